"""Rich progress bars with rate and ETA, written to stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

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
        # `start` is the count already done when the task began (a resumed run), so it is not counted.
        unit = task.fields.get("unit", "it")
        elapsed = task.elapsed
        done = task.completed - task.fields.get("start", 0)
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
