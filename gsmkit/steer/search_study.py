"""The Optuna side of `steer search`: the study in its storage, the sampler, and the count of trials.

In: a storage URL, a study name, the directions, the seed, the heartbeat. Out: `open_study` (an Optuna
study on an `RDBStorage` with heartbeats, a TPE sampler seeded per trial, a median pruner), `finished`
(COMPLETE + PRUNED trials: the count `--n-trials` means), `existing_study` (a study already there,
without creating a database), `TrialGate` (keeps several processes on one study from running more than
`--n-trials`), and `check_study_key` (every process agrees on what is being tuned).

Several processes, one study: Optuna's own mechanism. Every process opens the same storage URL and study
name and asks it for trials; the database serialises them. gsmkit adds two rules:
- a trial counts when it is COMPLETE or PRUNED; a FAIL (a crash, Ctrl-C, a killed process whose heartbeat
  went stale) never counts, so a killed search loses at most the trial that was running;
- a process killed after its trial began leaves it RUNNING until its heartbeat is `2 x --heartbeat` seconds
  old, then it is FAIL (Optuna's `fail_stale_trials`); one killed before its first heartbeat is failed by
  `fail_unstarted` once it is twice that old;
- at the start of a trial, `TrialGate` counts the finished trials and the RUNNING ones with a lower number
  (older, so they will finish first); while those could already reach `--n-trials`, the trial waits; once
  the finished ones do, it ends as FAIL without evaluating (`SurplusTrial`, caught by `optimize`) and the
  process stops. The oldest running trial never waits, so two processes never wait on each other.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, ResumeError

STUDY_KEY_ATTR = "gsmkit_search"
SQLITE_TIMEOUT_S = 60  # a second process writing: wait for its lock instead of failing
STORAGE_ATTEMPTS = 5


class SurplusTrial(Exception):
    """The study already has its trials: this one ends as FAIL without evaluating anything."""


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite URL (None for other databases)."""
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) else None


def _storage(url: str, heartbeat: int) -> Any:
    import optuna

    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(STORAGE_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                  grace_period=2 * heartbeat)
            except Exception as err:  # noqa: BLE001 - sqlalchemy's many errors for a bad URL, as one line
                last = err
        # Two processes creating a new database's tables at once: one loses the race (a unique constraint
        # on the schema version, or a lock) and finds the tables there when it tries again.
        if type(last).__name__ not in ("IntegrityError", "OperationalError"):
            break
        time.sleep(0.2 * (attempt + 1))
    raise ConfigError(f"--storage {url}: cannot open it ({type(last).__name__}: {str(last)[:160]})",
                      hint="pass a database URL such as sqlite:///runs/study.db")


def make_sampler(seed: int) -> Any:
    """A TPE sampler whose trial n draws with seed (seed, n): reproducible for one process, and distinct
    for trials that several processes run at the same time."""
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.inner = optuna.samplers.TPESampler(seed=seed)

        def before_trial(self, study: Any, trial: Any) -> None:
            self.inner = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + trial.number) % 2**32)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            return self.inner.sample_independent(study, trial, name, distribution)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self.inner.after_trial(study, trial, state, values)

    return TrialSeededTPE()


def make_pruner() -> Any:
    """Median pruning after 5 unpruned trials (a trial's chunk 0 may already be cut)."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


def open_study(url: str, name: str, directions: list[str], seed: int, heartbeat: int) -> Any:
    """The study (created if missing) on its storage, with gsmkit's sampler and pruner."""
    import optuna

    storage = _storage(url, heartbeat)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    sampler=make_sampler(seed), pruner=make_pruner(), load_if_exists=True)
    except ValueError as err:  # load_if_exists with other directions
        raise ResumeError(f"--storage {url}: study '{name}' was made with other objectives ({err})",
                          hint="pass another --study-name, or the same --objective") from None
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise ResumeError(f"--storage {url}: study '{name}' maximises {len(have)} objective(s), this search "
                          f"{len(directions)}", hint="pass another --study-name, or the same --objective")
    return study


def check_study_key(study: Any, key: dict[str, Any], url: str) -> None:
    """Record what this study tunes, or refuse a study that tunes something else."""
    import json

    key = json.loads(json.dumps(key))
    have = study.user_attrs.get(STUDY_KEY_ATTR)
    if have is None:
        study.set_user_attr(STUDY_KEY_ATTR, key)
        return
    if have != key:
        field = next((k for k in sorted(set(have) | set(key)) if have.get(k) != key.get(k)), "?")
        raise ResumeError(f"--storage {url}: study '{study.study_name}' was made with other search "
                          f"settings (field '{field}' differs)",
                          hint="pass the same options, another --study-name, or another --storage")


