"""Self-generated reasoning traces: up to K sampled attempts per problem, keep the first correct one.

In: `TraceSettings` (model + adapter, GSM8K problems, few-shot pool and k, prompt style, sampling
options, K). Out: `<out>` (traces JSONL in dataset order), `<out>.stats.json` (`traces.jsonl.stats.json`,
the name the SFT-vs-GRPO protocol's readers expect) and `<stem>.manifest.json`; returns `TraceStats`.

Semantics (the same as sampling attempts one after another until one is right):
- attempt i of a problem is the i-th sample of its prompt, drawn from a generator seeded by
  (seed, problem id, i), so what attempt i says does not depend on batching or on interruptions;
- the kept trace is the lowest-numbered correct attempt; `attempts` is its number (1-based), or K
  when none of the K is correct, in which case the gold solution is kept (`source: fallback`);
- "correct" is `reasoning.read_answer` equal to the gold: the same extractor as the metric's strict
  column and the GRPO correctness reward (`#### n`, or `<SOLUTION>n</SOLUTION>` in the tags style, read
  only after the reasoning section; an attempt that ended inside its reasoning has no answer).

Speed: all K attempts of a problem enter the engine together and share one encoding of its prompt
(the few-shot prefix shared by every problem is encoded once per run); once attempt i is known
correct, attempts after i are cancelled, queued ones never start and running ones leave the batch.
Attempts before i keep running: one of them may still be correct and come first. With
`all_attempts`, every attempt runs (no early stop), which gives the combinatorial pass@k estimator
more samples to work with.

Resumable (`gsmkit.run_folder`, file layout): decided problems are appended to `<stem>.partial.jsonl`
next to `<stem>.run.json` (the settings fingerprint); a rerun skips them, and the final files are
written atomically at the end.

`--data gsm8k:train` / `gsm8k:test` name a split of the Hub dataset; resolved settings
(`TraceSettings.resolved()`) hold it as read (`data` openai/gsm8k, `split` train), so manifests and
fingerprints name the source as it was read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.evaluation.run import OnProgress, OnStart, run_inputs
from gsmkit.fields import Record, setting
from gsmkit.generation import SamplingSettings
from gsmkit.modeling import ModelSpec
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.settings import (
    DEFAULT_SOURCE,
    DecodeOptions,
    ProblemOptions,
    ProblemRunOptions,
    SamplingOptions,
    override,
    resolved_model,
)

# Sidecars of the traces file (`RunOutput.file` names them `<stem>.<sidecar>`): the stats are
# `traces.jsonl.stats.json` (the whole file name, then .stats.json: --out always ends in .jsonl), the journal
# `traces.partial.jsonl` (runs before 2026-12 wrote their stats as `<stem>.stats.json`).
STATS = "jsonl.stats.json"
PARTIAL = "partial.jsonl"
HUB_SPLITS = "gsm8k:"  # --data gsm8k:train | gsm8k:test: a split of the Hub dataset
HUB_DATASET = DEFAULT_SOURCE
DEFAULT_SPLIT = "train"


def resolve_data(data: str, split: str | None) -> tuple[str, str]:
    """(source, split): `gsm8k:<split>` names the Hub dataset's split; any other `data` is a GSM8K source,
    read at `split` (train when not given)."""
    if not data.startswith(HUB_SPLITS):
        return data, split or DEFAULT_SPLIT
    named = data[len(HUB_SPLITS):]
    if split is not None and split != named:
        raise ConfigError(f"--data {data} names split '{named}', and --split says '{split}'",
                          hint=f"drop --split, or pass --data {HUB_DATASET} --split {split}")
    return HUB_DATASET, named


@dataclass(frozen=True)
class TraceSettings(ProblemRunOptions):
    model: ModelSpec
    out: Path = setting(Path("traces.jsonl"), "Traces file to write (JSONL); stats go to <stem>.stats.json.",
                        short="-o", path={"dir_okay": False})
    data: str = override(ProblemOptions, "data", f"{HUB_SPLITS}{DEFAULT_SPLIT}", help=(
        f"{HUB_SPLITS}train | {HUB_SPLITS}test (the Hub dataset), or a GSM8K source: a Hub id or a local "
        ".jsonl/.json/.parquet file or folder."))
    split: str | None = override(ProblemOptions, "split", None, show_default=False,
                                 help=f"Split of a GSM8K source. [default: {DEFAULT_SPLIT}]")
    num_samples: int | None = setting(None, "Problems to trace (after --offset; default: the whole split).",
                                      min=1, show_default=False)
    max_attempts: int = setting(5, "Sampled attempts per problem before falling back to the gold solution "
                                "(K).", min=1)
    all_attempts: bool = setting(False, "Sample all K attempts even after a correct one (slower; unbiased "
                                 "pass@k over K samples).")
    keep_attempts: bool = setting(False, "Also write every counted attempt (text, answer, correct) in each "
                                  "row.")
    temperature: float = override(SamplingOptions, "temperature", 0.8, help="Sampling temperature.")
    top_p: float = override(SamplingOptions, "top_p", 0.95, help="Nucleus sampling mass.")
    max_new_tokens: int = override(DecodeOptions, "max_new_tokens", help="Generation budget per attempt.")
    batch_size: int | None = override(DecodeOptions, "batch_size", help="Attempts generated together.")

    def __post_init__(self) -> None:
        resolve_data(self.data, self.split)  # a --data split that --split contradicts is refused here
        self.check_options()
        if self.out.suffix != ".jsonl":
            raise ConfigError(f"--out {self.out}: traces are written as JSON Lines",
                              hint="name it like traces.jsonl")
        self.sampling()

    def sampling(self, stop: tuple[str, ...] = ()) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, do_sample=True,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                seed=self.seed, stop=stop)

    def resolved(self) -> TraceSettings:
        """These settings as the run reads them (a new object; idempotent): `data` the source and `split` the
        split (`resolve_data`), steering as `SteerOptions.resolved_steer` resolves it, the model's adapter
        checked (`settings.resolved_model`)."""
        data, split = resolve_data(self.data, self.split)
        return dataclasses.replace(self, data=data, split=split, **self.resolved_steer(),
                                   **resolved_model(self))

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a partial run to be resumed (everything that changes the rows)."""
        from gsmkit.evaluation.run import problem_run_fingerprint

        return problem_run_fingerprint(self)


