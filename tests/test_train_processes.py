"""`train sft` and `train grpo` under `accelerate launch` with two processes (DDP over gloo on this CPU), as
they run on GPUs: one adapter, one log with each step once, the few-shot pool removed on every process, a
killed run resumed from the main process's checkpoints, the summary printed once.

`accelerate launch --cpu` starts a single process whatever `--num_processes` says (its multi-CPU launch
goes through mpirun), so these launch with `--multi_gpu`, accelerate's torchrun launcher, with CUDA hidden:
the trainer runs the processes on the CPU over gloo. `launch_hooks/sitecustomize.py` makes each process
record what it trained on and sampled (and fail at a step, as a killed run would).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "launch_hooks"

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], record: Path, *, config: Path | None = None, crash_step: int | None = None,
            processes: int = 2) -> subprocess.CompletedProcess:
    record.mkdir(parents=True, exist_ok=True)
    how = ["--config_file", str(config)] if config else ["--multi_gpu", "--mixed_precision", "no",
                                                          "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(_free_port()), "-m", "gsmkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
           "DDP_TEST_RECORD": str(record)}
    env.pop("DDP_TEST_CRASH_STEP", None)
    if crash_step is not None:
        env["DDP_TEST_CRASH_STEP"] = str(crash_step)
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


def _records(record: Path, kind: str) -> dict[int, list[dict]]:
    """Each process's recorded rows of one kind, by rank."""
    found = {}
    for path in sorted(record.glob("rank-*.jsonl")):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        found[int(path.stem.split("-")[1])] = [r for r in rows if r["kind"] == kind]
    return found


