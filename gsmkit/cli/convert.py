"""`gsmkit convert-benchmarks`: turn public benchmarks into `eval ppl` rows."""

from __future__ import annotations

import json

import typer

from gsmkit.cli.options import JsonOpt, command_from
from gsmkit.data.benchmarks import ConvertSettings


@command_from(ConvertSettings)
def convert_benchmarks(settings: ConvertSettings, json_out: JsonOpt = False) -> None:
    """Convert DROP, GPQA, HumanEval, MATH, MATH-500, MMLU, MGSM and GSM8K into one seeded, stratified sample
    for `eval ppl`.

    A missing or empty benchmark folder is reported and skipped. The same files and seed give a
    byte-identical output. Writes OUT and OUT.manifest.json (both replaced).

    Example: gsmkit convert-benchmarks --input-dir ../shared/data/benchmarks --out bench.jsonl
    --samples-per-benchmark 100
    """
    from gsmkit.data.benchmarks import convert_benchmarks as run_conversion
    from gsmkit.progress import make_progress, stderr_console

    console = stderr_console()
    stages = ("read", "decontaminated", "sampled")
    with make_progress(console) as progress:
        tasks: dict[str, int] = {}

        def on_progress(name: str, stage: str, count: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=len(stages), unit="stages")
            if stage in ("missing", "read") and count == 0:
                progress.update(tasks[name], completed=len(stages), description=f"{name} (skipped)")
            else:
                progress.update(tasks[name], advance=1, description=f"{name}: {stage} {count}")

        summary = run_conversion(settings, on_progress=on_progress)
    for line in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    if json_out:
        typer.echo(json.dumps(summary))
        return
    from rich.table import Table

    table = Table(title=f"{summary['written']} rows written to {settings.out}")
    for col in ("source", "difficulty", "domain", "n"):
        table.add_column(col, justify="right" if col == "n" else "left")
    for row in summary["table"]:
        table.add_row(row["source"], row["difficulty"], row["domain"], str(row["n"]))
    console.print(table)
    dropped = {k: v for k, v in summary["excluded"].items() if v}
    if settings.exclude:
        console.print(f"decontamination dropped: {dropped or 'none'}", highlight=False)
