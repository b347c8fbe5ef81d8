"""PEFT LoRA adapter folders, read and written directly with safetensors: no base model, no PEFT import.

In: an adapter folder (`adapter_config.json` + `adapter_model.safetensors`, or `adapter_model.bin`).
Out: `read_adapter` gives its `AdapterWeights`: each LoRA module's A and B as stored, with the rank,
alpha and scale PEFT would apply (rank_pattern / alpha_pattern / rsLoRA honoured), plus every other
saved tensor; `write_adapter_dir` writes a new adapter folder (config, safetensors, manifest) in a
hidden staging sibling and renames it into place (`gsmkit.run_folder`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ModelError
from gsmkit.jsonl import write_json
from gsmkit.modeling import PEFT_PREFIX, read_adapter_config
from gsmkit.run_folder import MANIFEST, publish_folder, staging_folder

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_SAFETENSORS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
_LINEAR_KEY = re.compile(r"^(.+)\.lora_(A|B)\.weight$")  # Linear and Conv layers
_EMBEDDING_KEY = re.compile(r"^(.+)\.lora_embedding_(A|B)$")  # Embedding layers: A [r, vocab], B [dim, r]
# PEFT's defaults when adapter_config.json leaves `r` or `lora_alpha` out (peft.LoraConfig).
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8


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


def match_pattern(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): the value of the first key K, in dict order, with
    re.match(rf"(.*\\.)?({K})$", path); `default` when none matches."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as err:
            raise ModelError(f"adapter_config.json: pattern key '{key}' is not a valid regular expression "
                             f"({err})") from None
    return default


def peft_patterns(ranks: dict[str, int]) -> dict[str, int]:
    """`ranks` ordered for PEFT's first-match rule: a key matches every module path ending in it, so longer
    paths (vision_tower.model.layers.0.q_proj) must come before their suffixes (model.layers.0.q_proj)."""
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
                         hint="the file is damaged or not a PEFT adapter; save it again with "
                         "save_pretrained") from None
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
        raise ModelError(f"{weights_file}: no LoRA weights in it (no '*.lora_A.weight' / '*.lora_B.weight' "
                         "tensors)",
                         hint="pass a LoRA adapter saved with PEFT's save_pretrained")
    use_rslora = bool(cfg.get("use_rslora"))
    modules: list[LoraModule] = []
    for prefix in sorted(pairs, key=_natural_key):
        entry = pairs[prefix]
        path = prefix.removeprefix(PEFT_PREFIX)
        for side in ("A", "B"):
            if side not in entry:
                other = "B" if side == "A" else "A"
                raise ModelError(f"{weights_file}: '{prefix}' has lora_{other} but no lora_{side}")
        a, b = entry["A"], entry["B"]
        if a.dim() < 2 or b.dim() < 2 or b.shape[1] != a.shape[0] or any(n != 1 for n in b.shape[2:]):
            raise ModelError(f"{weights_file}: '{path}' has lora_A {list(a.shape)} and lora_B "
                             f"{list(b.shape)}, which do not make a low-rank pair",
                             hint="only Linear, Embedding and Conv LoRA layers are read")
        r = int(a.shape[0])
        r_config = match_pattern(cfg.get("rank_pattern"), path, cfg.get("r", PEFT_DEFAULT_R))
        if int(r_config) != r:
            raise ModelError(f"{adapter}: '{path}' has rank {r} in its weights but {r_config} in "
                             "adapter_config.json",
                             hint="the config and the weights do not belong together")
        default_alpha = cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        alpha = float(match_pattern(cfg.get("alpha_pattern"), path, default_alpha))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r  # as peft's LoraLayer.update_layer
        modules.append(LoraModule(path=path, key_prefix=prefix, kind=entry["kind"], lora_a=a, lora_b=b,
                                  r=r, alpha=alpha, scale=scale))
    return AdapterWeights(config=cfg, modules=modules, others=others)


def write_adapter_dir(out: Path, config: dict[str, Any], tensors: dict[str, Any],
                      manifest: dict[str, Any]) -> None:
    """Write a PEFT adapter folder in a hidden staging sibling of `out`, then swap it into place (the
    caller has checked `out` with `run_folder.check_new_folder`)."""
    from safetensors.torch import save_file

    with staging_folder(Path(out)) as tmp:
        weights = tmp / WEIGHTS_SAFETENSORS
        save_file(tensors, str(weights), metadata={"format": "pt"})  # the metadata PEFT writes
        with weights.open("rb") as fh:
            os.fsync(fh.fileno())
        write_json(tmp / ADAPTER_CONFIG, config)
        write_json(tmp / MANIFEST, manifest)
        publish_folder(tmp, Path(out))