def run_output(settings: TraceSettings) -> RunOutput:
    """The traces file and its sidecars (stats, manifest), with a journal while the run goes on."""
    return RunOutput.file(settings.out, sidecars=(STATS,), journals=(PARTIAL,), overwrite=settings.overwrite,
                          what="trace generation", inputs=run_inputs(settings))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # Product form: no huge binomials, exact enough for any n a run can draw.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class TraceStats(Record):
    """`<out>.stats.json` of `generate-traces` (`traces.jsonl.stats.json`; the SFT-vs-GRPO protocol's keys,
    then gsmkit's): computed from the trace rows themselves, so the two agree.

    Attributes:
        total_samples: problems in the traces file
        grpo_successes: rows with `source` `model`: the kept trace is the model's own (the protocol's name;
            before it, `successes`)
        fallback_count: rows with `source` `fallback`: the gold solution was kept
        success_rate: `grpo_successes / total_samples`
        success_rate_ci95: 95% Wilson score interval of `success_rate`
        avg_attempts_for_successes: mean `attempts` over `model` rows (null when there are none)
        avg_attempts_overall: mean `attempts` over all rows
        total_attempts: sum of `attempts`
        max_attempts: K (`--max-attempts`)
        pass_at_k: `"1"` .. `"K"`: the estimated probability that at least one of k attempts is correct
        pass_at_k_estimator: `first-k (sequential attempts)`: per problem, 1 if its first correct attempt is
            among the first k (attempts are i.i.d., so this is unbiased); with `--all-attempts`, `unbiased
            (n=K samples per problem)`: Chen et al.'s `1 - C(n-c, k) / C(n, k)` with n = K and c =
            `num_correct`
        excluded_pool_problems: problems left out because they are among the run's k exemplars
        generated_this_run: problems decided by this invocation (fewer after a resume)
        attempts_this_run: attempts counted by this invocation
        completions_this_run: completions the engine finished, including attempts that ended in the same step
            as the one that made them unnecessary
        generated_tokens_this_run: tokens of those completions
        generation_s: seconds spent generating in this invocation
        attempts_per_s: `attempts_this_run` per second of `generation_s`
        problems_per_s: `generated_this_run` per second of `generation_s`
        tokens_per_s: `generated_tokens_this_run` per second of `generation_s`
        wall_s: seconds for this invocation, model loading included
        engine: the engine's counters (`prefix_tokens`, `prefill_tokens`, `decode_steps`, `generated_tokens`)
    """

    total_samples: int
    grpo_successes: int
    fallback_count: int
    success_rate: float
    success_rate_ci95: tuple[float, float]
    avg_attempts_for_successes: float | None
    avg_attempts_overall: float
    total_attempts: int
    max_attempts: int
    pass_at_k: dict[str, float]
    pass_at_k_estimator: str
    excluded_pool_problems: int
    generated_this_run: int
    attempts_this_run: int
    completions_this_run: int
    generated_tokens_this_run: int
    generation_s: float
    attempts_per_s: float
    problems_per_s: float
    tokens_per_s: float
    wall_s: float
    engine: dict[str, Any] = field(default_factory=dict)


