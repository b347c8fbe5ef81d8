"""LoRA for every trainer: which layers it targets, how the base is prepared, the PEFT wrap, and the
`--init-lora` start of a QLoRA adapter.

In: a loaded base model and the run's settings (LoraOptions: lora_r, lora_alpha, lora_dropout,
target_modules). Out: the projection names present (`find_lora_targets`), the PEFT `LoraConfig`
(`lora_config`; GRPO hands it to TRL), the PEFT model (`add_lora`), and the statistics of the
adapter's initialisation (`initialise_lora`, see `training.lora_init`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.training.lora_init import calibration_sample, initialise_adapter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def find_lora_targets(model: Any, wanted: tuple[str, ...] | None = None) -> list[str]:
    """Projection names present as linear layers (plain or bitsandbytes 4-bit) in the model."""
    present: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "Linear" in type(module).__name__ and leaf in (wanted or LORA_TARGETS):
            present.add(leaf)
    if wanted:
        missing = sorted(set(wanted) - present)
        if missing:
            found = ", ".join(sorted(present)) or "none of " + ", ".join(LORA_TARGETS)
            raise ConfigError(f"--target-modules {', '.join(missing)} not found in the model",
                              hint=f"present: {found}")
    if not present:
        raise ConfigError("no LoRA target modules found (none of q/k/v/o/gate/up/down_proj)",
                          hint="name them with --target-modules")
    return sorted(present, key=lambda n: (LORA_TARGETS + (n,)).index(n))


def prepare_base(model: Any, load_in_4bit: bool, checkpointing: bool) -> Any:
    """The base ready for an adapter: k-bit preparation on a 4-bit base (it freezes every parameter it
    finds, so the adapter comes after it), else inputs that carry gradients when checkpointing."""
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        model.enable_input_require_grads()
    return model


def lora_config(settings: Any, targets: Sequence[str]) -> Any:
    """A fresh adapter of the run's shape on `targets`."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM")


def add_lora(model: Any, settings: Any) -> tuple[Any, list[str]]:
    """The PEFT model with a fresh adapter on the targets present; and those targets."""
    from peft import get_peft_model

    targets = find_lora_targets(model, settings.target_modules)
    return get_peft_model(model, lora_config(settings, targets)), targets


def initialise_lora(peft_model: Any, settings: Any, encoded: list, pad_id: int,
                    on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The run's `--init-lora` on a fresh 4-bit PEFT model, calibrated (cloq) on the run's seeded sample of
    its encoded training rows; returns the statistics the manifest records as `lora_init`."""
    calibration = calibration_sample(encoded, settings.calibration_rows, settings.seed)
    return initialise_adapter(peft_model, settings.model, settings.init_lora,
                              calibration if settings.init_lora == "cloq" else (), pad_id=pad_id,
                              on_progress=on_progress)
