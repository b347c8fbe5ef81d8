"""Third-party output that tells a gsmkit user nothing to act on, silenced in one place.

In: nothing. Out: `warnings` and `logging` filters, and tqdm's default of drawing no bar, for this process.
The CLI calls `silence_library_noise` once at start-up (not under --debug, which shows everything); the
library never calls it, so a program that imports gsmkit sees every library's output as that library sets it.

What goes, and why it tells the user nothing:

- bitsandbytes, on its import on CPUs with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from
  kernels-community". The optional `kernels` package would bring a faster kernel; without it bitsandbytes
  uses its own, and gsmkit turns that bfloat16 path off for other compute dtypes anyway
  (`modeling.keep_4bit_compute_dtype`). It is printed by every command that imports PEFT, 4-bit or not.
- transformers' FutureWarnings "`is_gradient_checkpointing` / `gradient_checkpointing_enable` /
  `gradient_checkpointing_disable` is deprecated" (renamed to activation_checkpointing in transformers 5):
  PEFT 0.21 reads the old property while it wraps a model and calls the old method for 4-bit training,
  TRL calls both methods around GRPO's generation; gsmkit uses neither, and the user can change nothing.
- PEFT's UserWarning "Could not find a config file in <model> - will assume that the vocabulary was not
  modified", on saving an adapter of a base without config.json (a .gguf folder): gsmkit never resizes
  the vocabulary, so the assumption is right.
- TRL's UserWarning "You are using 'rollout_func', which is an experimental feature": `train grpo`'s
  engine rollouts are that hook, pinned by gsmkit's tests against the TRL it installs; the user chose
  nothing experimental.
- PEFT's UserWarning "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`", when a
  GPT-2-style adapter (its `adapter_config.json` says fan_in_fan_out: its base stores `Conv1D` weights
  transposed) is loaded on a 4-bit base, whose bitsandbytes layers replaced the `Conv1D`s and are not
  transposed: PEFT then wraps them untransposed, which is right (`training.lora.lora_config` writes the flag
  from the architecture so the same adapter also loads on the full-precision base).
- tqdm bars: transformers' "Loading weights", its GGUF reader's "Converting and de-quantizing GGUF
  tensors...", datasets' map bars. gsmkit shows model loading as its own step (`progress.status_step`)
  and draws its own bars for its work. tqdm reads its `TQDM_*` defaults when it is first imported, which
  in the CLI is after start-up; a TQDM_DISABLE the user set is left as it is.

Any other warning, gsmkit's own included, is shown as before.
"""

from __future__ import annotations

import logging
import os
import warnings

# (category, start of the message as a regular expression)
_WARNINGS = (
    (FutureWarning, r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated"),
    (UserWarning, r"Could not find a config file in .* will assume that the vocabulary was not modified"),
    (UserWarning, r"You are using 'rollout_func', which is an experimental feature"),
    (UserWarning, r"fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"),
)
# logger name -> start of the messages to drop from it
_LOG_RECORDS = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_library_noise() -> None:
    """Install the filters above; calling it again changes nothing."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in _LOG_RECORDS.items():
        logger = logging.getLogger(name)  # created now if the library is not imported yet; it gets this one
        if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    os.environ.setdefault("TQDM_DISABLE", "1")
