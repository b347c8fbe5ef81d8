"""`gsmkit fewshot`: draw the fixed few-shot pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import DataOpt, JsonOpt, SeedOpt, SplitOpt


def fewshot(
    out: Annotated[Path, typer.Option("--out", "-o", help="Pool file to write (JSONL).", dir_okay=False)] = Path("fewshot_pool.jsonl"),
    data: DataOpt = "openai/gsm8k",
    split: SplitOpt = "train",
    n: Annotated[int, typer.Option("--n", help="Number of examples in the pool.", min=1)] = 8,
    seed: SeedOpt = 42,
    json_out: JsonOpt = False,
) -> None:
    """Draw a fixed, seeded few-shot pool from GSM8K train; training removes it from its data by content hash.

    The same data and seed always give a byte-identical file, whatever the source format or row order.

    Example: gsmkit fewshot --data ../shared/data/gsm8k --out pool.jsonl
    """
    from gsmkit.data.fewshot import draw_pool, write_pool
    from gsmkit.data.gsm8k import load_gsm8k
    from gsmkit.manifest import build_manifest
    from gsmkit.progress import stderr_console

    problems = load_gsm8k(data, split)
    pool = draw_pool(problems, n=n, seed=seed)
    write_pool(out, pool)
    from gsmkit.data.gsm8k import resolve_split_files
    from gsmkit.jsonl import write_json

    files = resolve_split_files(data, split)
    manifest = build_manifest("fewshot", {"data": data, "split": split, "n": n, "seed": seed, "out": str(out)},
                              inputs={"data": files[0] if files else data}, seeds={"seed": seed})
    write_json(out.with_suffix(out.suffix + ".manifest.json"), manifest)
    summary = {"out": str(out), "n": len(pool), "seed": seed, "source_rows": len(problems),
               "ids": [ex.id for ex in pool]}
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        stderr_console().print(f"wrote {len(pool)} exemplars (seed {seed}, from {len(problems)} {split} problems) to {out}")
