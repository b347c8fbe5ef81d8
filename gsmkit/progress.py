"""Rich progress bars with rate and ETA, written to stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, with the task's unit (`problems/s`, `rows/s`)."""

    def render(self, task) -> Text:
        # Average over the whole run, not rich's windowed estimate: rows often finish in bursts (one
        # decode step ends several), and a burst over microseconds makes the windowed rate absurd.
        # `resumed` is the count already done when the task began (a resumed run), so it is not counted.
        unit = task.fields.get("unit", "it")
        elapsed = task.elapsed
        done = task.completed - task.fields.get("resumed", 0)
        if not elapsed or done <= 0:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{done / elapsed:.2f} {unit}/s", style="progress.data.speed")


def stderr_console() -> Console:
    return Console(stderr=True)


def make_progress(console: Console | None = None, disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or stderr_console(),
        disable=disable,
        transient=False,
    )


class ProgressTask:
    """One progress bar that is drawn only once the work reports its size.

    Commands open it around a library call and hand its methods over as callbacks; if the call fails
    before `start` (bad input, say), nothing is drawn and no blank line is left behind.
    """

    def __init__(self, description: str, unit: str, console: Console | None = None, disable: bool = False,
                 done_noun: str | None = None):
        self.description = description
        self.unit = unit
        self.done_noun = done_noun or unit  # "resuming: 3 of 6 <done_noun> already done"
        self.console = console
        self.progress = make_progress(console, disable=disable)
        self.task = None

    def start(self, total: int, completed: int = 0) -> None:
        """Draw the bar; a run that resumes (`completed` > 0) says so first, on the same console."""
        if completed and self.console is not None:
            self.console.print(f"resuming: {completed} of {total} {self.done_noun} already done",
                               highlight=False)
        # `resumed` = work already done when this run began, left out of the rate. (Not `start`: that
        # keyword of add_task decides whether the task's clock runs at all.)
        self.task = self.progress.add_task(self.description, total=total, completed=completed, unit=self.unit,
                                           resumed=completed)
        self.progress.start()

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(self, completed: int, total: int | None = None, description: str | None = None) -> None:
        """Set the position; the bar starts on the first call if `start` was never called."""
        if self.task is None:
            self.start(total or 0)
        self.progress.update(self.task, completed=completed, total=total,
                             description=description or self.description)

    def close(self) -> None:
        """Stop drawing (rich draws one live bar at a time: a stage's bar closes before the next starts)."""
        if self.task is not None:
            self.progress.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def status_step(description: str, done: str | None = None, console: Console | None = None) -> Iterator[None]:
    """One step of work that has no count to report (loading a model): a spinner with `description` while it
    runs (on a terminal), then one line, `done` (or `description`) and the seconds it took. If the work
    fails, nothing stays behind.

    Inside another live display (a command's stage bar already says what is happening) it draws nothing:
    rich draws one live display per terminal, and that one is redirecting stderr.
    """
    from rich.file_proxy import FileProxy

    if isinstance(sys.stderr, FileProxy):
        yield
        return
    console = console or stderr_console()
    t0 = time.perf_counter()
    with console.status(description, spinner="dots"):
        yield
    seconds = time.perf_counter() - t0
    console.print(f"{done or description} in {seconds:.1f}s", highlight=False, soft_wrap=True)
