"""Singular-value audit of a PEFT LoRA adapter, and its compression to lower ranks.

In: `AuditSettings` naming an adapter folder (`adapter_config.json` + `adapter_model.safetensors`, or
`adapter_model.bin`), read directly with safetensors: no base model is loaded.
Out: an `AuditResult` (per module: singular values of the update, effective rank at an energy
threshold, stable rank, spectral entropy, Frobenius norm, a suggested rank; summaries per module type
and per layer; the suggested ranks as a PEFT `rank_pattern`). The audit writes `audit.json`,
`audit.md`, `spectra.png` and `manifest.json` into its output folder (default `<adapter>/audit`).
With `compress`, it writes instead a new PEFT adapter folder (config, safetensors, manifest) whose
modules are the best rank-k approximations (Eckart-Young) of the original updates.

The update of one LoRA module is dW = s * B @ A with B [d, r], A [r, k] and s = alpha / r (alpha /
sqrt(r) with rsLoRA). Forming dW costs d * k memory and an SVD of a d x k matrix (53 s for 4096 x
14336 on two CPU cores). Instead, with reduced QR factorisations B = Q_b R_b and A^T = Q_a R_a,
dW = Q_b (s R_b R_a^T) Q_a^T; Q_b and Q_a have orthonormal columns, so dW has the singular values of
the small core C = s R_b R_a^T (at most r x r), and with C = U S V^T its SVD is (Q_b U) S (V^T Q_a^T).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, ModelError
from gsmkit.jsonl import atomic_open, write_json
from gsmkit.modeling import read_adapter_config

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
SPECTRA_PNG = "spectra.png"
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_SAFETENSORS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
# PEFT saves a LoRA module's weights under the PeftModel's attribute path: base_model (the LoraModel),
# .model (the transformers model), then the module path that `rank_pattern` keys are matched against.
PEFT_PREFIX = "base_model.model."
_LINEAR_KEY = re.compile(r"^(.+)\.lora_(A|B)\.weight$")  # Linear and Conv layers
_EMBEDDING_KEY = re.compile(r"^(.+)\.lora_embedding_(A|B)$")  # Embedding layers: A [r, vocab], B [dim, r]
# PEFT's defaults when adapter_config.json leaves `r` or `lora_alpha` out (peft.LoraConfig).
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
ZERO_NOTE = "zero update (lora_A or lora_B is all zeros, e.g. an untrained adapter): suggested rank 1"


@dataclass(frozen=True)
class AuditSettings:
    adapter: Path
    out: Path | None = None  # None: <adapter>/audit; required with compress
    energy: float = 0.90
    compress: bool = False
    rank: int | None = None  # compress only: one rank for every module instead of the suggested ones
    overwrite: bool = False  # compress only: replace a non-empty `out`

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:  # also refuses NaN
            raise ConfigError(f"--energy must be in (0, 1], got {self.energy}",
                              hint="0.9 keeps the directions that hold 90% of the update's squared Frobenius norm")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {self.rank}")
        if not self.compress:
            if self.rank is not None:
                raise ConfigError("--rank applies only with --compress", hint="add --compress --out DIR")
            if self.overwrite:
                raise ConfigError("--overwrite applies only with --compress",
                                  hint="the audit files are always replaced")
            return
        if self.out is None:
            raise ConfigError("--compress needs --out DIR for the new adapter",
                              hint="for example --out runs/sft-compressed")
        out = Path(self.out).expanduser().resolve()
        adapter = Path(self.adapter).expanduser().resolve()
        if out == adapter or adapter.is_relative_to(out):
            raise ConfigError(f"--out {self.out} would replace the adapter being compressed",
                              hint="write the compressed adapter to a new folder")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.adapter) / "audit"


@dataclass
class LoraModule:
    """One LoRA module as stored: the matrices, and the scale PEFT applies to B @ A."""

    path: str  # module path in the base model (what PEFT's rank_pattern keys are matched against)
    key_prefix: str  # saved key before `.lora_A.weight` / `.lora_embedding_A`
    kind: str  # "linear" (lora_A.weight / lora_B.weight) or "embedding" (lora_embedding_A / _B)
    lora_a: Any  # as stored: [r, k] (Conv: [r, in, *kernel])
    lora_b: Any  # as stored: [d, r] (Conv: [out, r, 1, ...])
    r: int
    alpha: float
    scale: float

    @property
    def keys(self) -> tuple[str, str]:
        if self.kind == "embedding":
            return f"{self.key_prefix}.lora_embedding_A", f"{self.key_prefix}.lora_embedding_B"
        return f"{self.key_prefix}.lora_A.weight", f"{self.key_prefix}.lora_B.weight"

    def matrices(self) -> tuple[Any, Any]:
        """(A [r, k], B [d, r]) as 2-D views: a Conv's kernel dimensions are folded into k."""
        return self.lora_a.reshape(self.r, -1), self.lora_b.reshape(self.lora_b.shape[0], self.r)


