"""`gsmkit merge`: fold a PEFT adapter into its base model, verified before anything is written."""

from __future__ import annotations

import json

import typer

from gsmkit.adapters.merge import MergeSettings
from gsmkit.cli.options import JsonOpt, command_from


@command_from(MergeSettings)
def merge(settings: MergeSettings, json_out: JsonOpt = False) -> None:
    """Merge an adapter into its base in float32, verify it against base + adapter, save a plain model.

    The merged model must reproduce the unmerged one (relative perplexity difference at most
    --tolerance) before OUT is written; OUT then holds the model, tokenizer, merge_report.json and
    manifest.json, and loads with AutoModelForCausalLM.from_pretrained.

    Example: gsmkit merge --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter runs/sft
    --data ../shared/data/gsm8k --dtype bfloat16 --out runs/merged
    """
    from gsmkit.adapters.merge import merge_adapter
    from gsmkit.progress import ProgressTask, stderr_console

    console = stderr_console()
    with ProgressTask("merge", "stages", console) as bar:
        report = merge_adapter(
            settings, on_progress=lambda done, total, stage: bar.update(done, total, f"merge: {stage}"))
    if json_out:
        from gsmkit.manifest import to_jsonable

        typer.echo(json.dumps(to_jsonable(report.to_dict())))
        return
    f32 = report.float32
    console.print(
        f"verified on {report.verify['items']} items ({report.verify['tokens']} tokens): relative perplexity "
        f"difference {f32['rel_ppl_diff']:.2e} (tolerance {report.tolerance:g}), max |logit difference| "
        f"{f32['max_abs_logit_diff']:.2e}, perplexity {f32['ppl_unmerged']:.4f} unmerged / "
        f"{f32['ppl_merged']:.4f} merged",
        highlight=False,
    )
    if report.cast:
        c = report.cast
        console.print(
            f"{c['dtype']}: argmax agreement {c['argmax_agreement']:.2%}, perplexity {c['ppl']:.4f} "
            f"(relative difference {c['rel_ppl_diff']:.2e}), max |logit difference| "
            f"{c['max_abs_logit_diff']:.2e}",
            highlight=False,
        )
    if report.trained_in_4bit:
        console.print(f"the adapter was trained on a 4-bit base ({report.trained_in_4bit_from}); it was "
                      "merged into the base's nf4 weights dequantized to float32 (the weights it was trained "
                      "against), not into the original full-precision weights", highlight=False)
    console.print(f"merged model in {report.out} (report: {report.out}/merge_report.json)", highlight=False)
