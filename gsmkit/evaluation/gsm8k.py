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
from gsmkit.errors import ConfigError, ResumeError
from gsmkit.evaluation.stats import wilson_interval
from gsmkit.generation import SamplingSettings
from gsmkit.jsonl import Journal, read_jsonl, write_json, write_jsonl
from gsmkit.modeling import ModelSpec
from gsmkit.records import Prediction

PREDICTIONS = "predictions.jsonl"
PARTIAL = "predictions.partial.jsonl"
RUN_FINGERPRINT = "run.json"
METRICS = "metrics.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EvalSettings:
    model: ModelSpec
    out: Path
    data: str = "openai/gsm8k"
    split: str = "test"
    offset: int = 0
    limit: int | None = None
    pool: Path | None = None
    k: int = 0
    style: str = "auto"
    system_prompt: str | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    prefix_cache: bool = True
    backend: str = "hf"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.k > 0 and self.pool is None:
            raise ConfigError(f"--k {self.k} needs a few-shot pool",
                              hint="make one with `gsmkit fewshot --out pool.jsonl` and pass --pool pool.jsonl")
        if self.k < 0:
            raise ConfigError(f"--k must be >= 0, got {self.k}")
        if self.offset < 0:
            raise ConfigError(f"--offset must be >= 0, got {self.offset}")
        if self.limit is not None and self.limit == 0:
            raise ConfigError("--limit 0 selects no problems", hint="omit --limit to evaluate the whole split")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        self.sampling()  # decoding options are checked where they are defined, before any model loads
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"unknown --backend '{self.backend}'", hint="choose hf or vllm")

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


def _prepare_out(settings: EvalSettings) -> tuple[Journal, dict[str, dict]]:
    """Check the output folder; return the journal and the rows already finished there."""
    out = settings.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder", hint="--out names a folder")
    journal = Journal(out / PARTIAL)
    fp_path = out / RUN_FINGERPRINT
    if settings.overwrite:
        journal.remove()
        for name in (PREDICTIONS, METRICS, MANIFEST, RUN_FINGERPRINT):
            (out / name).unlink(missing_ok=True)
        return journal, {}
    if (out / PREDICTIONS).exists() and not journal.path.exists():
        raise ConfigError(f"{out / PREDICTIONS}: this evaluation is already complete",
                          hint="pass --overwrite to run it again, or choose another --out")
    if not journal.path.exists():
        return journal, {}
    import json

    try:
        recorded = json.loads(fp_path.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != settings.fingerprint():
        raise ResumeError(f"{out}: holds a partial run made with different settings",
                          hint="rerun with the same options to resume, or pass --overwrite to start again")
    done = {}
    for row in journal.load():
        done[row["id"]] = row
    return journal, done


def evaluate_gsm8k(
    settings: EvalSettings,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EvalMetrics:
    """Run the evaluation; `on_start(total, already_done)` and `on_progress(n)` drive a progress bar."""
    t_wall = time.perf_counter()
    from gsmkit.data.fewshot import problems_for_run
    from gsmkit.manifest import build_manifest

    # Everything that can fail on input is checked before the model loads.
    problems, exemplars, excluded = problems_for_run(settings.data, settings.split, settings.offset, settings.limit,
                                                     settings.pool, settings.k)
    journal, done = _prepare_out(settings)

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
    settings.out.mkdir(parents=True, exist_ok=True)
    write_json(settings.out / RUN_FINGERPRINT, settings.fingerprint())
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
        inputs={"data": _data_file(settings), "pool": settings.pool},
        seeds={"seed": settings.seed},
        extra={"resolved": {"style": style, "stop": list(sampling.stop), "backend": settings.backend,
                            "dtype": str(loaded.dtype) if loaded else settings.model.dtype,
                            "device": str(loaded.device) if loaded else "cuda",
                            "excluded_pool_problems": excluded}},
    )
    write_jsonl(settings.out / PREDICTIONS, (pr.to_dict() for pr in preds))
    write_json(settings.out / METRICS, {**metrics.to_dict(), "manifest": manifest})
    write_json(settings.out / MANIFEST, manifest)
    journal.remove()
    (settings.out / RUN_FINGERPRINT).unlink(missing_ok=True)
    return metrics


def _data_file(settings: EvalSettings) -> str | Path | None:
    from gsmkit.data.gsm8k import resolve_split_files

    files = resolve_split_files(settings.data, settings.split)
    return files[0] if files else settings.data


def read_predictions(path: str | Path) -> list[Prediction]:
    return read_jsonl(path, Prediction.from_dict)
