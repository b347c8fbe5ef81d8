"""`gsmkit report`: summarise and check gsmkit runs (training runs with their evaluations joined, evaluated
models) into summary.csv, report.md, report.json and figures; thresholds as exit code 3."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gsmkit.cli.options import JsonOpt, command_from, usage_errors
from gsmkit.errors import THRESHOLD_MISSED_EXIT
from gsmkit.studies.report import ReportSettings

RunsArg = Annotated[list[str], typer.Argument(
    help="gsmkit output folders, folders above them or globs (quote them to let gsmkit expand **).",
    show_default=False)]


@command_from(ReportSettings)
def report(settings: ReportSettings, runs: RunsArg, json_out: JsonOpt = False) -> None:
    """Join every evaluation to the training run whose adapter (or checkpoint) it used, by sha256.

    One row per training run and one per evaluated model no training run made: method, preset,
    hyperparameters, training rows, seed, GSM8K strict and flexible accuracy, safety rate (each with n and
    its 95% interval), perplexity, the chosen checkpoint. Unfinished or unknown folders are listed and
    skipped. --require and --baseline check every row (exit 3 when one misses); --group-by aggregates
    replicates (mean, sd, 95% t-interval).

    Example: gsmkit report runs/ --baseline auto --out runs/report
    """
    from rich.table import Table

    from gsmkit.errors import DataError
    from gsmkit.manifest import build_manifest
    from gsmkit.progress import stderr_console
    from gsmkit.run_folder import check_output
    from gsmkit.studies.report import check_rows, group_rows, summarize
    from gsmkit.studies.report_files import write_report
    from gsmkit.studies.runs import find_runs

    console = stderr_console()
    check_output(settings.out, folder=True, inputs=runs, what="report")  # writable, and none of the runs
    found, skipped = find_runs(runs)  # every run file is read and checked here, before anything is written
    check_output(settings.out, folder=True, inputs=[r.path for r in found], what="report")
    if not found:
        why = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise DataError(f"no finished gsmkit runs in {' '.join(runs)}" + (f" ({why})" if why else ""),
                        hint="name train or eval output folders (or a folder above them)")
    rows = summarize(found, settings.sweep_order)
    checks = check_rows(rows, settings.requirements, settings.baseline)
    with usage_errors():  # a --group-by field no run has is a misused option
        groups = group_rows(rows, settings.group_by) if settings.group_by else []
    missed = [c for c in checks if not c.passed]
    summary = {"out": str(settings.out), "rows": [r.values for r in rows],
               "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped],
               "checks": [c.__dict__ for c in checks], "groups": groups,
               "passed": not missed if checks else None}
    manifest = build_manifest("report", settings, inputs={}, extra={"runs": [str(r.path) for r in found]})
    figures = write_report(settings.out, rows, checks, groups, skipped, manifest, settings.plot_x,
                           settings.series, summary)
    for note in (note for run in found for note in run.notes):  # on stderr, with --json too
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if json_out:
        typer.echo(json.dumps({**summary, "figures": figures}, default=str))
    else:
        table = Table(title=f"{len(rows)} rows from {len(found)} runs")
        for col in ("run", "method", "preset", "checkpoint", "GSM8K strict [95% CI] n", "safety [95% CI] n",
                    "ppl"):
            table.add_column(col)
        for r in rows:
            v = r.values
            table.add_row(str(v["run"]), str(v["method"]), str(v["preset"] or "-"),
                          str(v["chosen_checkpoint"] or "-"), _ci(v, "gsm8k_strict", "gsm8k_n"),
                          _ci(v, "safety", "safety_n"), "-" if v["ppl"] is None else f"{v['ppl']:.4f}")
        console.print(table)
        for s in skipped:
            console.print(f"skipped {s.path}: {s.reason}", highlight=False, markup=False, soft_wrap=True)
        console.print(f"report in {settings.out}", highlight=False, markup=False)
    if missed:
        table = Table(title=f"{len(missed)} of {len(checks)} threshold checks missed")
        for col in ("run", "requirement", "value"):
            table.add_column(col)
        for c in missed:
            table.add_row(c.run, c.requirement, "missing" if c.value is None else f"{c.value:.4g}")
        console.print(table)
        raise typer.Exit(THRESHOLD_MISSED_EXIT)


def _ci(v: dict, column: str, n_column: str) -> str:
    if v.get(column) is None:
        return "-"
    return f"{v[column]:.3f} [{v[column + '_lo']:.3f}, {v[column + '_hi']:.3f}] n={v[n_column]}"
