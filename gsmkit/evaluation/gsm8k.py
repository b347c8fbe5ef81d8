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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.evaluation.run import OnProgress, OnStart, run_inputs
from gsmkit.evaluation.stats import wilson_interval
from gsmkit.fields import Record, setting
from gsmkit.generation import SamplingSettings
from gsmkit.modeling import ModelSpec
from gsmkit.reasoning import Section, Split, holds_reasoning
from gsmkit.records import Prediction
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.settings import ProblemRunOptions

PREDICTIONS = "predictions.jsonl"
PARTIAL = "predictions.partial.jsonl"
METRICS = "metrics.json"


@dataclass(frozen=True)
class EvalSettings(ProblemRunOptions):
    model: ModelSpec
    out: Path = setting(Path("runs/eval-gsm8k"), "Output folder.", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    limit: int | None = setting(None, "Evaluate at most this many problems.", min=1, show_default=False)
    do_sample: bool = setting(False, "Sample instead of greedy decoding.", panel="Sampling")
    stop: tuple[str, ...] = setting((), "Extra stop string (repeatable).", panel="Generation")

    def __post_init__(self) -> None:
        self.check_options()
        self.sampling()  # decoding options are checked where they are defined, before any model loads

    def sampling(self, stop: tuple[str, ...] = ()) -> SamplingSettings:
        """The decoding settings; `stop` adds the prompt style's stop strings to --stop."""
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=tuple(dict.fromkeys(stop + self.stop)),
        )

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a partial run to be resumed (everything that changes predictions)."""
        from gsmkit.evaluation.run import problem_run_fingerprint

        return problem_run_fingerprint(self)


@dataclass
class EvalMetrics(Record):
    """`metrics.json` of `eval gsm8k`: accuracy by both extractors with intervals, and what this run did.

    Attributes:
        n: problems scored
        accuracy_strict: fraction of `correct_strict` predictions, 0 to 1
        accuracy_flexible: fraction of `correct_flexible` predictions, 0 to 1
        ci95_strict: 95% Wilson score interval of `accuracy_strict`
        ci95_flexible: 95% Wilson score interval of `accuracy_flexible`
        no_answer_strict: fraction of completions with no strict answer
        no_answer_flexible: fraction of completions with no number at all
        truncated: fraction of completions that hit `--max-new-tokens`
        prompt_tokens: prompt tokens, summed over all `n` predictions
        generated_tokens: generated tokens, summed over all `n` predictions
        k: few-shot exemplars per prompt
        style: the prompt style used: `chat`, `plain` or `tags` (`auto` resolved)
        answer_format: what the strict column reads: `hash` (the first `#### n`) or, for the `tags` style,
            `tags` (the last `<SOLUTION>n</SOLUTION>`)
        extractable: fraction of completions with a strict answer (`1 - no_answer_strict`)
        reasoning_section: the reasoning section answers were read after: `think` (`<think>...</think>`, a
            chat template that writes it), `tags` (`<start_working_out>...<end_working_out>`, the `tags`
            style) or null (none: the whole completion is the answer text)
        with_reasoning_section: fraction of completions with a reasoning section holding non-blank text,
            closed or not (those not closed are also in `ended_in_reasoning`); null without a section
        ci95_reasoning_section: 95% Wilson score interval of `with_reasoning_section` (n = `n`); null
            without a section
        ended_in_reasoning: fraction of completions that ended inside their reasoning section (it opened and
            never closed, typically cut by `--max-new-tokens`): they have no answer and count as wrong;
            null without a section
        ci95_ended_in_reasoning: 95% Wilson score interval of `ended_in_reasoning` (n = `n`); null without
            a section
        thinking_budget: `--thinking-budget` (tokens of reasoning before its end tag is forced); null
            without one
        budget_forced: fraction of completions whose reasoning reached the budget and had its end tag forced;
            null without a budget
        ci95_budget_forced: 95% Wilson score interval of `budget_forced` (n = `n`); null without a budget
        mean_reasoning_tokens: mean `reasoning_tokens` of the predictions whose completion had a reasoning
            section, blank ones included (tokens of the text inside it, tags left out, counted by the model's
            tokenizer on that text, no special tokens), rounded to 3 decimals; null when none has one
        mean_answer_tokens: mean `answer_tokens` of the predictions that did not end in their reasoning
            (tokens of the text after the section, or of the whole completion without one, counted the same
            way), rounded to 3 decimals; null when there are none
        generated_this_run: problems generated by this invocation, by all its processes (fewer than `n`
            after a resume)
        generation_s: seconds spent generating in this invocation
        problems_per_s: problems generated per second of `generation_s`
        tokens_per_s: tokens generated per second of `generation_s`
        wall_s: seconds for the whole evaluation in this invocation, model loading included
        engine: the generation engine's counters for this invocation (of the main process under a launch of
            several): `prefix_tokens`, `prefill_tokens`,
            `decode_steps`, `generated_tokens`
    """

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
    answer_format: str
    extractable: float
    reasoning_section: str | None
    with_reasoning_section: float | None
    ci95_reasoning_section: tuple[float, float] | None
    ended_in_reasoning: float | None
    ci95_ended_in_reasoning: tuple[float, float] | None
    thinking_budget: int | None
    budget_forced: float | None
    ci95_budget_forced: tuple[float, float] | None
    mean_reasoning_tokens: float | None
    mean_answer_tokens: float | None
    generated_this_run: int
    generation_s: float
    problems_per_s: float
    tokens_per_s: float
    wall_s: float
    engine: dict[str, Any] = field(default_factory=dict)


def _share(count: int, n: int, applies: Any) -> tuple[float | None, tuple[float, float] | None]:
    """A share of the `n` completions with its Wilson interval; (None, None) where it does not apply (no
    reasoning section, no budget)."""
    if applies is None:
        return None, None
    return (count / n if n else 0.0), wilson_interval(count, n)


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def summarize(preds: list[Prediction], k: int, style: str, timing: dict[str, Any],
              section: Section | None = None, thinking_budget: int | None = None) -> EvalMetrics:
    """metrics.json from the predictions; `section`: the reasoning section their answers were read after
    (`reasoning.section_for` of the resolved style and the tokenizer); `thinking_budget`: the run's."""
    from gsmkit.prompts import answer_format

    fmt = answer_format(style)
    n = len(preds)
    cs = sum(p.correct_strict for p in preds)
    cf = sum(p.correct_flexible for p in preds)
    gen_s = timing.get("generation_s", 0.0)
    done = timing.get("generated_this_run", 0)
    toks = timing.get("tokens_this_run", 0)
    had = sum(holds_reasoning(p.reasoning) for p in preds)
    with_section, ci_section = _share(had, n, section)
    ended, ci_ended = _share(sum(p.ended_in_reasoning for p in preds), n, section)
    forced, ci_forced = _share(sum(p.budget_forced for p in preds), n, thinking_budget)
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
        reasoning_section=section.name if section is not None else None,
        with_reasoning_section=with_section,
        ci95_reasoning_section=ci_section,
        ended_in_reasoning=ended,
        ci95_ended_in_reasoning=ci_ended,
        thinking_budget=thinking_budget,
        budget_forced=forced,
        ci95_budget_forced=ci_forced,
        mean_reasoning_tokens=_mean([p.reasoning_tokens for p in preds if p.reasoning_tokens is not None]),
        mean_answer_tokens=_mean([p.answer_tokens for p in preds
                                  if p.answer_tokens is not None and not p.ended_in_reasoning]),
        generated_this_run=done,
        generation_s=round(gen_s, 3),
        problems_per_s=round(done / gen_s, 4) if gen_s > 0 else 0.0,
        tokens_per_s=round(toks / gen_s, 2) if gen_s > 0 else 0.0,
        wall_s=round(timing.get("wall_s", 0.0), 3),
        engine=timing.get("engine", {}),
    )


