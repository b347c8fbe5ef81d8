"""The results of an SVD audit: one `ModuleAudit` per LoRA module and the `AuditResult` that holds them,
with the per-type and per-layer summaries.

In: a `LoraModule` (its A and B matrices and scale, from `lora_files`) and the energy threshold.
Out: the dataclasses that `audit.json` is made of (their fields' meanings are the generated tables of
docs/formats.md), read by `svd` (which computes them) and `audit_report` (which renders them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gsmkit.adapters.lora_files import LoraModule
from gsmkit.adapters.spectra import (
    effective_rank,
    lora_singular_values,
    spectral_entropy,
    stable_rank,
    suggest_rank,
)
from gsmkit.fields import Record

ZERO_NOTE = "zero update (lora_A or lora_B is all zeros, e.g. an untrained adapter): suggested rank 1"


@dataclass
class ModuleAudit:
    """The spectrum of one LoRA module's update `scale * B @ A`, and the rank it suggests.

    Attributes:
        module: the module path in the base model, as PEFT's `rank_pattern` keys match it: the saved key
            without `base_model.model.` and `.lora_A.weight`
        type: the last path component (`q_proj`, `v_proj`, ...), or, where modules of different places in
            their layers share it, the path below the layer number (GPT-2's `attn.c_proj` and `mlp.c_proj`)
        layer: the first number in the path (`model.layers.3.*` → 3); null for modules outside the layers,
            such as `lm_head`
        shape: `[d, k]` of `B @ A` (`[out_features, in_features]` for a Linear layer; a Conv kernel is folded
            into `k`)
        r: the module's rank (from `rank_pattern` when a key there matches the module)
        lora_alpha: the module's alpha (from `alpha_pattern` when a key there matches)
        scale: the scale PEFT applies: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`
        singular_values: singular values of `scale * B @ A`, in descending order. There are `min(d, k, r)` of
            them
        frobenius_norm: `sqrt(sum sigma_i^2)`
        effective_rank: the smallest `n` whose `n` largest `sigma_i^2` add up to at least `energy` of their
            total (0 for a zero update)
        stable_rank: `sum sigma_i^2 / sigma_1^2` (0 for a zero update)
        spectral_entropy: `-sum p_i ln p_i` in nats, with `p_i = sigma_i^2 / sum sigma_j^2` (0 for a zero
            update)
        suggested_rank: `effective_rank`, at least 1 and at most `r`
        lora_parameters: elements of `lora_A` plus `lora_B`
        note: set for a zero update (`lora_A` or `lora_B` all zeros, as in an untrained adapter): its spectrum
            is all zeros, its effective rank 0 and its suggested rank 1
    """

    module: str
    type: str
    layer: int | None
    shape: list[int]
    r: int
    lora_alpha: float
    scale: float
    singular_values: list[float]
    frobenius_norm: float
    effective_rank: int
    stable_rank: float
    spectral_entropy: float
    suggested_rank: int
    lora_parameters: int
    note: str | None = None


@dataclass
class AuditResult(Record):
    """`audit.json` of `audit-svd`: every module's audit, summaries per type and per layer, a rank pattern.

    Attributes:
        adapter: the adapter folder
        out: the output folder
        energy: `--energy`, in (0, 1]
        modules: one per LoRA module, in path order (layer 2 before layer 10). The fields are listed in the
            next table
        by_type: module type (a module's `type`: `q_proj`, `v_proj`, ...; GPT-2's `attn.c_proj`) → `modules`,
            `r` (the distinct ranks), `effective_rank_mean`, `effective_rank_max`, `stable_rank_mean`,
            `spectral_entropy_mean`, `frobenius_norm_mean`, `lora_parameters`, `lora_parameters_suggested`
        by_layer: one per layer (the first number in the module path; `null` for modules outside the layers,
            such as `lm_head`): `layer`, `modules`, `frobenius_norm` (of all the layer's updates together),
            `effective_rank` and `r` (module type → value), `stable_rank_mean`
        rank_pattern: module path → suggested rank, ready for `peft.LoraConfig(rank_pattern=...)`. Longer
            paths come first, because PEFT uses the first key that matches
        lora_parameters: parameters in all `lora_A` and `lora_B` matrices
        lora_parameters_suggested: the same at the suggested ranks: the sum of `suggested_rank * (d + k)`
        notes: for example how many modules have a zero update, or that a DoRA adapter's magnitude vectors are
            ignored
        compression: `--compress` only: the summary written into the compressed adapter's `manifest.json` as
            `compression` (see [Compressed adapter](#compressed-adapter-audit-svd---compress)); never in
            `audit.json`
    """

    adapter: str
    out: str
    energy: float
    modules: list[ModuleAudit]
    by_type: dict[str, dict[str, Any]]
    by_layer: list[dict[str, Any]]
    rank_pattern: dict[str, int]
    lora_parameters: int
    lora_parameters_suggested: int
    notes: list[str] = field(default_factory=list)
    compression: dict[str, Any] | None = None


def layer_of(path: str) -> int | None:
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def _in_layer(path: str) -> str:
    """The path below the layer number (`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`)."""
    parts = path.split(".")
    first = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return path if first is None else ".".join(parts[first + 1:])


def module_types(paths: list[str]) -> dict[str, str]:
    """Each module's type: its last path component, unless modules at different places in their layers
    share it (GPT-2's `attn.c_proj` and `mlp.c_proj`, two projections); those are told apart by the path
    below the layer number, so no summary merges them."""
    places: dict[str, set[str]] = {}
    for path in paths:
        places.setdefault(path.rsplit(".", 1)[-1], set()).add(_in_layer(path))
    return {path: path.rsplit(".", 1)[-1] if len(places[path.rsplit(".", 1)[-1]]) == 1 else _in_layer(path)
            for path in paths}


def audit_module(module: LoraModule, energy: float, kind: str) -> ModuleAudit:
    """`module`'s audit; `kind` is its type (`module_types`)."""
    a, b = module.matrices()
    values = [float(s) for s in lora_singular_values(a, b, module.scale)]
    eff = effective_rank(values, energy)
    return ModuleAudit(
        module=module.path, type=kind, layer=layer_of(module.path),
        shape=[int(b.shape[0]), int(a.shape[1])], r=module.r, lora_alpha=module.alpha, scale=module.scale,
        singular_values=values, frobenius_norm=math.sqrt(sum(s * s for s in values)), effective_rank=eff,
        stable_rank=stable_rank(values), spectral_entropy=spectral_entropy(values),
        suggested_rank=suggest_rank(eff, module.r), lora_parameters=int(a.numel() + b.numel()),
        note=ZERO_NOTE if eff == 0 else None,
    )


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summaries(audits: list[ModuleAudit]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    by_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({m.type for m in audits}):
        group = [m for m in audits if m.type == kind]
        by_type[kind] = {
            "modules": len(group),
            "r": sorted({m.r for m in group}),
            "effective_rank_mean": mean([m.effective_rank for m in group]),
            "effective_rank_max": max(m.effective_rank for m in group),
            "stable_rank_mean": mean([m.stable_rank for m in group]),
            "spectral_entropy_mean": mean([m.spectral_entropy for m in group]),
            "frobenius_norm_mean": mean([m.frobenius_norm for m in group]),
            "lora_parameters": sum(m.lora_parameters for m in group),
            "lora_parameters_suggested": sum(m.suggested_rank * sum(m.shape) for m in group),
        }
    by_layer: list[dict[str, Any]] = []
    layers = sorted({m.layer for m in audits}, key=lambda v: (v is None, v or 0))
    for layer in layers:
        group = [m for m in audits if m.layer == layer]
        by_layer.append({
            "layer": layer,
            "modules": len(group),
            # The norm of all the layer's updates taken together, as if stacked into one vector.
            "frobenius_norm": math.sqrt(sum(m.frobenius_norm**2 for m in group)),
            "effective_rank": {m.type: m.effective_rank for m in group},
            "r": {m.type: m.r for m in group},
            "stable_rank_mean": mean([m.stable_rank for m in group]),
        })
    return by_type, by_layer
