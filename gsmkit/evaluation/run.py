"""A resumable generation run over GSM8K problems, as `eval gsm8k` and `generate-traces` both make it.

In: the command's settings (`ProblemRunOptions`: `resolved()`, `fingerprint()`, `sampling(stop)`, `model`),
how its `RunOutput` is made from them, its journal, and how many problems it takes. Out: a `ProblemRun`
that holds the resolved settings, the problems (the few-shot pool's excluded), the rows an interrupted attempt
with the same settings finished, the engine, the resolved prompt style and its reasoning section; the command
then takes the `prompts()` of what is left, `begin`s, generates inside `generating()`, `record`s each finished
row and publishes with `manifest`.

Order, as every command keeps it: data, pool and output folder are checked before the model loads, and
the output folder comes into being (`begin`) only once data, model and engine are ready.

Several processes (`accelerate launch --num_processes N -m gsmkit ...`): each generates every N-th
problem into its own journal; `gather` reads them all once every process is done, and the main process
alone clears, begins and publishes, so the files are those one process writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from gsmkit.jsonl import Journal
from gsmkit.processes import Processes
from gsmkit.run_folder import RunOutput


def check_thinking_early(spec: Any, style: str, thinking: str, budget: int | None = None) -> None:
    """`--thinking on|off` and `--thinking-budget` checked against the tokenizer alone (cheap), before any
    model loads: a template without the thinking switch, or a style that renders none, is a misused option
    (`prompts.check_thinking`, exit 2), and so is a budget where the prompts have no reasoning section.
    `auto` without a budget needs no check, so nothing extra loads then."""
    if thinking == "auto" and budget is None:
        return
    from gsmkit.errors import UsageError
    from gsmkit.modeling import load_tokenizer
    from gsmkit.prompts import resolve_style
    from gsmkit.reasoning import section_for

    tokenizer = load_tokenizer(spec.model, spec.trust_remote_code)
    resolved = resolve_style(style, tokenizer, thinking)
    if budget is not None and section_for(resolved, tokenizer) is None:
        raise UsageError(f"--thinking-budget {budget}: the {resolved} prompts of this tokenizer have no "
                         "reasoning section (its chat template never writes <think>); drop it, or use "
                         "--style tags")


def run_inputs(settings: Any) -> tuple[Any, ...]:
    """The files and folders an `eval gsm8k` or `generate-traces` run reads (its output may never be one, nor
    replace one: `run_folder.check_output`); Hub ids are skipped there."""
    return (settings.data, settings.pool, settings.model.model, settings.model.adapter, settings.steer)


def problem_run_fingerprint(settings: Any) -> dict[str, Any]:
    """What must match for a partial `eval gsm8k` or `generate-traces` run to be resumed: every setting that
    changes its rows (not where they go, nor how fast they are made). A run without --thinking-budget
    leaves it out, so partial runs from before the option resume."""
    from gsmkit.generation.steering import steer_fingerprint
    from gsmkit.manifest import run_fingerprint

    ignore = ("out", "overwrite", "batch_size", "prefix_cache", "backend", "check_zero")
    if settings.thinking_budget is None:
        ignore += ("thinking_budget",)
    return {**run_fingerprint(settings, ignore), **steer_fingerprint(settings)}


@dataclass(frozen=True)
class Prompt:
    """One problem's prompt: its text, token ids, and whether it opened the reasoning section (a thinking
    template's `<think>` in the generation prompt: `reasoning.opened_by_prompt`)."""

    text: str
    ids: tuple[int, ...]
    opened: bool


# A command's progress callbacks: `on_start(total, already_done)` once, `on_progress(n)` per finished row.
OnStart = Callable[[int, int], None] | None
OnProgress = Callable[[int], None] | None


