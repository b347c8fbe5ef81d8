"""`gsmkit eval ...`: evaluation commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import (
    AdapterOpt,
    DataOpt,
    DeviceOpt,
    DTypeOpt,
    JsonOpt,
    KOpt,
    Load4bitOpt,
    ModelOpt,
    OutDirOpt,
    PoolOpt,
    SeedOpt,
    SplitOpt,
    StyleOpt,
    usage_errors,
)

app = typer.Typer(help="Evaluate a model (+ adapter): GSM8K accuracy, perplexity.", no_args_is_help=True)


@app.command("gsm8k")
def gsm8k(
    model: ModelOpt,
    out: OutDirOpt = Path("runs/eval-gsm8k"),
    adapter: AdapterOpt = None,
    data: DataOpt = "openai/gsm8k",
    split: SplitOpt = "test",
    offset: Annotated[int, typer.Option("--offset", help="Skip this many problems first.", min=0)] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate at most this many problems.", min=1)] = None,
    pool: PoolOpt = None,
    k: KOpt = 0,
    style: StyleOpt = "auto",
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="System prompt (chat) or preamble (plain).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generation budget per problem.", min=1)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows generated together.", min=1)] = 16,
    do_sample: Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (with --do-sample).")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --do-sample).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep only the k likeliest tokens (0 = off).", min=0)] = 0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Extra stop string (repeatable).")] = None,
    seed: SeedOpt = 0,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache", help="Encode the shared few-shot prefix once.")] = True,
    backend: Annotated[str, typer.Option("--backend", help="hf (transformers) or vllm (needs vllm and a GPU).")] = "hf",
    dtype: DTypeOpt = "auto",
    load_in_4bit: Load4bitOpt = False,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard finished or partial results in --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """GSM8K exact-match accuracy (strict `#### n` and flexible last-number), with a 95% Wilson interval.

    With --style tags, strict reads the last `<SOLUTION>n</SOLUTION>`, and the summary adds the share of
    outputs with a reasoning section and with an extractable answer.

    Writes OUT/predictions.jsonl, OUT/metrics.json and OUT/manifest.json. Interrupted runs resume:
    rerun the same command.

    Example: gsmkit eval gsm8k --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --limit 20 --pool pool.jsonl --k 5 --style plain --out runs/eval
    """
    from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
    from gsmkit.modeling import ModelSpec
    from gsmkit.progress import ProgressTask, stderr_console

    with usage_errors():
        settings = EvalSettings(
            model=ModelSpec(model=model, adapter=str(adapter) if adapter else None, dtype=dtype,
                            load_in_4bit=load_in_4bit, device=device),
            out=out, data=data, split=split, offset=offset, limit=limit, pool=pool, k=k, style=style,
            system_prompt=system_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()),
            prefix_cache=prefix_cache, backend=backend, overwrite=overwrite,
        )
    console = stderr_console()
    with ProgressTask("eval gsm8k", "problems", console) as bar:

        def on_start(total: int, done: int) -> None:
            if done:
                console.print(f"resuming: {done} of {total} problems already done")
            bar.start(total, done)

        metrics = evaluate_gsm8k(settings, on_start=on_start, on_progress=bar.advance)
    if json_out:
        typer.echo(json.dumps({"out": str(out), **metrics.to_dict()}))
        return
    from rich.table import Table

    table = Table(title=f"GSM8K ({metrics.n} problems, {metrics.k}-shot, {metrics.style})")
    table.add_column("metric")
    table.add_column("strict", justify="right")
    table.add_column("flexible", justify="right")
    table.add_row("accuracy", f"{metrics.accuracy_strict:.1%}", f"{metrics.accuracy_flexible:.1%}")
    table.add_row("95% CI", "{:.1%}-{:.1%}".format(*metrics.ci95_strict), "{:.1%}-{:.1%}".format(*metrics.ci95_flexible))
    table.add_row("no answer", f"{metrics.no_answer_strict:.1%}", f"{metrics.no_answer_flexible:.1%}")
    console.print(table)
    if metrics.with_reasoning_section is not None:
        console.print(f"reasoning-tags format: {metrics.with_reasoning_section:.1%} with a reasoning section, "
                      f"{metrics.extractable:.1%} with a <SOLUTION> answer (the strict column)")
    console.print(
        f"{metrics.generated_this_run} generated in {metrics.generation_s:.1f}s: {metrics.problems_per_s:.2f} problems/s, "
        f"{metrics.tokens_per_s:.1f} tokens/s; truncated at --max-new-tokens: {metrics.truncated:.1%}; results in {out}"
    )


@app.command("ppl")
def ppl(
    model: ModelOpt,
    data: Annotated[Path, typer.Option("--data", help="JSONL of {prompt, response} (loss on the response only) or "
                                       "{text} (loss on every token after the first) rows, optional metadata.",
                                       dir_okay=False, show_default=False)],
    out: OutDirOpt = Path("runs/eval-ppl"),
    adapter: AdapterOpt = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Window in tokens; longer texts are scored with a sliding window, never truncated "
        "(default: the model's max_position_embeddings, at most 4096).", show_default=False)] = None,
    stride: Annotated[int | None, typer.Option(
        "--stride", help="Tokens between window starts; each token keeps at least window - stride tokens of "
        "context (default: half the window).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences scored together (length-sorted).")] = 8,
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N rows.", show_default=False)] = None,
    dtype: DTypeOpt = "auto",
    load_in_4bit: Load4bitOpt = False,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier evaluation in --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Token-weighted loss and perplexity, overall and per metadata source / difficulty / domain.

    Writes OUT/items.jsonl (one row per item), OUT/metrics.json and OUT/manifest.json.

    Example: gsmkit eval ppl --model HuggingFaceTB/SmolLM2-135M-Instruct --data benchmarks.jsonl
    --limit 100 --out runs/ppl
    """
    from gsmkit.evaluation.perplexity import EvalPplSettings, evaluate_ppl
    from gsmkit.modeling import ModelSpec
    from gsmkit.progress import ProgressTask, stderr_console

    with usage_errors():
        settings = EvalPplSettings(
            model=ModelSpec(model=model, adapter=str(adapter) if adapter else None, dtype=dtype,
                            load_in_4bit=load_in_4bit, device=device),
            data=data, out=out, max_length=max_length, stride=stride, batch_size=batch_size, limit=limit,
            overwrite=overwrite,
        )
    console = stderr_console()
    with ProgressTask("eval ppl", "windows", console) as bar:
        metrics = evaluate_ppl(settings, on_progress=lambda done, total: bar.update(done, total))
    if json_out:
        from gsmkit.manifest import to_jsonable

        typer.echo(json.dumps(to_jsonable({"out": str(out), **metrics.to_dict()})))
        return
    from rich.table import Table

    table = Table(title=f"Perplexity ({metrics.n} items, {metrics.tokens} scored tokens)")
    for name, justify in (("group", "left"), ("value", "left"), ("n", "right"), ("tokens", "right"),
                          ("loss", "right"), ("ppl", "right")):
        table.add_column(name, justify=justify)
    table.add_row("overall", "", str(metrics.n), str(metrics.tokens), f"{metrics.loss:.4f}", f"{metrics.ppl:.3f}")
    for name, by_value in metrics.groups.items():
        for value, g in by_value.items():
            table.add_row(name, value, str(g.n), str(g.tokens), f"{g.loss:.4f}", f"{g.ppl:.3f}")
    console.print(table)
    console.print(
        f"window {metrics.max_length} tokens, stride {metrics.stride}: {metrics.windows} windows, "
        f"{metrics.items_over_window} items longer than the window; {metrics.tokens_per_s:.1f} tokens/s; "
        f"results in {out}", highlight=False,
    )
