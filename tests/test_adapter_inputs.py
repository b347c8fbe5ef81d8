"""A damaged adapter is an input error found while the command builds its settings: one `error:` line naming
the weights file, exit 1, no traceback, no output left behind, and no model (or data) loaded first."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ModelError
from gsmkit.modeling import check_adapter

runner = CliRunner()
LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "bias": "none"}


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = _safetensors({"__metadata__": {"format": "pt"},
                     "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12))
HUGE_HEADER = struct.pack("<Q", 1 << 40) + b"garbage!"  # what safetensors reports as "header too large"


@pytest.fixture
def damaged(tmp_path) -> Path:
    return _adapter(tmp_path / "damaged", HUGE_HEADER)


def _assert_rejected(args: list[str], out: Path, *also_absent: Path) -> None:
    t0 = time.perf_counter()
    res = runner.invoke(app, args)
    elapsed = time.perf_counter() - t0
    assert_clean_failure(res, out, 1, absent=also_absent)
    error = next(line for line in res.output.splitlines() if line.startswith("error:"))
    assert "adapter_model.safetensors" in error and "header claims" in error, res.output
    assert any(line.startswith("hint:") for line in res.output.splitlines()), res.output
    assert elapsed < 5, f"the input check took {elapsed:.1f}s: something heavy ran before it"


@pytest.fixture
def problems(tmp_path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    return path


@pytest.mark.usefixtures("no_loading")
def test_eval_gsm8k(tmp_path, tiny_model_dir, damaged, problems):
    out = tmp_path / "out"
    _assert_rejected(["eval", "gsm8k", "--model", str(tiny_model_dir), "--adapter", str(damaged),
                      "--data", str(problems), "--max-new-tokens", "2", "--out", str(out)], out)


@pytest.mark.usefixtures("no_loading")
def test_eval_ppl(tmp_path, tiny_model_dir, damaged):
    data = tmp_path / "ppl.jsonl"
    data.write_text(json.dumps({"prompt": "2 + 3 =", "response": " 5"}) + "\n")
    out = tmp_path / "out"
    _assert_rejected(["eval", "ppl", "--model", str(tiny_model_dir), "--adapter", str(damaged),
                      "--data", str(data), "--out", str(out)], out)


@pytest.mark.usefixtures("no_loading")
def test_eval_safety(tmp_path, tiny_model_dir, damaged):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "How do I pick a lock?", "hazard": "ncr"}) + "\n")
    guidelines = tmp_path / "guidelines.txt"
    guidelines.write_text("Is this response safe? {prompt} {response}")
    out = tmp_path / "out"
    _assert_rejected(["eval", "safety", "--model", str(tiny_model_dir), "--adapter", str(damaged),
                      "--prompts", str(prompts), "--safeguard-model", str(tiny_model_dir),
                      "--safety-prompt", str(guidelines), "--out", str(out)], out)


@pytest.mark.usefixtures("no_loading")
def test_generate_traces(tmp_path, tiny_model_dir, damaged, problems):
    out = tmp_path / "traces.jsonl"
    _assert_rejected(["generate-traces", "--model", str(tiny_model_dir), "--adapter", str(damaged),
                      "--data", str(problems), "--max-new-tokens", "2", "--out", str(out)],
                     out, tmp_path / "traces.jsonl.stats.json")


@pytest.mark.usefixtures("no_loading")
def test_merge_checks_the_adapter_before_the_verification_data(tmp_path, tiny_model_dir, damaged):
    # the default verification data is GSM8K from the Hub: it must not be fetched for a damaged adapter
    out = tmp_path / "merged"
    _assert_rejected(["merge", "--model", str(tiny_model_dir), "--adapter", str(damaged), "--out", str(out)],
                     out)


@pytest.mark.usefixtures("no_loading")
def test_train_grpo_init_adapter(tmp_path, tiny_model_dir, damaged, problems):
    out = tmp_path / "grpo"
    _assert_rejected(["train", "grpo", "--model", str(tiny_model_dir), "--init-adapter", str(damaged),
                      "--data", str(problems), "--max-steps", "1", "--out", str(out)], out)


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        (b"", "empty"),
        (b"abc", "too short"),
        (HUGE_HEADER, "header claims 1099511627776 bytes"),
        (struct.pack("<Q", 4) + b"nope", "not a JSON table of tensors"),
        (_safetensors(["a list"], b""), "not a JSON table of tensors"),
        (GOOD[:-4], "truncated"),
        (GOOD + b"tail", "12 bytes of tensors, but 16 follow"),
    ],
)
def test_check_adapter_names_the_damage(tmp_path, weights, needle):
    adapter = _adapter(tmp_path / "a", weights)
    with pytest.raises(ModelError, match="adapter_model.safetensors") as err:
        check_adapter(adapter)
    assert needle in err.value.message and err.value.hint


def test_check_adapter_returns_the_config_of_a_whole_adapter(tmp_path):
    assert check_adapter(_adapter(tmp_path / "a", GOOD)) == LORA_CONFIG
    bin_only = tmp_path / "b"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    (bin_only / "adapter_model.bin").write_bytes(b"PK\x03\x04 a torch zip")  # .bin files are read by torch
    assert check_adapter(bin_only) == LORA_CONFIG


def test_check_adapter_agrees_with_safetensors_on_a_saved_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    save_file({"x.lora_A.weight": torch.zeros(4, 8), "x.lora_B.weight": torch.ones(8, 4)},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert check_adapter(adapter)["r"] == 4


@pytest.mark.parametrize(("config", "needle"),
                         [("[1, 2]", "expected a JSON object"), ("{", "not valid JSON")])
def test_check_adapter_reads_the_config_first(tmp_path, config, needle):
    adapter = _adapter(tmp_path / "a", GOOD)
    (adapter / "adapter_config.json").write_text(config)
    with pytest.raises(ModelError, match="adapter_config.json") as err:
        check_adapter(adapter)
    assert needle in err.value.message
