"""Quantization-aware initialisation of a QLoRA adapter: LoftQ and CLoQ, on any device bitsandbytes runs on.

QLoRA trains a LoRA adapter on top of nf4 weights Q = nf4(W). Plain LoRA starts with B = 0, so training
begins from the quantized model and the adapter has to learn to undo the quantization error E = W - Q
before it can learn the task. Both methods here start the adapter at a rank-r correction C = scaling * B @ A
of E instead, so the first forward pass is already close to the full-precision model:

- `loftq`: C is the best rank-r approximation of E in the Frobenius norm, the SVD of E (one-shot LoftQ,
  Li et al. 2023, arXiv:2310.08659; PEFT's `replace_lora_weights_loftq`). It needs no data. On a small
  model the nf4 error is close to full-rank noise, so a rank-16 SVD removes little of it.
- `cloq`: C minimises the error of the layer's *outputs* on calibration inputs X, ||X (E - C)^T||_F, which
  is what the next layer sees. With H = X^T X = L L^T (Cholesky, damped), that is the Frobenius problem
  ||(E - C) L||: C = SVD_r(E L) L^-1, the closed form of CLoQ (Deng et al. 2025, arXiv:2501.18475) and of
  QERA (Zhang et al., ICLR 2025, arXiv:2410.06040). Activations have a few dominant directions, so most
  of the error that matters lies in a low-rank subspace: on SmolLM2-135M the rank-16 CLoQ adapter brings
  the nf4 model's held-out perplexity back to within 3% of float32 (5.30 -> 4.16, float32 4.04), where
  LoftQ recovers an eighth of the gap (5.14).

The inputs X come from running calibration rows (a seeded sample of the run's own training rows, so no
held-out data is touched) through the 4-bit model itself, on its device. Gram matrices are collected in
passes over the calibration rows, each pass holding at most `gram_budget` bytes of them and stopping the
forward pass once the pass's last layer has its input; layers of later passes therefore see the inputs of
already corrected earlier layers, as in GPTQ's sequential calibration.

In every case the base stays exactly nf4(W) of the original checkpoint (so `eval --load-in-4bit --adapter`
and `merge` rebuild it from the original weights as for any QLoRA adapter); only A and B change. PEFT's
own LoftQ computes on CUDA only and ignores the adapter's alpha/r scaling; this runs where the model is and
divides the scaling out. An adapter started this way carries a correction for the nf4 error: it belongs on
the nf4 base it was trained with, not on the full-precision weights (there it would add the correction twice).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.modeling import PEFT_PREFIX

METHODS = ("loftq", "cloq")
# GPTQ's damping: a share of the mean diagonal added to H, so directions no calibration token excites stay
# solvable (H is singular when a layer sees fewer distinct inputs than it has input features).
DAMP = 0.01
DEFAULT_GRAM_BUDGET = 2 << 30  # bytes of Gram matrices held at once (7B: about 14 passes over the rows)
CALIBRATION_BATCH = 8  # rows per calibration forward pass

# (description, done, total): "calibrating" counts forward batches, "initialising" counts layers.
InitProgress = Callable[[str, int, int], None]


def checkpoint_files(model: str) -> list[Path]:
    """The full-precision .safetensors files of a local folder, or of a Hub id (from the local cache, else
    the Hub)."""
    from gsmkit.modeling import locate_weights

    where, _, source = locate_weights(model)
    if source == "gguf":
        raise ConfigError("--init-lora needs the full-precision safetensors weights, not a .gguf file",
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
        raise ConfigError(f"{model}: no .safetensors weights to compute the adapter initialisation from",
                          hint="use --init-lora default, or convert the checkpoint to safetensors")
    return files


def _top_singular(matrix: Any, rank: int) -> tuple[Any, Any, Any]:
    """(U_r, S_r, Vh_r) of the top `rank` singular directions of `matrix`."""
    import torch

    if min(matrix.shape) > 2048:  # 7B-sized layers: a randomized SVD of the top rank+16 directions suffices
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 16, min(matrix.shape)), niter=4)
        return u[:, :rank], s[:rank], v.T[:rank]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def low_rank_factors(residual: Any, rank: int, scaling: float) -> tuple[Any, Any]:
    """(A, B) with scaling * B @ A the best rank-`rank` approximation of `residual` (out x in).

    The singular values are split evenly between the factors (B = U sqrt(S), A = sqrt(S) V^T), as LoftQ does,
    so neither factor starts much larger than the other.
    """
    u, s, vh = _top_singular(residual, rank)
    root = s.sqrt() / math.sqrt(scaling)
    return root[:, None] * vh, u * root[None, :]


def damped_cholesky(gram: Any, damp: float = DAMP) -> Any:
    """Lower-triangular L with L L^T = gram + damp * mean(diag) * I; more damping if that is not enough."""
    import torch

    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = float(gram.diagonal().mean()) or 1.0
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(gram + (damp * 10**attempt) * scale * eye)
        if int(info) == 0:
            return factor
    raise ConfigError("the calibration inputs of a layer give a Gram matrix that is not positive definite",
                      hint="use more --calibration-rows, or --init-lora loftq")


def calibrated_low_rank_factors(residual: Any, gram: Any, rank: int, scaling: float,
                                damp: float = DAMP) -> tuple[Any, Any]:
    """(A, B) minimising ||(residual - scaling * B @ A) L||_F with L L^T = gram (damped): CLoQ's closed form.

    `residual` is out x in, `gram` in x in (X^T X of the layer's inputs). Each rank-one component is then
    rescaled so that its column of B and its row of A have the same norm (the product is unchanged), for
    the reason `low_rank_factors` splits sqrt(S) evenly: neither factor's gradient starts much smaller.
    """
    import torch

    lower = damped_cholesky(gram, damp)
    u, s, vh = _top_singular(residual @ lower, rank)
    b = u * s.sqrt()[None, :]
    # A = sqrt(S) Vh L^-1, i.e. L^T A^T = Vh^T sqrt(S)
    a = torch.linalg.solve_triangular(lower.T, (s.sqrt()[:, None] * vh).T, upper=True).T
    balance = (a.norm(dim=1) / b.norm(dim=0).clamp_min(1e-30)).sqrt().clamp_min(1e-30)
    root = 1 / math.sqrt(scaling)
    return a / balance[:, None] * root, b * balance[None, :] * root


def calibration_sample(encoded: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A seeded sample of `n` encoded training rows (all of them if there are fewer), in dataset order."""
    if n >= len(encoded):
        return list(encoded)
    picked = sorted(random.Random(seed).sample(range(len(encoded)), n))
    return [encoded[i] for i in picked]


class _PassDone(Exception):
    """Raised from a hook once every layer of a calibration pass has its input: the rest is not needed."""


def _gram_passes(layers: list[tuple[str, Any]], budget: int) -> list[list[tuple[str, Any]]]:
    """Consecutive groups of layers whose float32 Gram matrices fit in `budget` bytes (at least one each)."""
    passes: list[list[tuple[str, Any]]] = [[]]
    used = 0
    for name, layer in layers:
        size = 4 * layer.in_features ** 2
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append((name, layer))
        used += size
    return passes


def collect_grams(model: Any, layers: list[tuple[str, Any]], rows: Sequence[Any], pad_id: int,
                  batch_size: int = CALIBRATION_BATCH,
                  on_batch: Callable[[], None] | None = None) -> tuple[dict[str, Any], int]:
    """X^T X of the inputs each of `layers` sees on `rows` (padding excluded), float32 on each layer's device;
    and the number of calibration tokens."""
    import torch

    from gsmkit.training.collate import PadCollator

    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    # each on its layer's device (a model split over devices feeds every layer on its own)
    grams = {name: torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)
             for name, layer in layers}
    seen: set[str] = set()
    mask: list[Any] = [None]
    last: list[Any] = [None, None]  # q/k/v (gate/up) get the same input tensor: its X^T X is computed once

    def hook(name: str):
        def record(_module, inputs):
            x = inputs[0]
            if last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1])
                if flat.shape[0] == mask[0].shape[0]:  # (batch, seq, features): leave the padding out
                    flat = flat[mask[0].to(flat.device)]
                flat = flat.float()
                last[0], last[1] = x, flat.T @ flat
            grams[name] += last[1]
            seen.add(name)
            if len(seen) == len(grams):
                raise _PassDone
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = collate([{"input_ids": r.input_ids, "labels": r.labels} for r in chunk])
                ids, attn = batch["input_ids"], batch["attention_mask"]
                mask[0] = attn.reshape(-1).bool().to(device)
                tokens += int(attn.sum())
                seen.clear()
                try:
                    model(input_ids=ids.to(device), attention_mask=attn.to(device))
                except _PassDone:
                    pass
                last[0] = last[1] = None
                if on_batch:
                    on_batch()
    finally:
        for handle in handles:
            handle.remove()
    return grams, tokens


