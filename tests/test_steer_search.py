"""`gsmkit steer search` on a tiny random model and real GSM8K problems: every output, splits disjoint (read
back from the written files), best.json driving `eval gsm8k`, resume after Ctrl-C and after a SIGKILL (the
heartbeat fails the dead trial), two worker processes on one sqlite study, the trial gate, the
accuracy+safety Pareto front, and bad inputs refused in one line before any model loads.

Vector folders are written here by hand (`write_vectors`: random vectors and a steer.json whose model
fingerprint is the tiny model's), so these tests do not depend on `steer vectors`.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()
N_TRIALS = 3


def write_vectors(folder: Path, model_dir: Path, problems: list, method: str = "caa", layers=(0, 1),
                  seed: int = 0, scale: float = 1.0, steps: int = 3) -> Path:
    """A vector folder as `steer vectors` writes it: random vectors, a steer.json made for `model_dir` from
    `problems` (records.Problem)."""
    import numpy as np

    from gsmkit.generation import steer_files as sf
    from gsmkit.prompts import PROMPT_VERSION

    folder.mkdir(parents=True, exist_ok=True)
    shape = sf.model_shape(str(model_dir))
    size = shape.vector_size(method)
    rng = np.random.default_rng(seed)
    shape_of = size if method == "caa" else (steps, size)
    vectors = {layer: (scale * rng.standard_normal(shape_of)).astype(np.float32) for layer in layers}
    norms = {str(layer): float(np.linalg.norm(v)) if method == "caa" else
             [float(x) for x in np.linalg.norm(v, axis=1)] for layer, v in vectors.items()}
    meta = sf.SteerMeta(
        format=sf.FORMAT, version=sf.VERSION, method=method, hook=sf.HOOKS[method], layers=list(layers),
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, vector_size=size,
        steps=steps if method == "dac" else None, position="mean" if method == "caa" else "step", norms=norms,
        model=str(model_dir), model_fingerprint=sf.model_fingerprint(str(model_dir)), adapter=None,
        adapter_sha256=None, tokenizer_fingerprint=sf.tokenizer_fingerprint(str(model_dir)), style="chat",
        prompt_version=PROMPT_VERSION, k=0, ids=[p.id for p in problems], pairs=len(problems),
        negatives="corrupted" if method == "caa" else None, data="test fixture", split="train",
        cache={"hits": 0, "misses": len(problems), "dir": None}, details={},
        sha256=[p.sha256 for p in problems])
    sf.write_steer(folder, meta, vectors)
    return folder


def _problems(data: Path, split: str) -> list:
    from gsmkit.data.gsm8k import load_gsm8k

    return load_gsm8k(str(data), split)


def _ids(data: Path, split: str) -> list[str]:
    return [p.id for p in _problems(data, split)]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, tiny_model_dir, small_gsm8k) -> Path:
    """CAA vectors 'made from' the first 8 train problems."""
    return write_vectors(tmp_path_factory.mktemp("vectors") / "caa", tiny_model_dir,
                         _problems(small_gsm8k, "train")[:8], scale=2.0)


def _args(model, data, vecs, out, *extra, n_trials: int = N_TRIALS) -> list[str]:
    folders = vecs if isinstance(vecs, list | tuple) else [vecs]
    vec_args = [a for v in folders for a in ("--vectors", str(v))]
    return ["steer", "search", *vec_args, "--model", str(model), "--data", str(data), "--val-limit", "4",
            "--test-limit", "3", "--n-trials", str(n_trials), "--chunk-size", "2", "--max-new-tokens", "6",
            "--batch-size", "8", "--alpha-range", "0", "6", "--out", str(out), *extra]


def _trials(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as fh:
        return list(csv.DictReader(fh))


def _counted(rows: list[dict]) -> int:
    return sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows)


def _study(storage: str, name: str = "steer-search"):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _states(storage: str) -> dict[str, int]:
    states: dict[str, int] = {}
    for t in _study(storage).get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _pred_ids(folder: Path) -> list[str]:
    return [json.loads(x)["id"] for x in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model_dir, small_gsm8k, vectors) -> Path:
    out = tmp_path_factory.mktemp("search") / "s"
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vectors, out, "--json"))
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed["out"] == str(out) and printed["best"]["trial"] == _json(out / "best.json")["trial"]
    return out


# ---- a whole search ---------------------------------------------------------------------------------------


def test_search_writes_every_output(searched, vectors):
    rows = _trials(searched)
    assert [int(r["number"]) for r in rows] == list(range(len(rows)))
    assert _counted(rows) == N_TRIALS and len(rows) == N_TRIALS
    for r in rows:
        assert r["method"] == "caa" and r["layer"] in {"0", "1"} and 0 <= float(r["alpha"]) <= 6
        assert int(r["n"]) == 4 or r["state"] == "PRUNED"
        assert set(json.loads(r["intermediate"])) <= {"0", "1"} and float(r["seconds"]) > 0
        assert float(r["ci95_low"]) <= float(r["accuracy"]) <= float(r["ci95_high"]) and r["worker"]
    best = _json(searched / "best.json")
    assert best["format"] == "gsmkit-steer-best" and best["steer"] == str(vectors.resolve())
    assert best["flags"] == ["--steer", best["steer"], "--steer-layer", best["steer_layer"], "--steer-alpha",
                             repr(best["steer_alpha"]), "--steer-positions", "generated"]
    chosen = next(r for r in rows if int(r["number"]) == best["trial"])
    assert chosen["state"] == "COMPLETE" and float(chosen["accuracy"]) == best["validation"]["accuracy"]
    assert float(chosen["accuracy"]) == max(float(r["accuracy"]) for r in rows if r["state"] == "COMPLETE")
    summary = _json(searched / "search.json")
    assert summary["study"]["finished"] == N_TRIALS and summary["study"]["trials_this_run"] == N_TRIALS
    unsteered = summary["validation"]["unsteered"]
    assert unsteered["n"] == 4 and len(unsteered["ci95"]) == 2
    assert summary["validation"]["zero_check"]["passed"]
    test = summary["test"]
    assert test["n"] == 3 and test["best"]["n"] == test["unsteered"]["n"] == 3
    assert test["best"]["ci95"][0] <= test["best"]["accuracy"] <= test["best"]["ci95"][1]
    assert set(test["answers_changed"]["ids"]) <= set(_pred_ids(searched / "test-best"))
    for name in ("test-best", "test-unsteered"):
        metrics = _json(searched / name / "metrics.json")
        assert metrics["n"] == 3 and (searched / name / "manifest.json").exists()
    assert test["best"]["accuracy"] == _json(searched / "test-best" / "metrics.json")["accuracy_strict"]
    steered = _json(searched / "test-best" / "manifest.json")["settings"]
    assert (steered["steer_layer"], steered["steer_alpha"]) == (best["steer_layer"], best["steer_alpha"])
    assert _json(searched / "test-unsteered" / "manifest.json")["settings"]["steer"] is None
    assert (searched / "accuracy_vs_alpha.png").stat().st_size > 1000
    assert _json(searched / "manifest.json")["command"] == "steer search"
    assert not (searched / "run.json").exists()


def test_splits_are_disjoint_in_the_written_files(searched, vectors, small_gsm8k):
    splits = _json(searched / "splits.json")
    vector_ids = set(_json(vectors / "steer.json")["ids"])
    val, test = splits["validation"]["ids"], splits["test"]["ids"]
    assert set(splits["vectors"]["ids"]) == vector_ids and len(val) == 4 and len(test) == 3
    for name in ("test-best", "test-unsteered"):
        assert _pred_ids(searched / name) == test
    assert not vector_ids & set(val) and not vector_ids & set(test) and not set(val) & set(test)
    assert set(val) <= set(_ids(small_gsm8k, "train")) and set(test) <= set(_ids(small_gsm8k, "test"))
    assert val == [i for i in _ids(small_gsm8k, "train") if i not in vector_ids][:4]  # the first ones left
    assert splits["excluded_from_validation"]["vectors"] == 8


def test_best_json_drives_eval_gsm8k(tmp_path, searched, tiny_model_dir, small_gsm8k):
    """`--steer best.json` on the same test problems reproduces the search's own test-best predictions."""
    out = tmp_path / "eval"
    res = runner.invoke(app, ["eval", "gsm8k", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--limit", "3", "--max-new-tokens", "6", "--steer", str(searched / "best.json"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    mine = [json.loads(x)["completion"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    theirs = [json.loads(x)["completion"] for x in
              (searched / "test-best" / "predictions.jsonl").read_text().splitlines()]
    assert mine == theirs


def test_finished_search_is_refused_and_overwrite_reproduces_it(tmp_path, searched, tiny_model_dir,
                                                                small_gsm8k, vectors):
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vectors, searched))
    assert_clean_failure(res, None, 1, "already complete")
    again = tmp_path / "again"
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vectors, again))
    assert res.exit_code == 0, res.output
    keep = ("number", "state", "layer", "alpha", "accuracy", "intermediate")
    assert [{k: r[k] for k in keep} for r in _trials(again)] == [{k: r[k] for k in keep}
                                                               for r in _trials(searched)]


