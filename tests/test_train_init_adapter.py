"""`train sft|qlora --init-adapter DIR` continues a trained adapter (the SFT-vs-GRPO protocol's full SFT
starts from its prep SFT): training starts from the adapter's own weights, its shape is checked against the
run, and the manifest records its sha256. The checks are shared with `train grpo --init-adapter`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ConfigError, ModelError
from gsmkit.manifest import adapter_sha256
from gsmkit.training.config import TrainSettings
from gsmkit.training.grpo import GrpoSettings
from gsmkit.training.sft import train

runner = CliRunner()


def _settings(model, data, pool, out, **kw) -> TrainSettings:
    base = {"model": str(model), "out": out, "data": str(data), "pool": pool, "batch_size": 4,
            "max_length": 192, "max_steps": 2, "logging_steps": 1, "learning_rate": 5e-3, "warmup_ratio": 0.0,
            "lr_scheduler": "constant", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    base.update(kw)
    return TrainSettings(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def prep(tmp_path_factory, tiny_model_dir, small_gsm8k, pool) -> Path:
    """A trained SFT adapter (rank 4, every projection), its B matrices away from zero."""
    out = tmp_path_factory.mktemp("prep") / "prep"
    train(_settings(tiny_model_dir, small_gsm8k, pool, out, max_steps=3, learning_rate=2e-2))
    assert any(float(v.abs().sum()) > 0 for k, v in _weights(out).items() if "lora_B" in k)
    return out


def test_sft_continues_the_adapters_own_weights(tmp_path, tiny_model_dir, small_gsm8k, pool, prep,
                                                monkeypatch):
    from peft import get_peft_model_state_dict
    from transformers import Trainer

    at_start: dict[str, torch.Tensor] = {}
    real_train = Trainer.train

    def spy(self, *args, **kwargs):  # the adapter's weights at step 0, as the Trainer gets them
        at_start.update({k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()})
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    out = tmp_path / "full"
    # --lora-r left at its default: the adapter's rank 4 trains, and the settings say so
    settings = _settings(tiny_model_dir, small_gsm8k, pool, out, lora_r=16, lora_alpha=32, seed=7,
                         init_adapter=str(prep))
    result = train(settings)
    assert result.steps == 2
    init = _weights(prep)
    assert set(at_start) == set(init)
    assert all(torch.equal(at_start[k], init[k]) for k in init)  # training started from the adapter
    after = _weights(out)
    assert set(after) == set(init)
    assert any(not torch.equal(after[k], init[k]) for k in init)  # and trained it further
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["resolved"]["init_adapter"]
    assert record["sha256"] == adapter_sha256(prep) and record["path"] == str(prep)
    assert (record["r"], record["lora_alpha"]) == (4, 8)
    assert (manifest["settings"]["lora_r"], manifest["settings"]["lora_alpha"]) == (4, 8)
    assert manifest["settings"]["init_adapter"] == str(prep)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_the_adapter_is_checked_against_the_run(tmp_path, tiny_model_dir, tiny_qwen_dir, small_gsm8k, pool,
                                                prep):
    def resolve(**kw):
        return _settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", init_adapter=str(prep),
                         **kw).resolved()

    assert resolve(lora_r=16, lora_alpha=32).lora_r == 4  # defaults: the adapter's shape
    assert resolve().resolved() == resolve()  # idempotent
    with pytest.raises(ConfigError, match="--lora-r 8 contradicts --init-adapter .*rank is 4"):
        resolve(lora_r=8)
    with pytest.raises(ConfigError, match="--lora-alpha 64 contradicts"):
        resolve(lora_alpha=64)
    with pytest.raises(ConfigError, match="--target-modules q_proj contradicts"):
        resolve(target_modules=("q_proj",))
    same = resolve(target_modules=("v_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj"))
    assert set(same.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                        "down_proj"}

    # the base: another model is refused, the same files elsewhere are not
    moved = tmp_path / "moved"
    shutil.copytree(prep, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    for base, ok in ((tiny_qwen_dir, False), (shutil.copytree(tiny_model_dir, tmp_path / "copy"), True)):
        recorded = {**config, "base_model_name_or_path": str(base)}
        (moved / "adapter_config.json").write_text(json.dumps(recorded))
        settings = _settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", init_adapter=str(moved))
        if ok:
            assert settings.resolved().lora_r == 4
        else:
            with pytest.raises(ConfigError, match=f"was trained on {base}, not --model"):
                settings.resolved()
    # GRPO takes the same adapter with the same checks
    grpo = GrpoSettings(model=str(tiny_model_dir), out=tmp_path / "g", data=str(small_gsm8k),
                        init_adapter=str(prep), lora_r=2)
    with pytest.raises(ConfigError, match="--lora-r 2 contradicts"):
        grpo.resolved()
    not_lora = tmp_path / "prefix"
    shutil.copytree(prep, not_lora)
    (not_lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelError, match="a PREFIX_TUNING adapter, not LoRA"):
        _settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", init_adapter=str(not_lora)).resolved()


def _cli(*args):
    return runner.invoke(app, ["train", *args])


def test_contradictions_are_usage_errors(tmp_path, tiny_model_dir, small_gsm8k, pool, prep):
    common = ["--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
              "--init-adapter", str(prep)]
    out = tmp_path / "o"
    for extra, needle in ((["--full"], "--full"), (["--rank-pattern", str(pool)], "--rank-pattern")):
        res = _cli("sft", *common, *extra, "--out", str(out))
        assert_clean_failure(res, out, 2, "--init-adapter", needle)
    res = _cli("qlora", *common, "--init-lora", "loftq", "--out", str(out))
    assert_clean_failure(res, out, 2, "--init-lora loftq")


@pytest.mark.usefixtures("no_loading")
def test_a_damaged_init_adapter_fails_before_anything_loads(tmp_path, tiny_model_dir, small_gsm8k, pool,
                                                            prep):
    damaged = tmp_path / "damaged"
    shutil.copytree(prep, damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    out = tmp_path / "o"
    res = _cli("sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
               "--init-adapter", str(damaged), "--out", str(out))
    assert_clean_failure(res, out, 1, "adapter_model.safetensors")
    res = _cli("sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
               "--init-adapter", str(prep), "--lora-r", "8", "--out", str(out))
    assert_clean_failure(res, out, 1, "--lora-r 8 contradicts --init-adapter")


def test_help_lists_the_new_options():
    assert "--init-adapter" in runner.invoke(app, ["train", "sft", "--help"], terminal_width=200).output
    assert "--init-adapter" in runner.invoke(app, ["train", "qlora", "--help"], terminal_width=200).output
    grpo = runner.invoke(app, ["train", "grpo", "--help"], terminal_width=200).output
    assert "--config" in grpo and "--preset" in grpo and "--report-to" in grpo
