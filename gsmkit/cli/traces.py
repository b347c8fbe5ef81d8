"""`gsmkit generate-traces`: sampled reasoning traces, the first correct of up to K attempts per problem."""

from __future__ import annotations

import json

import typer

from gsmkit.cli.options import JsonOpt, command_from, run_with_bar
from gsmkit.traces import TraceSettings


@command_from(TraceSettings)
def generate_traces(settings: TraceSettings, json_out: JsonOpt = False) -> None:
    """Sample up to K attempts per problem; keep the first correct one, else the gold solution.

    Each row: id, question, answer (the kept solution, ending in its answer), source (model | fallback),
    attempts, gold. Stats (success rate, attempts, pass@k for k = 1..K, throughput) go to
    <stem>.stats.json. Interrupted runs resume: rerun the same command. The file feeds
    `gsmkit train sft --data traces.jsonl`.

    Example: gsmkit generate-traces --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --num-samples 32 --max-attempts 5 --pool pool.jsonl --k 3 --out traces.jsonl
    """
    from gsmkit.traces import STATS, generate_traces, run_output

    out = settings.out
    stats_file = run_output(settings).path(STATS)
    stats = run_with_bar("generate-traces", "problems", generate_traces, settings)
    if stats is None:
        return  # the main process reports
    if json_out:
        typer.echo(json.dumps({"out": str(out), "stats": str(stats_file), **stats.to_dict()}))
        return
    from rich.table import Table

    from gsmkit.progress import stderr_console

    console = stderr_console()

    table = Table(title=f"Traces ({stats.total_samples} problems, up to {stats.max_attempts} attempts)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("solved by the model", f"{stats.grpo_successes} ({stats.success_rate:.1%}, 95% CI "
                  "{:.1%}-{:.1%})".format(*stats.success_rate_ci95))
    table.add_row("gold fallback", str(stats.fallback_count))
    avg = stats.avg_attempts_for_successes
    table.add_row("attempts per success", f"{avg:.2f}" if avg is not None else "-")
    table.add_row("attempts per problem", f"{stats.avg_attempts_overall:.2f}")
    for kk, v in stats.pass_at_k.items():
        table.add_row(f"pass@{kk}", f"{v:.1%}")
    console.print(table)
    console.print(f"{stats.attempts_this_run} attempts in {stats.generation_s:.1f}s: "
                  f"{stats.attempts_per_s:.2f} attempts/s, {stats.tokens_per_s:.1f} tokens/s; "
                  f"traces in {out}, stats in {stats_file}", highlight=False)