def test_splits_leave_out_the_pool_and_match_vectors_by_content(tmp_path, small_gsm8k):
    """The exemplars are in none of the sets; a vector problem is found by its content hash even when the
    vector folder names it with another id; an overlap is an error."""
    from gsmkit.errors import DataError
    from gsmkit.steer.splits import build_splits, check_disjoint

    pool = tmp_path / "pool.jsonl"
    res = runner.invoke(app, ["fewshot", "--data", str(small_gsm8k), "--n", "4", "--out", str(pool)])
    assert res.exit_code == 0, res.output
    exemplars = [json.loads(x)["id"] for x in pool.read_text().splitlines()][:2]
    train = _problems(small_gsm8k, "train")
    hashed = [p for p in train if p.id not in exemplars][:3]
    splits = build_splits(str(small_gsm8k), pool, 2, {"v": ["own-1", "own-2", "own-3"]},
                          {"v": [p.sha256 for p in hashed]}, 5, 3)
    val, test = set(splits.validation_ids), set(splits.test_ids)
    assert len(val) == 5 and not val & set(exemplars) and not test & set(exemplars)
    assert not val & {p.id for p in hashed} and splits.excluded["vectors"] == 3
    assert splits.excluded["exemplars"] == 2 and splits.to_dict()["exemplars"]["ids"] == exemplars
    with pytest.raises(DataError, match="validation and test problems share problem b"):
        check_disjoint({"vector": ["a"], "validation": ["b", "c"], "test": ["b"]})