@dataclass
class AdapterWeights:
    config: dict[str, Any]
    modules: list[LoraModule]
    others: dict[str, Any]  # every other saved tensor (modules_to_save, biases, DoRA magnitudes), as stored
    weights_file: Path


@dataclass
class ModuleAudit:
    module: str
    type: str  # last path component: q_proj, v_proj, ...
    layer: int | None  # first integer path component (model.layers.3.* -> 3); None for lm_head etc.
    shape: list[int]  # [d, k] of B @ A: [out_features, in_features] for a Linear layer
    r: int
    lora_alpha: float
    scale: float
    singular_values: list[float]  # of scale * B @ A, descending, min(d, k, r) of them
    frobenius_norm: float
    effective_rank: int
    stable_rank: float
    spectral_entropy: float  # nats
    suggested_rank: int
    lora_parameters: int
    note: str | None = None


@dataclass
class AuditResult:
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
    compression: dict[str, Any] | None = None  # set when a compressed adapter was written

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the numbers -------------------------------------------------------------------------------------


def _core(lora_a, lora_b, scale: float):
    """(Q_b [d, m_b], core [m_b, m_a], Q_a [k, m_a]) with scale * B @ A = Q_b @ core @ Q_a^T.

    m_b = min(d, r) and m_a = min(k, r) (reduced QR). Always float64, whatever the stored dtype: the
    stored values are exact in float64, so only the factorisation's own rounding (about 1e-15
    relative) separates these singular values from those of the dense product.
    """
    import torch

    a = lora_a.detach().to(device="cpu", dtype=torch.float64)
    b = lora_b.detach().to(device="cpu", dtype=torch.float64)
    q_b, r_b = torch.linalg.qr(b)  # [d, m_b], [m_b, r]
    q_a, r_a = torch.linalg.qr(a.T)  # [k, m_a], [m_a, r]
    return q_b, float(scale) * (r_b @ r_a.T), q_a


def lora_singular_values(lora_a, lora_b, scale: float = 1.0):
    """Singular values (float64, descending) of scale * B @ A for A [r, k], B [d, r], without forming it."""
    import torch

    _, core, _ = _core(lora_a, lora_b, scale)
    return torch.linalg.svdvals(core)


def truncate_lora(lora_a, lora_b, scale: float, rank: int, new_scale: float = 1.0):
    """(A' [k', k], B' [d, k'], retained energy) with new_scale * B' @ A' the best rank-k' approximation
    of scale * B @ A, k' = min(rank, number of singular values). float64.

    The singular values are split evenly between the factors (sqrt(S) on each side), so B' and A'
    have comparable norms, as trained LoRA factors do.
    """
    import torch

    if new_scale <= 0:
        raise ValueError(f"new_scale must be positive, got {new_scale}")
    q_b, core, q_a = _core(lora_a, lora_b, scale)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # [m_b, m], [m], [m, m_a]
    k = min(int(rank), s.numel())
    root = (s[:k] / float(new_scale)).sqrt()
    new_b = (q_b @ u[:, :k]) * root  # [d, k]: column j scaled by sqrt(S_j / new_scale)
    new_a = (root[:, None] * vh[:k]) @ q_a.T  # [k, in]: row j scaled likewise
    total = float((s**2).sum())
    retained = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    return new_a, new_b, retained


def _descending(singular_values) -> list[float]:
    return sorted((float(s) for s in singular_values), reverse=True)


def effective_rank(singular_values, energy: float) -> int:
    """Smallest k whose k largest sigma^2 sum to at least `energy` of sum(sigma^2); 0 for a zero spectrum."""
    squares = [s * s for s in _descending(singular_values)]
    total = sum(squares)
    if total == 0:
        return 0
    # A relative slack of 1e-12: with energy 1.0 (or a threshold met exactly) the running sum may land
    # a few ulps below the total computed in a different order.
    target = energy * total * (1 - 1e-12)
    running = 0.0
    for k, sq in enumerate(squares, start=1):
        running += sq
        if running >= target:
            return k
    return len(squares)


