"""LoRA for every trainer: which layers it targets, how the base is prepared, the PEFT wrap, per-module
ranks (`--rank-pattern`), and the `--init-lora` start of a QLoRA adapter.

In: a loaded base model and the run's settings (LoraOptions: lora_r, lora_alpha, lora_dropout,
target_modules; `rank_pattern`: a JSON file of per-module ranks, e.g. an `audit-svd` audit.json). Out: the
projection names targeted (`resolve_targets`: by default every linear projection of the decoder layers, as
`gsmkit.families` finds them in any family; `--target-modules` checked against them) and the modules they
name (`target_modules`), the checked pattern (`read_rank_pattern`, before any model loads), the PEFT
`LoraConfig` (`lora_config`; GRPO hands it to TRL), the PEFT model (`add_lora`, which refuses a pattern key
that sets no module's rank), the modules it wraps (`lora_modules`), the rank and alpha of each module as
built (`lora_ranks`), and the statistics of the adapter's initialisation (`initialise_lora`, see
`training.lora_init`).

Alpha follows the rank: a module of rank r_m gets alpha_m = lora_alpha * r_m / lora_r, so its scale
alpha_m / r_m is the run's lora_alpha / lora_r and a module given a lower rank learns at the same scale
as the others. A file's own `alpha_pattern` replaces that rule for the keys it names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit import families
from gsmkit.errors import DataError
from gsmkit.modeling import PEFT_PREFIX
from gsmkit.training.lora_init import calibration_sample, initialise_adapter


def resolve_targets(model: Any, wanted: Sequence[str] | None = None) -> list[str]:
    """The projection names LoRA targets: by default every linear projection of the decoder layers
    (`families.lora_targets`), else `--target-modules` checked against them (`families.check_lora_targets`:
    a one-line ConfigError naming the projections that exist)."""
    return families.check_lora_targets(model, wanted) if wanted else families.lora_targets(model)


def target_modules(model: Any, targets: Sequence[str]) -> list[tuple[str, Any]]:
    """(path, module) of each linear projection of the decoder layers named in `targets`: the modules the
    adapter wraps, in model order."""
    return [(path, module) for path, module in families.linear_modules(model)
            if path.rsplit(".", 1)[-1] in targets]


def prepare_base(model: Any, load_in_4bit: bool, checkpointing: bool) -> Any:
    """The base ready for an adapter: k-bit preparation on a 4-bit base (it freezes every parameter it
    finds, so the adapter comes after it), else inputs that carry gradients when checkpointing."""
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        from gsmkit.training.arguments import kbit_preparation_arguments

        options = kbit_preparation_arguments(prepare_model_for_kbit_training, checkpointing)
        return prepare_model_for_kbit_training(model, **options)
    if checkpointing:
        model.enable_input_require_grads()
    return model


# ---- --rank-pattern ----------------------------------------------------------------------------------

PATTERN_HINT = ("pass an `audit-svd` audit.json, a JSON object {\"rank_pattern\": {MODULE_PATTERN: RANK}} "
                "(optionally with \"alpha_pattern\"), or a bare {MODULE_PATTERN: RANK}")


@dataclass(frozen=True)
class RankPattern:
    """Per-module ranks read from a file: PEFT `rank_pattern` keys (module-path regexes, first match wins) in
    the file's order, and the file's own `alpha_pattern` (None: alpha follows the rank)."""

    path: Path
    ranks: dict[str, int]
    alphas: dict[str, float] | None = None

    def alpha_pattern(self, lora_r: int, lora_alpha: float) -> dict[str, float]:
        """Each key's alpha, lora_alpha * rank / lora_r (the run's scale), unless the file gives one."""
        if self.alphas is not None:
            return dict(self.alphas)
        return {key: _number(lora_alpha * rank / lora_r) for key, rank in self.ranks.items()}


def _number(value: float) -> float:
    """An integral alpha as an int, so adapter_config.json reads 16 rather than 16.0."""
    return int(value) if float(value).is_integer() else float(value)


def _pattern_entries(path: Path, table: Any, name: str, kind: type) -> dict[str, Any]:
    if not isinstance(table, dict) or not table:
        raise DataError(f"{path}: '{name}' must be a non-empty JSON object of module pattern -> "
                        f"{'rank' if kind is int else 'alpha'}", hint=PATTERN_HINT)
    for key, value in table.items():
        try:
            re.compile(key)
        except re.error as err:
            raise DataError(f"{path}: {name} key '{key}' is not a valid regular expression ({err})",
                            hint="keys are module paths or regexes, as PEFT's rank_pattern reads "
                            "them") from None
        bad = isinstance(value, bool) or not isinstance(value, int if kind is int else int | float)
        if bad or value <= 0:
            what = "a positive integer rank" if kind is int else "a positive number"
            raise DataError(f"{path}: {name} key '{key}': expected {what}, got {value!r}", hint=PATTERN_HINT)
    return dict(table)


def read_rank_pattern(path: str | Path) -> RankPattern:
    """The ranks (and optional alphas) in a --rank-pattern file; DataError naming the file and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err})", hint=PATTERN_HINT) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}", hint=PATTERN_HINT)
    if "rank_pattern" in data:  # audit.json, {"rank_pattern": ...}, or an adapter_config.json
        alphas = data.get("alpha_pattern") or None
        return RankPattern(path, _pattern_entries(path, data["rank_pattern"], "rank_pattern", int),
                           _pattern_entries(path, alphas, "alpha_pattern", float) if alphas else None)
    return RankPattern(path, _pattern_entries(path, data, "rank_pattern", int))