def summarize(rows: list[dict[str, Any]], max_attempts: int, all_attempts: bool, timing: dict[str, Any],
              excluded: int = 0) -> TraceStats:
    """The stats sidecar, computed from the trace rows themselves (so the two always agree)."""
    from gsmkit.evaluation.stats import wilson_interval

    n = len(rows)
    wins = [r for r in rows if r["source"] == "model"]
    passes: dict[str, float] = {}
    for k in range(1, max_attempts + 1):
        if all_attempts:
            # Every attempt ran: the combinatorial estimator over all K samples of each problem.
            vals = [pass_at_k(max_attempts, r["num_correct"], k) for r in rows]
        else:
            # Attempts are i.i.d. draws, so "one of the first k was correct" is an unbiased estimate of
            # pass@k for each problem; the first correct attempt's number says exactly that.
            vals = [1.0 if r["source"] == "model" and r["attempts"] <= k else 0.0 for r in rows]
        passes[str(k)] = sum(vals) / n if n else 0.0
    gen_s = timing.get("generation_s", 0.0)
    return TraceStats(
        total_samples=n, grpo_successes=len(wins), fallback_count=n - len(wins),
        success_rate=len(wins) / n if n else 0.0, success_rate_ci95=wilson_interval(len(wins), n),
        avg_attempts_for_successes=sum(r["attempts"] for r in wins) / len(wins) if wins else None,
        avg_attempts_overall=sum(r["attempts"] for r in rows) / n if n else 0.0,
        total_attempts=sum(r["attempts"] for r in rows), max_attempts=max_attempts, pass_at_k=passes,
        pass_at_k_estimator=("unbiased (n=K samples per problem)" if all_attempts
                             else "first-k (sequential attempts)"),
        excluded_pool_problems=excluded,
        generated_this_run=timing.get("problems", 0), attempts_this_run=timing.get("attempts", 0),
        completions_this_run=timing.get("completions", 0), generated_tokens_this_run=timing.get("tokens", 0),
        generation_s=round(gen_s, 3),
        attempts_per_s=round(timing.get("attempts", 0) / gen_s, 4) if gen_s > 0 else 0.0,
        problems_per_s=round(timing.get("problems", 0) / gen_s, 4) if gen_s > 0 else 0.0,
        tokens_per_s=round(timing.get("tokens", 0) / gen_s, 2) if gen_s > 0 else 0.0,
        wall_s=round(timing.get("wall_s", 0.0), 3), engine=timing.get("engine", {}),
    )


def cut_after_answer(text: str, answer_format: str, section: Any = None, opened: bool = False) -> str:
    """The completion up to the end of the marker its answer was read from (`#### n` line or the last
    `</SOLUTION>`), looked for only after its reasoning section (`reasoning.split_completion`), so a kept
    trace keeps its reasoning and ends in its answer, not in a draft inside the reasoning nor in whatever
    the model wrote next."""
    from gsmkit.answers import SOLUTION_END, STRICT_PATTERN
    from gsmkit.reasoning import split_completion

    answer = split_completion(text, section, opened).answer
    head = text[: len(text) - len(answer)]  # the answer text is the completion's tail
    if answer_format == "tags":
        end = answer.rfind(SOLUTION_END)
        return (head + answer[: end + len(SOLUTION_END)]).strip() if end != -1 else text.strip()
    match = STRICT_PATTERN.search(answer)
    return (head + answer[: match.end()]).rstrip(".,").strip() if match else text.strip()


class _Problem:
    """The attempts of one problem as they arrive (in any order), and the decision they allow."""

    def __init__(self, max_attempts: int, all_attempts: bool):
        self.max_attempts = max_attempts
        self.all_attempts = all_attempts
        self.results: dict[int, tuple[bool, Any]] = {}
        self.first_correct: int | None = None  # lowest correct index seen so far (maybe not final yet)

    def add(self, index: int, correct: bool, result: Any) -> None:
        self.results[index] = (correct, result)
        if correct and (self.first_correct is None or index < self.first_correct):
            self.first_correct = index

    def needed(self, index: int) -> bool:
        """Whether attempt `index` can still change the outcome (or the stats, with all_attempts)."""
        if self.all_attempts:
            return True
        return self.first_correct is None or index < self.first_correct

    def decided(self) -> bool:
        if self.all_attempts:
            return len(self.results) == self.max_attempts
        if self.first_correct is not None:
            return all(i in self.results for i in range(self.first_correct))
        return len(self.results) == self.max_attempts


