"""Per-module LoRA ranks: `train sft --rank-pattern FILE` builds exactly the ranks asked for (config and
safetensors shapes), alpha follows the rank, bad files fail before any model loads; `audit-svd --compress
--rank-policy suggested|median|uniform:K` (and `--rank K`, the same as uniform:K)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.adapters.lora_files import read_adapter
from gsmkit.adapters.svd import AuditSettings, parse_rank_policy
from gsmkit.cli import app
from gsmkit.errors import ConfigError, DataError
from gsmkit.modeling import PEFT_PREFIX
from gsmkit.training.config import TrainSettings
from gsmkit.training.lora import add_lora, lora_ranks, read_rank_pattern

runner = CliRunner()
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def _train(tiny_model_dir, small_gsm8k, pool, out, *extra):
    return runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                               "--pool", str(pool), "--out", str(out), "--max-steps", "1",
                               "--batch-size", "2", "--max-length", "96", "--lora-r", "4",
                               "--lora-alpha", "8", *extra])


def _shapes(adapter: Path) -> dict[str, tuple[int, int]]:
    """module path -> (rank of lora_A, rank of lora_B) as stored."""
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    return {key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"):
            (tensors[key].shape[0], tensors[key.replace("lora_A", "lora_B")].shape[1])
            for key in tensors if key.endswith(".lora_A.weight")}


Q0, DOWN1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
V1 = r"layers\.1\.self_attn\.v_proj"
ASKED = {Q0: 2, DOWN1: 7, "model.layers.1.self_attn.v_proj": 1}  # the modules those keys set


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory, tiny_model_dir, small_gsm8k, pool) -> tuple[Path, Path]:
    """One step of `train sft --lora-r 4 --lora-alpha 8 --rank-pattern audit.json`: (run folder, pattern)."""
    root = tmp_path_factory.mktemp("pattern-run")
    # audit.json's form: a rank_pattern key among others; full paths and a suffix regex
    pattern = _write(root / "audit.json", {"energy": 0.9, "rank_pattern": {Q0: 2, DOWN1: 7, V1: 1}})
    res = _train(tiny_model_dir, small_gsm8k, pool, root / "run", "--rank-pattern", str(pattern))
    assert res.exit_code == 0, res.output
    return root / "run", pattern


def test_a_pattern_trains_exactly_the_asked_ranks(pattern_run):
    out, pattern = pattern_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {Q0: 2, DOWN1: 7, V1: 1}
    # alpha follows the rank: alpha_m / r_m = 8 / 4 = 2 for every module
    assert config["alpha_pattern"] == {Q0: 4, DOWN1: 14, V1: 2}
    shapes = _shapes(out)
    assert len(shapes) == 2 * len(TARGETS)
    for module, (r_a, r_b) in shapes.items():
        assert r_a == r_b == ASKED.get(module, 4), module
    # what PEFT reads back: each module's rank and a scale of 2 everywhere
    read = read_adapter(out)
    assert {m.path: m.r for m in read.modules} == {m: ASKED.get(m, 4) for m in shapes}
    assert {m.scale for m in read.modules} == {2.0}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["rank_pattern"] == str(pattern)


def test_the_manifest_records_each_modules_rank(pattern_run):
    out, pattern = pattern_run
    manifest = json.loads((out / "manifest.json").read_text())
    ranks = manifest["resolved"]["lora_ranks"]
    assert len(ranks) == 2 * len(TARGETS)
    assert {m: v["r"] for m, v in ranks.items()} == {m: ASKED.get(m, 4) for m in ranks}
    assert all(v["alpha"] == 2 * v["r"] for v in ranks.values())
    assert manifest["inputs"]["rank_pattern"]["path"] == str(pattern)


def test_an_audit_json_pattern_and_its_alpha_pattern(tmp_path, tiny_model_dir):
    """A real audit.json from `audit-svd` gives each module its suggested rank; a file's own alpha_pattern
    is used as it is; lora_ranks reports what was built."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "adapter")
    res = runner.invoke(app, ["audit-svd", "--adapter", str(tmp_path / "adapter"), "--energy", "0.6",
                              "--out", str(tmp_path / "audit")])
    assert res.exit_code == 0, res.output
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    suggested = audit["rank_pattern"]
    assert len(suggested) == 4 and len(set(suggested.values())) > 1

    pattern = read_rank_pattern(tmp_path / "audit" / "audit.json")
    assert pattern.ranks == suggested and pattern.alphas is None
    settings = TrainSettings(model=str(tiny_model_dir), out=tmp_path / "o", lora_r=16, lora_alpha=32,
                             target_modules=("q_proj", "v_proj"),
                             rank_pattern=tmp_path / "audit" / "audit.json")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    built, targets = add_lora(base, settings)
    assert targets == ["q_proj", "v_proj"]
    assert lora_ranks(built, settings) == {m: {"r": r, "alpha": 2 * r} for m, r in suggested.items()}

    # an explicit alpha_pattern (here: scale 1, as a compressed adapter's config has) is kept as given
    module = next(iter(suggested))
    own = _write(tmp_path / "own.json", {"rank_pattern": {module: 3}, "alpha_pattern": {module: 3}})
    settings = TrainSettings(model=str(tiny_model_dir), out=tmp_path / "o", lora_r=16, lora_alpha=32,
                             target_modules=("q_proj", "v_proj"), rank_pattern=own)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    built, _ = add_lora(base, settings)
    ranks = lora_ranks(built, settings)
    assert ranks[module] == {"r": 3, "alpha": 3}
    assert {v["r"] for m, v in ranks.items() if m != module} == {16}
    assert lora_ranks(built, TrainSettings(model="m", out=tmp_path / "o")) is None  # no pattern: uniform


