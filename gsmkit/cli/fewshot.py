"""`gsmkit fewshot`: draw the fixed few-shot pool."""

from __future__ import annotations

import json

import typer

from gsmkit.cli.options import JsonOpt, command_from
from gsmkit.data.fewshot import FewshotSettings


@command_from(FewshotSettings)
def fewshot(settings: FewshotSettings, json_out: JsonOpt = False) -> None:
    """Draw a fixed, seeded few-shot pool from GSM8K train; training removes it from its data by content hash.

    The same data and seed always give a byte-identical file, whatever the source format or row order.
    Writes OUT and OUT.manifest.json (both replaced).

    Example: gsmkit fewshot --data ../shared/data/gsm8k --out pool.jsonl
    """
    from gsmkit.data.fewshot import make_pool
    from gsmkit.progress import stderr_console

    summary = make_pool(settings)
    if json_out:
        typer.echo(json.dumps({k: summary[k] for k in ("out", "n", "seed", "source_rows", "ids")}))
    else:
        stderr_console().print(f"wrote {summary['n']} exemplars (seed {summary['seed']}, from "
                               f"{summary['source_rows']} {summary['split']} problems) to {summary['out']}")