def check_rank_pattern(model: Any, targets: Sequence[str], pattern: RankPattern) -> None:
    """Every key of the pattern sets the rank (or alpha) of at least one LoRA module of `model`, by PEFT's
    own rule (the first key, in order, that matches the module path); else DataError naming the key."""
    from peft.utils.other import get_pattern_key

    names = [path for path, _ in target_modules(model, targets)]
    for label, table in (("rank_pattern", pattern.ranks), ("alpha_pattern", pattern.alphas or {})):
        used = {get_pattern_key(list(table), name) for name in names}
        unused = [key for key in table if key not in used]
        if unused:
            example = names[0] if names else "none"
            raise DataError(f"{pattern.path}: {label} key '{unused[0]}' sets no LoRA module of the model"
                            + (f" ({len(unused)} such keys)" if len(unused) > 1 else ""),
                            hint=f"keys match module paths ending in them, like {example}, among the "
                            f"targets {', '.join(targets)}; an earlier key that matches takes precedence")


def lora_config(settings: Any, model: Any, targets: Sequence[str]) -> Any:
    """A fresh adapter of the run's shape on the projections of `model`'s decoder layers named in `targets`,
    with the run's --rank-pattern when it has one.

    PEFT matches target names anywhere in the model, so a module of the same name outside the decoder layers
    (a vision tower's `q_proj`, a head named like a projection) is excluded by its path. GPT-2's `Conv1D`
    stores its weight transposed: `fan_in_fan_out` says so when every target is one (PEFT would otherwise
    warn and set it itself). A 4-bit base holds them as bitsandbytes `Linear4bit` (transformers records the
    class it replaced), which PEFT wraps untransposed whatever the flag says: the flag still follows the
    architecture, so the adapter loads on the full-precision base as it is.
    """
    from peft import LoraConfig

    patterns: dict[str, Any] = {}
    if getattr(settings, "rank_pattern", None) is not None:
        pattern = read_rank_pattern(settings.rank_pattern)
        patterns = {"rank_pattern": dict(pattern.ranks),
                    "alpha_pattern": pattern.alpha_pattern(settings.lora_r, settings.lora_alpha)}
    chosen = target_modules(model, targets)
    inside = {path for path, _ in chosen}
    outside = [path for path, _ in model.named_modules()
               if path.rsplit(".", 1)[-1] in targets and path not in inside]
    if outside:  # a full-match regex of exact paths: a list would also exclude paths that end in one
        patterns["exclude_modules"] = "|".join(re.escape(path) for path in outside)
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=bool(chosen) and all(families.is_conv1d(m) for _, m in chosen),
                      **patterns)


def add_lora(model: Any, settings: Any) -> tuple[Any, list[str]]:
    """The PEFT model with a fresh adapter on the run's targets (`resolve_targets`; its dropout made lean);
    and those targets."""
    from peft import get_peft_model

    targets = resolve_targets(model, settings.target_modules)
    if getattr(settings, "rank_pattern", None) is not None:
        check_rank_pattern(model, targets, read_rank_pattern(settings.rank_pattern))
    return lean_dropout(get_peft_model(model, lora_config(settings, model, targets))), targets


def lora_modules(peft_model: Any) -> list[str]:
    """The paths of the modules the adapter wraps (PEFT's LoRA layers), as `rank_pattern` keys see them."""
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix(PEFT_PREFIX) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)]


def lean_dropout(model: Any) -> Any:
    """Every LoRA dropout of `model` (PEFT's `lora_dropout` modules) as `torch.native_dropout`, which keeps a
    one-byte mask for the backward pass. On CPU, `nn.Dropout` keeps a float32 noise tensor and its input
    (8 bytes per element): 2.1 GB of SmolLM2-135M's 7.8 GB of activations at batch 8 x 468. The same
    dropout (probability, scaling, on in training only); on CUDA nn.Dropout already runs this kernel."""
    import torch

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout:
                    dropouts[name] = _mask_dropout()(dropout.p)
    return model


def _mask_dropout() -> type:
    import torch

    class MaskDropout(torch.nn.Dropout):
        def forward(self, x: Any) -> Any:
            if not self.training or self.p == 0:
                return x
            return torch.native_dropout(x, self.p, True)[0]

    return MaskDropout


def lora_ranks(peft_model: Any, settings: Any) -> dict[str, dict[str, float]] | None:
    """Each LoRA module's rank and alpha as built, {module path: {"r", "alpha"}} (the manifest records it
    for a --rank-pattern run); None without --rank-pattern, where every module has lora_r and lora_alpha."""
    if getattr(settings, "rank_pattern", None) is None:
        return None
    from peft.tuners.lora import LoraLayer

    found: dict[str, dict[str, float]] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter, r in module.r.items():
                path = name.removeprefix(PEFT_PREFIX)
                found[path] = {"r": int(r), "alpha": _number(module.lora_alpha[adapter])}
    return found


def initialise_lora(peft_model: Any, settings: Any, encoded: list, pad_id: int,
                    on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The run's `--init-lora` on a fresh 4-bit PEFT model, calibrated (cloq) on the run's seeded sample of
    its encoded training rows; returns the statistics the manifest records as `lora_init`."""
    calibration = calibration_sample(encoded, settings.calibration_rows, settings.seed)
    return initialise_adapter(peft_model, settings.model, settings.init_lora,
                              calibration if settings.init_lora == "cloq" else (), pad_id=pad_id,
                              on_progress=on_progress)