@dataclass
class ProblemRun:
    settings: Any
    output: RunOutput
    journal: Journal
    problems: list  # records.Problem, in dataset order
    exemplars: list  # the first k of the pool
    excluded: int  # problems dropped because they are pool exemplars
    done: dict[str, dict[str, Any]]  # id -> finished row (journalled by this or an interrupted attempt)
    loaded: Any  # modeling.LoadedModel, or None for vLLM
    tokenizer: Any
    engine: Any  # generation.Engine
    style: str  # resolved (never "auto")
    section: Any  # reasoning.Section the answers are read after (None: the whole completion)
    answer_format: str  # "hash" or "tags"
    sampling: Any  # generation.SamplingSettings, with the style's stop strings and --thinking-budget
    processes: Processes  # of this launch; each generates its shard of the problems
    journal_role: str

    @classmethod
    def start(cls, settings: Any, output_for: Callable[[Any], RunOutput], journal: str,
              limit: int | None) -> ProblemRun:
        """The run of `settings`, resolved first (`settings.resolved()`: `run.settings` holds them), into the
        output `output_for(settings)` with its journal `journal`, over at most `limit` problems."""
        from gsmkit.data.fewshot import problems_for_run
        from gsmkit.generation import build_engine
        from gsmkit.generation.budget import ThinkingBudget
        from gsmkit.generation.steering import steering_for
        from gsmkit.prompts import answer_format, resolve_style, stop_strings
        from gsmkit.reasoning import section_for

        settings = settings.resolved()
        output = output_for(settings)
        steering = steering_for(settings)
        problems, exemplars, excluded = problems_for_run(settings.data, settings.split, settings.offset,
                                                         limit, settings.pool, settings.k)
        check_thinking_early(settings.model, settings.style, settings.thinking, settings.thinking_budget)
        procs = Processes.from_env()
        if procs.is_main or not output.overwrite:  # the same checks everywhere; only the main one clears
            output.prepare(settings.fingerprint())
        procs.barrier()
        log = output.journal(journal, procs.index, procs.count)
        done = {row["id"]: row for row in output.journal_rows(journal)}
        loaded, tok, engine = build_engine(settings.model, settings.backend, settings.batch_size,
                                           settings.prefix_cache, settings.seed, steering)
        style = resolve_style(settings.style, tok, settings.thinking)
        section = section_for(style, tok)
        sampling = settings.sampling(stop_strings(style))
        if settings.thinking_budget is not None:  # (a section exists: check_thinking_early)
            sampling = replace(sampling, thinking_budget=ThinkingBudget(settings.thinking_budget, section))
        run = cls(settings, output, log, problems, exemplars, excluded, done, loaded, tok, engine, style,
                  section, answer_format(style), sampling, procs, journal)
        if steering is not None and settings.check_zero:
            run.check_zero()
        return run

    def check_zero(self) -> None:
        """`--check-zero`: the hooks at alpha = 0 reproduce the unsteered greedy outputs on the first problems
        (`steering.check_zero_steering`); before the output folder exists, so a failure leaves nothing."""
        import torch

        from gsmkit.generation import GenRequest
        from gsmkit.generation.steering import ZERO_CHECK_PROBLEMS, check_zero_steering

        requests = [GenRequest(p.id, tuple(self.encode(p.question)[1]))
                    for p in self.problems[:ZERO_CHECK_PROBLEMS]]
        with torch.inference_mode():
            check_zero_steering(self.engine, self.engine.steering, requests, self.sampling)

    @property
    def todo(self) -> list:
        """This process's problems still to generate (a resumed run has the rest; in a launch of several,
        process i takes every N-th problem from the i-th)."""
        return [p for p in self.processes.shard(self.problems) if p.id not in self.done]

    def encode(self, question: str) -> tuple[str, list[int]]:
        """(prompt text, token ids) of one problem, rendered as every command renders it."""
        from gsmkit.prompts import encode_prompt

        return encode_prompt(self.style, question, self.exemplars, self.tokenizer,
                             self.settings.system_prompt, self.settings.thinking)

    def prompts(self) -> dict[str, Prompt]:
        """The prompts of this process's problems still to generate, by id, in order (a resumed run has the
        rest): rendered and tokenized only now."""
        from gsmkit.reasoning import opened_by_prompt

        prompts = {}
        for p in self.todo:
            text, ids = self.encode(p.question)
            prompts[p.id] = Prompt(text, tuple(ids), opened_by_prompt(text, self.section))
        return prompts

    def begin(self, on_start: OnStart) -> None:
        """The run starts: its output exists and holds the fingerprint; the bar learns total and done (of
        this process's share)."""
        if self.processes.is_main:
            self.output.begin(self.settings.fingerprint())
        self.processes.barrier()
        if on_start is not None:
            mine = self.processes.shard(self.problems)
            on_start(len(mine), sum(p.id in self.done for p in mine))

    def gather(self) -> dict[str, Any]:
        """Once every process has generated its share: all rows, read from every process's journal, and
        what the manifest says of the processes (how many problems each journalled)."""
        self.processes.barrier()
        n = self.processes.count
        if n > 1:
            self.done = {row["id"]: row for row in self.output.journal_rows(self.journal_role)}
        per = [len(self.output.journal(self.journal_role, i, n).load()) for i in range(n)]
        self.processes.barrier()  # every process has read the journals before the main one removes them
        return {"count": n, "problems_journalled": per}

    def publish(self, writers: dict[str, Any]) -> None:
        """The main process publishes the output; the others wait until it has."""
        if self.processes.is_main:
            self.output.publish(writers)
        self.processes.barrier()

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """No autograd while the engine runs; the journal is closed however the loop ends."""
        import torch

        try:
            with torch.inference_mode() if self.loaded else contextlib.nullcontext():
                yield
        finally:
            self.journal.close()

    def record(self, key: str, row: dict[str, Any]) -> None:
        """A finished row: journalled (a kill loses at most the row being written) and kept."""
        self.journal.append(row)
        self.done[key] = row

    def manifest(self, command: str, **resolved: Any) -> dict[str, Any]:
        from gsmkit.data.gsm8k import source_file
        from gsmkit.manifest import build_manifest

        s = self.settings
        return build_manifest(
            command, s, seeds={"seed": s.seed},
            inputs={"data": source_file(s.data, s.split), "pool": s.pool, "steer": s.steer},
            extra={"resolved": {"style": self.style, **resolved, "stop": list(self.sampling.stop),
                                **self.engine.describe(), "excluded_pool_problems": self.excluded}},
        )
