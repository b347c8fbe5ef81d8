"""Singular-value audit of a PEFT LoRA adapter, and its compression to lower ranks.

In: `AuditSettings` naming an adapter folder (`adapter_config.json` + `adapter_model.safetensors`, or
`adapter_model.bin`), read directly with safetensors (`lora_files`): no base model is loaded.
Out: an `AuditResult` (per module: singular values of the update, effective rank at an energy
threshold, stable rank, spectral entropy, Frobenius norm, a suggested rank; summaries per module type
and per layer; the suggested ranks as a PEFT `rank_pattern`). The audit writes `audit.json`,
`audit.md`, `spectra.png` and `manifest.json` into its output folder (default `<adapter>/audit`;
`audit_report`). With `compress`, it writes instead a new PEFT adapter folder (config, safetensors,
manifest) whose modules are the best rank-k approximations (Eckart-Young) of the original updates, k
set by the rank policy (`--rank-policy`: each module's suggested rank, one rank at the median of those,
or a uniform K; `--rank K` is uniform:K).

The spectra come from QR factors of B and A, never from the dense d x k update (`spectra`).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gsmkit.adapters.audit_report import audit_output, write_audit
from gsmkit.adapters.audit_results import AuditResult, ModuleAudit, audit_module, module_types, summaries
from gsmkit.adapters.lora_files import (
    AdapterWeights,
    peft_patterns,
    read_adapter,
    write_adapter_dir,
)
from gsmkit.adapters.spectra import (
    truncate_lora,
)
from gsmkit.errors import ConfigError, ModelError
from gsmkit.fields import check_fields, setting
from gsmkit.run_folder import check_new_folder
from gsmkit.settings import RunOptions, override


@dataclass(frozen=True)
class AuditSettings:
    adapter: Path = setting(help="PEFT LoRA adapter folder (adapter_config.json + "
                            "adapter_model.safetensors); no base model is needed.", show_default=False,
                            path={"exists": True, "file_okay": False, "dir_okay": True})
    # The interval (0, 1] is checked in __post_init__, with one message and a hint; as field bounds the
    # command line would refuse each end with a different message.
    energy: float = setting(0.90, "Effective rank: the fewest singular directions holding this fraction of "
                            "each update's squared Frobenius norm, in (0, 1].")
    out: Path | None = setting(None, "Output folder: the audit files (default ADAPTER/audit), or with "
                               "--compress the new adapter (required).", short="-o", show_default=False,
                               path={"file_okay": False, "dir_okay": True})
    compress: bool = setting(False, "Write a new adapter truncated to the ranks of --rank-policy into --out, "
                             "instead of the audit files.")
    rank_policy: str | None = setting(
        None, "With --compress: the new ranks. suggested: each module's suggested rank at --energy; median: "
        "one rank for every module, the median of the suggested ranks (the upper one of the two middle "
        "values for an even count); uniform:K: rank K for every module. A module keeps at most its own r.",
        show_default="suggested")
    rank: int | None = setting(None, "With --compress: the same as --rank-policy uniform:K.", min=1,
                               show_default=False)
    overwrite: bool = override(RunOptions, "overwrite",
                               help="With --compress: replace --out if it exists and is not empty.")

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 < self.energy <= 1.0:  # also refuses NaN
            raise ConfigError(f"--energy must be in (0, 1], got {self.energy}",
                              hint="0.9 keeps the directions that hold 90% of the update's squared "
                              "Frobenius norm")
        if not self.compress:
            if self.rank is not None:
                raise ConfigError("--rank applies only with --compress", hint="add --compress --out DIR")
            if self.rank_policy is not None:
                raise ConfigError("--rank-policy applies only with --compress",
                                  hint="add --compress --out DIR")
            if self.overwrite:
                raise ConfigError("--overwrite applies only with --compress",
                                  hint="the audit files are always replaced")
            return
        if self.out is None:
            raise ConfigError("--compress needs --out DIR for the new adapter",
                              hint="for example --out runs/sft-compressed")
        # (--out against the adapter: run_folder's output rule, when the audit starts)
        self._policy()

    def _policy(self) -> tuple[str, int | None]:
        """The rank policy of --rank-policy and --rank together (they are one setting, and must agree)."""
        policy = parse_rank_policy(self.rank_policy or "suggested")
        if self.rank is not None:
            if self.rank_policy is not None and policy != ("uniform", self.rank):
                raise ConfigError(f"--rank {self.rank} is --rank-policy uniform:{self.rank}, which "
                                  f"contradicts --rank-policy {self.rank_policy}", hint="give one of them")
            policy = ("uniform", self.rank)
        return policy

    def resolved(self) -> AuditSettings:
        """With --compress, the rank policy written out whole (`--rank K` is `uniform:K`; none is
        `suggested`), as the run and its manifest hold it. Idempotent."""
        return replace(self, rank_policy=policy_text(self._policy())) if self.compress else self

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.adapter) / "audit"


RANK_POLICIES = ("suggested", "median", "uniform:K")
_UNIFORM = re.compile(r"uniform:([0-9]+)")


def parse_rank_policy(text: str) -> tuple[str, int | None]:
    """("suggested", None) | ("median", None) | ("uniform", K) from --rank-policy's text."""
    text = text.strip()
    if text in ("suggested", "median"):
        return text, None
    match = _UNIFORM.fullmatch(text)
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"--rank-policy {text!r} is not one of {', '.join(RANK_POLICIES)}",
                          hint="for example --rank-policy median, or --rank-policy uniform:8 (K >= 1)")
    return "uniform", int(match.group(1))