def initialise_adapter(peft_model: Any, model: str, method: str, calibration: Sequence[Any] = (),
                       pad_id: int = 0, adapter: str = "default", gram_budget: int = DEFAULT_GRAM_BUDGET,
                       on_progress: InitProgress | None = None) -> dict[str, Any]:
    """Set every 4-bit LoRA layer's A and B to the `method` correction of its nf4 error; return statistics.

    `model` is what the base was loaded from (folder or Hub id): its safetensors files give W. `calibration`:
    encoded rows for `cloq`. Statistics: the number of layers, the relative Frobenius error of the weights
    sqrt(sum ||W - Q_eff||^2 / sum ||W||^2) with Q_eff = Q + scaling * B @ A, before (B = 0) and after; for
    `cloq` also the relative output error on the calibration inputs sqrt(sum tr(D H D^T) / sum tr(W H W^T)),
    D = W - Q_eff, before and after, and the calibration rows and tokens.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    if method not in METHODS:
        raise ConfigError(f"unknown LoRA initialisation '{method}'",
                          hint=f"choose one of {', '.join(METHODS)}")
    layers = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ConfigError(f"--init-lora {method} applies to 4-bit LoRA layers and the model has none",
                          hint="use it with `gsmkit train qlora`")
    if method == "cloq" and not calibration:
        raise ConfigError("--init-lora cloq needs calibration rows",
                          hint="set --calibration-rows to 1 or more")
    from gsmkit.modeling import keep_4bit_compute_dtype

    # calibration runs inference passes: keep the layout dequantize_4bit reads
    keep_4bit_compute_dtype(peft_model)
    where: dict[str, Path] = {}
    for file in checkpoint_files(model):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    for name, _ in layers:
        key = name.removeprefix(PEFT_PREFIX) + ".weight"
        if key not in where:  # before any forward pass: a wrong checkpoint fails in seconds
            raise ConfigError(f"{model}: the checkpoint has no tensor '{key}' for --init-lora",
                              hint="this architecture renames weights on load; use --init-lora default")
    passes = _gram_passes(layers, gram_budget) if method == "cloq" else [layers]
    batches = -(-len(calibration) // CALIBRATION_BATCH) * len(passes) if method == "cloq" else 0
    stats = {"method": method, "layers": len(layers), "weight": [0.0, 0.0, 0.0], "output": [0.0, 0.0, 0.0]}
    done_batches = done_layers = 0
    was_training = peft_model.training
    peft_model.eval()  # no dropout while calibrating
    try:
        for group in passes:
            grams: dict[str, Any] = {}
            if method == "cloq":
                def on_batch() -> None:
                    nonlocal done_batches
                    done_batches += 1
                    if on_progress:
                        on_progress("calibrating", done_batches, batches)

                grams, tokens = collect_grams(peft_model, group, calibration, pad_id, on_batch=on_batch)
                stats["calibration_rows"], stats["calibration_tokens"] = len(calibration), tokens
            with torch.no_grad():
                for name, layer in group:
                    _initialise_layer(layer, name, where, grams.get(name), adapter, stats, bnbf, safe_open)
                    done_layers += 1
                    if on_progress:
                        on_progress("initialising", done_layers, len(layers))
            del grams
    finally:
        peft_model.train(was_training)
    weight, output = stats.pop("weight"), stats.pop("output")
    stats["rel_error_before"] = math.sqrt(weight[0] / weight[2])
    stats["rel_error_after"] = math.sqrt(weight[1] / weight[2])
    if method == "cloq":
        stats["rel_output_error_before"] = math.sqrt(output[0] / output[2])
        stats["rel_output_error_after"] = math.sqrt(output[1] / output[2])
    return stats


def _initialise_layer(layer: Any, name: str, where: dict[str, Path], gram: Any, adapter: str, stats: dict,
                      bnbf: Any, safe_open: Any) -> None:
    import torch

    key = name.removeprefix(PEFT_PREFIX) + ".weight"
    with safe_open(str(where[key]), framework="pt", device="cpu") as handle:
        weight = handle.get_tensor(key)
    device = layer.weight.device
    # float64 on the CPU (cheap there, and the Cholesky solve of a damped Gram matrix likes it), else float32
    work = torch.float64 if device.type == "cpu" else torch.float32
    weight = weight.to(device=device, dtype=work)
    quantized = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(work)
    if quantized.shape != weight.shape:
        raise ConfigError(f"'{key}' has shape {tuple(weight.shape)} in the checkpoint, the model's layer "
                          f"{tuple(quantized.shape)}",
                          hint="train from the checkpoint the model was loaded from")
    residual = weight - quantized
    a_mod, b_mod = layer.lora_A[adapter], layer.lora_B[adapter]
    scaling = float(layer.scaling[adapter])
    rank = a_mod.weight.shape[0]
    if gram is None:
        lora_a, lora_b = low_rank_factors(residual, rank, scaling)
    else:
        gram = gram.to(work)
        lora_a, lora_b = calibrated_low_rank_factors(residual, gram, rank, scaling)
    a_mod.weight.copy_(lora_a.to(a_mod.weight.dtype))
    b_mod.weight.copy_(lora_b.to(b_mod.weight.dtype))
    corrected = residual - scaling * (b_mod.weight.to(work) @ a_mod.weight.to(work))
    for slot, value in enumerate((residual.pow(2).sum(), corrected.pow(2).sum(), weight.pow(2).sum())):
        stats["weight"][slot] += float(value)
    if gram is not None:
        for slot, d in enumerate((residual, corrected, weight)):
            stats["output"][slot] += float(((d @ gram) * d).sum())  # tr(D H D^T)
