"""4-bit loading keeps the compute dtype it was asked for: bitsandbytes' CPU bf16 repacking is switched
off."""

from __future__ import annotations

import pytest
import torch


def _first_4bit(model):
    return next(m for m in model.modules() if type(m).__name__ == "Linear4bit")


def test_inference_keeps_the_weights_and_the_float32_compute(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gsmkit.modeling import ModelSpec, keep_4bit_compute_dtype, load_model

    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = load_model(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu", load_in_4bit=True))
    layer = _first_4bit(loaded.model)
    before = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    with torch.no_grad():
        loaded.model(input_ids=ids)  # an inference pass, where bitsandbytes would repack for its bf16 kernel
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before)
    # the output is the float32 product with the dequantized weight
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ before.T, atol=1e-5)

    # a model loaded elsewhere, already repacked by an inference pass, gets its canonical layout back
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=bnb,
                                                 device_map={"": "cpu"}).eval()
    with torch.no_grad():
        other(input_ids=ids)
    packed = getattr(_first_4bit(other).weight.quant_state, "packing_format_for_cpu", False)
    restored = keep_4bit_compute_dtype(other)
    assert (restored > 0) == packed  # packed only on CPUs with AVX512-BF16
    layer = _first_4bit(other)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # the scales were rounded to bfloat16 by the repacking, so the weights come back close, not identical
    assert torch.allclose(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before,
                          rtol=0.02, atol=1e-3)