def split_fields(split: Split, tokenizer: Any) -> dict[str, Any]:
    """A prediction's reasoning fields from its split: the reasoning text, whether it ended inside it, and
    the tokens of the reasoning and of the answer text by `tokenizer` (no special tokens)."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    return {"reasoning": split.reasoning, "ended_in_reasoning": split.ended_in_reasoning,
            "reasoning_tokens": None if split.reasoning is None else count(split.reasoning),
            "answer_tokens": None if split.ended_in_reasoning else count(split.answer)}


def run_output(settings: EvalSettings) -> RunOutput:
    """The evaluation's folder: predictions, metrics and manifest, with a journal while it runs."""
    return RunOutput.folder(settings.out, finals=(PREDICTIONS, METRICS), journals=(PARTIAL,),
                            overwrite=settings.overwrite, what="evaluation", inputs=run_inputs(settings))


def evaluate_gsm8k(settings: EvalSettings, on_start: OnStart = None,
                   on_progress: OnProgress = None) -> EvalMetrics:
    """Run the evaluation; `on_start(total, already_done)` and `on_progress(n)` drive a progress bar."""
    t_wall = time.perf_counter()
    from gsmkit.evaluation.run import ProblemRun
    from gsmkit.generation import GenRequest
    from gsmkit.reasoning import score

    run = ProblemRun.start(settings, run_output, PARTIAL, settings.limit)
    settings, section = run.settings, run.section
    prompts = run.prompts()
    by_id = {p.id: p for p in run.problems}
    requests = [GenRequest(pid, prompt.ids) for pid, prompt in prompts.items()]
    run.begin(on_start)

    t_gen = time.perf_counter()
    with run.generating():
        for res in run.engine.generate(requests, run.sampling):
            p = by_id[res.key]
            scored = score(res.text, p.gold, run.answer_format, section, prompts[p.id].opened)
            pred = Prediction(
                id=p.id, prompt_sha256=hashlib.sha256(prompts[p.id].text.encode()).hexdigest(),
                completion=res.text,
                strict=scored.answers.strict, flexible=scored.answers.flexible, gold=p.gold,
                correct_strict=scored.correct_strict, correct_flexible=scored.correct_flexible,
                num_prompt_tokens=res.num_prompt_tokens, num_tokens=len(res.token_ids),
                finish_reason=res.finish_reason, **split_fields(scored.split, run.tokenizer),
                budget_forced=res.budget_forced,
            )
            run.record(p.id, pred.to_dict())
            if on_progress is not None:
                on_progress(1)
    gen_s = time.perf_counter() - t_gen
    before = set(run.done) - {r.key for r in requests}
    processes = run.gather()
    new = [row for pid, row in run.done.items() if pid not in before]  # by every process of the launch

    preds = [Prediction.from_dict(run.done[p.id], f"{run.journal.path}") for p in run.problems]
    timing = {
        "generation_s": gen_s, "generated_this_run": len(new),
        "tokens_this_run": sum(r["num_tokens"] for r in new),
        "wall_s": time.perf_counter() - t_wall, "engine": dict(run.engine.stats),
    }
    metrics = summarize(preds, settings.k, run.style, timing, section, settings.thinking_budget)
    manifest = run.manifest("eval gsm8k", processes=processes)
    run.publish({PREDICTIONS: jsonl_writer(pr.to_dict() for pr in preds),
                        METRICS: json_writer({**metrics.to_dict(), "manifest": manifest}),
                        MANIFEST: json_writer(manifest)})
    return metrics

