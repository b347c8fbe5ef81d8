"""The one library-version shim of the training runs: `TrainingArguments` (train sft, qlora) and TRL's
`GRPOConfig` (train grpo) built from the same settings (--report-to included) under the names the installed
version takes, and the options of peft's k-bit preparation.

In: the arguments class, the run's settings (`TrainingOptions` and the base-model group of
`training.config`), the loaded model, the checkpoints folder and the trainer's own arguments.
Out: the arguments object. What differs between versions is decided here and only here:
- activation checkpointing: transformers >= 5 renamed `gradient_checkpointing*` to
  `activation_checkpointing*` (and warns on the old names), and peft >= 0.22 renamed
  `prepare_model_for_kbit_training`'s `gradient_checkpointing_kwargs` the same way;
- warmup: transformers >= 5 has no `warmup_ratio`; a float `warmup_steps` in [0, 1) is the ratio;
- batches grouped by length: `train_sampling_strategy="group_by_length"` in transformers >= 5, the
  `group_by_length` switch before;
- arguments that older versions lack (`include_num_input_tokens_seen`, ...) are left out there.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

# Arguments a run can do without: left out where this transformers does not know them.
OPTIONAL = ("include_num_input_tokens_seen", "logging_first_step", "data_seed", "use_cpu")


def _checkpointing_prefix(params: Any) -> str:
    """"activation" where these signature parameters take the new checkpointing names, else "gradient"."""
    new = ("activation_checkpointing", "activation_checkpointing_kwargs")
    return "activation" if any(name in params for name in new) else "gradient"


def checkpointing_arguments(params: Any, on: bool) -> dict[str, Any]:
    """Activation checkpointing options under the names this transformers takes (`params`: the arguments
    class's signature parameters)."""
    prefix = _checkpointing_prefix(params)
    return {f"{prefix}_checkpointing": on,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def kbit_preparation_arguments(prepare: Any, on: bool) -> dict[str, Any]:
    """The options of peft's `prepare_model_for_kbit_training` (`prepare`) under the names this peft takes."""
    prefix = _checkpointing_prefix(inspect.signature(prepare).parameters)
    return {"use_gradient_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def trainer_arguments(cls: type, settings: Any, loaded: Any, checkpoints: Path, *,
                      group_by_length: bool = False, **own: Any) -> Any:
    """`cls(...)` for one run: the shared optimiser, schedule, logging, checkpoint, seed and precision
    arguments from `settings`, plus the trainer's `own` (batch size, epochs, GRPO's sampling ...)."""
    import torch

    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {
        "output_dir": str(checkpoints),
        "gradient_accumulation_steps": settings.grad_accum,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler,
        "max_steps": settings.max_steps,
        "logging_steps": settings.logging_steps,
        "save_strategy": "steps" if settings.save_steps else "no",
        "save_steps": settings.save_steps or 500,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "report_to": list(getattr(settings, "report_to", ())) or "none",  # --report-to: none by default
        "bf16": loaded.dtype == torch.bfloat16 and loaded.device.type == "cuda",
        "fp16": loaded.dtype == torch.float16,
        "use_cpu": loaded.device.type == "cpu",
        "disable_tqdm": True,  # the progress bar is ours; stdout stays for --json
        "dataloader_num_workers": 0,
        **checkpointing_arguments(params, settings.checkpointing),
        **own,
    }
    if "warmup_ratio" in params:
        kwargs["warmup_ratio"] = settings.warmup_ratio
    else:  # transformers >= 5: a float warmup_steps in [0, 1) is a ratio
        kwargs["warmup_steps"] = float(settings.warmup_ratio)
    if group_by_length:
        if "train_sampling_strategy" in params:  # transformers >= 5
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    for name in OPTIONAL:
        if name not in params:
            kwargs.pop(name, None)
    return cls(**kwargs)
