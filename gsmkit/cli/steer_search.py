"""`gsmkit steer search`: an Optuna study of the steering layer and strength, then one test evaluation."""

from __future__ import annotations

import json
from typing import Any

import typer

from gsmkit.cli.options import JsonOpt, command_from
from gsmkit.steer.search import SearchProgress
from gsmkit.steer.search_settings import SearchSettings


class _Bars(SearchProgress):
    """Two bars in one rich display (rich draws one live display at a time): trials, and the problems of
    the pass that runs now (the zero check, a trial, a test evaluation)."""

    def __init__(self, console: Any):
        from gsmkit.progress import ProgressTask

        self.bar = ProgressTask("steer search: trials", "trials", console)
        self.task = None

    def trials(self, total: int, done: int) -> None:
        self.bar.start(total, done)

    def trial_done(self, done: int, row: dict[str, Any]) -> None:  # noqa: ARG002 - the bar shows counts only
        self.bar.update(done)

    def problems(self, label: str, total: int, done: int = 0) -> None:
        progress = self.bar.progress
        if self.task is None:
            self.task = progress.add_task(label, total=total, completed=done, unit="problems", resumed=done)
            progress.start()
        else:
            progress.reset(self.task, total=total, completed=done, description=label, unit="problems",
                           resumed=done)

    def problem(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.progress.advance(self.task, n)


def _ci(r: dict[str, Any] | None, key: str = "accuracy") -> tuple[str, str, str]:
    if not r:
        return "-", "-", "-"
    lo, hi = r["ci95"]
    return f"{r[key]:.1%}", f"{lo:.1%}-{hi:.1%}", str(r["n"])


@command_from(SearchSettings)
def search(settings: SearchSettings, json_out: JsonOpt = False) -> None:
    """Tune the steering layer and strength on validation problems (Optuna), then evaluate the best setting
    and the unsteered model once on test problems.

    Each trial picks a method (with several --vectors), a layer and alpha, steers one engine built for the
    whole search, and runs the validation problems in --chunk-size chunks; the running accuracy is reported
    after each chunk and a median pruner stops weak trials (--objective accuracy+safety adds the safety rate
    as a second objective: a Pareto front, no pruning). Before the first trial the hooks at alpha = 0 must
    reproduce the unsteered outputs on every validation problem. Validation problems come from the train
    split, test problems from the test split; vector problems and few-shot exemplars are in neither, and
    OUT/splits.json records all four sets.

    Resumable: the study lives in --storage (default OUT/study.db); rerunning the same command continues
    it, and a killed search loses at most the trial that was running. Several processes or machines can
    work on one study: give each the same --storage URL (a database they all reach, e.g.
    postgresql://host/db; one sqlite file serves processes on one machine), the same --study-name and
    options, and its own --out. The study stops at exactly --n-trials COMPLETE or PRUNED trials; a trial
    whose process died is marked FAIL once its heartbeat is --heartbeat x 2 seconds old, and never counts.

    Writes OUT/trials.csv, OUT/best.json (pass it to `eval gsm8k --steer OUT/best.json`),
    OUT/accuracy_vs_alpha.png, OUT/splits.json, OUT/search.json, OUT/manifest.json, and the evaluations
    OUT/test-best and OUT/test-unsteered.

    Example: gsmkit steer search --vectors runs/steer-caa --model HuggingFaceTB/SmolLM2-135M-Instruct
    --data ../shared/data/gsm8k --val-limit 32 --test-limit 64 --n-trials 20 --layers all
    --alpha-range 0 8 --out runs/steer-search
    """
    from gsmkit.progress import stderr_console
    from gsmkit.steer.search import run_search

    console = stderr_console()
    bars = _Bars(console)
    try:
        summary = run_search(settings, bars)
    finally:
        bars.bar.close()
    if json_out:
        from gsmkit.manifest import to_jsonable

        typer.echo(json.dumps(to_jsonable({"out": str(settings.out), **summary})))
        return
    _print_summary(console, summary, settings)


def _print_summary(console: Any, summary: dict[str, Any], settings: SearchSettings) -> None:
    from rich.table import Table

    study, best, test, val = summary["study"], summary["best"], summary["test"], summary["validation"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(study["states"].items()))
    setting = f"{best['method']} layer {best['steer_layer']}, alpha {best['steer_alpha']:.3g}"
    table = Table(title=f"Steering search: {study['finished']} trials ({states}); best trial "
                        f"{best['trial']}: {setting}")
    for name, justify in (("", "left"), ("accuracy", "right"), ("95% CI", "right"), ("n", "right")):
        table.add_column(name, justify=justify)
    table.add_row("validation, unsteered", *_ci(val["unsteered"]))
    table.add_row("validation, best", *_ci(best["validation"]))
    table.add_section()
    table.add_row("test, unsteered", *_ci(test["unsteered"]))
    table.add_row("test, best", *_ci(test["best"]))
    console.print(table)
    if summary["pareto_front"]:
        front = Table(title="Pareto front (validation accuracy, safety rate)")
        for name in ("trial", "method", "layer", "alpha", "accuracy", "95% CI", "safety", "95% CI", "n"):
            front.add_column(name, justify="right")
        for t in summary["pareto_front"]:
            acc, ci, _ = _ci(t["validation"])
            safe, safe_ci, n = _ci(t["safety"], "safety_rate")
            front.add_row(str(t["trial"]), t["method"], str(t["layer"]), f"{t['alpha']:.3g}", acc, ci, safe,
                          safe_ci, n)
        console.print(front)
    changed = test["answers_changed"]["n"]
    console.print(f"test answers changed by steering: {changed} of {test['n']} ("
                  f"{test['became_correct']['n']} became correct, {test['became_wrong']['n']} became wrong); "
                  f"{study['trials_this_run']} trials run here in {summary['wall_s']:.1f}s; results in "
                  f"{settings.out}", highlight=False)
    console.print(f"use it: gsmkit eval gsm8k --steer {settings.out / 'best.json'} ...", highlight=False)