def policy_text(policy: tuple[str, int | None]) -> str:
    name, k = policy
    return f"uniform:{k}" if name == "uniform" else name


def policy_ranks(policy: tuple[str, int | None], audits: list[ModuleAudit]) -> tuple[list[int], int | None]:
    """The rank each module is asked for under `policy`, and the one rank every module is given (None for
    suggested). median is `statistics.median_high` of the suggested ranks: always one of them, the upper
    middle value for an even count."""
    name, k = policy
    if name == "median":
        k = int(statistics.median_high(m.suggested_rank for m in audits))
    if name == "suggested":
        return [m.suggested_rank for m in audits], None
    return [int(k)] * len(audits), k


def audit_adapter(
    settings: AuditSettings,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Audit the adapter; write the audit files, or with `settings.compress` the compressed adapter."""
    from gsmkit.manifest import build_manifest

    settings = settings.resolved()
    # --out first: a new folder for the compressed adapter, or the audit files' folder (always replaced).
    if settings.compress:
        check_new_folder(settings.out_dir, settings.overwrite, protected=(settings.adapter,))
    else:
        audit_output(settings.out_dir, inputs=(settings.adapter,))
    weights = read_adapter(settings.adapter)
    if on_start:
        on_start(len(weights.modules))
    audits: list[ModuleAudit] = []
    kinds = module_types([module.path for module in weights.modules])
    for module in weights.modules:
        audits.append(audit_module(module, settings.energy, kinds[module.path]))
        if on_progress:
            on_progress(1)
    by_type, by_layer = summaries(audits)
    notes: list[str] = []
    zeros = [m.module for m in audits if m.effective_rank == 0]
    if zeros:
        notes.append(f"{len(zeros)} of {len(audits)} modules have a zero update (lora_A or lora_B all "
                     "zeros, as in a freshly initialised adapter): their spectrum is 0 and their suggested "
                     "rank 1")
    if weights.config.get("use_dora"):
        notes.append("DoRA adapter: the magnitude vectors are not part of this audit, only the B @ A "
                     "directions")
    result = AuditResult(
        adapter=str(settings.adapter), out=str(settings.out_dir), energy=settings.energy, modules=audits,
        by_type=by_type, by_layer=by_layer,
        rank_pattern=peft_patterns({m.module: m.suggested_rank for m in audits}),
        lora_parameters=sum(m.lora_parameters for m in audits),
        lora_parameters_suggested=sum(m.suggested_rank * sum(m.shape) for m in audits),
        notes=notes,
    )
    manifest = build_manifest("audit-svd", settings, {"adapter": settings.adapter})
    if settings.compress:
        result.compression = compress_adapter(weights, audits, settings, manifest)
    else:
        write_audit(settings.out_dir, result, manifest)
    return result


# ---- compression -------------------------------------------------------------------------------------


def compress_adapter(weights: AdapterWeights, audits: list[ModuleAudit], settings: AuditSettings,
                     manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the truncated adapter into `settings.out` atomically; return the compression summary."""
    if weights.config.get("use_dora"):
        raise ModelError(f"{settings.adapter}: a DoRA adapter cannot be compressed without its base model",
                         hint="DoRA's magnitudes are normalised by the norm of W + dW, which truncation "
                         "changes")
    tensors: dict[str, Any] = dict(weights.others)  # copied through unchanged, under their own names
    ranks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    policy = parse_rank_policy(settings.rank_policy or "suggested")
    asked, uniform_rank = policy_ranks(policy, audits)
    for module, audit, wanted in zip(weights.modules, audits, asked, strict=True):
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
        rows.append({"module": module.path, "r_before": module.r, "r_after": rank,
                     "retained_energy": retained, "lora_parameters_before": audit.lora_parameters,
                     "lora_parameters_after": int(tensors[key_a].numel() + tensors[key_b].numel())})
    pattern = peft_patterns(ranks)
    top = max(ranks.values())
    config = dict(weights.config)
    # Every module listed with alpha = its rank, so PEFT's scale alpha / r is exactly 1 everywhere, and
    # rsLoRA off, since its alpha / sqrt(r) would not be 1.
    config.update(r=top, lora_alpha=top, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    summary = {
        "source": str(settings.adapter),
        "rank_policy": policy_text(policy),
        "forced_rank": uniform_rank,
        "energy": settings.energy,
        "lora_parameters_before": sum(r["lora_parameters_before"] for r in rows),
        "lora_parameters_after": sum(r["lora_parameters_after"] for r in rows),
        "other_parameters": int(sum(t.numel() for t in weights.others.values())),
        "modules": rows,
        "notes": notes,
    }
    write_adapter_dir(settings.out_dir, config, tensors, {**manifest, "compression": summary})
    return summary
