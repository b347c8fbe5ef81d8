"""Progress bars: the rate is an average over the run that leaves resumed work out, and the clock runs."""

from __future__ import annotations

import io
import time

from rich.console import Console

from gsmkit.progress import ProgressTask, RateColumn


def test_rate_counts_only_this_runs_work_and_the_clock_runs():
    console = Console(file=io.StringIO(), force_terminal=False)
    with ProgressTask("eval", "problems", console) as bar:
        bar.start(total=10, completed=4)  # 4 done by an earlier, interrupted run
        time.sleep(0.05)
        bar.advance(2)
        task = bar.progress.tasks[0]
        assert task.elapsed is not None and task.elapsed > 0
        rate = float(RateColumn().render(task).plain.split()[0])
    assert 0 < rate <= 2 / 0.05


def test_nothing_is_drawn_when_the_work_never_starts():
    out = io.StringIO()
    try:
        with ProgressTask("eval", "problems", Console(file=out, force_terminal=True)):
            raise ValueError("bad input")
    except ValueError:
        pass
    assert out.getvalue() == ""