def stable_rank(singular_values) -> float:
    """sum(sigma^2) / max(sigma)^2: between 1 and the rank; 0 for a zero spectrum."""
    values = _descending(singular_values)
    if not values or values[0] == 0:
        return 0.0
    return sum(s * s for s in values) / (values[0] * values[0])


def spectral_entropy(singular_values) -> float:
    """Shannon entropy (nats) of p_i = sigma_i^2 / sum(sigma^2): 0 for rank 1, ln(n) for n equal values."""
    squares = [s * s for s in _descending(singular_values)]
    total = sum(squares)
    if total == 0:
        return 0.0
    return -sum((q / total) * math.log(q / total) for q in squares if q > 0)


def suggest_rank(eff_rank: int, r: int) -> int:
    """The effective rank, at least 1 (PEFT cannot hold rank 0) and at most the module's r."""
    return max(1, min(int(eff_rank), int(r)))


# ---- reading the adapter -----------------------------------------------------------------------------


def match_pattern(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): the value of the first key K, in dict order, with
    re.match(rf"(.*\\.)?({K})$", path); `default` when none matches."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as err:
            raise ModelError(f"adapter_config.json: pattern key '{key}' is not a valid regular expression ({err})") from None
    return default


def peft_patterns(ranks: dict[str, int]) -> dict[str, int]:
    """`ranks` ordered for PEFT's first-match rule: a key matches every module path ending in it, so
    longer paths (vision_tower.model.layers.0.q_proj) must come before their suffixes (model.layers.0.q_proj)."""
    return dict(sorted(ranks.items(), key=lambda kv: -kv[0].count(".")))


def _natural_key(text: str) -> list[Any]:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _load_tensors(adapter: Path) -> tuple[Path, dict[str, Any]]:
    import torch

    path = adapter / WEIGHTS_SAFETENSORS
    try:
        if path.exists():
            from safetensors.torch import load_file

            return path, load_file(str(path), device="cpu")
        path = adapter / WEIGHTS_BIN
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line for the user
        raise ModelError(f"{path}: cannot read the adapter weights ({type(err).__name__}: {str(err)[:200]})",
                         hint="the file is damaged or not a PEFT adapter; save it again with save_pretrained") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return path, tensors