def _check_finished_run(out: Path, base: Path, processes: int = 2) -> dict:
    """One valid adapter (it loads with PEFT), its manifest, and a log with steps 1-4 once each; nothing
    left beside OUT (no staging or swapped-out folder) and no settings record in it. Returns the manifest."""
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "trainer_log.jsonl",
                 "fewshot_pool.jsonl"):
        assert (out / name).exists(), name
    assert not (out / "run.json").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)  # no row written twice
    trained = [r["step"] for r in rows if "loss" in r]
    assert trained == [1, 2, 3, 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["processes"] == processes and manifest["resolved"]["steps"] == 4

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
    assert any("lora_B" in n for n, _ in model.named_parameters())
    return manifest


def _summary(done: subprocess.CompletedProcess) -> dict:
    """The --json line, printed once (by the main process)."""
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def _pool_questions(pool: Path) -> list[str]:
    return [" ".join(json.loads(x)["question"].split()) for x in pool.read_text().splitlines()]


SFT = ["train", "sft", "--batch-size", "2", "--max-length", "128", "--logging-steps", "1", "--lora-r", "4",
       "--device", "cpu", "--json"]


def test_sft_two_processes_write_one_adapter_and_one_log(tmp_path, tiny_model_dir, small_gsm8k, pool):
    from transformers import AutoTokenizer

    out = tmp_path / "sft"
    done = _launch([*SFT, "--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
                    "--out", str(out), "--max-steps", "4"], tmp_path / "record")
    summary = _summary(done)
    assert summary["steps"] == 4 and summary["removed_fewshot"] == 4
    assert done.stderr.count("train sft") == 1  # one progress bar, the main process's
    manifest = _check_finished_run(out, tiny_model_dir)
    assert manifest["resolved"]["removed_fewshot"] == 4

    batches = _records(tmp_path / "record", "batch")
    assert sorted(batches) == [0, 1] and all(len(b) >= 4 for b in batches.values())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = {rank: [" ".join(tok.decode(r, skip_special_tokens=True).split()) for b in bs for r in b["rows"]]
             for rank, bs in batches.items()}
    assert set(texts[0]) != set(texts[1])  # each process trains on its own share of the rows
    questions = _pool_questions(pool)
    assert not any(q in t for q in questions for ts in texts.values() for t in ts)  # the pool on every rank


def test_sft_two_processes_resume_a_killed_run(tmp_path, tiny_model_dir, small_gsm8k, pool):
    out = tmp_path / "sft"
    args = [*SFT, "--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
            "--out", str(out), "--max-steps", "4", "--save-steps", "2"]
    killed = _launch(args, tmp_path / "r1", crash_step=3)
    assert killed.returncode != 0 and "killed at step 3" in killed.stderr
    assert (out / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").exists()
    assert not (out / "adapter_config.json").exists()
    logged = [json.loads(x)["step"] for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2]

    done = _launch([*args, "--resume"], tmp_path / "r2")
    assert _summary(done)["steps"] == 4
    manifest = _check_finished_run(out, tiny_model_dir)
    assert manifest["resolved"]["resumed_from"].endswith("checkpoint-2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_grpo_two_processes_sample_their_own_prompts_on_the_engine(tmp_path, tiny_model_dir, small_gsm8k,
                                                                    pool):
    out = tmp_path / "grpo"
    done = _launch(["train", "grpo", "--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool",
                    str(pool), "--out", str(out), "--max-steps", "4", "--train-samples", "8",
                    "--max-completion-length", "12", "--lora-r", "4", "--rollouts", "engine",
                    "--device", "cpu", "--json"], tmp_path / "record")
    summary = _summary(done)
    assert summary["steps"] == 4 and summary["removed_fewshot"] == 4
    assert done.stderr.count("train grpo") == 1
    manifest = _check_finished_run(out, tiny_model_dir)
    assert manifest["resolved"]["rollouts"] == "engine"
    assert manifest["resolved"]["completions_per_step"] == 2 * 2 * 4  # processes x prompts x group
    # under DDP the update still shares each group's prompt: the main process's 4 steps, one pass each
    assert manifest["resolved"]["update"]["calls"] == {"shared": 4, "unshared": 0}

    rounds = _records(tmp_path / "record", "rollout")
    assert sorted(rounds) == [0, 1]
    for rank, rs in rounds.items():
        assert [r["step"] for r in rs] == [0, 1, 2, 3]
        for r in rs:
            assert r["wrapped"] == "DistributedDataParallel" and r["policy"] == "PeftModelForCausalLM"
            assert r["keys"] == [f"{r['step']}/{rank}/0", f"{r['step']}/{rank}/1"]
            assert len(r["prompts"]) == 2 * 4
    for step in range(4):  # the two processes sample different prompts at every step
        assert set(rounds[0][step]["prompts"]).isdisjoint(rounds[1][step]["prompts"])
    questions = _pool_questions(pool)
    prompts = [" ".join(p.split()) for rs in rounds.values() for r in rs for p in r["prompts"]]
    assert not any(q in p for q in questions for p in prompts)


def test_the_fsdp_config_parses_and_is_refused_where_accelerate_would_run_ddp(tmp_path, tiny_model_dir,
                                                                               small_gsm8k, pool):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = ROOT / "examples" / "accelerate" / "fsdp.yaml"
    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type == DistributedType.FSDP and loaded.fsdp_config["fsdp_version"] == 2
    out = tmp_path / "fsdp"
    done = _launch([*SFT, "--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
                    "--out", str(out), "--max-steps", "2"], tmp_path / "record", config=config)
    # accelerate takes the file as is (two processes start), but shards only on GPUs: never a silent DDP run
    assert done.returncode != 0 and "asks for FSDP" in done.stderr and "MULTI_CPU" in done.stderr
    assert not (out / "adapter_config.json").exists()


def test_only_rank_zero_is_the_main_process_and_starts_the_run_folder(tmp_path, monkeypatch):
    from gsmkit.processes import RANK_VARIABLES, is_main_process
    from gsmkit.training.outputs import start_run

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert is_main_process()  # a plain run
    monkeypatch.setenv("PMI_RANK", "1")  # mpirun
    assert not is_main_process()
    monkeypatch.delenv("PMI_RANK")
    monkeypatch.setenv("RANK", "1")  # torchrun, accelerate launch
    assert not is_main_process()
    out = tmp_path / "run"
    assert start_run(out, None, overwrite=False, fingerprint={"a": 1}) == out / "trainer_log.jsonl"
    assert not out.exists()  # another process's: it never writes OUT
    monkeypatch.setenv("RANK", "0")
    start_run(out, None, overwrite=False, fingerprint={"a": 1})
    assert (out / "run.json").exists()


def test_engine_rollouts_refuse_a_sharded_policy():
    from types import SimpleNamespace

    from gsmkit.errors import ConfigError
    from gsmkit.training.rollouts import check_whole_weights

    def trainer(fsdp=False, zero=None):
        plugin = SimpleNamespace(zero_stage=zero) if zero is not None else None
        return SimpleNamespace(is_fsdp_enabled=fsdp,
                               accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))

    check_whole_weights(trainer())  # DDP: each process holds the whole policy
    check_whole_weights(trainer(zero=2))
    for sharded in (trainer(fsdp=True), trainer(zero=3)):
        with pytest.raises(ConfigError, match="FSDP or ZeRO-3 shards it") as caught:
            check_whole_weights(sharded)
        assert "--rollouts trl" in caught.value.hint
