"""`gsmkit convert-benchmarks`: turn public benchmarks into `eval ppl` rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import JsonOpt, SeedOpt, usage_errors

_ALL = "drop,gpqa,humaneval,math,math500,mmlu,mgsm,gsm8k"


def convert_benchmarks(
    input_dir: Annotated[Path, typer.Option("--input-dir", help="Folder with one subfolder per benchmark (DIR/mmlu, DIR/humaneval, ...).",
                                            exists=True, file_okay=False, dir_okay=True, show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write ({prompt, response, metadata} rows).",
                                      dir_okay=False, show_default=False)],
    benchmarks: Annotated[str, typer.Option("--benchmarks", help="Comma-separated benchmarks to convert.")] = _ALL,
    samples: Annotated[int, typer.Option("--samples-per-benchmark", help="Examples per benchmark, stratified by difficulty; -1 for all.")] = 100,
    seed: SeedOpt = 42,
    exclude: Annotated[list[Path] | None, typer.Option("--exclude", help="Training JSONL (question / prompt / messages); matching examples are dropped before sampling. Repeatable.",
                                                      exists=True, dir_okay=False, show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert DROP, GPQA, HumanEval, MATH, MATH-500, MMLU, MGSM and GSM8K into one seeded, stratified sample for `eval ppl`.

    A missing or empty benchmark folder is reported and skipped. The same files and seed give a byte-identical output.

    Example: gsmkit convert-benchmarks --input-dir ../shared/data/benchmarks --out bench.jsonl --samples-per-benchmark 100
    """
    from gsmkit.data.benchmarks import ConvertSettings
    from gsmkit.data.benchmarks import convert_benchmarks as run_conversion
    from gsmkit.jsonl import write_json
    from gsmkit.manifest import build_manifest
    from gsmkit.progress import make_progress, stderr_console

    with usage_errors():
        settings = ConvertSettings(input_dir=input_dir, out=out, benchmarks=tuple(benchmarks.split(",")),
                                   samples_per_benchmark=samples, seed=seed, exclude=tuple(exclude or ()))
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
    inputs = {k: Path(v) for k, v in summary.pop("inputs").items()}
    inputs.update({f"exclude[{i}]": p for i, p in enumerate(settings.exclude)})
    write_json(out.with_suffix(out.suffix + ".manifest.json"),
               build_manifest("convert-benchmarks", settings, inputs=inputs, seeds={"seed": seed},
                              extra={"summary": summary}))
    for line in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    if json_out:
        typer.echo(json.dumps(summary))
        return
    from rich.table import Table

    table = Table(title=f"{summary['written']} rows written to {out}")
    for col in ("source", "difficulty", "domain", "n"):
        table.add_column(col, justify="right" if col == "n" else "left")
    for row in summary["table"]:
        table.add_row(row["source"], row["difficulty"], row["domain"], str(row["n"]))
    console.print(table)
    dropped = {k: v for k, v in summary["excluded"].items() if v}
    if settings.exclude:
        console.print(f"decontamination dropped: {dropped or 'none'}", highlight=False)
