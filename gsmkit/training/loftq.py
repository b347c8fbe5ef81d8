"""LoftQ initialisation of a QLoRA adapter, on any device bitsandbytes runs on (CPU included).

QLoRA trains a LoRA adapter on top of nf4 weights Q = nf4(W). Plain LoRA starts with B = 0, so training
begins from the quantized model and the adapter has to learn to undo the quantization error E = W - Q
before it can learn the task. LoftQ (Li et al., 2023, arXiv:2310.08659) starts the adapter at the best
rank-r approximation of E instead, so the first forward pass is already closer to the full-precision
model. This is the one-shot variant PEFT calls `replace_lora_weights_loftq`: the base stays exactly the
nf4 quantization of the original checkpoint (so `eval --load-in-4bit --adapter` and `merge` rebuild it
from the original weights as for any QLoRA adapter), and only the LoRA initialisation changes. PEFT's own
implementation computes on CUDA only and ignores the adapter's alpha/r scaling; this one runs where the
model is and divides the scaling out, so that scaling * B @ A equals the rank-r part of E.

An adapter started this way carries a correction for the nf4 error: it belongs on the nf4 base it was
trained with, not on the full-precision weights (there it would add the correction twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError

PEFT_PREFIX = "base_model.model."


def checkpoint_files(model: str) -> list[Path]:
    """The full-precision .safetensors files of a local folder or (from the local cache, else the Hub) a Hub id."""
    from gsmkit.modeling import locate_weights

    where, _, source = locate_weights(model)
    if source == "gguf":
        raise ConfigError("--init-lora loftq needs the full-precision safetensors weights, not a .gguf file",
                          hint="save the model once with save_pretrained and train from that folder")
    folder = Path(where)
    if source == "hub":
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(where, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached yet: fetch the same files from_pretrained would
            folder = Path(snapshot_download(where, allow_patterns=["*.safetensors"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model}: no .safetensors weights to compute the LoftQ initialisation from",
                          hint="use the default --init-lora default, or convert the checkpoint to safetensors")
    return files


def low_rank_factors(residual: Any, rank: int, scaling: float) -> tuple[Any, Any]:
    """(A, B) with scaling * B @ A the best rank-`rank` approximation of `residual` (out x in).

    The singular values are split evenly between the factors (B = U sqrt(S), A = sqrt(S) V^T), as LoftQ does,
    so neither factor starts much larger than the other.
    """
    import torch

    if min(residual.shape) > 2048:  # 7B-sized layers: a randomized SVD of the top rank+16 directions suffices
        u, s, v = torch.svd_lowrank(residual, q=min(rank + 16, min(residual.shape)), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt() / math.sqrt(scaling)
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def loftq_initialise(peft_model: Any, model: str, adapter: str = "default",
                     on_module: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Set every 4-bit LoRA layer's A and B to the rank-r SVD of its nf4 error; return error statistics.

    `model` is what the base was loaded from (folder or Hub id): its safetensors files give W.
    Statistics: the number of layers, and the total relative Frobenius error ||W - Q_eff|| / ||W|| of the
    effective weights Q_eff = Q + scaling * B @ A before (B = 0) and after.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    layers = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ConfigError("--init-lora loftq applies to 4-bit LoRA layers and the model has none",
                          hint="use it with `gsmkit train qlora`")
    where: dict[str, Path] = {}
    for file in checkpoint_files(model):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    err_before = err_after = norm = 0.0
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            key = name.removeprefix(PEFT_PREFIX) + ".weight"
            if key not in where:
                raise ConfigError(f"{model}: the checkpoint has no tensor '{key}' for LoftQ",
                                  hint="this architecture renames weights on load; use --init-lora default")
            with safe_open(str(where[key]), framework="pt", device="cpu") as handle:
                weight = handle.get_tensor(key)
            device = layer.weight.device
            weight = weight.to(device=device, dtype=torch.float32)
            quantized = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
            if quantized.shape != weight.shape:
                raise ConfigError(f"{model}: '{key}' has shape {tuple(weight.shape)}, the model's layer "
                                  f"{tuple(quantized.shape)}", hint="train from the checkpoint the model was loaded from")
            residual = weight - quantized
            a_mod, b_mod = layer.lora_A[adapter], layer.lora_B[adapter]
            scaling = float(layer.scaling[adapter])
            lora_a, lora_b = low_rank_factors(residual, a_mod.weight.shape[0], scaling)
            a_mod.weight.copy_(lora_a.to(a_mod.weight.dtype))
            b_mod.weight.copy_(lora_b.to(b_mod.weight.dtype))
            corrected = residual - scaling * (b_mod.weight.float() @ a_mod.weight.float())
            err_before += float(residual.pow(2).sum())
            err_after += float(corrected.pow(2).sum())
            norm += float(weight.pow(2).sum())
            if on_module:
                on_module(i + 1, len(layers))
    return {"layers": len(layers), "rel_error_before": math.sqrt(err_before / norm),
            "rel_error_after": math.sqrt(err_after / norm)}
