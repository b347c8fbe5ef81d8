"""`--report-to` on every trainer: none by default; `tensorboard` writes its event file into OUT/tensorboard/
(moved into the finished run with it); an unknown tracker or one whose package is missing is refused before
anything loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ConfigError
from gsmkit.training.config import TrainSettings

runner = CliRunner()
TINY = ["--batch-size", "4", "--max-length", "128", "--max-steps", "2", "--logging-steps", "1",
        "--lora-r", "4", "--lora-alpha", "8"]


def _events(folder):
    return sorted(folder.rglob("events.out.tfevents.*"))


def test_sft_report_to_tensorboard_writes_the_event_file(tmp_path, tiny_model_dir, small_gsm8k, pool):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sft"
    res = runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--pool", str(pool), *TINY, "--report-to", "tensorboard", "--out", str(out)])
    assert res.exit_code == 0, res.output
    events = _events(out / "tensorboard")
    assert len(events) == 1, sorted(p.relative_to(out) for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = [e.step for e in acc.Scalars("train/loss")]
    logged = [r["step"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses == logged == [1, 2]  # the same logs as trainer_log.jsonl
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["report_to"] == ["tensorboard"]


def test_grpo_report_to_tensorboard(tmp_path, tiny_model_dir, small_gsm8k):
    pytest.importorskip("tensorboard")
    from gsmkit.training.grpo import GrpoSettings, train_grpo

    out = tmp_path / "grpo"
    train_grpo(GrpoSettings(model=str(tiny_model_dir), out=out, data=str(small_gsm8k), train_samples=4,
                            max_steps=1, max_completion_length=8, num_generations=2, prompts_per_step=2,
                            lora_r=4, lora_alpha=8, report_to=("tensorboard",)))
    assert len(_events(out / "tensorboard")) == 1


def test_no_tracker_by_default(tmp_path):
    from transformers import TrainingArguments

    from gsmkit.training.arguments import trainer_arguments

    loaded = SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))
    for report_to, expected in (((), []), (("none",), []), (("tensorboard",), ["tensorboard"])):
        settings = TrainSettings(model="m", out=tmp_path, report_to=report_to)
        if report_to == ("tensorboard",):
            pytest.importorskip("tensorboard")
        args = trainer_arguments(TrainingArguments, settings.resolved(), loaded, tmp_path / "c")
        assert args.report_to == expected


def test_bad_trackers(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown --report-to 'tensorbored'"):
        TrainSettings(model="m", out=tmp_path, report_to=("tensorbored",))
    with pytest.raises(ConfigError, match="--report-to none contradicts"):
        TrainSettings(model="m", out=tmp_path, report_to=("none", "wandb"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="--report-to mlflow needs the mlflow package") as err:
        TrainSettings(model="m", out=tmp_path, report_to=("mlflow",)).resolved()
    assert err.value.hint == "pip install mlflow"


@pytest.mark.usefixtures("no_loading")
def test_a_tracker_that_is_not_installed_fails_before_anything_loads(tmp_path, monkeypatch, small_gsm8k):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    for command in ("sft", "grpo"):
        out = tmp_path / command
        res = runner.invoke(app, ["train", command, "--model", "some/model", "--data", str(small_gsm8k),
                                  "--report-to", "wandb", "--out", str(out)])
        assert_clean_failure(res, out, 1, "--report-to wandb needs the wandb package")
    res = runner.invoke(app, ["train", "grpo", "--model", "m", "--report-to", "comet", "--out", str(out)])
    assert_clean_failure(res, out, 2, "unknown --report-to 'comet'")


def test_a_resume_may_change_the_trackers(tmp_path):
    from gsmkit.training.outputs import training_fingerprint

    plain = TrainSettings(model="m", out=tmp_path)
    tracked = TrainSettings(model="m", out=tmp_path, report_to=("tensorboard",))
    assert training_fingerprint(plain) == training_fingerprint(tracked)
    other = TrainSettings(model="m", out=tmp_path, lora_r=8)
    assert training_fingerprint(plain) != training_fingerprint(other)
