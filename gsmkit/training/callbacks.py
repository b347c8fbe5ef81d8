"""Trainer callbacks shared by every training run: the JSONL log written as training goes (by the main
process of a launch only), the wall-clock budget (`--time-limit`), and where a --report-to tensorboard writes.

Before the first step the log's callback also checks the launch: an `accelerate launch` config that asks
for FSDP, where accelerate runs plain DDP instead (its CPU processes), is an error, not a silent fallback.

In: the log file and the caller's progress functions, or a budget in seconds. Out: `TrainerCallback`s
for transformers' Trainer and TRL's GRPOTrainer (transformers is imported when they are built).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path


def log_callbacks(log_path: Path, on_log: Callable[[dict], None] | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> list:
    """A callback that appends every Trainer log (loss, lr, grad norm, step) to `log_path` as it happens,
    and reports each log row and each finished step."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ARG002 - the Trainer's signature
            check_launch()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ARG002 - the Trainer's signature
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if on_log:
                on_log(row)

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002 - the Trainer's signature
            if on_step and state.is_world_process_zero:
                on_step(state.global_step, state.max_steps)

    return [JsonlLog()]


def check_launch() -> None:
    """Fail when `accelerate launch` was given an FSDP config (ACCELERATE_USE_FSDP, which it sets from the
    config) but the processes run without FSDP: accelerate shards only on GPUs (and other accelerators), and
    runs CPU processes as plain DDP whatever the config says."""
    import os

    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from gsmkit.errors import ConfigError

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    if asked and AcceleratorState().distributed_type != DistributedType.FSDP:
        raise ConfigError(
            f"the accelerate config asks for FSDP, but accelerate runs these processes as "
            f"{AcceleratorState().distributed_type.value} (FSDP needs GPUs; on CPUs it is plain DDP)",
            hint="on CPUs, launch without the FSDP config: accelerate launch --multi_gpu --num_processes N")


def time_limit_callbacks(seconds: float | None) -> list:
    """A callback that ends training after the step during which `seconds` of training time ran out."""
    if seconds is None:
        return []
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ARG002 - the Trainer's signature
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002 - the Trainer's signature
            if time.perf_counter() - self.start >= seconds:
                control.should_training_stop = True

    return [TimeLimit()]


def read_log(log_path: Path) -> list[dict]:
    """The rows of a trainer log (none when it does not exist), up to a torn or damaged line (a run killed
    while writing it); the file is left as it is."""
    rows: list[dict] = []
    if not log_path.exists():
        return rows
    for raw in log_path.read_bytes().splitlines():
        try:
            row = json.loads(raw) if raw.strip() else None
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for garbage bytes
            break
        if row is not None:
            if not isinstance(row, dict):
                break
            rows.append(row)
    return rows


def place_tensorboard(trainer, folder: Path) -> None:
    """Point transformers' TensorBoard callback (--report-to tensorboard) at `folder` (OUT/tensorboard/, which
    the publish moves into the finished run) instead of the checkpoints folder; TENSORBOARD_LOGGING_DIR, when
    set, still wins."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "logging_dir", "") is None:
            callback.logging_dir = str(folder)
