"""`gsmkit merge`: the merged folder reproduces base + adapter, the verification gate rejects a broken
merge without leaving anything behind, low-precision outputs report argmax agreement, bad adapters
are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_clean_failure, build_tiny_model
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()
VERIFY_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"prompt": "Question: What is 6 times 7?\nAnswer:", "response": " 6 * 7 = 42\n#### 42"},
    {"text": "Natalia sold clips to 48 of her friends in April, and then half as many in May."},
]


def _lora(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter made with PEFT directly, with random non-zero lora_B so the update matters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return _lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def verify_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "verify.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in VERIFY_ROWS))
    return path


def _merge(model, adapter, out, *extra):
    return runner.invoke(app, ["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(out),
                               "--device", "cpu", *extra])


def test_merged_folder_reproduces_base_plus_adapter(tmp_path, tiny_model_dir, adapter, small_gsm8k):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    res = _merge(tiny_model_dir, adapter, out, "--data", str(small_gsm8k), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert json.loads((out / "merge_report.json").read_text()) == report
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "merge" and manifest["inputs"]["verify_data"]["path"].endswith("test.jsonl")
    # Default verification set: the first 8 test problems of --data (the small fixture has 6).
    assert report["verify"]["items"] == 6 and report["verify"]["tokens"] > 100
    f32 = report["float32"]
    assert f32["passed"] and f32["rel_ppl_diff"] <= 1e-4 and f32["max_abs_logit_diff"] < 1e-4
    assert report["cast"] is None and report["dtype"] == "float32" and report["trained_in_4bit"] is False

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)(VERIFY_ROWS[2]["text"], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got, before = unmerged(ids).logits, merged(ids).logits, plain(ids).logits
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    assert (want - got).abs().max() < 1e-5
    assert (want - before).abs().max() > 1e-2, \
        "the adapter must change the logits for this test to mean anything"


def test_gate_rejects_a_corrupted_merge(tmp_path, tiny_model_dir, adapter, verify_file, monkeypatch):
    import torch

    from gsmkit.adapters import merge as merge_mod

    real = merge_mod.merge_weights

    def noisy(peft_model):
        merged = real(peft_model)
        with torch.no_grad():
            weight = merged.model.layers[0].self_attn.q_proj.weight
            weight.add_(torch.randn_like(weight) * 0.5)
        return merged

    monkeypatch.setattr(merge_mod, "merge_weights", noisy)
    out = tmp_path / "merged"
    res = _merge(tiny_model_dir, adapter, out, "--verify-data", str(verify_file))
    assert_clean_failure(res, out, 1, "merge verification failed", "relative perplexity difference",
                         "max |logit difference|", "tolerance 0.0001")


def test_bfloat16_output_reports_argmax_agreement(tmp_path, tiny_model_dir, adapter, verify_file):
    import torch
    from safetensors import safe_open

    qlora = tmp_path / "qlora-adapter"
    qlora.mkdir()
    for f in adapter.iterdir():
        (qlora / f.name).write_bytes(f.read_bytes())
    (qlora / "manifest.json").write_text(json.dumps({"command": "train qlora"}))
    out = tmp_path / "merged-bf16"
    out.mkdir()  # an existing, non-empty --out needs --overwrite
    (out / "old.txt").write_text("old")
    res = _merge(tiny_model_dir, qlora, out, "--verify-data", str(verify_file), "--dtype", "bfloat16")
    assert_clean_failure(res, None, 1, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    res = _merge(tiny_model_dir, qlora, out, "--verify-data", str(verify_file), "--dtype", "bfloat16",
                 "--overwrite", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["verify"]["items"] == 3 and report["float32"]["passed"]
    cast = report["cast"]
    assert cast["dtype"] == "bfloat16" and 0.5 <= cast["argmax_agreement"] <= 1.0
    assert cast["max_abs_logit_diff"] > report["float32"]["max_abs_logit_diff"]
    assert report["trained_in_4bit"] is True and report["trained_in_4bit_from"] == "manifest"
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.bfloat16


def test_adapter_for_another_base_is_one_line(tmp_path, tiny_model_dir, verify_file):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", tokenizer, hidden=32, seed=3)
    foreign = _lora(other, tmp_path / "foreign")
    out = tmp_path / "merged"
    res = _merge(tiny_model_dir, foreign, out, "--verify-data", str(verify_file))
    assert_clean_failure(res, out, 1, "does not fit base model", "size mismatch")


def test_bad_adapter_and_verify_inputs(tmp_path, tiny_model_dir, adapter, verify_file):
    fake = tmp_path / "fake-adapter"
    fake.mkdir()
    (fake / "README.md").write_text("hello")
    out = tmp_path / "merged"
    assert_clean_failure(_merge(tiny_model_dir, fake, out, "--verify-data", str(verify_file)), out, 1,
                         "not a PEFT adapter folder")
    assert_clean_failure(_merge(tiny_model_dir, adapter, out, "--verify-data", str(tmp_path / "none.jsonl")),
                         out, 1, "none.jsonl", "file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert_clean_failure(_merge(tiny_model_dir, adapter, out, "--verify-data", str(bad)), out, 1, f"{bad}:1:",
                         "'answer'")
    assert_clean_failure(_merge(tiny_model_dir, adapter, out, "--dtype", "int8"), out, 2)


def test_qlora_adapter_merges_into_the_dequantized_nf4_weights(tmp_path, tiny_model_dir, adapter,
                                                               verify_file):
    """A QLoRA adapter learned against nf4-rounded weights: the merged model must carry those weights."""
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("bitsandbytes")
    res = _merge(tiny_model_dir, adapter, tmp_path / "m4", "--verify-data", str(verify_file), "--from-4bit",
                 "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["float32"]["passed"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # k_proj has no LoRA update: merged == nf4(original) != original, and close to it
    w_m = merged.model.layers[0].self_attn.k_proj.weight
    w_o = original.model.layers[0].self_attn.k_proj.weight
    assert not torch.equal(w_m, w_o)
    assert float((w_m - w_o).norm() / w_o.norm()) < 0.2
