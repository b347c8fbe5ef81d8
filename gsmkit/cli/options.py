"""Shared option types, declared once and reused by every command (Typer checks paths before any model loads)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hugging Face model id, local model folder, or .gguf file.", show_default=False),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option("--adapter", help="PEFT adapter folder (adapter_config.json + weights) applied on top of --model.",
                 exists=True, file_okay=False, dir_okay=True, show_default=False),
]
DTypeOpt = Annotated[str, typer.Option("--dtype", help="Weights dtype: auto | float32 | bfloat16 | float16.")]
Load4bitOpt = Annotated[bool, typer.Option("--load-in-4bit", help="Load the base model in 4-bit nf4 with double quantization (bitsandbytes).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="GSM8K source: a Hub id (openai/gsm8k) or a local .jsonl/.json/.parquet file or folder."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split to read: train or test (file <split>.jsonl in a folder).")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.", file_okay=False, dir_okay=True)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
PoolOpt = Annotated[
    Path | None,
    typer.Option("--pool", help="Few-shot pool JSONL written by `gsmkit fewshot`.", exists=True, dir_okay=False,
                 show_default=False),
]
KOpt = Annotated[int, typer.Option("--k", help="Number of few-shot exemplars, taken in order from --pool.", min=0)]
StyleOpt = Annotated[
    str, typer.Option("--style", help="Prompt style: auto (chat if the tokenizer has a template) | chat | plain | tags (reasoning tags, <SOLUTION>n</SOLUTION>).")
]


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Contradictory options found while building settings are usage errors: exit code 2, not 1."""
    from gsmkit.errors import ConfigError

    try:
        yield
    except ConfigError as err:
        raise typer.BadParameter(err.message + (f" (hint: {err.hint})" if err.hint else "")) from None
