"""GSM8K exact-match evaluation.

In: `EvalSettings` (model + adapter, data source and slice, few-shot pool and k, prompt style,
decoding options, output folder). Out: `<out>/predictions.jsonl` (one `Prediction` per problem, in
dataset order), `<out>/metrics.json` and `<out>/manifest.json`; returns `EvalMetrics`.

Resumable: finished rows are appended to `<out>/predictions.partial.jsonl` as they complete, next to
`<out>/run.json`, the fingerprint of the settings that produced them. Rerunning the same command skips
finished ids; the final files are written atomically at the end and the partial files removed, so a
killed and resumed run ends with the same predictions file as a clean one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.answers import score_completion
from gsmkit.errors import ConfigError
from gsmkit.evaluation.stats import wilson_interval
from gsmkit.fields import check_fields, setting
from gsmkit.generation import SamplingSettings
from gsmkit.modeling import ModelSpec
from gsmkit.records import Prediction
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.settings import DecodeOptions, ProblemOptions, PromptOptions, RunOptions, SamplingOptions

PREDICTIONS = "predictions.jsonl"
PARTIAL = "predictions.partial.jsonl"
METRICS = "metrics.json"


@dataclass(frozen=True)
class EvalSettings(ProblemOptions, PromptOptions, DecodeOptions, SamplingOptions, RunOptions):
    model: ModelSpec
    out: Path = setting(Path("runs/eval-gsm8k"), "Output folder.", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    limit: int | None = setting(None, "Evaluate at most this many problems.", min=1, show_default=False)
    do_sample: bool = setting(False, "Sample instead of greedy decoding.")
    stop: tuple[str, ...] = setting((), "Extra stop string (repeatable).")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.k > 0 and self.pool is None:
            raise ConfigError(f"--k {self.k} needs a few-shot pool",
                              hint="make one with `gsmkit fewshot --out pool.jsonl` and pass --pool pool.jsonl")
        self.sampling()  # decoding options are checked where they are defined, before any model loads

    def sampling(self, stop: tuple[str, ...] = ()) -> SamplingSettings:
        """The decoding settings; `stop` adds the prompt style's stop strings to --stop."""
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=tuple(dict.fromkeys(stop + self.stop)),
        )

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a partial run to be resumed (everything that changes predictions)."""
        from gsmkit.manifest import run_fingerprint

        return run_fingerprint(self, ("out", "overwrite", "batch_size", "prefix_cache", "backend"))


@dataclass
class EvalMetrics:
    n: int
    accuracy_strict: float
    accuracy_flexible: float
    ci95_strict: tuple[float, float]
    ci95_flexible: tuple[float, float]
    no_answer_strict: float
    no_answer_flexible: float
    truncated: float
    prompt_tokens: int
    generated_tokens: int
    k: int
    style: str
    answer_format: str  # "hash" (`#### n`) or "tags" (`<SOLUTION>n</SOLUTION>`): what "strict" extracts
    extractable: float  # share of completions with a strict (format-marked) answer
    with_reasoning_section: float | None  # tags style: share with a non-empty <start_working_out> section
    generated_this_run: int
    generation_s: float
    problems_per_s: float
    tokens_per_s: float
    wall_s: float
    engine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(preds: list[Prediction], k: int, style: str, timing: dict[str, Any]) -> EvalMetrics:
    from gsmkit.answers import has_reasoning_section
    from gsmkit.prompts import answer_format

    fmt = answer_format(style)
    n = len(preds)
    cs = sum(p.correct_strict for p in preds)
    cf = sum(p.correct_flexible for p in preds)
    gen_s = timing.get("generation_s", 0.0)
    done = timing.get("generated_this_run", 0)
    toks = timing.get("tokens_this_run", 0)
    return EvalMetrics(
        n=n,
        accuracy_strict=cs / n if n else 0.0,
        accuracy_flexible=cf / n if n else 0.0,
        ci95_strict=wilson_interval(cs, n),
        ci95_flexible=wilson_interval(cf, n),
        no_answer_strict=sum(p.strict is None for p in preds) / n if n else 0.0,
        no_answer_flexible=sum(p.flexible is None for p in preds) / n if n else 0.0,
        truncated=sum(p.finish_reason == "length" for p in preds) / n if n else 0.0,
        prompt_tokens=sum(p.num_prompt_tokens for p in preds),
        generated_tokens=sum(p.num_tokens for p in preds),
        k=k,
        style=style,
        answer_format=fmt,
        extractable=sum(p.strict is not None for p in preds) / n if n else 0.0,
        with_reasoning_section=(sum(has_reasoning_section(p.completion) for p in preds) / n if n else 0.0)
        if fmt == "tags" else None,
        generated_this_run=done,
        generation_s=round(gen_s, 3),
        problems_per_s=round(done / gen_s, 4) if gen_s > 0 else 0.0,
        tokens_per_s=round(toks / gen_s, 2) if gen_s > 0 else 0.0,
        wall_s=round(timing.get("wall_s", 0.0), 3),
        engine=timing.get("engine", {}),
    )


def run_output(settings: EvalSettings) -> RunOutput:
    """The evaluation's folder: predictions, metrics and manifest, with a journal while it runs."""
    return RunOutput.folder(settings.out, finals=(PREDICTIONS, METRICS), journals=(PARTIAL,),
                            overwrite=settings.overwrite, what="evaluation")


