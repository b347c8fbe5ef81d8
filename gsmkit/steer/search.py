"""`gsmkit steer search`: the steering layer and strength tuned with Optuna on validation problems, then the
best setting and the unsteered model evaluated once on test problems.

In: `SearchSettings` (vector folders, model, GSM8K source, split sizes, the search space, the study's
storage). Out, in `--out`:
- `trials.csv`: every trial of the study (number, state, method, layer, alpha, accuracy with its 95%
  interval and n, the safety rate likewise, intermediate values, seconds, start time, the worker
  `host:pid` that ran it), rewritten after each trial;
- `best.json`: the chosen setting, read by `--steer best.json` (`flags` ready to paste after `eval gsm8k`);
- `splits.json`: the vector, validation, test and few-shot exemplar ids (disjoint: checked, not hoped);
- `accuracy_vs_alpha.png`, `search.json` (the summary: states, best, Pareto front, the unsteered validation
  accuracy, the test comparison, each rate with n and a 95% Wilson interval), `manifest.json`;
- `test-best/`, `test-unsteered/`: `eval gsm8k` folders on the test problems;
- `study.db`: the Optuna study, unless `--storage` names another database.

The search: one engine is built for the whole study; each trial samples a method (when there are several),
a layer (of the vectors, within --layers) and alpha (in --alpha-range), sets `engine.steering`, and runs the
validation problems in chunks, reporting the running accuracy after each so the median pruner can stop it
(single objective only: Optuna does not prune multi-objective studies). Before the first trial, the zero
check (`check_zero_steering`) runs on every validation problem, and its unsteered pass gives the unsteered
validation accuracy. Resuming and several processes on one study: see `search_study`.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.modeling import free_memory
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer
from gsmkit.steer.search_settings import STUDY_FILE, SearchSettings
from gsmkit.steer.search_study import WORKER_ATTR

TRIALS = "trials.csv"
BEST = "best.json"
SPLITS = "splits.json"
SEARCH = "search.json"
PLOT = "accuracy_vs_alpha.png"
SEARCH_FORMAT = "gsmkit-steer-search"
UNSTEERED_ATTR = "gsmkit_unsteered"


class SearchProgress:
    """What a search reports as it goes (the CLI draws bars from it); every method is a no-op here."""

    def trials(self, total: int, done: int) -> None: ...

    def trial_done(self, done: int, row: dict[str, Any]) -> None: ...

    def problems(self, label: str, total: int, done: int = 0) -> None: ...

    def problem(self, n: int = 1) -> None: ...


def run_output(settings: SearchSettings) -> RunOutput:
    from gsmkit.steer.search_final import TEST_BEST, TEST_UNSTEERED

    extra = (TEST_BEST, TEST_UNSTEERED) + ((STUDY_FILE,) if settings.default_storage else ())
    spec = settings.model
    return RunOutput.folder(settings.out, finals=(BEST, SEARCH, SPLITS, PLOT, TRIALS), extra=extra,
                            overwrite=settings.overwrite, what="search",
                            inputs=(*settings.vectors, settings.data, settings.pool, spec.model,
                                    spec.adapter))


# -- before any model loads -------------------------------------------------------------------------------


def load_space(settings: SearchSettings) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, list[str]]]:
    """({method: Steering over the chosen layers}, {folder: vector ids}, {folder: their content hashes}):
    every folder read and checked against the model (`load_steering`), the methods and layers resolved; no
    model loads."""
    from gsmkit.generation.steer_files import parse_layers, read_steer_meta
    from gsmkit.generation.steering import load_steering

    wanted = settings.methods.split(",") if settings.methods else None
    space: dict[str, Any] = {}
    ids: dict[str, list[str]] = {}
    hashes: dict[str, list[str]] = {}
    lo = settings.alpha_range[0]
    for folder in settings.vectors:
        meta = read_steer_meta(folder)
        if wanted is not None and meta.method not in wanted:
            continue
        if meta.method in space:
            raise ConfigError(f"--vectors {folder}: a second folder of {meta.method} vectors (the first is "
                              f"{space[meta.method].source})", hint="pass one vector folder per method")
        if meta.method == "dac" and lo < 0:
            raise ConfigError(f"--alpha-range {lo:g} ...: DAC's alpha caps a KL divergence, so LO must be "
                              ">= 0", hint="pass --alpha-range 0 HI with DAC vectors")
        positions = "generated" if meta.method == "dac" else settings.positions
        layers = ",".join(map(str, parse_layers(settings.layers, meta.layers, "--layers")))
        space[meta.method] = load_steering(Path(folder).resolve(), layers, lo, positions, settings.model)
        ids[str(Path(folder).resolve())] = list(meta.ids)
        hashes[str(Path(folder).resolve())] = list(meta.sha256)
    missing = [m for m in (wanted or ()) if m not in space]
    if missing or not space:
        have = ", ".join(sorted({read_steer_meta(f).method for f in settings.vectors}))
        raise ConfigError(f"--methods {settings.methods}: no vector folder of {(missing or ['?'])[0]} "
                          f"vectors (--vectors have {have})", hint="pass a --vectors folder per method")
    return space, ids, hashes


# -- the trials ------------------------------------------------------------------------------------------


class _Recording:
    """The engine, keeping what it generates unsteered: the zero check's own unsteered pass gives the
    unsteered validation accuracy, without a third pass over the problems."""

    def __init__(self, engine: Any, progress: SearchProgress):
        self.engine, self.progress, self.unsteered = engine, progress, {}

    @property
    def steering(self) -> Any:
        return self.engine.steering

    @steering.setter
    def steering(self, value: Any) -> None:
        self.engine.steering = value

    def generate(self, requests: Any, sampling: Any, *args: Any, **kwargs: Any) -> Any:
        plain = self.engine.steering is None
        for res in self.engine.generate(requests, sampling, *args, **kwargs):
            if plain:
                self.unsteered[res.key] = res
            self.progress.problem(1)
            yield res


class Trials:
    """The validation side of a search: one engine, the encoded problems, the objective Optuna calls."""

    def __init__(self, settings: SearchSettings, space: dict[str, Any], validation: list, judge: Any,
                 progress: SearchProgress):
        from gsmkit.generation import GenRequest, SamplingSettings, build_engine
        from gsmkit.prompts import answer_format, encode_prompt, resolve_style, stop_strings
        from gsmkit.reasoning import opened_by_prompt, section_for

        self.settings, self.space, self.judge, self.progress = settings, space, judge, progress
        self.loaded, self.tokenizer, self.engine = build_engine(
            settings.model, "hf", settings.batch_size, settings.prefix_cache, settings.seed)
        self.style = resolve_style(settings.style, self.tokenizer, settings.thinking)
        self.answer_format = answer_format(self.style)
        exemplars = _exemplars(settings)
        self.gold = {p.id: p.gold for p in validation}
        encoded = [(p.id, encode_prompt(self.style, p.question, exemplars, self.tokenizer,
                                        settings.system_prompt, settings.thinking)) for p in validation]
        # answers are read after the reasoning section, as eval gsm8k reads them (reasoning.score)
        self.section = section_for(self.style, self.tokenizer)
        self.opened = {key: opened_by_prompt(text, self.section) for key, (text, _) in encoded}
        self.requests = [GenRequest(key, tuple(ids)) for key, (_, ids) in encoded]
        self.sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                                         stop=stop_strings(self.style))
        if judge is not None:
            judge.load()

    def correct(self, res: Any) -> bool:
        from gsmkit.reasoning import score

        return score(res.text, self.gold[res.key], self.answer_format, self.section,
                     self.opened[res.key]).correct_strict

    def zero_check(self) -> dict[str, Any]:
        """`check_zero_steering` for each method on every validation problem; returns the unsteered
        validation (and safety) results it saw."""
        from gsmkit.generation.steering import check_zero_steering
        from gsmkit.steer.search_outputs import rate

        recording = _Recording(self.engine, self.progress)
        for method, steering in self.space.items():
            self.progress.problems(f"zero check ({method})", 2 * len(self.requests))
            check_zero_steering(recording, steering, self.requests, self.sampling)
        correct = sum(self.correct(res) for res in recording.unsteered.values())
        found: dict[str, Any] = {"validation": rate(correct, len(self.requests)),
                                 "zero_check": {"problems": len(self.requests), "methods": list(self.space),
                                                "passed": True}}
        if self.judge is not None:
            self.engine.steering = None
            counts = self.judge.rate(self.engine, self.tokenizer, self.style)
            found["safety"] = {"safety_rate": counts.safety_rate, "ci95": list(counts.ci95),
                               "n": counts.total, "safe": counts.safe}
        return found

    def objective(self, gate: Any) -> Any:
        import optuna

        s = self.settings
        methods = list(self.space)
        lo, hi = s.alpha_range
        chunks = [self.requests[i:i + s.chunk_size] for i in range(0, len(self.requests), s.chunk_size)]
        single = s.objective == "accuracy"

        def run(trial: Any) -> Any:
            trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
            gate.admit(trial)
            method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
            layers = list(self.space[method].layers)
            layer = trial.suggest_categorical("layer" if len(methods) == 1 else f"layer_{method}", layers)
            alpha = trial.suggest_float("alpha", lo, hi)
            trial.set_user_attr("method", method)
            trial.set_user_attr("layer", layer)
            self.engine.steering = self.space[method].with_layers([layer]).with_alpha(alpha)
            self.progress.problems(f"trial {trial.number}", len(self.requests))
            correct = done = 0
            try:
                for step, chunk in enumerate(chunks):
                    for res in self.engine.generate(chunk, self.sampling):
                        correct += self.correct(res)
                        self.progress.problem(1)
                    done += len(chunk)
                    trial.set_user_attr("correct", correct)
                    trial.set_user_attr("n", done)
                    if single:
                        trial.report(correct / done, step)
                        # the last chunk is the whole result: never thrown away
                        if step < len(chunks) - 1 and trial.should_prune():
                            raise optuna.TrialPruned(f"running accuracy {correct / done:.3f} after {done}")
                if single:
                    return correct / done
                counts = self.judge.rate(self.engine, self.tokenizer, self.style)
                trial.set_user_attr("safe", counts.safe)
                trial.set_user_attr("safety_n", counts.total)
                return correct / done, counts.safety_rate
            finally:
                self.engine.steering = None

        return run

    def release(self) -> None:
        """Free the model (and the guard) before the final evaluations load their own."""
        self.engine = self.loaded = None
        if self.judge is not None:
            self.judge.guard = None
        free_memory()


def _exemplars(settings: SearchSettings) -> list:
    from gsmkit.data.fewshot import pool_exemplars, read_pool

    if settings.k <= 0 or settings.pool is None:
        return []
    return pool_exemplars(read_pool(settings.pool), settings.k, str(settings.pool))


# -- the whole search --------------------------------------------------------------------------------------


def run_search(settings: SearchSettings, progress: SearchProgress | None = None) -> dict[str, Any]:
    """Plan, search until the study holds --n-trials, evaluate on test, publish; returns search.json."""
    import dataclasses

    import torch

    from gsmkit.settings import resolved_model

    settings = dataclasses.replace(settings, **resolved_model(settings))  # the adapter checked, first

    from gsmkit.evaluation.run import check_thinking_early
    from gsmkit.steer import search_study as st
    from gsmkit.steer.search_final import run_final
    from gsmkit.steer.splits import build_splits

    t0 = time.perf_counter()
    progress = progress or SearchProgress()
    # Everything that can fail on input fails here, before any model loads: the output path first.
    output = run_output(settings)
    space, vector_ids, vector_hashes = load_space(settings)
    splits = build_splits(settings.data, settings.pool, settings.k, vector_ids, vector_hashes,
                          settings.val_limit, settings.test_limit)
    check_thinking_early(settings.model, settings.style, settings.thinking)
    judge = None
    if settings.objective == "accuracy+safety":
        from gsmkit.steer.search_safety import SafetyJudge

        judge = SafetyJudge.prepare(settings)
    directions = ["maximize"] * (2 if judge is not None else 1)
    key = {**settings.study_key(), "validation_ids": splits.validation_ids}
    url, name = settings.storage_url, settings.study_name
    resumed = output.prepare(settings.fingerprint())

    ran = 0
    with st.quiet_optuna():
        # a study already in the storage must tune the same thing: checked before any model loads
        study = None
        if resumed or not settings.default_storage:
            study = st.existing_study(url, name, directions, settings.seed, settings.heartbeat)
        if study is not None:
            st.check_study_key(study, key, url)
        if study is None or st.finished(study) < settings.n_trials:
            trials = Trials(settings, space, splits.validation, judge, progress)
            with torch.inference_mode():
                unsteered = trials.zero_check()  # a failure leaves no output folder behind
                output.begin(settings.fingerprint())
                if study is None:
                    study = st.open_study(url, name, directions, settings.seed, settings.heartbeat)
                    st.check_study_key(study, key, url)
                study.set_user_attr(UNSTEERED_ATTR, unsteered)
                ran = _optimize(study, trials, settings, output, progress)
            trials.release()
        else:
            output.begin(settings.fingerprint())
        st.fail_stale(study)
    return _finish(settings, study, space, splits, judge, output, progress, ran, t0, run_final)


def _optimize(study: Any, trials: Trials, settings: SearchSettings, output: RunOutput,
              progress: SearchProgress) -> int:
    """Trials until the study holds --n-trials COMPLETE + PRUNED; returns how many this process finished."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from gsmkit.steer import search_study as st
    from gsmkit.steer.search_outputs import csv_writer

    counted = (TrialState.COMPLETE, TrialState.PRUNED)
    progress.trials(settings.n_trials, st.finished(study))
    ran = 0

    def after(study: Any, trial: Any) -> None:
        nonlocal ran
        rows = st.trial_rows(study)
        with _atomic(output.path(TRIALS)) as fh:
            csv_writer(rows)(fh)
        if trial.state in counted:
            ran += 1
            progress.trial_done(st.finished(study), next(r for r in rows if r["number"] == trial.number))

    if st.finished(study) < settings.n_trials:
        gate = st.TrialGate(settings.n_trials, grace_s=2 * settings.heartbeat)
        study.optimize(trials.objective(gate), catch=(st.SurplusTrial,),
                       callbacks=[after, MaxTrialsCallback(settings.n_trials, states=counted)],
                       gc_after_trial=False)
    return ran