def read_adapter(adapter: str | Path) -> AdapterWeights:
    """The LoRA modules of a PEFT adapter folder with their scales; raise ModelError on anything malformed."""
    adapter = Path(adapter).expanduser()
    cfg = read_adapter_config(adapter)
    if not isinstance(cfg, dict):
        raise ModelError(f"{adapter / ADAPTER_CONFIG}: expected a JSON object")
    peft_type = str(cfg.get("peft_type") or "LORA")
    if peft_type.upper() != "LORA":
        raise ModelError(f"{adapter}: a {peft_type} adapter, not LoRA",
                         hint="audit-svd reads LoRA adapters (lora_A / lora_B matrices)")
    weights_file, tensors = _load_tensors(adapter)
    pairs: dict[str, dict[str, Any]] = {}
    others: dict[str, Any] = {}
    for key, tensor in tensors.items():
        kind, match = "linear", _LINEAR_KEY.match(key)
        if match is None:
            kind, match = "embedding", _EMBEDDING_KEY.match(key)
        if match is None:
            others[key] = tensor
            continue
        entry = pairs.setdefault(match.group(1), {"kind": kind})
        entry[match.group(2)] = tensor
    if not pairs:
        raise ModelError(f"{weights_file}: no LoRA weights in it (no '*.lora_A.weight' / '*.lora_B.weight' tensors)",
                         hint="pass a LoRA adapter saved with PEFT's save_pretrained")
    use_rslora = bool(cfg.get("use_rslora"))
    modules: list[LoraModule] = []
    for prefix in sorted(pairs, key=_natural_key):
        entry = pairs[prefix]
        path = prefix.removeprefix(PEFT_PREFIX)
        for side in ("A", "B"):
            if side not in entry:
                raise ModelError(f"{weights_file}: '{prefix}' has lora_{'B' if side == 'A' else 'A'} but no lora_{side}")
        a, b = entry["A"], entry["B"]
        if a.dim() < 2 or b.dim() < 2 or b.shape[1] != a.shape[0] or any(n != 1 for n in b.shape[2:]):
            raise ModelError(f"{weights_file}: '{path}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                             "which do not make a low-rank pair", hint="only Linear, Embedding and Conv LoRA layers are read")
        r = int(a.shape[0])
        r_config = match_pattern(cfg.get("rank_pattern"), path, cfg.get("r", PEFT_DEFAULT_R))
        if int(r_config) != r:
            raise ModelError(f"{adapter}: '{path}' has rank {r} in its weights but {r_config} in adapter_config.json",
                             hint="the config and the weights do not belong together")
        alpha = float(match_pattern(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r  # as peft's LoraLayer.update_layer
        modules.append(LoraModule(path=path, key_prefix=prefix, kind=entry["kind"], lora_a=a, lora_b=b,
                                  r=r, alpha=alpha, scale=scale))
    return AdapterWeights(config=cfg, modules=modules, others=others, weights_file=weights_file)


# ---- the audit ---------------------------------------------------------------------------------------


def _layer_of(path: str) -> int | None:
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def audit_module(module: LoraModule, energy: float) -> ModuleAudit:
    a, b = module.matrices()
    values = [float(s) for s in lora_singular_values(a, b, module.scale)]
    eff = effective_rank(values, energy)
    return ModuleAudit(
        module=module.path, type=module.path.rsplit(".", 1)[-1], layer=_layer_of(module.path),
        shape=[int(b.shape[0]), int(a.shape[1])], r=module.r, lora_alpha=module.alpha, scale=module.scale,
        singular_values=values, frobenius_norm=math.sqrt(sum(s * s for s in values)), effective_rank=eff,
        stable_rank=stable_rank(values), spectral_entropy=spectral_entropy(values),
        suggested_rank=suggest_rank(eff, module.r), lora_parameters=int(a.numel() + b.numel()),
        note=ZERO_NOTE if eff == 0 else None,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _summaries(audits: list[ModuleAudit]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    by_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({m.type for m in audits}):
        group = [m for m in audits if m.type == kind]
        by_type[kind] = {
            "modules": len(group),
            "r": sorted({m.r for m in group}),
            "effective_rank_mean": _mean([m.effective_rank for m in group]),
            "effective_rank_max": max(m.effective_rank for m in group),
            "stable_rank_mean": _mean([m.stable_rank for m in group]),
            "spectral_entropy_mean": _mean([m.spectral_entropy for m in group]),
            "frobenius_norm_mean": _mean([m.frobenius_norm for m in group]),
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
            "stable_rank_mean": _mean([m.stable_rank for m in group]),
        })
    return by_type, by_layer


def _check_out(settings: AuditSettings) -> None:
    out = settings.out_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder", hint="choose another --out")
    if settings.compress and out.is_dir() and any(out.iterdir()) and not settings.overwrite:
        raise ConfigError(f"{out}: already exists and is not empty",
                          hint="choose another --out, or pass --overwrite to replace it")


def audit_adapter(
    settings: AuditSettings,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Audit the adapter; write the audit files, or with `settings.compress` the compressed adapter."""
    from gsmkit.manifest import build_manifest

    _check_out(settings)
    weights = read_adapter(settings.adapter)
    if on_start:
        on_start(len(weights.modules))
    audits: list[ModuleAudit] = []
    for module in weights.modules:
        audits.append(audit_module(module, settings.energy))
        if on_progress:
            on_progress(1)
    by_type, by_layer = _summaries(audits)
    notes: list[str] = []
    zeros = [m.module for m in audits if m.effective_rank == 0]
    if zeros:
        notes.append(f"{len(zeros)} of {len(audits)} modules have a zero update (lora_A or lora_B all zeros, "
                     "as in a freshly initialised adapter): their spectrum is 0 and their suggested rank 1")
    if weights.config.get("use_dora"):
        notes.append("DoRA adapter: the magnitude vectors are not part of this audit, only the B @ A directions")
    result = AuditResult(
        adapter=str(settings.adapter), out=str(settings.out_dir), energy=settings.energy, modules=audits,
        by_type=by_type, by_layer=by_layer,
        rank_pattern=peft_patterns({m.module: m.suggested_rank for m in audits}),
        lora_parameters=sum(m.lora_parameters for m in audits),
        lora_parameters_suggested=sum(m.suggested_rank * sum(m.shape) for m in audits),
        notes=notes,
    )
    inputs = {"adapter": settings.adapter}
    if settings.compress:
        result.compression = compress_adapter(weights, audits, settings, build_manifest("audit-svd", settings, inputs))
        return result
    out = settings.out_dir
    manifest = build_manifest("audit-svd", settings, inputs)
    audit = {k: v for k, v in result.to_dict().items() if k != "compression"}  # None here: no adapter written
    write_json(out / AUDIT_JSON, {**audit, "manifest": manifest})
    with atomic_open(out / AUDIT_MD) as fh:
        fh.write(render_markdown(result))
    with atomic_open(out / SPECTRA_PNG, "wb") as fh:
        plot_spectra(audits, fh)
    write_json(out / MANIFEST, manifest)
    return result


# ---- compression -------------------------------------------------------------------------------------


def compress_adapter(weights: AdapterWeights, audits: list[ModuleAudit], settings: AuditSettings,
                     manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the truncated adapter into `settings.out` atomically; return the compression summary."""
    if weights.config.get("use_dora"):
        raise ModelError(f"{settings.adapter}: a DoRA adapter cannot be compressed without its base model",
                         hint="DoRA's magnitudes are normalised by the norm of W + dW, which truncation changes")
    tensors: dict[str, Any] = dict(weights.others)  # copied through unchanged, under their own names
    ranks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for module, audit in zip(weights.modules, audits, strict=True):
        wanted = settings.rank if settings.rank is not None else audit.suggested_rank
        a, b = module.matrices()
        # scale' = 1 (alpha = rank in alpha_pattern): the factors carry the whole update.
        new_a, new_b, retained = truncate_lora(a, b, module.scale, wanted, new_scale=1.0)
        rank = int(new_a.shape[0])
        if rank < wanted:
            notes.append(f"{module.path}: rank {wanted} asked for, {rank} kept (all its singular values)")
        key_a, key_b = module.keys
        tensors[key_a] = new_a.reshape(rank, *module.lora_a.shape[1:]).to(module.lora_a.dtype).contiguous()
        tensors[key_b] = new_b.reshape(module.lora_b.shape[0], rank, *module.lora_b.shape[2:]).to(
            module.lora_b.dtype).contiguous()
        ranks[module.path] = rank
        rows.append({"module": module.path, "r_before": module.r, "r_after": rank, "retained_energy": retained,
                     "lora_parameters_before": audit.lora_parameters,
                     "lora_parameters_after": int(tensors[key_a].numel() + tensors[key_b].numel())})
    pattern = peft_patterns(ranks)
    top = max(ranks.values())
    config = dict(weights.config)
    # Every module listed with alpha = its rank, so PEFT's scale alpha / r is exactly 1 everywhere, and
    # rsLoRA off, since its alpha / sqrt(r) would not be 1.
    config.update(r=top, lora_alpha=top, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    summary = {
        "source": str(settings.adapter),
        "forced_rank": settings.rank,
        "energy": settings.energy,
        "lora_parameters_before": sum(r["lora_parameters_before"] for r in rows),
        "lora_parameters_after": sum(r["lora_parameters_after"] for r in rows),
        "other_parameters": int(sum(t.numel() for t in weights.others.values())),
        "modules": rows,
        "notes": notes,
    }
    write_adapter_dir(settings.out_dir, config, tensors, {**manifest, "compression": summary}, settings.overwrite)
    return summary


def write_adapter_dir(out: Path, config: dict[str, Any], tensors: dict[str, Any], manifest: dict[str, Any],
                      overwrite: bool) -> None:
    """Write a PEFT adapter folder into a hidden temporary sibling, then rename it into place."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    tmp = out.parent / f".{out.name}.{token}.tmp"
    tmp.mkdir()
    try:
        weights = tmp / WEIGHTS_SAFETENSORS
        save_file(tensors, str(weights), metadata={"format": "pt"})  # the metadata PEFT writes
        with weights.open("rb") as fh:
            os.fsync(fh.fileno())
        write_json(tmp / ADAPTER_CONFIG, config)
        write_json(tmp / MANIFEST, manifest)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise ConfigError(f"{out}: already exists and is not empty",
                                  hint="choose another --out, or pass --overwrite to replace it")
            old = out.parent / f".{out.name}.{token}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reports -----------------------------------------------------------------------------------------


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _layer_label(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def type_rows(result: AuditResult) -> list[list[str]]:
    """Rows of the per-module-type table (shared by audit.md and the printed table)."""
    return [[kind, str(s["modules"]), "/".join(map(str, s["r"])),
             f"{s['effective_rank_mean']:.2f} / {s['effective_rank_max']}", f"{s['stable_rank_mean']:.2f}",
             f"{s['spectral_entropy_mean']:.3f}", f"{s['frobenius_norm_mean']:.4g}"]
            for kind, s in result.by_type.items()]


TYPE_HEADERS = ["type", "modules", "r", "eff. rank mean / max", "stable rank", "entropy (nats)", "Frobenius"]


def layer_rows(result: AuditResult) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the per-layer table: effective rank / r for each module type, then the norm."""
    kinds = list(result.by_type)
    rows = [[_layer_label(entry["layer"])]
            + [f"{entry['effective_rank'][k]}/{entry['r'][k]}" if k in entry["effective_rank"] else "" for k in kinds]
            + [f"{entry['frobenius_norm']:.4g}"]
            for entry in result.by_layer]
    return ["layer", *kinds, "Frobenius"], rows


def render_markdown(result: AuditResult) -> str:
    saved = result.lora_parameters - result.lora_parameters_suggested
    parts = [
        f"# SVD audit of `{result.adapter}`\n",
        (f"{len(result.modules)} LoRA modules, {result.lora_parameters:,} parameters. Effective rank: the fewest "
         f"singular directions holding {result.energy:g} of each update's squared Frobenius norm. The suggested "
         f"ranks need {result.lora_parameters_suggested:,} parameters ({saved:,} fewer).\n"),
        "## By module type\n",
        _md_table(TYPE_HEADERS, type_rows(result)),
        "## By layer (effective rank / r)\n",
        _md_table(*layer_rows(result)),
        "## Modules\n",
        _md_table(
            ["module", "shape", "r", "scale", "eff. rank", "suggested", "stable rank", "entropy", "Frobenius",
             "largest singular values"],
            [[f"`{m.module}`", "x".join(map(str, m.shape)), m.r, f"{m.scale:g}", m.effective_rank, m.suggested_rank,
              f"{m.stable_rank:.2f}", f"{m.spectral_entropy:.3f}", f"{m.frobenius_norm:.4g}",
              ", ".join(f"{s:.3g}" for s in m.singular_values[:4]) + (", ..." if len(m.singular_values) > 4 else "")]
             for m in result.modules],
        ),
    ]
    if result.notes:
        parts += ["## Notes\n", "".join(f"- {note}\n" for note in result.notes)]
    parts += ["## Suggested `rank_pattern`\n",
              "For `peft.LoraConfig(rank_pattern=...)`, or `gsmkit audit-svd --compress`:\n",
              "```json\n" + json.dumps(result.rank_pattern, indent=2) + "\n```\n"]
    return "\n".join(parts)


def plot_spectra(audits: list[ModuleAudit], fh) -> None:
    """One panel per module type: sigma_i / sigma_1 against i, one line per module, coloured by layer."""
    # Figure without pyplot: no global backend state, no display needed.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    kinds = sorted({m.type for m in audits})
    ncols = min(3, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    layers = [m.layer for m in audits if m.layer is not None]
    top_layer = max(layers) if layers else 0
    cmap = colormaps["viridis"]
    for ax, kind in zip(axes, kinds, strict=False):
        group = [m for m in audits if m.type == kind]
        plotted = 0
        for m in group:
            if not m.singular_values or m.singular_values[0] == 0:
                continue  # a zero update has no shape to normalise
            xs = range(1, len(m.singular_values) + 1)
            ys = [s / m.singular_values[0] for s in m.singular_values]
            colour = cmap((m.layer or 0) / top_layer if top_layer else 0.5)
            ax.plot(xs, ys, color=colour, alpha=0.7, linewidth=1.0, marker="." if len(ys) <= 16 else None)
            plotted += 1
        zero = len(group) - plotted
        ax.set_title(f"{kind} ({len(group)} modules" + (f", {zero} zero" if zero else "") + ")", fontsize=10)
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    if top_layer:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(norm=Normalize(0, top_layer), cmap=cmap), ax=list(axes[:len(kinds)]), label="layer")
    fig.suptitle("Normalised singular values of scale * B @ A (colour: layer)", fontsize=11)
    fig.savefig(fh, format="png", dpi=110)


def audit_tables(result: AuditResult) -> list[Any]:
    """Rich tables for the terminal: by module type, then by layer."""
    from rich.table import Table

    by_type = Table(title=f"LoRA spectra by module type (energy {result.energy:g})")
    for i, header in enumerate(TYPE_HEADERS):
        by_type.add_column(header, justify="left" if i == 0 else "right")
    for row in type_rows(result):
        by_type.add_row(*row)
    headers, rows = layer_rows(result)
    by_layer = Table(title="Effective rank / r by layer")
    for i, header in enumerate(headers):
        by_layer.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        by_layer.add_row(*row)
    return [by_type, by_layer]
