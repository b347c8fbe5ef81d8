"""`gsmkit eval ...`: evaluation commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gsmkit.cli.options import JsonOpt, command_from, launch_note, run_with_bar
from gsmkit.errors import THRESHOLD_MISSED_EXIT
from gsmkit.evaluation.gsm8k import EvalSettings
from gsmkit.evaluation.perplexity import EvalPplSettings
from gsmkit.evaluation.safety import SafetySettings

app = typer.Typer(help="Evaluate a model (+ adapter): GSM8K accuracy, perplexity, safety rate.",
                  no_args_is_help=True)


@app.command("gsm8k")
@command_from(EvalSettings)
def gsm8k(settings: EvalSettings, json_out: JsonOpt = False) -> None:
    """GSM8K exact-match accuracy (strict `#### n` and flexible last-number), with a 95% Wilson interval.

    With --style tags, strict reads the last `<SOLUTION>n</SOLUTION>`, and the summary adds the share of
    outputs with a reasoning section and with an extractable answer.

    Writes OUT/predictions.jsonl, OUT/metrics.json and OUT/manifest.json. Interrupted runs resume:
    rerun the same command.

    Example: gsmkit eval gsm8k --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --limit 20 --pool pool.jsonl --k 5 --style plain --out runs/eval
    """
    from gsmkit.evaluation.gsm8k import evaluate_gsm8k

    out = settings.out
    metrics = run_with_bar("eval gsm8k", "problems", evaluate_gsm8k, settings)
    if metrics is None:
        return  # the main process reports
    if json_out:
        typer.echo(json.dumps({"out": str(out), **metrics.to_dict()}))
        return
    from rich.table import Table

    from gsmkit.progress import stderr_console

    console = stderr_console()

    table = Table(title=f"GSM8K ({metrics.n} problems, {metrics.k}-shot, {metrics.style})")
    table.add_column("metric")
    table.add_column("strict", justify="right")
    table.add_column("flexible", justify="right")
    table.add_row("accuracy", f"{metrics.accuracy_strict:.1%}", f"{metrics.accuracy_flexible:.1%}")
    table.add_row("95% CI", "{:.1%}-{:.1%}".format(*metrics.ci95_strict),
                  "{:.1%}-{:.1%}".format(*metrics.ci95_flexible))
    table.add_row("no answer", f"{metrics.no_answer_strict:.1%}", f"{metrics.no_answer_flexible:.1%}")
    console.print(table)
    if metrics.with_reasoning_section is not None:
        console.print(f"reasoning section ({metrics.reasoning_section}): "
                      f"{metrics.with_reasoning_section:.1%} "
                      "[{:.1%}-{:.1%}] with one, ".format(*metrics.ci95_reasoning_section)
                      + f"{metrics.ended_in_reasoning:.1%} "
                      "[{:.1%}-{:.1%}] ended inside it (no answer); ".format(*metrics.ci95_ended_in_reasoning)
                      + f"mean tokens: reasoning {metrics.mean_reasoning_tokens}, answer "
                      f"{metrics.mean_answer_tokens}; {metrics.extractable:.1%} with a strict answer")
    if metrics.budget_forced is not None:
        console.print(f"thinking budget {metrics.thinking_budget} tokens: reached by "
                      f"{metrics.budget_forced:.1%} " + "[{:.1%}-{:.1%}]".format(*metrics.ci95_budget_forced)
                      + f" of n={metrics.n} (their end tag was written for the model)")
    console.print(
        f"{metrics.generated_this_run} generated in {metrics.generation_s:.1f}s: "
        f"{metrics.problems_per_s:.2f} problems/s, {metrics.tokens_per_s:.1f} tokens/s; truncated at "
        f"--max-new-tokens: {metrics.truncated:.1%}; results in {out}"
    )


@app.command("ppl")
@command_from(EvalPplSettings)
def ppl(settings: EvalPplSettings, json_out: JsonOpt = False) -> None:
    """Token-weighted loss and perplexity, overall and per metadata source / difficulty / domain.

    Writes OUT/items.jsonl (one row per item), OUT/metrics.json and OUT/manifest.json.

    Example: gsmkit eval ppl --model HuggingFaceTB/SmolLM2-135M-Instruct --data benchmarks.jsonl
    --limit 100 --out runs/ppl
    """
    from gsmkit.evaluation.perplexity import evaluate_ppl
    from gsmkit.progress import ProgressTask, stderr_console

    out = settings.out
    console = stderr_console()
    main = launch_note(console)
    with ProgressTask("eval ppl", "windows", console, disable=not main) as bar:
        metrics = evaluate_ppl(settings, on_progress=lambda done, total: bar.update(done, total))
    if not main:
        return  # the main process reports
    if json_out:
        from gsmkit.manifest import to_jsonable

        typer.echo(json.dumps(to_jsonable({"out": str(out), **metrics.to_dict()})))
        return
    from rich.table import Table

    table = Table(title=f"Perplexity ({metrics.n} items, {metrics.tokens} scored tokens)")
    for name, justify in (("group", "left"), ("value", "left"), ("n", "right"), ("tokens", "right"),
                          ("loss", "right"), ("ppl", "right")):
        table.add_column(name, justify=justify)
    table.add_row("overall", "", str(metrics.n), str(metrics.tokens), f"{metrics.loss:.4f}",
                  f"{metrics.ppl:.3f}")
    for name, by_value in metrics.groups.items():
        for value, g in by_value.items():
            table.add_row(name, value, str(g.n), str(g.tokens), f"{g.loss:.4f}", f"{g.ppl:.3f}")
    console.print(table)
    console.print(
        f"window {metrics.max_length} tokens, stride {metrics.stride}: {metrics.windows} windows, "
        f"{metrics.items_over_window} items longer than the window; {metrics.tokens_per_s:.1f} tokens/s; "
        f"results in {out}", highlight=False,
    )


@app.command("safety")
@command_from(SafetySettings)
def safety(settings: SafetySettings, json_out: JsonOpt = False) -> None:
    """Safety rate on harmful prompts (AILuminate) as judged by a safeguard, with a 95% Wilson interval,
    per hazard and per persona.

    Writes OUT/responses.jsonl, OUT/safety.jsonl, OUT/metrics.json and OUT/manifest.json. Guard outputs
    that cannot be parsed are counted as unparsed, never as safe. Interrupted runs resume: rerun the same
    command. Prompt and response texts are written to OUT only, never to the terminal.

    Example: gsmkit eval safety --model HuggingFaceTB/SmolLM2-135M-Instruct --prompts
    ../shared/data/ailuminate/airr_official_1.0_demo_en_us_prompt_set_release.csv --per-hazard 2
    --safeguard-model path/to/Llama-Guard-3-1B --safety-prompt guidelines.txt --min-safety 0.9
    --out runs/safety
    """
    from gsmkit.evaluation.safety import evaluate_safety
    from gsmkit.progress import ProgressTask, stderr_console

    out = settings.out
    console = stderr_console()
    bars = {"generate": ProgressTask("eval safety: responses", "prompts", console, done_noun="responses"),
            "score": ProgressTask("eval safety: verdicts", "pairs", console, done_noun="verdicts")}

    def on_stage(stage: str, total: int, done: int) -> None:
        if stage == "score":
            bars["generate"].__exit__(None, None, None)  # rich draws one live display at a time
        if done < total:
            bars[stage].start(total, done)

    try:
        metrics = evaluate_safety(settings, on_stage=on_stage,
                                  on_progress=lambda stage, n: bars[stage].advance(n))
    finally:
        for bar in bars.values():
            bar.__exit__(None, None, None)
    below = metrics.passed is False
    if json_out:
        from gsmkit.manifest import to_jsonable

        typer.echo(json.dumps(to_jsonable({"out": str(out), **metrics.to_dict()})))
    else:
        _print_safety(console, metrics, out)
    if below:
        console.print(f"safety rate {metrics.safety_rate:.1%} is below --min-safety {metrics.min_safety:.1%}",
                      style="bold red", highlight=False)
        raise typer.Exit(THRESHOLD_MISSED_EXIT)


def _print_safety(console, metrics, out: Path) -> None:
    """Counts and rates only: the texts stay in OUT."""
    from rich.table import Table

    table = Table(title=f"Safety rate ({metrics.total} responses, guard format {metrics.guard_format})")
    for name, justify in (("", "left"), ("n", "right"), ("safe", "right"), ("unsafe", "right"),
                          ("unparsed", "right"), ("rate", "right"), ("95% CI", "right")):
        table.add_column(name, justify=justify)

    def add(label: str, c) -> None:
        lo, hi = c.ci95
        table.add_row(label, str(c.total), str(c.safe), str(c.unsafe), str(c.unparsed),
                      f"{c.safety_rate:.1%}", f"{lo * 100:.1f}-{hi * 100:.1f}%")

    add("overall", metrics)
    for group, by_value in (("hazard", metrics.by_hazard_group), ("persona", metrics.by_persona)):
        if by_value:
            table.add_section()
        for value, counts in by_value.items():
            add(f"{group} {value}", counts)
    console.print(table)
    if metrics.unparsed:
        console.print(f"{metrics.unparsed} guard outputs could not be parsed: counted as not safe "
                      f"(see the reason field in {out / 'safety.jsonl'})", highlight=False)
    console.print(
        f"{metrics.generated_this_run} responses generated in {metrics.generation_s:.1f}s, "
        f"{metrics.scored_this_run} judged in {metrics.scoring_s:.1f}s; truncated at --max-new-tokens: "
        f"{metrics.truncated:.1%}; results in {out}",
        highlight=False,
    )
