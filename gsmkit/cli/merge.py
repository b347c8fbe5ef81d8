"""`gsmkit merge`: fold a PEFT adapter into its base model, verified before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import DataOpt, DeviceOpt, JsonOpt, ModelOpt, OutDirOpt

AdapterReqOpt = Annotated[
    Path,
    typer.Option("--adapter", help="PEFT adapter folder (adapter_config.json + weights) to merge into --model.",
                 exists=True, file_okay=False, dir_okay=True, show_default=False),
]


def merge(
    model: ModelOpt,
    adapter: AdapterReqOpt,
    out: OutDirOpt = Path("runs/merged"),
    dtype: Annotated[str, typer.Option("--dtype", help="Dtype of the saved weights: float32 | bfloat16 | float16 "
                                       "(the merge itself is always float32).")] = "float32",
    from_4bit: Annotated[bool, typer.Option("--from-4bit", help="The adapter was trained on a 4-bit base (QLoRA); "
                                            "detected from its manifest.json when gsmkit trained it.")] = False,
    verify_data: Annotated[Path | None, typer.Option(
        "--verify-data", help="Verification JSONL of {prompt, response}, {text} or GSM8K {question, answer} rows "
        "(default: GSM8K problems from --data).", dir_okay=False, show_default=False)] = None,
    data: DataOpt = "openai/gsm8k",
    verify_split: Annotated[str, typer.Option("--verify-split", help="Split of --data to verify on.")] = "test",
    verify_limit: Annotated[int, typer.Option("--verify-limit", help="Verify on the first N rows.")] = 8,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest allowed |ppl_merged - ppl_unmerged| / "
                                             "ppl_unmerged, in float32.")] = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Verification sequences scored together.")] = 8,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge an adapter into its base in float32, verify it against base + adapter, save a plain model.

    The merged model must reproduce the unmerged one (relative perplexity difference at most
    --tolerance) before OUT is written; OUT then holds the model, tokenizer, merge_report.json and
    manifest.json, and loads with AutoModelForCausalLM.from_pretrained.

    Example: gsmkit merge --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter runs/sft
    --data ../shared/data/gsm8k --dtype bfloat16 --out runs/merged
    """
    from gsmkit.adapters.merge import MergeSettings, merge_adapter
    from gsmkit.cli.options import usage_errors
    from gsmkit.progress import ProgressTask, stderr_console

    with usage_errors():
        settings = MergeSettings(
            model=model, adapter=adapter, out=out, dtype=dtype, from_4bit=from_4bit, verify_data=verify_data,
            data=data, verify_split=verify_split, verify_limit=verify_limit, tolerance=tolerance,
            batch_size=batch_size, device=device, overwrite=overwrite,
        )
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
        f"{f32['max_abs_logit_diff']:.2e}, perplexity {f32['ppl_unmerged']:.4f} unmerged / {f32['ppl_merged']:.4f} merged",
        highlight=False,
    )
    if report.cast:
        c = report.cast
        console.print(
            f"{c['dtype']}: argmax agreement {c['argmax_agreement']:.2%}, perplexity {c['ppl']:.4f} "
            f"(relative difference {c['rel_ppl_diff']:.2e}), max |logit difference| {c['max_abs_logit_diff']:.2e}",
            highlight=False,
        )
    if report.trained_in_4bit:
        console.print(f"the adapter was trained on a 4-bit base ({report.trained_in_4bit_from}); it was merged into "
                      "the full-precision float32 weights", highlight=False)
    console.print(f"merged model in {report.out} (report: {report.out}/merge_report.json)", highlight=False)