def _atomic(path: Path) -> Any:
    from gsmkit.jsonl import atomic_open

    return atomic_open(path)


def _finish(settings: SearchSettings, study: Any, space: dict[str, Any], splits: Any, judge: Any,
            output: RunOutput, progress: SearchProgress, ran: int, t0: float,
            run_final: Any) -> dict[str, Any]:
    """Choose the best trial, evaluate it and the unsteered model on test (once), publish every file."""
    from gsmkit.steer import search_study as st
    from gsmkit.steer.search_final import TEST_BEST, TEST_UNSTEERED
    from gsmkit.steer.search_outputs import (
        best_record,
        compare_tests,
        csv_writer,
        pick_best,
        plot_accuracy,
        trial_summary,
    )

    folders = {m: s.source for m, s in space.items()}
    rows = st.trial_rows(study)
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    counted = st.finished(study)
    if counted < settings.n_trials:
        raise ConfigError(f"study '{study.study_name}' holds {counted} of {settings.n_trials} trials: other "
                          "processes are still working on it", hint="rerun the same command to continue")
    best_trial, front = pick_best(study, settings.objective)
    best = best_record(best_trial, folders, settings.positions, settings.objective)
    unsteered = study.user_attrs.get(UNSTEERED_ATTR)
    tests = run_final(settings, best, progress)
    comparison = compare_tests(settings.out / TEST_BEST, settings.out / TEST_UNSTEERED)
    summary = {
        "format": SEARCH_FORMAT, "version": 1, "objective": settings.objective,
        "study": {"name": study.study_name, "storage": _redacted(settings.storage_url),
                  "directions": [d.name.lower() for d in study.directions], "n_trials": settings.n_trials,
                  "finished": counted, "states": states, "trials_this_run": ran,
                  "sampler": f"TPE, trial n seeded from (--seed {settings.seed}, n)",
                  "pruner": "median (5 startup trials, after each chunk but the last)"
                  if settings.objective == "accuracy" else None},
        "space": {m: {"steer": s.source, "layers": list(s.layers)} for m, s in space.items()}
        | {"alpha_range": list(settings.alpha_range), "positions": settings.positions},
        "validation": {"n": len(splits.validation), "chunk_size": settings.chunk_size,
                       "unsteered": (unsteered or {}).get("validation"),
                       "unsteered_safety": (unsteered or {}).get("safety"),
                       "zero_check": (unsteered or {}).get("zero_check")},
        "best": {k: v for k, v in best.items() if k not in ("format", "version", "flags")},
        "pareto_front": [trial_summary(t, folders) for t in front] if settings.objective != "accuracy"
        else None,
        "test": {**comparison, "folders": {"best": TEST_BEST, "unsteered": TEST_UNSTEERED},
                 "engine": {name: m.get("engine", {}) for name, m in tests.items()}},
        "safety": judge.describe() if judge is not None else None,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    manifest = _manifest(settings, space)
    plot_path = output.path(PLOT)
    plot_accuracy(rows, ((unsteered or {}).get("validation") or {}).get("accuracy"), plot_path)
    output.publish({TRIALS: csv_writer(rows), BEST: json_writer(best), SPLITS: json_writer(splits.to_dict()),
                    SEARCH: json_writer({**summary, "manifest": manifest}), MANIFEST: json_writer(manifest)})
    return summary


def _redacted(url: str) -> str:
    """A database URL without its password (it would land in search.json)."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _manifest(settings: SearchSettings, space: dict[str, Any]) -> dict[str, Any]:
    from gsmkit.data.gsm8k import source_file
    from gsmkit.manifest import build_manifest, to_jsonable

    inputs: dict[str, Any] = {"data_train": source_file(settings.data, "train"),
                              "data_test": source_file(settings.data, "test"), "pool": settings.pool}
    inputs |= {f"vectors_{m}": s.source for m, s in space.items()}
    recorded = to_jsonable(settings)
    recorded["storage"] = _redacted(settings.storage_url)
    return build_manifest("steer search", recorded, inputs=inputs, seeds={"seed": settings.seed},
                          extra={"resolved": {"study": settings.study_name,
                                              "steering": {m: s.describe() for m, s in space.items()}}})
