"""CLI behaviour on bad input: one-line errors naming the problem, exit 1 (2 for misused options),
no traceback, no output folder left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import assert_clean_failure, build_tiny_model
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()


def _eval(model, data, out, *extra):
    return runner.invoke(app, ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--out", str(out),
                               "--max-new-tokens", "2", *extra])


def test_version_and_help():
    from gsmkit import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = runner.invoke(app, [])
    assert "fewshot" in res.output and "eval" in res.output


def test_help_is_fast_because_imports_are_lazy():
    code = "import sys, gsmkit.cli; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("", ["file is empty"]),
        ('{"question": "q", "answer": "a #### 1"}\nnot json\n', [":2:", "not valid JSON"]),
        ('{"answer": "x #### 3"}\n', [":1:", "missing field 'question'"]),
        ('{"question": "q", "answer": "no final answer"}\n', [":1:", "'answer'", "####"]),
    ],
)
def test_bad_data_files(tmp_path, tiny_model_dir, content, needles):
    data = tmp_path / "test.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    assert_clean_failure(_eval(tiny_model_dir, data, out), out, 1, str(data), *needles)


def test_missing_data_file(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert_clean_failure(_eval(tiny_model_dir, tmp_path / "nope.jsonl", out), out, 1, "nope.jsonl",
                         "no such file")


def test_missing_model(tmp_path, small_gsm8k):
    out = tmp_path / "out"
    assert_clean_failure(_eval(tmp_path / "no-model", small_gsm8k, out), out, 1, "no-model")


def test_folder_that_is_not_an_adapter(tmp_path, tiny_model_dir, small_gsm8k):
    fake = tmp_path / "fake-adapter"
    fake.mkdir()
    (fake / "README.md").write_text("hello")
    out = tmp_path / "out"
    res = _eval(tiny_model_dir, small_gsm8k, out, "--adapter", str(fake))
    assert_clean_failure(res, out, 1, "not a PEFT adapter folder", "adapter_config.json")


def test_adapter_for_another_base_model(tmp_path, tiny_model_dir, small_gsm8k):
    """A LoRA adapter trained on a model with another hidden size cannot be applied: one line, exit 1."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", tok, hidden=32, seed=3)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    res = _eval(tiny_model_dir, small_gsm8k, out, "--adapter", str(tmp_path / "adapter"))
    assert_clean_failure(res, out, 1, "does not fit base model", "size mismatch")


def test_misused_options_exit_2(tmp_path, tiny_model_dir, small_gsm8k):
    out = tmp_path / "out"
    assert_clean_failure(_eval(tiny_model_dir, small_gsm8k, out, "--k", "3"), out, 2, "--pool")
    assert_clean_failure(_eval(tiny_model_dir, small_gsm8k, out, "--batch-size", "0"), out, 2)
    assert_clean_failure(_eval(tiny_model_dir, small_gsm8k, out, "--do-sample", "--temperature", "0"),
                         out, 2)
    assert_clean_failure(_eval(tiny_model_dir, small_gsm8k, out, "--pool", str(tmp_path / "none.jsonl"),
                               "--k", "1"),
                         out, 2)


def test_unavailable_features_are_errors_not_fallbacks(tmp_path, tiny_model_dir, small_gsm8k,
                                                       monkeypatch):
    from gsmkit import modeling

    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: False)
    out = tmp_path / "out"
    res = _eval(tiny_model_dir, small_gsm8k, out, "--dtype", "bfloat16", "--device", "cpu")
    assert_clean_failure(res, out, 1, "bfloat16", "--dtype float32")
    res = _eval(tiny_model_dir, small_gsm8k, out, "--backend", "vllm")
    assert_clean_failure(res, out, 1)
    assert "vllm" in res.output.lower()


def test_k_larger_than_pool(tmp_path, tiny_model_dir, small_gsm8k):
    pool = tmp_path / "pool.jsonl"
    assert runner.invoke(app, ["fewshot", "--data", str(small_gsm8k), "--n", "2",
                               "--out", str(pool)]).exit_code == 0
    out = tmp_path / "out"
    assert_clean_failure(_eval(tiny_model_dir, small_gsm8k, out, "--pool", str(pool), "--k", "5"), out, 1,
                         "--k 5", "2")


def test_fewshot_cli_is_byte_identical_and_seeded(tmp_path, small_gsm8k):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for path, seed in ((a, "42"), (b, "42"), (c, "7")):
        res = runner.invoke(app, ["fewshot", "--data", str(small_gsm8k), "--n", "5", "--seed", seed,
                                  "--out", str(path)])
        assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    assert (tmp_path / "a.jsonl.manifest.json").exists()