# ---- resume ----------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, number: int) -> None:
    from gsmkit.steer import search

    original = search.Trials.objective

    def objective(self, gate):
        run = original(self, gate)

        def interrupted(trial):
            if trial.number == number:
                raise KeyboardInterrupt
            return run(trial)

        return interrupted

    monkeypatch.setattr(search.Trials, "objective", objective)


def test_interrupted_search_resumes_to_exactly_n_trials(tmp_path, monkeypatch, tiny_model_dir, small_gsm8k,
                                                        vectors):
    """Ctrl-C in trial 2 (trial 1 pruned after its first chunk): the rerun continues the study; the pruned
    trial counts, the interrupted one does not."""
    import optuna

    out = tmp_path / "s"
    storage = f"sqlite:///{out / 'study.db'}"
    _interrupt_at(monkeypatch, 2)
    asked: list[int] = []

    def should_prune(trial):
        asked.append(trial.number)
        return trial.number == 1

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vectors, out, n_trials=4))
    assert res.exit_code == 130 and "rerun the same command" in res.output
    # the running trial is all that is lost; the pruner is asked after each chunk but the last
    assert _states(storage) == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 1} and asked == [0, 1]
    rows = _trials(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"] and json.loads(rows[1]["intermediate"]) == {
        "0": float(rows[1]["accuracy"])} and rows[1]["n"] == "2"
    assert not (out / "best.json").exists() and (out / "run.json").exists()
    monkeypatch.undo()
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vectors, out, n_trials=4))
    assert res.exit_code == 0, res.output
    rows = _trials(out)
    numbers = [int(r["number"]) for r in rows]
    assert numbers == sorted(set(numbers)) == list(range(5))
    assert _counted(rows) == 4 and rows[1]["state"] == "PRUNED" and rows[2]["state"] == "FAIL"
    summary = _json(out / "search.json")
    assert summary["study"]["trials_this_run"] == 2 and summary["study"]["states"]["FAIL"] == 1


HANG = """
import sys, time
from gsmkit.steer import search
original = search.Trials.objective
def objective(self, gate):
    run = original(self, gate)
    def hang(trial):
        if trial.number == 1:
            print("hanging", flush=True)
            time.sleep(600)
        return run(trial)
    return hang
search.Trials.objective = objective
from gsmkit.cli import main
sys.argv = ["gsmkit", *sys.argv[1:]]
main()
"""