def generate_traces(settings: TraceSettings, on_start: OnStart = None,
                    on_progress: OnProgress = None) -> TraceStats:
    """Run the trace generation; `on_start(total, already_done)` and `on_progress(n)` drive a progress bar."""
    t_wall = time.perf_counter()
    from gsmkit.answers import answers_equal, to_tags
    from gsmkit.evaluation.run import ProblemRun
    from gsmkit.generation import GenRequest
    from gsmkit.reasoning import opening_in_prompt, read_answer

    run = ProblemRun.start(settings, run_output, PARTIAL, settings.num_samples)
    settings, fmt, section = run.settings, run.answer_format, run.section  # answers are read after section
    by_id = {p.id: p for p in run.problems}
    todo = run.todo
    prompts = run.prompts()
    opened = {pid: prompt.opened for pid, prompt in prompts.items()}
    # a kept trace holds its whole section: the opening tag a thinking template wrote into the prompt goes in
    # front of the completion, so SFT on the trace teaches it (and the template reads the section back)
    opening = {pid: opening_in_prompt(prompt.text, section) for pid, prompt in prompts.items()}
    requests = [GenRequest(p.id, prompts[p.id].ids, num_samples=settings.max_attempts) for p in todo]

    def answer_of(pid: str, text: str) -> str | None:
        return read_answer(text, fmt, section, opened[pid])
    # Only now, with data, model and engine ready, does anything appear beside --out.
    run.begin(on_start)

    state = {p.id: _Problem(settings.max_attempts, settings.all_attempts) for p in todo}
    finished: set[str] = set()
    counts = {"problems": 0, "attempts": 0, "completions": 0, "tokens": 0}

    def cancelled(key: str, index: int) -> bool:
        return key in finished or not state[key].needed(index)

    def decide(pid: str) -> dict[str, Any]:
        p, st = by_id[pid], state[pid]
        attempts = st.first_correct + 1 if st.first_correct is not None else settings.max_attempts
        if st.first_correct is not None:
            answer = opening[pid] + cut_after_answer(st.results[st.first_correct][1].text, fmt, section,
                                                     opened[pid])
            source = "model"
        else:
            answer, source = (to_tags(p.answer) if fmt == "tags" else p.answer), "fallback"
        row: dict[str, Any] = {"id": p.id, "question": p.question, "answer": answer, "source": source,
                               "attempts": attempts, "gold": p.gold}
        if settings.all_attempts:
            row["num_correct"] = sum(ok for ok, _ in st.results.values())
        if settings.keep_attempts:
            shown = range(settings.max_attempts) if settings.all_attempts else range(attempts)
            row["attempt_texts"] = [
                {"text": st.results[i][1].text, "answer": answer_of(pid, st.results[i][1].text),
                 "correct": st.results[i][0], "finish_reason": st.results[i][1].finish_reason} for i in shown
            ]
        counts["attempts"] += settings.max_attempts if settings.all_attempts else attempts
        return row

    t_gen = time.perf_counter()
    with run.generating():
        for res in run.engine.generate(requests, run.sampling, cancelled=cancelled):
            counts["completions"] += 1
            counts["tokens"] += len(res.token_ids)
            if res.key in finished or not state[res.key].needed(res.sample_index):
                continue  # finished in the same step as the attempt that made it unnecessary
            p = by_id[res.key]
            correct = answers_equal(answer_of(p.id, res.text), p.gold)
            state[res.key].add(res.sample_index, correct, res)
            if state[res.key].decided():
                run.record(res.key, decide(res.key))
                finished.add(res.key)
                counts["problems"] += 1
                if on_progress is not None:
                    on_progress(1)
    gen_s = time.perf_counter() - t_gen
    processes = run.gather()
    missing = [p.id for p in run.problems if p.id not in run.done]
    if missing:  # the engine returned fewer attempts than asked: a bug, never a silently short file
        raise RuntimeError(f"{len(missing)} problems were not decided (first: {missing[0]})")

    rows = [run.done[p.id] for p in run.problems]
    timing = {**counts, "generation_s": gen_s, "wall_s": time.perf_counter() - t_wall,
              "engine": dict(run.engine.stats)}
    stats = summarize(rows, settings.max_attempts, settings.all_attempts, timing, run.excluded)
    manifest = run.manifest("generate-traces", answer_format=fmt, processes=processes)
    run.publish({"main": jsonl_writer(rows),
                        STATS: json_writer({**stats.to_dict(), "traces": str(settings.out)}),
                        MANIFEST: json_writer(manifest)})
    return stats
