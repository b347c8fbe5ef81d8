"""`gsmkit bench`: certify LoRA variants against a probe adapter (one seed), or aggregate several seeds'
benches; a probe that misses --gate exits 3."""

from __future__ import annotations

import json

import typer

from gsmkit.cli.options import JsonOpt, command_from
from gsmkit.errors import THRESHOLD_MISSED_EXIT
from gsmkit.studies.bench import BenchSettings


@command_from(BenchSettings)
def bench(settings: BenchSettings, json_out: JsonOpt = False) -> None:
    """Judge variants against a probe on the same problems: a paired delta, McNemar p and a verdict.

    Per variant: accuracy of probe and variant (Wilson 95%), delta = variant - probe with its paired
    bootstrap 95% interval, exact McNemar p, and the verdict: safe when the interval's lower bound is >=
    -margin, unsafe otherwise, gate failed when the probe misses --gate (exit 3; with --gate and no
    variant, bench is a pipeline gate). Writes bench.json, bench.md and manifest.json.

    --aggregate reads several seeds' bench folders and recomputes every delta from their predictions: the
    mean over seeds, its hierarchical bootstrap interval (seeds, then problems), the t interval of the
    per-seed deltas, the verdict by the same rule (bench_aggregate.json, bench_aggregate.md). Problem sets
    that differ between the probe and a variant are refused (exit 1).

    Example: gsmkit bench --probe runs/s42/eval-probe --variant median=runs/s42/eval-median --margin 0.025
    --gate 'gsm8k.strict>=0.15' --out runs/s42/bench
    """
    from rich.table import Table

    from gsmkit.progress import stderr_console
    from gsmkit.studies.bench import aggregate_benches, run_bench
    from gsmkit.studies.bench_files import AGGREGATE_HEADERS, BENCH_HEADERS, aggregate_rows, bench_rows, count

    if settings.aggregate:
        result = aggregate_benches(settings)
        headers, rows = AGGREGATE_HEADERS, aggregate_rows(result)
        title = f"{count(len(result['variants']), 'variant')} over {count(len(result['benches']), 'seed')}"
    else:
        result = run_bench(settings)
        headers, rows = BENCH_HEADERS, bench_rows(result)
        title = f"{count(len(result['variants']), 'variant')} against {settings.probe}"
    if json_out:
        typer.echo(json.dumps({**result, "out": str(settings.out)}))
    else:
        console = stderr_console()
        gate = result.get("gate")
        if gate is not None:
            console.print(f"gate {gate['requirement']}: probe {gate['value']}, "
                          f"{'passed' if gate['passed'] else 'MISSED'}", highlight=False, markup=False)
        if rows:
            table = Table(title=f"{title} (metric {result['metric']}, margin {result['margin']:g})")
            for header in headers:
                table.add_column(header)
            for row in rows:
                table.add_row(*row)
            console.print(table)
        for note in result.get("notes", []):
            console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        console.print(f"bench in {settings.out}", highlight=False, markup=False)
    if not result["gate_passed"]:
        failed = [b["bench"] for b in result.get("benches", []) if not b["gate_passed"]]
        typer.echo("error: the probe missed the gate" + (f" in {', '.join(failed)}" if failed else "")
                   + ": every verdict is 'gate failed'", err=True)
        raise typer.Exit(THRESHOLD_MISSED_EXIT)
