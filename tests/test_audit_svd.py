"""`gsmkit audit-svd`: QR-based spectra equal dense SVDs, the rank arithmetic, audit files of a real PEFT
adapter, compression that PEFT loads and that reproduces the model at full rank, and clean failures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gsmkit.adapters.lora_files import PEFT_PREFIX, read_adapter
from gsmkit.adapters.spectra import (
    effective_rank,
    lora_singular_values,
    spectral_entropy,
    stable_rank,
    suggest_rank,
    truncate_lora,
)
from gsmkit.cli import app

runner = CliRunner()
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _dense_svdvals(a, b, scale):
    """Reference: the dense update from the same stored values, in float64."""
    return torch.linalg.svdvals(scale * (b.to(torch.float64) @ a.to(torch.float64)))


# ---- the QR path against dense SVD --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(d=st.integers(4, 64), k=st.integers(4, 64), r=st.integers(1, 8), dtype=st.sampled_from(sorted(DTYPES)),
       scale=st.floats(0.01, 10.0), seed=st.integers(0, 2**31 - 1))
def test_qr_singular_values_equal_dense(d, k, r, dtype, scale, seed):
    r = min(r, d, k)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64).to(DTYPES[dtype])
    b = torch.randn(d, r, generator=gen, dtype=torch.float64).to(DTYPES[dtype])
    got = lora_singular_values(a, b, scale)
    want = _dense_svdvals(a, b, scale)
    assert got.dtype == torch.float64 and got.shape == (r,)
    # 1e-6 of the largest singular value: the brief's tolerance; float64 on both sides gives ~1e-14.
    top = float(want[0])
    assert torch.allclose(got, want[:r], rtol=0, atol=1e-6 * top)
    assert all(float(v) <= 1e-10 * top for v in want[r:])  # the dense update has rank <= r


def test_zero_update_has_zero_spectrum():
    a = torch.randn(4, 16)
    b = torch.zeros(8, 4)  # PEFT initialises lora_B to zero
    assert torch.equal(lora_singular_values(a, b, 2.0), torch.zeros(4, dtype=torch.float64))


def test_truncation_is_the_best_rank_k_approximation():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    b = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    scale = 16 / 6
    dense = scale * b @ a
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    for rank, new_scale in ((6, 1.0), (3, 1.0), (2, 0.25)):
        new_a, new_b, retained = truncate_lora(a, b, scale, rank, new_scale=new_scale)
        assert new_a.shape == (rank, 40) and new_b.shape == (30, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose(new_scale * new_b @ new_a, best, atol=1e-12)
        assert retained == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()))
    new_a, _, _ = truncate_lora(a, b, scale, 99)  # more than there are: all of them, not an error
    assert new_a.shape[0] == 6


# ---- the rank arithmetic on hand-made spectra -------------------------------------------------------------


def test_effective_rank_thresholds():
    sv = [2.0, 1.0, 1.0]  # squares 4, 1, 1 of total 6: cumulative 4/6, 5/6, 6/6
    assert [effective_rank(sv, e) for e in (0.5, 2 / 3, 0.8, 5 / 6, 0.9, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert effective_rank([1.0, 2.0, 1.0], 0.5) == 1  # order of the input does not matter
    assert effective_rank([0.1] * 10, 1.0) == 10  # energy 1.0 despite rounding in the running sum
    assert effective_rank([1.0, 0.0, 0.0], 0.99) == 1
    assert effective_rank([0.0, 0.0], 0.9) == 0
    assert effective_rank([], 0.9) == 0


def test_stable_rank_and_entropy():
    assert stable_rank([2.0, 1.0, 1.0]) == pytest.approx(6 / 4)
    assert stable_rank([3.0, 3.0, 3.0, 3.0]) == pytest.approx(4.0)
    assert stable_rank([5.0, 0.0]) == pytest.approx(1.0)
    assert stable_rank([0.0, 0.0]) == 0.0
    p = [4 / 6, 1 / 6, 1 / 6]
    assert spectral_entropy([2.0, 1.0, 1.0]) == pytest.approx(-sum(q * math.log(q) for q in p))
    assert spectral_entropy([0.5] * 8) == pytest.approx(math.log(8))
    assert spectral_entropy([7.0, 0.0, 0.0]) == 0.0
    assert spectral_entropy([0.0, 0.0]) == 0.0


def test_suggested_rank_bounds():
    assert [suggest_rank(e, 8) for e in (0, 1, 5, 8, 12)] == [1, 1, 5, 8, 8]


# ---- a real PEFT adapter on the tiny model -----------------------------------------------------------------


def _make_adapter(base: Path, out: Path, *, random_b: bool, **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora_kwargs})
    peft_model = get_peft_model(model, config)
    if random_b:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter", random_b=True)


def _logits(base: Path, adapter: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = torch.arange(3, 40).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def _stored_pairs(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    return {key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"):
            (tensors[key], tensors[key.replace("lora_A", "lora_B")])
            for key in tensors if key.endswith(".lora_A.weight")}


def _invoke(*args: str):
    return runner.invoke(app, ["audit-svd", *args])


def test_audit_files_and_numbers_match_dense_svd(adapter_dir, tmp_path):
    out = tmp_path / "audit"
    res = _invoke("--adapter", str(adapter_dir), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["modules"] == 4 and summary["out"] == str(out)
    for name in ("audit.json", "audit.md", "spectra.png", "manifest.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    audit = json.loads((out / "audit.json").read_text())
    assert audit["manifest"]["command"] == "audit-svd"
    pairs = _stored_pairs(adapter_dir)
    assert {m["module"] for m in audit["modules"]} == set(pairs) == {
        f"model.layers.{i}.self_attn.{t}" for i in (0, 1) for t in ("q_proj", "v_proj")}
    for m in audit["modules"]:
        a, b = pairs[m["module"]]
        want = _dense_svdvals(a, b, 16 / 8)[:8]
        assert m["scale"] == 2.0 and m["r"] == 8 and m["shape"] == [b.shape[0], a.shape[1]]
        got = torch.tensor(m["singular_values"], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-10, atol=0)
        assert m["frobenius_norm"] == pytest.approx(float(torch.linalg.norm(want)), rel=1e-10)
        assert m["effective_rank"] == effective_rank(want.tolist(), 0.9)
        assert 1 <= m["suggested_rank"] <= 8 and m["note"] is None
        assert audit["rank_pattern"][m["module"]] == m["suggested_rank"]
    assert set(audit["by_type"]) == {"q_proj", "v_proj"} and [e["layer"] for e in audit["by_layer"]] == [0, 1]
    md = (out / "audit.md").read_text()
    assert "## By module type" in md and "model.layers.1.self_attn.v_proj" in md


def test_module_types_tell_apart_projections_that_share_a_name():
    """A type is the module's last name, unless two places in a layer share it (GPT-2's attention and MLP
    `c_proj`): the summaries then keep them apart instead of one overwriting the other."""
    from gsmkit.adapters.audit_results import module_types

    llama = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")] + ["lm_head"]
    assert set(module_types(llama).values()) == {"q_proj", "v_proj", "lm_head"}
    gpt2 = [f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]
    assert module_types(gpt2)["transformer.h.1.attn.c_proj"] == "attn.c_proj"
    assert set(module_types(gpt2).values()) == {"c_attn", "attn.c_proj", "mlp.c_proj"}


def test_default_out_is_inside_the_adapter(adapter_dir, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter_dir, copy)
    res = _invoke("--adapter", str(copy), "--energy", "0.5")
    assert res.exit_code == 0, res.output
    assert "q_proj" in res.output and (copy / "audit" / "audit.json").exists()


def test_compress_at_full_rank_reproduces_the_model(adapter_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "r8"
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--rank", "8", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    original = _logits(tiny_model_dir, adapter_dir)
    assert (original - _logits(tiny_model_dir, None)).abs().max() > 1e-3  # the adapter does change the model
    assert (_logits(tiny_model_dir, out) - original).abs().max() < 1e-5
    summary = json.loads(res.stdout)
    assert summary["lora_parameters_before"] == summary["lora_parameters_after"] == 3584


def test_compress_to_rank_2_is_smaller_and_loads(adapter_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "r2"
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--rank", "2", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["lora_parameters_after"] < summary["lora_parameters_before"]
    assert set(summary["ranks"].values()) == {2}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and set(cfg["rank_pattern"].values()) == {2}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    stored = _stored_pairs(out)
    assert sum(a.numel() + b.numel() for a, b in stored.values()) == summary["lora_parameters_after"]
    # Each stored update (scale 2 / 2 = 1) is the best rank-2 approximation of the original one.
    for module, (a, b) in _stored_pairs(adapter_dir).items():
        u, s, vh = torch.linalg.svd(2.0 * b.double() @ a.double())
        new_a, new_b = stored[module]
        assert torch.allclose(new_b.double() @ new_a.double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)
    assert _logits(tiny_model_dir, out).isfinite().all()  # PeftModel.from_pretrained accepts it


def test_suggested_ranks_differ_per_module_and_audit_again(adapter_dir, tiny_model_dir, tmp_path):
    """Compress to the suggested ranks (different r per module), then audit the result: rank_pattern
    and alpha_pattern are honoured, and the spectra are the leading singular values of the original."""
    out = tmp_path / "suggested"
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--energy", "0.6", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    ranks = json.loads(res.stdout)["ranks"]
    assert ranks == json.loads(res.stdout)["rank_pattern"]
    original = {m.path: m for m in read_adapter(adapter_dir).modules}
    compressed = read_adapter(out)
    assert {m.path: m.r for m in compressed.modules} == ranks
    assert len(set(ranks.values())) > 1 and max(ranks.values()) < 8
    for m in compressed.modules:
        assert m.scale == 1.0
        a0, b0 = original[m.path].matrices()
        want = lora_singular_values(a0, b0, original[m.path].scale)[: m.r]
        assert torch.allclose(lora_singular_values(m.lora_a, m.lora_b, m.scale), want, rtol=1e-5)
    assert _logits(tiny_model_dir, out).isfinite().all()


def test_patterns_and_rslora_set_rank_and_scale(tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "mixed"
    adapter.mkdir()
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True,
           "target_modules": ["q_proj", "v_proj"],
           "rank_pattern": {"model.layers.0.self_attn.q_proj": 4}, "alpha_pattern": {"q_proj": 8}}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    p = f"{PEFT_PREFIX}model.layers.0.self_attn"
    save_file({f"{p}.q_proj.lora_A.weight": torch.randn(4, 16),
               f"{p}.q_proj.lora_B.weight": torch.randn(16, 4),
               f"{p}.v_proj.lora_A.weight": torch.randn(8, 16),
               f"{p}.v_proj.lora_B.weight": torch.randn(12, 8)},
              str(adapter / "adapter_model.safetensors"))
    modules = {m.path.rsplit(".", 1)[-1]: m for m in read_adapter(adapter).modules}
    assert (modules["q_proj"].r, modules["q_proj"].alpha, modules["q_proj"].scale) == (4, 8.0, 8 / 2)
    assert (modules["v_proj"].r, modules["v_proj"].alpha) == (8, 16.0)
    assert modules["v_proj"].scale == pytest.approx(16 / math.sqrt(8))
    res = _invoke("--adapter", str(adapter), "--out", str(tmp_path / "audit"), "--json")
    assert res.exit_code == 0, res.output


def test_fresh_adapter_has_zero_spectra_and_a_note(tiny_model_dir, tmp_path):
    adapter = _make_adapter(tiny_model_dir, tmp_path / "fresh", random_b=False)
    out = tmp_path / "audit"
    res = _invoke("--adapter", str(adapter), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    for m in audit["modules"]:
        assert m["singular_values"] == [0.0] * 8 and m["frobenius_norm"] == 0.0
        numbers = (m["effective_rank"], m["stable_rank"], m["spectral_entropy"], m["suggested_rank"])
        assert numbers == (0, 0.0, 0.0, 1)
        assert "zero update" in m["note"]
    assert any("zero update" in n for n in audit["notes"])
    compressed = tmp_path / "fresh-c"
    assert _invoke("--adapter", str(adapter), "--compress", "--out", str(compressed)).exit_code == 0
    assert json.loads((compressed / "adapter_config.json").read_text())["r"] == 1


# ---- clean failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "needles"),
    [
        ({"README.md": "hello"}, ["not a PEFT adapter folder", "adapter_config.json"]),
        ({"adapter_config.json": '{"peft_type": "LORA", "r": 8}'}, ["no weights"]),
        ({}, ["not a PEFT adapter folder"]),
        ({"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": "not safetensors"},
         ["cannot read"]),
    ],
    ids=["no-config", "no-weights", "empty", "damaged-weights"],
)
def test_bad_adapter_folders(tmp_path, files, needles):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, text in files.items():
        (adapter / name).write_text(text)
    for extra in ([], ["--compress"]):
        out = tmp_path / "out"
        assert_clean_failure(_invoke("--adapter", str(adapter), "--out", str(out), *extra), out, 1, *needles)
    assert_clean_failure(_invoke("--adapter", str(adapter)), adapter / "audit", 1, *needles)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rank", "2"], "--rank applies only with --compress"),
        (["--compress"], "--compress needs --out"),
        (["--energy", "0"], "--energy must be in (0, 1]"),
        (["--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--compress", "--rank", "0", "--out", "OUT"], "--rank"),
    ],
)
def test_misused_options_exit_2(adapter_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    res = _invoke("--adapter", str(adapter_dir), *[str(out) if a == "OUT" else a for a in args])
    assert_clean_failure(res, out, 2, needle)
    assert not (adapter_dir / "audit").exists()


def test_compress_refuses_a_non_empty_out_without_overwrite(adapter_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--out", str(out))
    assert_clean_failure(res, None, 1, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--out", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--out", str(adapter_dir), "--overwrite")
    assert_clean_failure(res, None, 1, "would replace the input")
    res = _invoke("--adapter", str(adapter_dir), "--compress", "--out", str(adapter_dir / "small"))
    assert_clean_failure(res, adapter_dir / "small", 1, "lies inside the input")
