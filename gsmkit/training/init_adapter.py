"""`--init-adapter` (train sft | qlora | grpo): a trained LoRA adapter that a run continues instead of a fresh
one, read once and checked against the run before any model loads, attached trainable, recorded.

In: the adapter folder (adapter_config.json and its weights, as `gsmkit train` or PEFT's save_pretrained
writes them) and the run's settings. Out: `read_init_adapter` (its shape: rank, alpha, target modules, the
base it was trained on; its sha256, `manifest.adapter_sha256`, the key `gsmkit report` joins runs by), the
LoRA fields it fixes in the resolved settings (`adapter_fields`), the model with it attached trainable
(`attach_trainable`) and the manifest's record of it (`record`).

The adapter's shape is the run's: its rank, alpha and target modules train as they are, so the resolved
settings (and the manifest) hold them; a --lora-r, --lora-alpha or --target-modules given with another value
is an error, as is a --model other than the base it was trained on where that base is found here to compare
(its files, `generation.steer_files.model_fingerprint`; a Hub id against a Hub id by name). Its dropout is the
run's --lora-dropout: a choice of the training, not part of the adapter (GRPO's default 0 keeps the rollouts'
policy and the updated one the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, ModelError
from gsmkit.fields import default_of, field_of, flag_of

_HINT = "--init-adapter continues a LoRA adapter folder written by `gsmkit train` (or PEFT's save_pretrained)"


@dataclass(frozen=True)
class InitAdapter:
    """What a run needs to know of the adapter it continues."""

    path: str
    r: int
    alpha: int | float
    targets: tuple[str, ...]
    base: str | None  # base_model_name_or_path: the --model it was trained on
    sha256: str


def read_init_adapter(path: str | Path) -> InitAdapter:
    """The adapter folder's shape and digest; a ModelError naming the folder for a damaged folder or one that
    is not a LoRA adapter. Reads adapter_config.json and the weights' header and bytes (for the sha256); no
    model."""
    from gsmkit.manifest import adapter_sha256
    from gsmkit.modeling import check_adapter

    cfg = check_adapter(path)  # whole, or a ModelError naming the file
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise ModelError(f"{path}: a {kind} adapter, not LoRA", hint=_HINT)
    r, alpha, targets = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r")), cfg.get("target_modules")
    where = Path(path) / "adapter_config.json"
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ModelError(f"{where}: field 'r' must be a positive integer, got {r!r}", hint=_HINT)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise ModelError(f"{where}: field 'lora_alpha' must be a positive number, got {alpha!r}", hint=_HINT)
    if isinstance(targets, str):
        targets = [targets]  # a regex of module paths, as PEFT allows
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ModelError(f"{where}: field 'target_modules' must be a non-empty list of module names, got "
                         f"{targets!r}", hint=_HINT)
    base = cfg.get("base_model_name_or_path")
    return InitAdapter(path=str(path), r=r, alpha=int(alpha) if float(alpha).is_integer() else alpha,
                       targets=tuple(sorted(targets)), base=base if isinstance(base, str) and base else None,
                       sha256=adapter_sha256(path) or "")


def adapter_fields(settings: Any) -> dict[str, Any]:
    """The LoRA fields of `settings` as its --init-adapter fixes them (`lora_r`, `lora_alpha`,
    `target_modules`), after checking the adapter against the run: a value given that differs from the
    adapter's, or another base model, is a ConfigError naming both. A value at its default takes the
    adapter's."""
    adapter = read_init_adapter(settings.init_adapter)
    check_base(adapter, settings.model)
    cls = type(settings)
    for name, theirs, what in (("lora_r", adapter.r, "rank"), ("lora_alpha", adapter.alpha, "alpha")):
        ours = getattr(settings, name)
        if ours != theirs and ours != default_of(cls, name):
            flag = flag_of(field_of(cls, name))
            raise ConfigError(f"{flag} {ours} contradicts --init-adapter {adapter.path}, whose {what} is "
                              f"{theirs}", hint=f"drop {flag}: the adapter trains with its own shape")
    given = settings.target_modules
    if given is not None and set(given) != set(adapter.targets):
        raise ConfigError(f"--target-modules {' '.join(given)} contradicts --init-adapter {adapter.path}, "
                          f"which targets {' '.join(adapter.targets)}",
                          hint="drop --target-modules: the adapter's own modules train")
    return {"lora_r": adapter.r, "lora_alpha": adapter.alpha, "target_modules": adapter.targets}


def check_base(adapter: InitAdapter, model: str) -> None:
    """A ConfigError when the adapter was trained on another model than --model: compared by their files when
    the recorded base is found here (the same folder, or the same config and weights elsewhere), by name when
    both are Hub ids; a recorded base not found here cannot be compared (loading still checks the shapes)."""
    recorded = adapter.base
    if recorded is None or recorded == model:
        return
    here, there = Path(model).expanduser(), Path(recorded).expanduser()
    if there.exists() and here.exists():
        if there.resolve() == here.resolve():
            return
        from gsmkit.generation.steer_files import model_fingerprint

        if model_fingerprint(str(there)) == model_fingerprint(str(here)):
            return
    elif there.exists() or here.exists() or _looks_like_path(recorded) or _looks_like_path(model):
        return
    raise ConfigError(f"--init-adapter {adapter.path} was trained on {recorded}, not --model {model}",
                      hint=f"pass --model {recorded}, the base the adapter belongs to")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1


def attach_trainable(model: Any, settings: Any) -> Any:
    """`model` (a prepared base) with the settings' --init-adapter attached, its weights trainable, and its
    dropout the run's --lora-dropout."""
    from peft import PeftConfig

    from gsmkit.modeling import attach_adapter

    config = PeftConfig.from_pretrained(settings.init_adapter)
    config.lora_dropout = settings.lora_dropout
    return attach_adapter(model, settings.init_adapter, settings.model, is_trainable=True, config=config)


def record(path: str | Path | None) -> dict[str, Any] | None:
    """The manifest's `resolved.init_adapter`: the adapter's path, sha256 and shape (None without one)."""
    if path is None:
        return None
    adapter = read_init_adapter(path)
    return {"path": adapter.path, "sha256": adapter.sha256, "r": adapter.r, "lora_alpha": adapter.alpha,
            "target_modules": list(adapter.targets), "base_model": adapter.base}
