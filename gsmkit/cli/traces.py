"""`gsmkit generate-traces`: sampled reasoning traces, the first correct of up to K attempts per problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import (
    AdapterOpt,
    DeviceOpt,
    DTypeOpt,
    JsonOpt,
    KOpt,
    Load4bitOpt,
    ModelOpt,
    PoolOpt,
    SeedOpt,
    StyleOpt,
    usage_errors,
)


def parse_data(data: str, split: str | None) -> tuple[str, str]:
    """`gsm8k:train` / `gsm8k:test` name the Hub dataset's split; anything else is a GSM8K source."""
    if data.startswith("gsm8k:"):
        named = data.split(":", 1)[1]
        if split is not None and split != named:
            raise typer.BadParameter(f"--data {data} names split '{named}', and --split says '{split}'")
        return "openai/gsm8k", named
    return data, split or "train"


def generate_traces(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Traces file to write (JSONL); stats go to <stem>.stats.json.",
                                      dir_okay=False)] = Path("traces.jsonl"),
    adapter: AdapterOpt = None,
    data: Annotated[str, typer.Option("--data", help="gsm8k:train | gsm8k:test (the Hub dataset), or a GSM8K source: "
                                      "a Hub id or a local .jsonl/.json/.parquet file or folder.")] = "gsm8k:train",
    split: Annotated[str | None, typer.Option("--split", help="Split of a GSM8K source. [default: train]",
                                              show_default=False)] = None,
    offset: Annotated[int, typer.Option("--offset", help="Skip this many problems first.", min=0)] = 0,
    num_samples: Annotated[int | None, typer.Option("--num-samples", help="Problems to trace (after --offset; "
                                                    "default: the whole split).", min=1, show_default=False)] = None,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Sampled attempts per problem before falling "
                                              "back to the gold solution (K).", min=1)] = 5,
    all_attempts: Annotated[bool, typer.Option("--all-attempts", help="Sample all K attempts even after a correct "
                                               "one (slower; unbiased pass@k over K samples).")] = False,
    keep_attempts: Annotated[bool, typer.Option("--keep-attempts", help="Also write every counted attempt "
                                                "(text, answer, correct) in each row.")] = False,
    pool: PoolOpt = None,
    k: KOpt = 0,
    style: StyleOpt = "auto",
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="System prompt (chat) or preamble (plain).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.", min=0.0)] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep only the k likeliest tokens (0 = off).", min=0)] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generation budget per attempt.", min=1)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Attempts generated together.", min=1)] = 16,
    seed: SeedOpt = 0,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache", help="Encode the shared few-shot prefix once.")] = True,
    backend: Annotated[str, typer.Option("--backend", help="hf (transformers) or vllm (needs vllm and a GPU).")] = "hf",
    dtype: DTypeOpt = "auto",
    load_in_4bit: Load4bitOpt = False,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard finished or partial traces at --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Sample up to K attempts per problem; keep the first correct one, else the gold solution.

    Each row: id, question, answer (the kept solution, ending in its answer), source (model | fallback),
    attempts, gold. Stats (success rate, attempts, pass@k for k = 1..K, throughput) go to
    <stem>.stats.json. Interrupted runs resume: rerun the same command. The file feeds
    `gsmkit train sft --data traces.jsonl`.

    Example: gsmkit generate-traces --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --num-samples 32 --max-attempts 5 --pool pool.jsonl --k 3 --out traces.jsonl
    """
    from gsmkit.modeling import ModelSpec
    from gsmkit.progress import ProgressTask, stderr_console
    from gsmkit.traces import TraceSettings
    from gsmkit.traces import generate_traces as run

    source, split_name = parse_data(data, split)
    with usage_errors():
        settings = TraceSettings(
            model=ModelSpec(model=model, adapter=str(adapter) if adapter else None, dtype=dtype,
                            load_in_4bit=load_in_4bit, device=device),
            out=out, data=source, split=split_name, offset=offset, num_samples=num_samples, max_attempts=max_attempts,
            pool=pool, k=k, style=style, system_prompt=system_prompt, temperature=temperature, top_p=top_p,
            top_k=top_k, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
            keep_attempts=keep_attempts, all_attempts=all_attempts, prefix_cache=prefix_cache, backend=backend,
            overwrite=overwrite,
        )
    console = stderr_console()
    with ProgressTask("generate-traces", "problems", console) as bar:
        stats = run(settings, on_start=bar.start, on_progress=bar.advance)
    if json_out:
        typer.echo(json.dumps({"out": str(out), "stats": str(settings.stats_file), **stats.to_dict()}))
        return
    from rich.table import Table

    table = Table(title=f"Traces ({stats.total_samples} problems, up to {stats.max_attempts} attempts)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("solved by the model", f"{stats.successes} ({stats.success_rate:.1%}, 95% CI "
                  "{:.1%}-{:.1%})".format(*stats.success_rate_ci95))
    table.add_row("gold fallback", str(stats.fallback_count))
    avg = stats.avg_attempts_for_successes
    table.add_row("attempts per success", f"{avg:.2f}" if avg is not None else "-")
    table.add_row("attempts per problem", f"{stats.avg_attempts_overall:.2f}")
    for kk, v in stats.pass_at_k.items():
        table.add_row(f"pass@{kk}", f"{v:.1%}")
    console.print(table)
    console.print(f"{stats.attempts_this_run} attempts in {stats.generation_s:.1f}s: {stats.attempts_per_s:.2f} attempts/s, "
                  f"{stats.tokens_per_s:.1f} tokens/s; traces in {out}, stats in {settings.stats_file}", highlight=False)
