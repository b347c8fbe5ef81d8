"""Merge a PEFT adapter into its base model, verified against the unmerged model before anything is kept.

In: `MergeSettings` (base model, adapter folder, output folder and dtype, verification set, tolerance).
Out: `<out>/` with the merged model (`save_pretrained`: config, safetensors weights, generation
config), the tokenizer, `merge_report.json` and `manifest.json`; returns a `MergeReport`.

How: the base is loaded in float32. For an adapter trained with QLoRA (its `manifest.json` says
`"command": "train qlora"`, or `--from-4bit`) the base is first quantized exactly as in training
(nf4, double quantization) and then dequantized to float32, so the update is merged into the weights
it was trained against; merging into 4-bit storage would round the update away, so a base stored
quantized on disk is refused. The adapter is
attached, the verification set scored (logits kept at every scored position), the adapter merged
(`merge_and_unload`), and the merged float32 model scored again. The gate: the relative perplexity
difference `|ppl_merged - ppl_unmerged| / ppl_unmerged` must be at most `tolerance`; the maximum
absolute logit difference is reported beside it. Only then is the model cast to the output dtype
(bfloat16/float16 outputs are scored once more and report their greedy argmax agreement with the
unmerged float32 model), saved to a hidden staging sibling of `out` and renamed into place
(`gsmkit.run_folder`): a failed merge leaves nothing at `out`.

Verification set: `verify_data` (JSONL of `{prompt, response}`, `{text}` or GSM8K `{question,
answer}` rows, scored as in `eval ppl`; GSM8K rows as `Question: q\\nAnswer: a`, the answer scored),
else the first `verify_limit` problems of `data`'s `verify_split`. Memory: the unmerged logits of
every scored token are held on the CPU (tokens x vocabulary x 4 bytes), so keep the set small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import GsmkitError, ModelError
from gsmkit.fields import Record, check_fields, setting
from gsmkit.modeling import ModelSpec, check_adapter, read_adapter_config
from gsmkit.run_folder import MANIFEST, check_new_folder, publish_folder, staging_folder
from gsmkit.settings import ProblemOptions, RunOptions, override

REPORT = "merge_report.json"
OUT_DTYPES = ("float32", "bfloat16", "float16")
# PEFT types that add virtual tokens instead of weight deltas: there is nothing to merge.
_PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                    "ADAPTION_PROMPT", "CPT")


class MergeVerificationError(GsmkitError):
    """The merged model does not reproduce base + adapter within the tolerance."""


@dataclass(frozen=True)
class MergeSettings:
    model: str = override(ModelSpec, "model")
    adapter: Path = setting(help="PEFT adapter folder (adapter_config.json + weights) to merge into --model.",
                            show_default=False, path={"exists": True, "file_okay": False, "dir_okay": True})
    out: Path = setting(Path("runs/merged"), "Output folder.", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    dtype: str = setting("float32", "Dtype of the saved weights: float32 | bfloat16 | float16 (the merge "
                         "itself is always float32).", choices=OUT_DTYPES)
    from_4bit: bool = setting(False, "The adapter was trained on a 4-bit base (QLoRA); detected from its "
                              "manifest.json when gsmkit trained it.")
    verify_data: Path | None = setting(None, "Verification JSONL of {prompt, response}, {text} or GSM8K "
                                       "{question, answer} rows (default: GSM8K problems from --data).",
                                       show_default=False, path={"dir_okay": False})
    data: str = override(ProblemOptions, "data")
    verify_split: str = setting("test", "Split of --data to verify on.")
    verify_limit: int = setting(8, "Verify on the first N rows.", min=1)
    tolerance: float = setting(1e-4, "Largest allowed |ppl_merged - ppl_unmerged| / ppl_unmerged, in "
                               "float32.", min=0.0)
    batch_size: int = setting(8, "Verification sequences scored together.", min=1)
    device: str = override(ModelSpec, "device")
    overwrite: bool = override(RunOptions, "overwrite", help="Replace an existing --out folder.")

    def __post_init__(self) -> None:
        check_fields(self)
        # The device string is checked where it is used (ModelSpec); fail here too, before any loading.
        ModelSpec(model=self.model, dtype="float32", device=self.device)


@dataclass
class MergeReport(Record):
    """`merge_report.json`: what was merged, and how closely the merged model reproduces base + adapter.

    Attributes:
        model: `--model` as given
        adapter: `--adapter` as given
        adapter_base: `base_model_name_or_path` from the adapter's `adapter_config.json`
        peft_type: the adapter's `peft_type` (`"LORA"`, ...)
        trained_in_4bit: the adapter was trained on a 4-bit base (QLoRA), so it was merged into the
            dequantised nf4 weights
        trained_in_4bit_from: how that is known: `"manifest"` (the adapter's `manifest.json` says `"command":
            "train qlora"`) or `"--from-4bit"`; null when it wasn't
        dtype: dtype of the saved weights
        tolerance: `--tolerance`
        verify: `source` (the `--verify-data` file, the GSM8K split file, or the Hub id), `items`, scored
            `tokens`, `windows`
        float32: `ppl_unmerged`, `ppl_merged`, `rel_ppl_diff`, `max_abs_logit_diff` (largest |merged −
            unmerged| over all logits at scored positions), `argmax_agreement` (share of scored positions
            whose most likely token is the same), `passed`
        cast: for `bfloat16`/`float16` outputs: `dtype`, `ppl`, `rel_ppl_diff` and `max_abs_logit_diff` (both
            against the unmerged float32 model) and `argmax_agreement` (the same comparison). null for
            `float32`
        out: the output folder
        files: the files in OUT
        wall_s: seconds for the whole command
    """

    model: str
    adapter: str
    adapter_base: str | None
    peft_type: str | None
    trained_in_4bit: bool
    trained_in_4bit_from: str | None
    dtype: str
    tolerance: float
    verify: dict[str, Any]
    float32: dict[str, Any]
    cast: dict[str, Any] | None
    out: str
    files: list[str]
    wall_s: float


def merge_weights(peft_model: Any) -> Any:
    """Fold the adapter into the base weights; the base model comes back without PEFT layers."""
    try:
        # safe_merge checks the merged weights for NaNs before they replace the originals.
        return peft_model.merge_and_unload(safe_merge=True)
    except ValueError as err:
        raise ModelError(f"merging the adapter failed: {str(err).strip().splitlines()[0][:200]}") from None


def _trained_in_4bit(settings: MergeSettings) -> tuple[bool, str | None]:
    if settings.from_4bit:
        return True, "--from-4bit"
    from gsmkit.modeling import adapter_trained_in_4bit

    # without gsmkit's manifest (another tool's adapter), --from-4bit is the way to say it
    return (True, "manifest") if adapter_trained_in_4bit(settings.adapter) else (False, None)


def _check_out(settings: MergeSettings) -> None:
    """--out is a new folder (or --overwrite) that gsmkit can write, and never one of the inputs, a folder
    holding one, or a folder inside one (the adapter, a local base model, the verification data)."""
    verify = settings.verify_data if settings.verify_data is not None else settings.data
    check_new_folder(settings.out, settings.overwrite, protected=(settings.adapter, settings.model, verify))


def _verification_items(settings: MergeSettings) -> tuple[list[Any], str | Path]:
    """(items, the input recorded in the manifest)."""
    from gsmkit.evaluation.ppl_items import PplItem, read_ppl_items

    if settings.verify_data is not None:
        items = read_ppl_items(settings.verify_data, settings.verify_limit, question_answer=True)
        return items, settings.verify_data
    from gsmkit.data.gsm8k import load_gsm8k, resolve_split_files
    from gsmkit.prompts import render_prompt, render_target

    problems = load_gsm8k(settings.data, settings.verify_split)[: settings.verify_limit]
    items = [PplItem(i, f"{settings.data}[{settings.verify_split}]:{p.id}", "response",
                     render_prompt("plain", p.question), render_target("plain", p.answer))
             for i, p in enumerate(problems)]
    files = resolve_split_files(settings.data, settings.verify_split)
    return items, files[0] if files else settings.data


def _score(model: Any, rows: list[Any], batch_size: int, pad_id: int,
           reference: dict[int, Any] | None = None, keep: bool = False) -> dict[str, Any]:
    """NLL and token count of `rows`; against `reference` logits also max |diff| and argmax agreement."""
    import torch

    from gsmkit.evaluation.perplexity import perplexity, scored_logits

    nll, tokens, agree, max_diff = 0.0, 0, 0, 0.0
    kept: dict[int, Any] = {}
    for i, logits, targets in scored_logits(model, rows, batch_size, pad_id):
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        tokens += len(targets)
        if reference is not None:
            ref = reference[i]
            diff = float((logits - ref).abs().max())
            # A nan sticks, so a broken merge cannot pass as a small difference.
            if not math.isnan(max_diff) and (math.isnan(diff) or diff > max_diff):
                max_diff = diff
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        if keep:
            kept[i] = logits
    return {"nll": nll, "tokens": tokens, "ppl": perplexity(nll, tokens), "max_abs_logit_diff": max_diff,
            "argmax_agreement": agree / tokens if tokens else float("nan"), "logits": kept}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b if b else float("inf")


def merge_adapter(
    settings: MergeSettings, on_progress: Callable[[int, int, str], None] | None = None
) -> MergeReport:
    """Merge, verify, save; `on_progress(done, total, stage)` reports the stages."""
    t_wall = time.perf_counter()
    from gsmkit.evaluation.perplexity import model_window
    from gsmkit.evaluation.ppl_items import encode_item, sliding_windows
    from gsmkit.jsonl import write_json
    from gsmkit.manifest import build_manifest, to_jsonable
    from gsmkit.modeling import attach_adapter, load_model, load_tokenizer
    from gsmkit.tokenization import Encoded

    # Everything that can fail on input is checked before the model loads; a damaged adapter first.
    check_adapter(settings.adapter)
    adapter_cfg = read_adapter_config(settings.adapter)
    peft_type = adapter_cfg.get("peft_type")
    if peft_type in _PROMPT_LEARNING:
        raise ModelError(f"{settings.adapter}: a {peft_type} adapter adds virtual tokens, it has no weights "
                         "to merge", hint="use it with --adapter as it is")
    _check_out(settings)
    trained_4bit, trained_4bit_from = _trained_in_4bit(settings)
    items, verify_input = _verification_items(settings)
    tokenizer = load_tokenizer(settings.model)
    encoded = [encode_item(item, tokenizer) for item in items]

    total = 7 if settings.dtype != "float32" else 6
    step = 0

    def stage(name: str) -> None:
        nonlocal step
        if on_progress is not None:
            on_progress(step, total, name)
        step += 1

    import torch

    stage("load base (float32)")
    if trained_4bit:
        # QLoRA: the adapter learned against nf4-rounded weights, so merge into exactly those weights,
        # dequantized to float32 (never into the 4-bit storage, which would round the update away).
        from gsmkit.modeling import dequantize_4bit_model

        loaded = load_model(ModelSpec(model=settings.model, dtype="float32", device=settings.device,
                                      load_in_4bit=True))
        base = dequantize_4bit_model(loaded.model)
    else:
        loaded = load_model(ModelSpec(model=settings.model, dtype="float32", device=settings.device))
        base = loaded.model
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False) or any(
            "4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in base.modules()):
        raise ModelError(f"{settings.model}: the base model is stored quantized, and merging into quantized "
                         "weights would round the adapter's update away",
                         hint="pass the full-precision base model the adapter (or QLoRA run) started from")
    window = model_window(base)
    windows = [w for i, (ids, labels) in enumerate(encoded)
               for w in sliding_windows(ids, labels, window, window // 2, i)]
    rows = [Encoded(input_ids=w.input_ids, labels=w.labels, where=items[w.item].where, truncated=False)
            for w in windows]
    pad_id = tokenizer.pad_token_id

    stage("attach adapter")
    peft_model = attach_adapter(base, str(settings.adapter), settings.model)
    peft_model.eval()
    stage("score base + adapter")
    unmerged = _score(peft_model, rows, settings.batch_size, pad_id, keep=True)
    reference = unmerged.pop("logits")

    stage("merge (float32)")
    merged = merge_weights(peft_model)
    merged.eval()
    stage("score merged")
    check = _score(merged, rows, settings.batch_size, pad_id, reference=reference)
    rel = _rel(check["ppl"], unmerged["ppl"])
    float32 = {"ppl_unmerged": unmerged["ppl"], "ppl_merged": check["ppl"], "rel_ppl_diff": rel,
               "max_abs_logit_diff": check["max_abs_logit_diff"],
               "argmax_agreement": check["argmax_agreement"],
               "passed": bool(rel <= settings.tolerance and not math.isnan(check["max_abs_logit_diff"]))}
    if not float32["passed"]:
        raise MergeVerificationError(
            f"merge verification failed: relative perplexity difference {rel:.3e} > tolerance "
            f"{settings.tolerance:g} (max |logit difference| {check['max_abs_logit_diff']:.3e}; perplexity "
            f"{unmerged['ppl']:.6g} unmerged, {check['ppl']:.6g} merged); nothing was written to "
            f"{settings.out}",
            hint="the merged weights do not reproduce base + adapter: check that --model is the adapter's "
            "base",
        )

    cast = None
    if settings.dtype != "float32":
        stage(f"score {settings.dtype}")
        merged = merged.to(getattr(torch, settings.dtype))
        low = _score(merged, rows, settings.batch_size, pad_id, reference=reference)
        cast = {"dtype": settings.dtype, "ppl": low["ppl"], "rel_ppl_diff": _rel(low["ppl"], unmerged["ppl"]),
                "max_abs_logit_diff": low["max_abs_logit_diff"], "argmax_agreement": low["argmax_agreement"]}
    del reference

    stage("save")
    out = settings.out.expanduser()
    with staging_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise ModelError(f"{tmp}: save_pretrained wrote no .safetensors weights")
        report = MergeReport(
            model=settings.model, adapter=str(settings.adapter),
            adapter_base=adapter_cfg.get("base_model_name_or_path"),
            peft_type=peft_type, trained_in_4bit=trained_4bit, trained_in_4bit_from=trained_4bit_from,
            dtype=settings.dtype, tolerance=settings.tolerance,
            verify={"source": str(verify_input), "items": len(items), "tokens": unmerged["tokens"],
                    "windows": len(rows)},
            float32=float32, cast=cast, out=str(out),
            files=sorted(p.name for p in tmp.iterdir()) + [REPORT, MANIFEST],
            wall_s=round(time.perf_counter() - t_wall, 3),
        )
        manifest = build_manifest(
            "merge", settings, inputs={"adapter": settings.adapter, "verify_data": verify_input},
            extra={"resolved": {"device": str(loaded.device), "merged_in": "float32", "window": window,
                                "trained_in_4bit": trained_4bit}},
        )
        write_json(tmp / REPORT, to_jsonable(report.to_dict()))
        write_json(tmp / MANIFEST, manifest)
        publish_folder(tmp, out)
    if on_progress is not None:
        on_progress(total, total, "done")
    return report
