"""LoRA targets in every family: by default the adapter sits on every linear projection of every decoder layer
(fused `qkv_proj` / `gate_up_proj`, GPT-2's `Conv1D` `c_attn` / `c_proj` / `c_fc` included) and never on the
head, in full precision and on a 4-bit base; `--target-modules` is checked against the model with a one-line
error; `train sft` on GPT-2 trains and writes those modules.

The expected modules are enumerated here from the model itself (the decoder blocks by each family's attribute
path, layers by class), independently of `gsmkit.families`, which the code under test uses.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import assert_clean_failure
from family_models import FAMILIES
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ConfigError
from gsmkit.modeling import PEFT_PREFIX, ModelSpec, load_model
from gsmkit.training.config import TrainSettings
from gsmkit.training.lora import add_lora, prepare_base

runner = CliRunner()
# where each family keeps its decoder blocks (every other family here: model.layers)
BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def _projections(model, family: str) -> set[str]:
    """Paths of every linear layer (nn.Linear, Conv1D, bitsandbytes Linear4bit) inside the decoder blocks."""
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit,)
    except ImportError:
        pass
    prefix = BLOCKS.get(family, "model.layers") + "."
    return {name for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, kinds)}


def _wrapped(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def _head_path(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def _load(model_dir, **spec):
    return load_model(ModelSpec(model=str(model_dir), device="cpu", dtype="float32", **spec),
                      for_training=True).model


def _settings(model_dir, tmp_path, **kw) -> TrainSettings:
    return TrainSettings(model=str(model_dir), out=tmp_path / "o", lora_r=2, lora_alpha=4, lora_dropout=0.0,
                         **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_projection_of_every_decoder_layer_gets_lora(family, family_model_dirs, tmp_path):
    model_dir = family_model_dirs(family)
    model = _load(model_dir)
    expected = _projections(model, family)
    head = _head_path(model)
    layers = model.config.get_text_config().num_hidden_layers
    # each block holds at least its attention and MLP projections
    assert len(expected) >= 2 * layers and head not in expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model, targets = add_lora(prepare_base(model, False, False), _settings(model_dir, tmp_path))
    assert _wrapped(peft_model) == expected
    assert {path.rsplit(".", 1)[-1] for path in expected} == set(targets)
    assert head not in _wrapped(peft_model) and type(peft_model.get_output_embeddings()) is torch.nn.Linear
    # the adapter's config says how Conv1D stores its weight, so PEFT has nothing to correct (or warn about)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]

    # a trained-looking adapter merges into the same function: the transposition (fan_in_fan_out) is right
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    peft_model.eval()
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 12), generator=gen)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    base = _load(model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(adapted, base(input_ids=ids).logits, atol=1e-4)  # the adapter acts
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_a_4bit_base_gets_lora_on_every_projection(family, family_model_dirs, tmp_path):
    """On a 4-bit base, transformers quantises GPT-2's Conv1D (this version) and Phi-3's fused projections;
    whichever class a projection ends up as, LoRA attaches to it. The adapter's fan_in_fan_out follows the
    architecture (so it loads on the full-precision Conv1D base as it is); 4-bit layers are untransposed."""
    pytest.importorskip("bitsandbytes")
    model_dir = family_model_dirs(family)
    expected = _projections(_load(model_dir), family)
    quantised = _load(model_dir, load_in_4bit=True)
    assert _projections(quantised, family) == expected
    peft_model, _ = add_lora(prepare_base(quantised, True, False), _settings(model_dir, tmp_path))
    assert _wrapped(peft_model) == expected
    assert _head_path(quantised) not in _wrapped(peft_model)
    assert peft_model.peft_config["default"].fan_in_fan_out is (family == "gpt2")
    from peft.tuners.lora import LoraLayer

    assert not [m for m in peft_model.modules() if isinstance(m, LoraLayer) and m.fan_in_fan_out]


def test_a_namesake_outside_the_decoder_layers_gets_no_lora(family_model_dirs, tmp_path):
    """PEFT matches target names anywhere; a projection-named module outside the blocks (a vision tower's
    q_proj) stays as it is."""
    model_dir = family_model_dirs("llama")
    model = _load(model_dir)
    expected = _projections(model, "llama")
    model.model.tower = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "c_fc": torch.nn.Linear(8, 8)})
    peft_model, targets = add_lora(prepare_base(model, False, False), _settings(model_dir, tmp_path))
    assert "q_proj" in targets and _wrapped(peft_model) == expected
    assert type(peft_model.get_base_model().model.tower["q_proj"]) is torch.nn.Linear


def test_target_modules_overrides_the_default(family_model_dirs, tmp_path):
    model_dir = family_model_dirs("gpt2")
    settings = _settings(model_dir, tmp_path, target_modules=("c_attn",))
    peft_model, targets = add_lora(_load(model_dir), settings)
    assert targets == ["c_attn"]
    assert _wrapped(peft_model) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


@pytest.mark.parametrize(("wanted", "says"), [
    (("q_proj", "c_fc"), "--target-modules q_proj not found"),  # a Llama name on GPT-2
    (("lm_head",), "--target-modules lm_head is the output head"),
])
def test_a_target_that_is_no_projection_is_a_one_line_error(wanted, says, family_model_dirs, tmp_path):
    model_dir = family_model_dirs("gpt2")
    with pytest.raises(ConfigError) as err:
        add_lora(_load(model_dir), _settings(model_dir, tmp_path, target_modules=wanted))
    assert says in str(err.value) and "\n" not in str(err.value)
    # the hint names the projections that exist
    assert all(name in err.value.hint for name in ("c_attn", "c_proj", "c_fc"))


def test_train_sft_on_gpt2_trains_its_conv1d_projections(family_model_dirs, small_gsm8k, pool, tmp_path):
    model_dir = family_model_dirs("gpt2")
    out = tmp_path / "run"
    common = ["train", "sft", "--model", str(model_dir), "--data", str(small_gsm8k), "--pool", str(pool),
              "--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--max-samples", "4",
              "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lr", "1e-2",
              "--warmup-ratio", "0"]
    res = runner.invoke(app, [*common, "--out", str(out)])
    assert res.exit_code == 0, res.output

    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        for layer in (0, 1):
            b = tensors[f"{PEFT_PREFIX}transformer.h.{layer}.{module}.lora_B.weight"]
            assert float(b.abs().sum()) > 0, (layer, module)  # B starts at zero: it trained
    assert not [key for key in tensors if "lm_head" in key or "wte" in key]
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"] and config["fan_in_fan_out"]
    resolved = json.loads((out / "manifest.json").read_text())["resolved"]
    assert resolved["lora_targets"] == ["c_attn", "c_proj", "c_fc"] and resolved["lora_module_count"] == 8

    # an override naming the head fails before training, in one line plus a hint naming what exists
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "head"), "--target-modules", "lm_head"])
    assert_clean_failure(res, tmp_path / "head", 1, "hint:", "c_attn, c_proj, c_fc")
    error = next(line for line in res.output.splitlines() if line.startswith("error:"))
    assert "lm_head is the output head" in error
