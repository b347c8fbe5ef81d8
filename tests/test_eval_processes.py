"""`eval gsm8k`, `generate-traces` and `eval ppl` under `accelerate launch` with two processes on this CPU:
each process generates its share of the problems into its own journal (ppl: scores its share of the
windows), the main process publishes exactly the file one process writes (byte-identical predictions for
greedy decoding), killed runs resume under any number of processes, and the summary is printed once.

As in test_train_processes.py, two CPU processes are launched with `--multi_gpu` and CUDA hidden (accelerate's
`--cpu` launch of several processes goes through mpirun); the literal `--cpu --num_processes 2` starts one
process, which gsmkit says, and writes the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_processes import HOOKS, ROOT, _free_port

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")


def _eval_args(model: Path, data: Path, pool: Path, out: Path) -> list[str]:
    return ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--limit", "20", "--pool", str(pool),
            "--k", "2", "--style", "plain", "--max-new-tokens", "24", "--out", str(out), "--json"]


def _launch(args: list[str], processes: int = 2, how: tuple[str, ...] = ("--multi_gpu",),
            crash_rows: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(_free_port()), "-m", "gsmkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")])}
    env.pop("DDP_TEST_RECORD", None)
    env.pop("DDP_TEST_CRASH_ROWS", None)
    if crash_rows is not None:
        env["DDP_TEST_CRASH_ROWS"] = str(crash_rows)
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _single(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gsmkit", *args], check=False, capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir, gsm8k_dir, pool) -> Path:
    out = tmp_path_factory.mktemp("single") / "eval"
    res = _single(_eval_args(tiny_model_dir, gsm8k_dir, pool, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _summaries(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_two_processes_write_the_single_process_predictions(tmp_path, tiny_model_dir, gsm8k_dir, pool,
                                                            single_run):
    out = tmp_path / "eval"
    res = _launch(_eval_args(tiny_model_dir, gsm8k_dir, pool, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "predictions.jsonl").read_bytes() == (single_run / "predictions.jsonl").read_bytes()
    assert len(_summaries(res.stdout)) == 1  # reported once, by the main process
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json", "predictions.jsonl"]
    processes = json.loads((out / "manifest.json").read_text())["resolved"]["processes"]
    assert processes == {"count": 2, "problems_journalled": [10, 10]}


def test_killed_processes_resume_under_any_number_of_processes(tmp_path, tiny_model_dir, gsm8k_dir, pool,
                                                               single_run):
    out = tmp_path / "eval"
    args = _eval_args(tiny_model_dir, gsm8k_dir, pool, out)
    killed = _launch(args, crash_rows=3)
    assert killed.returncode != 0 and not (out / "predictions.jsonl").exists()
    journals = sorted(p.name for p in out.glob("predictions.partial*.jsonl"))
    assert journals == ["predictions.partial.p0.jsonl", "predictions.partial.p1.jsonl"]
    assert all(len((out / j).read_text().splitlines()) == 3 for j in journals)

    resumed = _launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "predictions.jsonl").read_bytes() == (single_run / "predictions.jsonl").read_bytes()
    metrics = _summaries(resumed.stdout)[0]
    assert metrics["n"] == 20 and metrics["generated_this_run"] == 14  # 20, less the 3 + 3 journalled

    # killed under two processes, finished by one: the same file, and no journal left behind
    out2 = tmp_path / "eval2"
    args2 = _eval_args(tiny_model_dir, gsm8k_dir, pool, out2)
    assert _launch(args2, crash_rows=2).returncode != 0
    single = _single(args2)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _summaries(single.stdout)[0]["generated_this_run"] == 16
    assert (out2 / "predictions.jsonl").read_bytes() == (single_run / "predictions.jsonl").read_bytes()
    assert not list(out2.glob("*partial*"))


def test_accelerate_cpu_launch_is_one_process_and_says_so(tmp_path, tiny_model_dir, gsm8k_dir, pool,
                                                          single_run):
    out = tmp_path / "eval"
    res = _launch(_eval_args(tiny_model_dir, gsm8k_dir, pool, out), how=("--cpu",))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "started one process" in res.stderr
    assert (out / "predictions.jsonl").read_bytes() == (single_run / "predictions.jsonl").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["resolved"]["processes"]["count"] == 1


def test_generate_traces_in_two_processes(tmp_path, tiny_model_dir, gsm8k_dir, pool):
    def args(out: Path) -> list[str]:
        return ["generate-traces", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--split",
                "test", "--num-samples", "8", "--pool", str(pool), "--k", "2", "--style", "plain",
                "--max-attempts", "2", "--max-new-tokens", "16", "--seed", "3", "--out", str(out)]

    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert _single(args(one)).returncode == 0
    res = _launch(args(two))
    assert res.returncode == 0, res.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    processes = json.loads(two.with_name("two.manifest.json").read_text())["resolved"]["processes"]
    assert processes == {"count": 2, "problems_journalled": [4, 4]}


def test_eval_ppl_in_two_processes(tmp_path, tiny_model_dir):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i} + {i}?\nA:", "response": f" {2 * i}",
                                        "metadata": {"source": "s" if i % 2 else "t"}}) + "\n"
                            for i in range(9)))

    def args(out: Path) -> list[str]:
        # batch size 1: a window's loss does not depend on which others share its batch, so the files match
        return ["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "1",
                "--out", str(out), "--json"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert _single(args(one)).returncode == 0
    res = _launch(args(two))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (two / "items.jsonl").read_bytes() == (one / "items.jsonl").read_bytes()
    assert len(_summaries(res.stdout)) == 1
    processes = json.loads((two / "manifest.json").read_text())["resolved"]["processes"]
    assert processes == {"count": 2, "windows_scored": [5, 4]}