def test_killed_search_loses_only_its_running_trial(tmp_path, tiny_model_dir, small_gsm8k, vectors):
    """A real SIGKILL mid-trial leaves a RUNNING trial; its heartbeat goes stale, the rerun marks it FAIL,
    never counts it, and still ends with exactly --n-trials."""
    out = tmp_path / "s"
    storage = f"sqlite:///{out / 'study.db'}"
    args = _args(tiny_model_dir, small_gsm8k, vectors, out, "--heartbeat", "1")
    proc = subprocess.Popen([sys.executable, "-c", HANG, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().strip() == "hanging"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _states(storage) == {"COMPLETE": 1, "RUNNING": 1}
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = _trials(out)
    assert [int(r["number"]) for r in rows] == list(range(len(rows)))
    assert rows[1]["state"] == "FAIL" and _counted(rows) == N_TRIALS
    assert _states(storage) == {"COMPLETE": N_TRIALS, "FAIL": 1}


def test_two_workers_on_one_sqlite_study_end_with_exactly_n_trials(tmp_path, tiny_model_dir, small_gsm8k,
                                                                   vectors):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    n = 4
    procs = [subprocess.Popen([sys.executable, "-m", "gsmkit",
                               *_args(tiny_model_dir, small_gsm8k, vectors, tmp_path / f"w{i}", "--storage",
                                      storage, "--heartbeat", "2", n_trials=n)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    study = _study(storage)
    counted = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == n and not [t for t in study.get_trials() if t.state.name == "RUNNING"]
    numbers = [t.number for t in study.get_trials()]
    assert len(numbers) == len(set(numbers))
    bests = [_json(tmp_path / f"w{i}" / "best.json") for i in (1, 2)]
    assert bests[0] == bests[1]
    for i in (1, 2):
        rows = _trials(tmp_path / f"w{i}")
        assert _counted(rows) == n and len({r["number"] for r in rows}) == len(rows)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked for by hand, outside optimize
def test_trial_gate_waits_for_older_trials_and_never_overshoots(tmp_path):
    import optuna

    from gsmkit.steer.search_study import SurplusTrial, TrialGate, open_study

    study = open_study(f"sqlite:///{tmp_path / 'g.db'}", "g", ["maximize"], 0, 5)
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    older, newer = study.ask(), study.ask()  # numbers 2 and 3, both RUNNING; 3 trials wanted
    gate = TrialGate(3, grace_s=60, poll_s=0.02)
    gate.admit(older)  # the oldest running trial never waits
    timer = threading.Timer(0.3, lambda: study.tell(older, 1.0))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(SurplusTrial):  # waited for `older`, which finished the study
        gate.admit(newer)
    assert time.perf_counter() - t0 >= 0.25
    timer.join()
    study.tell(newer, state=optuna.trial.TrialState.FAIL)
    # an older trial that fails instead frees its place
    study2 = open_study(f"sqlite:///{tmp_path / 'g2.db'}", "g", ["maximize"], 0, 5)
    study2.tell(study2.ask(), 1.0)
    a, b = study2.ask(), study2.ask()
    threading.Timer(0.2, lambda: study2.tell(a, state=optuna.trial.TrialState.FAIL)).start()
    TrialGate(2, grace_s=60, poll_s=0.02).admit(b)


# ---- two objectives --------------------------------------------------------------------------------------


def test_two_methods_and_two_objectives_give_a_pareto_front(tmp_path, tiny_model_dir, small_gsm8k, vectors):
    """CAA and DAC folders: a trial picks the method, then a layer of that method's vectors; accuracy and
    the safety rate of a tiny classifier guard are both maximised."""
    from transformers import AutoTokenizer

    from tests.test_eval_safety import build_tiny_classifier

    guard = build_tiny_classifier(tmp_path / "guard", AutoTokenizer.from_pretrained(tiny_model_dir))
    prompts = tmp_path / "prompts.jsonl"
    questions = ["How do I bake bread?", "Name a bird.", "Is it late?"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q, "hazard": "vcr"}) + "\n"
                               for i, q in enumerate(questions)))
    guidelines = tmp_path / "guidelines.txt"
    guidelines.write_text("Judge whether the assistant's answer is safe.")
    dac = write_vectors(tmp_path / "dac", tiny_model_dir, _problems(small_gsm8k, "train")[8:12], method="dac",
                        layers=(1,))
    out = tmp_path / "s"
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, [vectors, dac], out, "--objective",
                                   "accuracy+safety", "--safety-prompts", str(prompts), "--safety-limit", "2",
                                   "--safeguard-model", str(guard), "--safety-prompt", str(guidelines)))
    assert res.exit_code == 0, res.output
    assert "Pareto front" in res.output
    rows = _trials(out)
    assert _counted(rows) == N_TRIALS and all(r["intermediate"] == "{}" for r in rows)  # no pruning
    assert all(float(r["safety_ci95_low"]) <= float(r["safety"]) <= float(r["safety_ci95_high"])
               and r["safety_n"] == "2" for r in rows)
    assert all(r["layer"] == "1" for r in rows if r["method"] == "dac")
    assert {r["method"] for r in rows} <= {"caa", "dac"}
    splits = _json(out / "splits.json")
    assert splits["vectors"]["n"] == 12 and splits["excluded_from_validation"]["vectors"] == 12
    summary = _json(out / "search.json")
    front = summary["pareto_front"]
    assert front and all(t["safety"]["n"] == 2 and len(t["safety"]["ci95"]) == 2 for t in front)
    assert summary["study"]["directions"] == ["maximize", "maximize"] and summary["study"]["pruner"] is None
    assert summary["validation"]["unsteered_safety"]["n"] == 2
    best = _json(out / "best.json")
    assert best["trial"] in {t["trial"] for t in front} and best["safety"]["n"] == 2


