"""`gsmkit eval gsm8k` end to end on a tiny random model and real GSM8K problems: outputs, determinism,
prefix cache on/off, resume after an interruption (in-process and a real SIGKILL), leakage guard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_failure, kill_midway
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
from gsmkit.modeling import ModelSpec

runner = CliRunner()


def _args(model, data, pool, out, *extra):
    return ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--pool", str(pool), "--k", "2",
            "--style", "plain", "--max-new-tokens", "6", "--batch-size", "4", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model_dir, small_gsm8k, pool) -> Path:
    out = tmp_path_factory.mktemp("clean")
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, out, "--json"))
    assert res.exit_code == 0, res.output
    return out


def test_writes_predictions_metrics_and_manifest(clean_run, small_gsm8k):
    rows = [json.loads(x) for x in (clean_run / "predictions.jsonl").read_text().splitlines()]
    questions = [json.loads(x)["question"] for x in (small_gsm8k / "test.jsonl").read_text().splitlines()]
    from gsmkit.records import problem_id

    assert [r["id"] for r in rows] == [problem_id(q) for q in questions]  # dataset order
    for r in rows:
        assert r["num_tokens"] <= 6 and r["finish_reason"] in {"stop", "length"}
        assert len(r["prompt_sha256"]) == 64
    metrics = json.loads((clean_run / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["k"] == 2 and metrics["style"] == "plain"
    assert metrics["accuracy_strict"] == sum(r["correct_strict"] for r in rows) / 6
    assert metrics["no_answer_flexible"] == sum(r["flexible"] is None for r in rows) / 6
    assert metrics["generated_tokens"] == sum(r["num_tokens"] for r in rows)
    assert 0.0 <= metrics["ci95_strict"][0] <= metrics["ci95_strict"][1] <= 1.0
    manifest = json.loads((clean_run / "manifest.json").read_text())
    assert manifest["command"] == "eval gsm8k" and manifest["settings"]["k"] == 2
    assert manifest["inputs"]["data"]["sha256"] and manifest["inputs"]["pool"]["sha256"]
    assert not (clean_run / "predictions.partial.jsonl").exists() and not (clean_run / "run.json").exists()


def test_json_summary_on_stdout(tmp_path, tiny_model_dir, small_gsm8k, pool):
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", "--limit", "2",
                                   "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and "accuracy_flexible" in summary


def test_greedy_is_deterministic_and_prefix_cache_invariant(tmp_path, clean_run, tiny_model_dir, small_gsm8k,
                                                            pool):
    again = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, tmp_path / "again"))
    off = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, tmp_path / "off", "--no-prefix-cache",
                                   "--batch-size", "1"))
    assert again.exit_code == 0 and off.exit_code == 0, again.output + off.output
    expected = (clean_run / "predictions.jsonl").read_bytes()
    assert (tmp_path / "again" / "predictions.jsonl").read_bytes() == expected
    assert (tmp_path / "off" / "predictions.jsonl").read_bytes() == expected


def test_resume_after_interruption_matches_clean_run(tmp_path, clean_run, tiny_model_dir, small_gsm8k, pool):
    settings = EvalSettings(model=ModelSpec(str(tiny_model_dir)), out=tmp_path / "r", data=str(small_gsm8k),
                            pool=pool, k=2, style="plain", max_new_tokens=6, batch_size=4)
    seen = []

    def interrupt(n):
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_gsm8k(settings, on_progress=interrupt)
    partial = (tmp_path / "r" / "predictions.partial.jsonl").read_text().splitlines()
    assert len(partial) == 3 and not (tmp_path / "r" / "predictions.jsonl").exists()
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, tmp_path / "r"))
    assert res.exit_code == 0, res.output
    assert "resuming: 3 of 6" in res.output
    want = (clean_run / "predictions.jsonl").read_bytes()
    assert (tmp_path / "r" / "predictions.jsonl").read_bytes() == want


def test_resume_refuses_other_settings_and_finished_runs(tmp_path, clean_run, tiny_model_dir, small_gsm8k,
                                                         pool):
    settings = EvalSettings(model=ModelSpec(str(tiny_model_dir)), out=tmp_path / "r", data=str(small_gsm8k),
                            pool=pool, k=2, style="plain", max_new_tokens=6, batch_size=4)

    def stop(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_gsm8k(settings, on_progress=stop)
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, tmp_path / "r",
                                   "--max-new-tokens", "7"))
    assert_clean_failure(res, None, 1, "different settings")
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, clean_run))
    assert res.exit_code == 1 and "already complete" in res.output and "--overwrite" in res.output


def test_pool_problems_are_never_scored(tmp_path, tiny_model_dir, small_gsm8k, pool):
    """Evaluating on the split the pool came from skips the exemplars shown in the prompt."""
    res = runner.invoke(app, _args(tiny_model_dir, small_gsm8k, pool, tmp_path / "t", "--split", "train",
                                   "--limit", "40", "--max-new-tokens", "1"))
    assert res.exit_code == 0, res.output
    ids = {json.loads(x)["id"] for x in (tmp_path / "t" / "predictions.jsonl").read_text().splitlines()}
    exemplar_ids = [json.loads(x)["id"] for x in pool.read_text().splitlines()][:2]
    assert len(ids) == 38 and not ids & set(exemplar_ids)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["resolved"]["excluded_pool_problems"] == 2


def test_sigkill_then_rerun_gives_the_clean_file(tmp_path, clean_run, tiny_model_dir, small_gsm8k, pool):
    """A real kill -9 mid-run: the journal keeps finished rows, the rerun completes without duplicates."""
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "gsmkit",
           *_args(tiny_model_dir, small_gsm8k, pool, out, "--batch-size", "1")]
    kill_midway(cmd, out / "predictions.partial.jsonl", out / "predictions.jsonl")
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "predictions.jsonl").read_bytes() == (clean_run / "predictions.jsonl").read_bytes()