def evaluate_gsm8k(
    settings: EvalSettings,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EvalMetrics:
    """Run the evaluation; `on_start(total, already_done)` and `on_progress(n)` drive a progress bar."""
    t_wall = time.perf_counter()
    from gsmkit.data.fewshot import problems_for_run
    from gsmkit.data.gsm8k import source_file
    from gsmkit.manifest import build_manifest

    # Everything that can fail on input is checked before the model loads.
    problems, exemplars, excluded = problems_for_run(settings.data, settings.split, settings.offset, settings.limit,
                                                     settings.pool, settings.k)
    output = run_output(settings)
    output.prepare(settings.fingerprint())
    journal = output.journal(PARTIAL)
    done = {row["id"]: row for row in journal.load()}

    from gsmkit.generation import GenRequest, build_engine
    from gsmkit.prompts import answer_format, encode_prompt, resolve_style, stop_strings

    loaded, tok, engine = build_engine(settings.model, settings.backend, settings.batch_size, settings.prefix_cache,
                                       settings.seed)
    style = resolve_style(settings.style, tok)
    fmt = answer_format(style)
    sampling = settings.sampling(stop_strings(style))
    # Only the problems still to generate are rendered and tokenized (a resumed run has the rest).
    encoded = {p.id: encode_prompt(style, p.question, exemplars, tok, settings.system_prompt)
               for p in problems if p.id not in done}
    prompt_sha = {pid: hashlib.sha256(text.encode()).hexdigest() for pid, (text, _) in encoded.items()}
    by_id = {p.id: p for p in problems}
    requests = [GenRequest(pid, ids) for pid, (_, ids) in encoded.items()]
    # Only now, with data, model and engine ready, does the output folder come into being.
    output.begin(settings.fingerprint())
    if on_start is not None:
        on_start(len(problems), len(done))

    import contextlib

    import torch

    t_gen = time.perf_counter()
    tokens_this_run = 0
    try:
        with torch.inference_mode() if loaded else contextlib.nullcontext():
            for res in engine.generate(requests, sampling):
                p = by_id[res.key]
                extracted, ok_strict, ok_flex = score_completion(res.text, p.gold, fmt)
                pred = Prediction(
                    id=p.id, prompt_sha256=prompt_sha[p.id], completion=res.text,
                    strict=extracted.strict, flexible=extracted.flexible, gold=p.gold,
                    correct_strict=ok_strict, correct_flexible=ok_flex,
                    num_prompt_tokens=res.num_prompt_tokens, num_tokens=len(res.token_ids),
                    finish_reason=res.finish_reason,
                )
                journal.append(pred.to_dict())
                done[p.id] = pred.to_dict()
                tokens_this_run += len(res.token_ids)
                if on_progress is not None:
                    on_progress(1)
    finally:
        journal.close()
    gen_s = time.perf_counter() - t_gen

    preds = [Prediction.from_dict(done[p.id], f"{journal.path}") for p in problems]
    timing = {
        "generation_s": gen_s, "generated_this_run": len(requests), "tokens_this_run": tokens_this_run,
        "wall_s": time.perf_counter() - t_wall, "engine": dict(engine.stats),
    }
    metrics = summarize(preds, settings.k, style, timing)
    manifest = build_manifest(
        "eval gsm8k", settings,
        inputs={"data": source_file(settings.data, settings.split), "pool": settings.pool},
        seeds={"seed": settings.seed},
        extra={"resolved": {"style": style, "stop": list(sampling.stop), "backend": settings.backend,
                            "dtype": str(loaded.dtype) if loaded else settings.model.dtype,
                            "device": str(loaded.device) if loaded else "cuda",
                            "excluded_pool_problems": excluded}},
    )
    output.publish({PREDICTIONS: jsonl_writer(pr.to_dict() for pr in preds),
                    METRICS: json_writer({**metrics.to_dict(), "manifest": manifest}),
                    MANIFEST: json_writer(manifest)})
    return metrics