@pytest.mark.usefixtures("no_loading")
def test_bad_pattern_files_fail_before_any_model_loads(tmp_path, tiny_model_dir, small_gsm8k, pool):
    cases = [
        ("notjson.json", "{nope", "not a readable JSON file"),
        ("list.json", [1, 2], "expected a JSON object, got list"),
        ("zero.json", {"q_proj": 0}, "rank_pattern key 'q_proj': expected a positive integer rank, got 0"),
        ("float.json", {"rank_pattern": {"q_proj": 2.5}}, "key 'q_proj': expected a positive integer rank"),
        ("bool.json", {"q_proj": True}, "key 'q_proj'"),
        ("empty.json", {"rank_pattern": {}}, "'rank_pattern' must be a non-empty JSON object"),
        ("regex.json", {"q_proj(": 2}, "rank_pattern key 'q_proj(' is not a valid regular expression"),
        ("alpha.json", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": "x"}},
         "alpha_pattern key 'q_proj': expected a positive number"),
    ]
    for name, content, message in cases:
        path = _write(tmp_path / name, content)
        with pytest.raises(DataError) as err:
            read_rank_pattern(path)
        assert name in err.value.message and message in err.value.message, err.value.message
        res = _train(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", "--rank-pattern", str(path))
        assert_clean_failure(res, tmp_path / "o", 1, name)
    # usage errors: a missing file (Typer's check) and --full
    missing = str(tmp_path / "no.json")
    res = _train(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", "--rank-pattern", missing)
    assert res.exit_code == 2 and "no.json" in res.output
    good = _write(tmp_path / "good.json", {"q_proj": 2})
    res = _train(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", "--rank-pattern", str(good), "--full")
    assert res.exit_code == 2 and "--rank-pattern" in res.output and "--full" in res.output
    with pytest.raises(ConfigError, match="--full"):
        TrainSettings(model="m", out=tmp_path / "o", full=True, rank_pattern=good)


def test_a_key_that_sets_no_module_is_refused_before_training(tmp_path, tiny_model_dir, small_gsm8k, pool):
    for name, table, key in (
        ("other.json", {"model.layers.0.self_attn.q_proj": 2, "vision.q_proj": 3}, "vision.q_proj"),
        ("untargeted.json", {"q_proj": 2, "lm_head": 3}, "lm_head"),
        # an earlier key matches every module the later one would: the later one never applies
        ("shadowed.json", {"q_proj": 2, "layers.0.self_attn.q_proj": 3}, "layers.0.self_attn.q_proj"),
    ):
        path = _write(tmp_path / name, table)
        res = _train(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", "--rank-pattern", str(path))
        assert_clean_failure(res, tmp_path / "o", 1, f"key '{key}' sets no LoRA module", name)
    path = _write(tmp_path / "target.json", {"q_proj": 2})
    res = _train(tiny_model_dir, small_gsm8k, pool, tmp_path / "o", "--rank-pattern", str(path),
                 "--target-modules", "v_proj")
    assert res.exit_code == 1 and "key 'q_proj' sets no LoRA module" in res.output


# ---- audit-svd --compress --rank-policy -------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (r = 8 on q/v_proj of 2 layers) whose updates have n_i equal singular values and then
    zeros, so each module's suggested rank at --energy 0.99 is n_i."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    ranks = iter((1, 2, 5, 6))  # layer 0 q, layer 0 v, layer 1 q, layer 1 v: the median_high is 5
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if name.endswith(("q_proj", "v_proj")) and hasattr(module, "lora_A"):
                n = next(ranks)
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                qa, _ = torch.linalg.qr(torch.randn(a.shape[1], 8, generator=gen))
                qb, _ = torch.linalg.qr(torch.randn(b.shape[0], 8, generator=gen))
                sigma = torch.tensor([1.0 if j < n else 0.0 for j in range(8)])
                a.copy_(qa.T)
                b.copy_(qb * sigma)
    out = tmp_path_factory.mktemp("uneven") / "adapter"
    peft_model.save_pretrained(out)
    return out


def _compress(adapter: Path, out: Path, *extra: str):
    return runner.invoke(app, ["audit-svd", "--adapter", str(adapter), "--energy", "0.99", "--compress",
                               "--out", str(out), "--json", *extra])


def test_rank_policies_give_the_documented_ranks(uneven_adapter, tmp_path):
    expected = {"suggested": [1, 2, 5, 6], "median": [5, 5, 5, 5], "uniform:3": [3, 3, 3, 3]}
    for policy in ("suggested", "median", "uniform:3"):
        out = tmp_path / policy.replace(":", "-")
        res = _compress(uneven_adapter, out, "--rank-policy", policy)
        assert res.exit_code == 0, res.output
        ranks = [m.r for m in read_adapter(out).modules]
        assert ranks == expected[policy], policy
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["settings"]["rank_policy"] == policy
        assert manifest["compression"]["rank_policy"] == policy
        forced = {"suggested": None, "median": 5, "uniform:3": 3}[policy]
        assert manifest["compression"]["forced_rank"] == forced
    # the default is suggested; --rank K is uniform:K, recorded as such
    res = _compress(uneven_adapter, tmp_path / "default")
    assert res.exit_code == 0 and [m.r for m in read_adapter(tmp_path / "default").modules] == [1, 2, 5, 6]
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["compression"]["rank_policy"] == \
        "suggested"
    res = _compress(uneven_adapter, tmp_path / "rank3", "--rank", "3")
    assert res.exit_code == 0 and [m.r for m in read_adapter(tmp_path / "rank3").modules] == [3, 3, 3, 3]
    manifest = json.loads((tmp_path / "rank3" / "manifest.json").read_text())
    assert manifest["settings"]["rank_policy"] == "uniform:3" and manifest["compression"]["forced_rank"] == 3
    # a uniform rank above a module's own r keeps its r (8), with a note
    res = _compress(uneven_adapter, tmp_path / "big", "--rank-policy", "uniform:9")
    assert res.exit_code == 0 and [m.r for m in read_adapter(tmp_path / "big").modules] == [8, 8, 8, 8]
    assert any("rank 9 asked for, 8 kept" in n for n in json.loads(res.stdout)["notes"] +
               json.loads((tmp_path / "big" / "manifest.json").read_text())["compression"]["notes"])


def test_rank_policy_parsing_and_contradictions(uneven_adapter, tmp_path):
    assert parse_rank_policy("suggested") == ("suggested", None)
    assert parse_rank_policy("median") == ("median", None)
    assert parse_rank_policy("uniform:12") == ("uniform", 12)
    for bad in ("uniform:0", "uniform", "uniform:x", "mean", "8"):
        with pytest.raises(ConfigError, match="--rank-policy"):
            parse_rank_policy(bad)
    same = AuditSettings(adapter=uneven_adapter, compress=True, out=tmp_path / "o", rank=4,
                         rank_policy="uniform:4")
    assert same.rank_policy == "uniform:4"
    for args, message in (
        (["--rank-policy", "median"], "--rank-policy applies only with --compress"),
        (["--compress", "--out", str(tmp_path / "o"), "--rank-policy", "uniform:0"], "--rank-policy"),
        (["--compress", "--out", str(tmp_path / "o"), "--rank", "4", "--rank-policy", "median"],
         "--rank 4 is --rank-policy uniform:4"),
    ):
        res = runner.invoke(app, ["audit-svd", "--adapter", str(uneven_adapter), *args])
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "o").exists()