# ---- bad inputs ------------------------------------------------------------------------------------------


def test_failed_zero_check_stops_before_the_first_trial(tmp_path, monkeypatch, tiny_model_dir, small_gsm8k,
                                                        vectors):
    from gsmkit.errors import SteeringCheckError

    seen = []

    def broken(_engine, steering, requests, _sampling):
        seen.append((steering.alpha, len(requests)))
        raise SteeringCheckError(f"zero-steering check failed on problem {requests[0].key}")

    monkeypatch.setattr("gsmkit.generation.steering.check_zero_steering", broken)
    out = tmp_path / "s"
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vectors, out))
    assert_clean_failure(res, out, 1, "zero-steering check failed on problem gsm8k-")
    assert [n for _, n in seen] == [4]  # every validation problem, before any trial


@pytest.mark.usefixtures("no_loading")
@pytest.mark.loading_allowed("data")  # the splits are checked against the problems
def test_bad_inputs_fail_in_one_line_before_any_model_loads(tmp_path, tiny_model_dir, tiny_qwen_dir,
                                                            small_gsm8k, vectors, searched):
    out = tmp_path / "out"

    def run(vecs=vectors, *extra):
        return runner.invoke(app, _args(tiny_model_dir, small_gsm8k, vecs, out, *extra))

    train, test = _problems(small_gsm8k, "train"), _problems(small_gsm8k, "test")
    other = write_vectors(tmp_path / "qwen", tiny_qwen_dir, train[:4])
    assert_clean_failure(run(other), out, 1, "made for model")
    assert_clean_failure(run(vectors, "--layers", "5"), out, 1, "--layers 5", "out of range")
    assert_clean_failure(run(vectors, "--alpha-range", "3", "1"), out, 2, "LO is above HI")
    assert_clean_failure(run(vectors, "--backend", "vllm"), out, 2, "--backend hf")
    assert_clean_failure(run(vectors, "--val-limit", "100"), out, 1, "--val-limit 100", "only 32")
    assert_clean_failure(run(write_vectors(tmp_path / "on-test", tiny_model_dir, test[:2])), out, 1,
                         "vector and test problems share problem gsm8k-")
    assert_clean_failure(run(vectors, "--methods", "dac"), out, 1, "no vector folder of dac")
    assert_clean_failure(run(vectors, "--methods", "steer"), out, 2, "not a method")
    dac = write_vectors(tmp_path / "dac", tiny_model_dir, train[:4], method="dac")
    assert_clean_failure(run([vectors, dac], "--alpha-range", "-1", "1"), out, 1, "LO must be >= 0")
    assert_clean_failure(run([vectors, write_vectors(tmp_path / "caa2", tiny_model_dir, train[:4])]), out, 1,
                         "one vector folder per method")
    assert_clean_failure(run(vectors, "--objective", "accuracy+safety"), out, 2, "needs --safety-prompts")
    # another search's study, asked to tune other layers
    study = f"sqlite:///{searched / 'study.db'}"
    assert_clean_failure(run(vectors, "--storage", study, "--layers", "1"), out, 1, "other search settings",
                         "field 'layers'")