def finished(study: Any) -> int:
    """COMPLETE + PRUNED trials: what `--n-trials` counts (FAIL and RUNNING never count)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def existing_study(url: str, name: str, directions: list[str], seed: int, heartbeat: int) -> Any | None:
    """The study if its storage already holds it (as `open_study` opens it), else None; creates no
    database file."""
    import optuna

    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    try:
        optuna.load_study(study_name=name, storage=_storage(url, heartbeat))
    except KeyError:
        return None
    return open_study(url, name, directions, seed, heartbeat)


def fail_stale(study: Any) -> None:
    """Mark RUNNING trials whose heartbeat went stale (their process was killed) as FAIL."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


WORKER_ATTR = "worker"  # set by a trial first thing: "host:pid"


def fail_unstarted(study: Any, trials: list[Any], grace_s: float) -> None:
    """FAIL the RUNNING trials whose process died before the trial began (no `worker` attribute, created more
    than 2 x `grace_s` ago): they may have no heartbeat at all, and Optuna never fails those."""
    import datetime

    import optuna

    now = datetime.datetime.now()
    for t in trials:
        started = t.datetime_start
        if WORKER_ATTR in t.user_attrs or started is None:
            continue
        if (now - started.replace(tzinfo=None)).total_seconds() > 2 * grace_s:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # another process got there first, or it finished after all


class TrialGate:
    """`admit(trial)` at the start of each trial: returns when the trial may evaluate, raises `SurplusTrial`
    when the study already holds `n_trials` (see the module docstring). `poll_s` is the wait between two
    looks while older running trials could finish the study; `grace_s` the storage's heartbeat grace
    period."""

    def __init__(self, n_trials: int, grace_s: float, poll_s: float = 1.0):
        self.n_trials = n_trials
        self.grace_s = grace_s
        self.poll_s = poll_s

    def admit(self, trial: Any) -> None:
        from optuna.trial import TrialState

        study = trial.study
        counted = (TrialState.COMPLETE, TrialState.PRUNED)
        while True:
            # one read for both counts: with two, an older trial finishing between them would be in neither
            trials = study.get_trials(deepcopy=False, states=(*counted, TrialState.RUNNING))
            done = sum(t.state in counted for t in trials)
            if done >= self.n_trials:  # MaxTrialsCallback stops the process after this FAIL
                raise SurplusTrial(f"the study already holds {done} finished trials")
            older = [t for t in trials if t.state == TrialState.RUNNING and t.number < trial.number]
            if done + len(older) < self.n_trials:
                return
            time.sleep(self.poll_s)
            fail_stale(study)
            fail_unstarted(study, older, self.grace_s)


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own log lines (one per trial, a warning per surplus trial) off while gsmkit reports."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial, by number: what trials.csv holds."""
    import json

    from gsmkit.evaluation.stats import wilson_interval

    def ci(successes: Any, n: Any) -> tuple[Any, Any]:
        return wilson_interval(successes, n) if isinstance(n, int) and n > 0 else ("", "")

    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        values = list(t.values) if t.values is not None else []
        seconds = t.duration.total_seconds() if t.duration is not None else None
        a = t.user_attrs
        acc_ci = ci(a.get("correct"), a.get("n"))
        safety_ci = ci(a.get("safe"), a.get("safety_n"))
        rows.append({
            "number": t.number, "state": t.state.name, "method": a.get("method", ""),
            "layer": a.get("layer", ""), "alpha": t.params.get("alpha", ""),
            "accuracy": values[0] if values else "", "ci95_low": acc_ci[0], "ci95_high": acc_ci[1],
            "n": a.get("n", ""), "correct": a.get("correct", ""),
            "safety": values[1] if len(values) > 1 else "", "safety_ci95_low": safety_ci[0],
            "safety_ci95_high": safety_ci[1], "safety_n": a.get("safety_n", ""),
            "intermediate": json.dumps({str(k): v for k, v in sorted(t.intermediate_values.items())}),
            "seconds": round(seconds, 3) if seconds is not None else "",
            "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
            "worker": t.user_attrs.get(WORKER_ATTR, ""),
        })
    return rows
