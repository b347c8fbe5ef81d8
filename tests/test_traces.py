"""`gsmkit generate-traces`: first-correct selection, gold fallback, stats that agree with the rows,
resume after a kill, determinism, bad inputs, and traces that `train sft` accepts."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_failure, kill_midway
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from gsmkit import generation
from gsmkit.cli import app
from gsmkit.generation import GenResult
from gsmkit.modeling import ModelSpec
from gsmkit.records import Problem
from gsmkit.traces import TraceSettings, cut_after_answer, generate_traces, pass_at_k, summarize

runner = CliRunner()


def _problems(folder: Path, split: str = "train") -> list[Problem]:
    lines = (folder / f"{split}.jsonl").read_text().splitlines()
    return [Problem.from_dict(json.loads(x), "t") for x in lines]


class StubEngine:
    """Attempt i of problem j is correct iff i is in `correct_at(j)`; results arrive out of order
    (4, 2, 3, 1, 0 for five attempts), as they may from a batch where later attempts finish earlier."""

    def __init__(self, gold_by_key: dict[str, str], correct_at):
        self.gold = gold_by_key
        self.index = {key: j for j, key in enumerate(gold_by_key)}  # j: the problem's row in the split
        self.correct_at = correct_at
        self.stats = {"generated_tokens": 0}
        self.started: list[tuple[str, int]] = []

    def generate(self, requests, _settings, on_result=None, cancelled=None):
        for r in requests:
            j = self.index[r.key]
            order = [4, 2, 3, 1, 0] if r.num_samples == 5 else list(reversed(range(r.num_samples)))
            for s in order:
                if cancelled is not None and cancelled(r.key, s):
                    continue
                self.started.append((r.key, s))
                right = s in self.correct_at(j)
                text = f"attempt {s}: reasoning\n#### {self.gold[r.key] if right else '-1'}\nQuestion: junk"
                result = GenResult(r.key, s, (1, 2, 3), text, "stop", 10)
                if on_result is not None:
                    on_result(result)
                yield result

    def describe(self):
        return {"backend": "stub", "device": "cpu", "dtype": "torch.float32"}


@pytest.fixture()
def stub(monkeypatch, small_gsm8k):
    gold = {p.id: p.gold for p in _problems(small_gsm8k)}
    holder = {}

    def install(correct_at):
        real = generation.build_engine

        def fake(spec, backend="hf", batch_size=16, prefix_cache=True, seed=0, steering=None):
            loaded, tok, _ = real(spec, backend, batch_size, prefix_cache, seed, steering)
            holder["engine"] = StubEngine(gold, correct_at)
            return loaded, tok, holder["engine"]

        monkeypatch.setattr(generation, "build_engine", fake)
        return holder

    return install


def _settings(model, data, out, **kw) -> TraceSettings:
    base = {"model": ModelSpec(str(model)), "out": out, "data": str(data), "num_samples": 6,
            "max_attempts": 5, "max_new_tokens": 8, "batch_size": 4}
    base.update(kw)
    return TraceSettings(**base)


def test_first_correct_attempt_is_kept_and_later_ones_are_cancelled(tmp_path, tiny_model_dir, small_gsm8k,
                                                                     stub):
    # Problems 0-2: right on the third attempt (and the fifth, which arrives first); 3-5: never right.
    holder = stub(lambda j: {2, 4} if j < 3 else set())
    out = tmp_path / "traces.jsonl"
    stats = generate_traces(_settings(tiny_model_dir, small_gsm8k, out, keep_attempts=True))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    problems = _problems(small_gsm8k)[:6]
    assert [r["id"] for r in rows] == [p.id for p in problems]
    for r, p in zip(rows[:3], problems[:3], strict=True):
        assert r["source"] == "model" and r["attempts"] == 3 and r["gold"] == p.gold
        assert r["answer"] == f"attempt 2: reasoning\n#### {p.gold}"  # cut after its answer line
        assert [a["correct"] for a in r["attempt_texts"]] == [False, False, True]
    for r, p in zip(rows[3:], problems[3:], strict=True):
        assert r["source"] == "fallback" and r["attempts"] == 5 and r["answer"] == p.answer
        assert len(r["attempt_texts"]) == 5
    # Attempt 4 came back correct first, then attempt 2: attempt 3 was then unnecessary and never started,
    # attempts 0 and 1 still ran (either could have come first).
    started = [s for key, s in holder["engine"].started if key == problems[0].id]
    assert started == [4, 2, 1, 0]
    assert stats.grpo_successes == 3 and stats.fallback_count == 3 and stats.total_samples == 6
    assert stats.avg_attempts_for_successes == 3 and stats.avg_attempts_overall == (3 * 3 + 3 * 5) / 6
    assert stats.pass_at_k == {"1": 0.0, "2": 0.0, "3": 0.5, "4": 0.5, "5": 0.5}
    # beside the traces as <traces file name>.stats.json, with the SFT-vs-GRPO protocol's keys
    on_disk = json.loads(out.with_name("traces.jsonl.stats.json").read_text())
    protocol = {"total_samples", "grpo_successes", "fallback_count", "success_rate",
                "avg_attempts_for_successes", "avg_attempts_overall"}
    assert protocol <= set(on_disk)
    assert not out.with_name("traces.stats.json").exists()
    assert on_disk["grpo_successes"] == sum(r["source"] == "model" for r in rows)
    assert on_disk["total_attempts"] == sum(r["attempts"] for r in rows)
    manifest = json.loads(out.with_name("traces.manifest.json").read_text())
    assert manifest["command"] == "generate-traces"
    assert manifest["resolved"]["backend"] == "stub"  # what ran, as the engine describes itself
    assert not out.with_name("traces.partial.jsonl").exists()
    assert not out.with_name("traces.run.json").exists()


def test_all_attempts_counts_every_correct_sample(tmp_path, tiny_model_dir, small_gsm8k, stub):
    stub(lambda j: {1, 3} if j % 2 == 0 else set())
    out = tmp_path / "all.jsonl"
    stats = generate_traces(_settings(tiny_model_dir, small_gsm8k, out, all_attempts=True))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["num_correct"] for r in rows] == [2, 0, 2, 0, 2, 0]
    assert [r["attempts"] for r in rows] == [2, 5, 2, 5, 2, 5]
    assert stats.pass_at_k["1"] == pytest.approx(0.5 * 2 / 5)
    assert stats.pass_at_k["5"] == pytest.approx(0.5)
    assert stats.pass_at_k_estimator.startswith("unbiased")


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_subset_average(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_summarize_arithmetic():
    rows = [{"source": "model", "attempts": 1}, {"source": "model", "attempts": 4},
            {"source": "fallback", "attempts": 4}, {"source": "fallback", "attempts": 4}]
    s = summarize(rows, 4, False, {"generation_s": 2.0, "attempts": 13, "problems": 4, "tokens": 100})
    assert (s.total_samples, s.grpo_successes, s.fallback_count) == (4, 2, 2)
    assert s.success_rate == 0.5 and s.avg_attempts_for_successes == 2.5 and s.avg_attempts_overall == 13 / 4
    assert s.pass_at_k == {"1": 0.25, "2": 0.25, "3": 0.25, "4": 0.5}
    assert s.attempts_per_s == 6.5 and s.tokens_per_s == 50.0
    assert summarize([], 3, False, {}).avg_attempts_for_successes is None


def test_cut_after_answer():
    assert cut_after_answer("a\n#### 5.\nQuestion: b", "hash") == "a\n#### 5"
    assert cut_after_answer("<SOLUTION>1</SOLUTION> x <SOLUTION>2</SOLUTION> tail", "tags") == \
        "<SOLUTION>1</SOLUTION> x <SOLUTION>2</SOLUTION>"


def test_real_model_run_is_seeded_and_batch_independent(tmp_path, tiny_model_dir, small_gsm8k):
    a = tmp_path / "a.jsonl"
    stats = generate_traces(_settings(tiny_model_dir, small_gsm8k, a, num_samples=4, max_attempts=3,
                                      keep_attempts=True))
    rows = [json.loads(x) for x in a.read_text().splitlines()]
    assert len(rows) == 4 and stats.total_samples == 4
    assert all(set(r) >= {"id", "question", "answer", "source", "attempts", "gold"} for r in rows)
    # A random model never answers right: every row falls back, having spent all 3 attempts.
    assert all(r["source"] == "fallback" and r["attempts"] == 3 and len(r["attempt_texts"]) == 3
               for r in rows)
    assert stats.attempts_this_run == 12 and stats.engine["generated_tokens"] > 0
    texts = [t["text"] for r in rows for t in r["attempt_texts"]]
    assert len(set(texts)) > 1
    b = tmp_path / "b.jsonl"
    generate_traces(_settings(tiny_model_dir, small_gsm8k, b, num_samples=4, max_attempts=3,
                              keep_attempts=True, batch_size=1, prefix_cache=False))
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.jsonl"
    generate_traces(_settings(tiny_model_dir, small_gsm8k, c, num_samples=4, max_attempts=3,
                              keep_attempts=True, seed=1))
    assert a.read_bytes() != c.read_bytes()


def test_interrupted_run_resumes_without_duplicates(tmp_path, tiny_model_dir, small_gsm8k, stub):
    stub(lambda j: {j % 5})
    clean = tmp_path / "clean.jsonl"
    generate_traces(_settings(tiny_model_dir, small_gsm8k, clean))

    out = tmp_path / "cut.jsonl"
    calls = {"n": 0}

    def stop_after_two(n):
        calls["n"] += n
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_traces(_settings(tiny_model_dir, small_gsm8k, out), on_progress=stop_after_two)
    assert not out.exists() and len(out.with_name("cut.partial.jsonl").read_text().splitlines()) == 2
    seen = {}
    generate_traces(_settings(tiny_model_dir, small_gsm8k, out),
                    on_start=lambda _total, done: seen.update(done=done))
    assert seen["done"] == 2
    assert out.read_bytes() == clean.read_bytes()


def test_sigkill_then_rerun_has_every_problem_once(tmp_path, tiny_model_dir, small_gsm8k):
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "gsmkit", "generate-traces", "--model", str(tiny_model_dir), "--data",
           str(small_gsm8k), "--num-samples", "12", "--max-attempts", "2", "--max-new-tokens", "24",
           "--batch-size", "2", "--out", str(out)]
    kill_midway(cmd, out.with_name("k.partial.jsonl"), out)
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12
    assert ids == [p.id for p in _problems(small_gsm8k)[:12]]


def test_train_sft_accepts_traces(tmp_path, tiny_model_dir, small_gsm8k, stub):
    stub(lambda j: {0} if j % 2 else set())
    out = tmp_path / "traces.jsonl"
    generate_traces(_settings(tiny_model_dir, small_gsm8k, out, offset=10, num_samples=8))
    pool = tmp_path / "pool.jsonl"
    drawn = runner.invoke(app, ["fewshot", "--data", str(small_gsm8k), "--n", "2", "--out", str(pool)])
    assert drawn.exit_code == 0
    res = runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(out),
                              "--fewshot-pool", str(pool), "--max-steps", "1", "--batch-size", "2",
                              "--max-length", "128", "--lora-r", "2", "--out", str(tmp_path / "run"),
                              "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["train_rows"] + summary["removed_fewshot"] == 8 and summary["train_rows"] > 0


def _cli(*args):
    return runner.invoke(app, ["generate-traces", *args])


def test_bad_inputs(tmp_path, tiny_model_dir, small_gsm8k):
    base = ["--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--num-samples", "2",
            "--max-new-tokens", "4"]
    r = _cli(*base, "--out", str(tmp_path / "x.jsonl"), "--k", "2")
    assert r.exit_code == 2 and "few-shot pool" in r.output
    r = _cli(*base, "--out", str(tmp_path / "x.txt"))
    assert r.exit_code == 2 and "JSON Lines" in r.output
    r = _cli("--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl"),
             "--out", str(tmp_path / "y.jsonl"))
    assert_clean_failure(r, tmp_path / "y.jsonl", 1, "nope.jsonl")
    r = _cli("--model", str(tiny_model_dir), "--data", "gsm8k:test", "--split", "train",
             "--out", str(tmp_path / "z.jsonl"))
    assert r.exit_code == 2
    # a finished file is not overwritten silently; a partial run with other settings is not mixed in
    done = tmp_path / "done.jsonl"
    assert _cli(*base, "--out", str(done)).exit_code == 0
    r = _cli(*base, "--out", str(done))
    assert r.exit_code == 1 and "--overwrite" in r.output
    partial = tmp_path / "p.jsonl"
    partial.with_name("p.partial.jsonl").write_text('{"id": "x"}\n')
    partial.with_name("p.run.json").write_text('{"seed": 99}')
    r = _cli(*base, "--out", str(partial))
    assert r.exit_code == 1 and "different settings" in r.output
    assert not partial.exists()


def test_json_summary(tmp_path, tiny_model_dir, small_gsm8k):
    r = _cli("--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--num-samples", "2",
             "--max-attempts", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "t.jsonl"), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["total_samples"] == 2 and summary["stats"].endswith("t.jsonl.stats.json")
    assert math.isclose(summary["success_rate"], summary["grpo_successes"] / 2)
