"""benchmarks/gpu_check.py runs on this machine at tiny sizes before a GPU ever sees it: every step is in
its JSON, the engine agrees with transformers, what needs CUDA says so, and nothing fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("setup", "engine_bf16", "engine_sliding_window", "train_qlora", "train_grpo", "merge",
         "backend_parity")


@pytest.mark.slow
def test_gpu_check_runs_every_step_at_tiny_sizes(tmp_path):
    import torch

    out = tmp_path / "tmp.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    assert out.is_file(), done.stdout + done.stderr
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert tuple(steps) == STEPS
    failed = {name: step.get("error") for name, step in steps.items() if step["status"] == "failed"}
    assert not failed, failed
    assert done.returncode == 0, done.stdout + done.stderr
    assert result["summary"]["failed"] == 0 and result["mode"] == "tiny"
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), name
        assert step["status"] == "ok" or step["reason"], name  # a skipped step says why
    assert "train_qlora" in done.stdout and "backend_parity" in done.stdout  # the table

    for name in ("setup", "engine_bf16", "engine_sliding_window", "train_grpo", "merge"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    for name in ("engine_bf16", "engine_sliding_window"):
        fig = steps[name]["figures"]
        assert fig["agreement"] is True and fig["engine_tokens_checked"]["beyond_rounding"] == 0, fig
        assert fig["distinct_completions"] > 1 and fig["engine"]["tokens_per_s"] > 0
        assert fig["generate"]["tokens_per_s"] > 0
    window = steps["engine_sliding_window"]["figures"]
    assert window["prompt_tokens_min"] > window["window"] and window["window_changes_completions"] > 0
    assert steps["merge"]["figures"]["gate"]["passed"] is True

    if not torch.cuda.is_available():
        assert "no CUDA device" in " ".join(result["notes"])
        parity = steps["backend_parity"]
        assert parity["status"] == "skipped" and "CUDA" in parity["reason"]
    qlora = steps["train_qlora"]
    if qlora["status"] == "skipped":
        assert "bitsandbytes" in qlora["reason"]
    else:
        assert qlora["figures"]["steps"] > 0 and steps["merge"]["figures"]["trained_in_4bit"] is True
