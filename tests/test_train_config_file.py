"""`--config` files and presets on every trainer (`train sft|qlora|grpo`): layered defaults < preset < file <
flags, and a file that cannot be used (not UTF-8 text, not YAML, not a mapping, a key of the wrong type or out
of bounds) is one line naming the file and the key, exit 1, before anything loads; a `train sft --resume`
after a torn last line in trainer_log.jsonl drops that line and goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.training.callbacks import read_log
from gsmkit.training.config import resolve_settings
from gsmkit.training.config_file import ConfigFileError
from gsmkit.training.grpo import GrpoSettings
from gsmkit.training.grpo_settings import GRPO_PRESETS

runner = CliRunner()


def test_grpo_presets_config_and_flags_layer_in_order(tmp_path, record_settings):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("num_generations: 6\nreward_weights: correctness=3,integer=0\nbeta: 0.01\n"
                   "target-modules: [q_proj]\n")
    s = resolve_settings({"model": "m", "beta": 0.2}, cfg, "medium", cls=GrpoSettings)
    assert s.max_steps == GRPO_PRESETS["medium"]["max_steps"] and s.save_steps == 50  # from the preset
    assert s.num_generations == 6 and s.weights["correctness"] == 3 and s.weights["integer"] == 0  # the file
    assert s.beta == 0.2 and s.preset == "medium" and s.target_modules == ("q_proj",)  # the flag wins
    assert s.out == Path("runs/grpo")  # the field's default
    cfg.write_text("reward_weights: {correctness: 2}\npreset: strong\n")
    s = resolve_settings({"model": "m"}, cfg, cls=GrpoSettings)
    assert s.weights["correctness"] == 2 and s.preset == "strong" and s.beta == 0.04
    # the command line: the same layering
    seen = record_settings("gsmkit.training.grpo.train_grpo")
    res = runner.invoke(app, ["train", "grpo", "--model", "m", "--config", str(cfg), "--preset", "simple",
                              "--max-steps", "7"])
    assert res.exit_code == 0, res.output
    assert (seen["settings"].max_steps, seen["settings"].preset) == (7, "simple")
    assert seen["settings"].weights["correctness"] == 2


@pytest.mark.parametrize("command", ["sft", "grpo"])
@pytest.mark.parametrize(("content", "needles"), [
    (b"lora_r: 8\n\xff\xfe\x00 not text\n", ["not UTF-8 text"]),
    (b"lora_r: [8,\n", ["not valid YAML"]),
    (b"- lora_r\n- 8\n", ["expected a mapping of option names to values, got a list"]),
    (b"lora_r: [1, 2]\n", ["key 'lora_r' must be an integer, got a list"]),
    (b"lora_r: {a: 1}\n", ["key 'lora_r' must be an integer, got a mapping"]),
    (b"overwrite: 1\n", ["key 'overwrite' must be true or false, got 1"]),
    (b"lora_r: 0\n", ["key 'lora_r': --lora-r must be >= 1"]),
    (b"lr: fast\n", ["key 'lr' must be a number"]),
    (b"style: 3\n", ["key 'style' must be text, got 3"]),
    (b"target_modules: [q_proj, 3]\n", ["key 'target_modules' must be a list of names"]),
    (b"lora_r: null\n", ["key 'lora_r' needs a value"]),
    (b"learning_rat: 1\n", ["unknown key 'learning_rat'"]),
])
@pytest.mark.usefixtures("no_loading")
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, command, content, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    out = tmp_path / "o"
    res = runner.invoke(app, ["train", command, "--model", "m", "--config", str(cfg), "--out", str(out)])
    assert_clean_failure(res, out, 1, str(cfg), *needles)


def test_the_config_file_error_is_a_config_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("reward_weights: speed=2\n")
    with pytest.raises(ConfigFileError, match="bad.yaml: key 'reward_weights'.*speed"):
        resolve_settings({"model": "m"}, cfg, cls=GrpoSettings)


def test_read_log_stops_at_a_torn_line(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    log.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    assert log.read_bytes().endswith(b'"lo')  # reading never changes the file


def test_resume_after_a_torn_last_log_line(tmp_path, tiny_model_dir, small_gsm8k, pool):
    from gsmkit.training.config import TrainSettings
    from gsmkit.training.sft import train

    out = tmp_path / "run"
    flags = {"batch_size": 4, "max_length": 128, "max_steps": 3, "save_steps": 1, "logging_steps": 1,
             "lora_r": 4, "lora_alpha": 8}

    def crash(step, _total):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(model=str(tiny_model_dir), out=out, data=str(small_gsm8k), pool=pool, **flags),
              on_step=crash)
    log = out / "trainer_log.jsonl"
    with log.open("ab") as fh:  # the process was killed while writing a row
        fh.write(b'{"step": 2, "loss": 1.2, "grad_no')
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    res = runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--pool", str(pool), *args, "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in log.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    resolved = json.loads((out / "manifest.json").read_text())["resolved"]
    assert resolved["resumed_from"].endswith("checkpoint-1")


def test_grpo_preset_table_matches_the_presets():
    import re

    text = (Path(__file__).parents[1] / "docs" / "formats.md").read_text(encoding="utf-8")
    section = text[text.index("`train grpo --preset` sets"):]
    for name, values in GRPO_PRESETS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert set(re.findall(r"`(\w+): ([^`]+)`", row)) == {(k, f"{v:g}") for k, v in values.items()}, row
