"""The output folder of a training run (train sft, qlora, grpo): what may be trained into, resuming from a
checkpoint, the log, the atomic publish of the finished run, and the checkpoint sweep.

In: --out, --resume, --overwrite; at the end, the writers of the final files. Out: while a run trains,
OUT holds `checkpoints/` (with --save-steps), `tensorboard/` (with --report-to tensorboard) and
`trainer_log.jsonl`. The finished run is built in a hidden sibling of OUT (the model or adapter, the
tokenizer, the manifest, the curve, the pool and a copy of the log), the run's `checkpoints/` and
`tensorboard/` are moved in, and `run_folder.publish_folder` swaps it into place: OUT is either the
interrupted run (resumable) or the finished one, never half of each. A resumed run's log loses a torn last
line (a run killed while writing it), as eval's journals do (`jsonl.Journal`).

A folder holding the finished marker (`adapter_config.json`, `config.json` with --full) is a finished
run; one with `checkpoint-N/` folders but no marker is an interrupted one (--resume continues it).

Several processes (`accelerate launch`, `torchrun`): every process checks OUT and finds the same checkpoint
to resume from, but only the main one writes OUT (the log and `run.json` when the run starts, the publish
at the end); the Trainer writes each checkpoint's per-process files. `publish_on_main` makes the others
wait for the publish.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.jsonl import Journal, dumps_line
from gsmkit.processes import is_main_process
from gsmkit.run_folder import (
    FINGERPRINT,
    MANIFEST,
    RunOutput,
    check_not_an_input,
    publish_folder,
    staging_folder,
    write_text,
)

CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"  # --report-to tensorboard's event files
CARRIED = (CHECKPOINTS, TENSORBOARD)  # folders a run writes while it trains, moved into the finished run
LOG = "trainer_log.jsonl"
POOL = "fewshot_pool.jsonl"  # the pool the run kept out of training, beside the adapter
SWEEP = "sweep.json"


def finished_marker(out: Path, full: bool = False) -> Path:
    return out / ("config.json" if full else "adapter_config.json")


# What a resumed run may change: how long it trains, what it saves and logs (and where: --report-to), and what
# runs after it.
# `loss_chunk` changes how the loss is computed, not its value.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "max_steps", "epochs", "time_limit", "save_steps",
                     "save_total_limit", "logging_steps", "report_to", "loss_chunk", "eval_limit",
                     "eval_data", "eval_max_new_tokens", "sweep_last", "preset", "shared_prompt")


def training_fingerprint(settings: Any) -> dict[str, Any]:
    """The settings a --resume must repeat: everything that changes the model being trained."""
    from gsmkit.manifest import run_fingerprint

    return run_fingerprint(settings, RESUME_MAY_CHANGE)


def check_run_folder(out: Path, finished: Path, resume: bool, overwrite: bool,
                     fingerprint: dict[str, Any] | None = None, inputs: tuple = ()) -> Path | None:
    """Refuse to train into a finished or interrupted run unless told what to do, or into a folder that
    holds something else (the finished run replaces the folder whole); returns the checkpoint to resume
    from (with `resume`), after checking that the interrupted run's recorded settings are these."""
    checkpoints = out / CHECKPOINTS
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    check_not_an_input(out, inputs)  # the finished run replaces OUT whole
    if finished.exists() and not overwrite:
        raise ConfigError(f"{out}: already holds a finished run",
                          hint="pass --overwrite, or choose another --out")
    if resume:
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is None:
            raise ConfigError(f"--resume: no checkpoint in {checkpoints}",
                              hint="checkpoints are written only with --save-steps N")
        if fingerprint is not None and (out / FINGERPRINT).exists():  # runs from before gsmkit wrote one
            RunOutput.folder(out, finals=()).prepare(fingerprint)  # ResumeError for other settings
        return resume_from
    if checkpoints.exists() and any(checkpoints.glob("checkpoint-*")) and not overwrite:
        raise ConfigError(f"{out}: holds checkpoints of an interrupted run",
                          hint="pass --resume to continue it, or --overwrite to start again")
    if out.is_dir() and not overwrite and not _is_run_folder(out):
        raise ConfigError(f"{out}: holds files that are not a training run",
                          hint="choose a new folder for --out, or pass --overwrite to replace this one")
    return None


def _is_run_folder(out: Path) -> bool:
    """Empty, or what a run that stopped early leaves (its log, an empty checkpoints folder, its events)."""
    return all(p.name in (*CARRIED, LOG, FINGERPRINT) for p in out.iterdir())


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = []
    for p in checkpoints.glob("checkpoint-*"):
        try:
            found.append((int(p.name.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return max(found)[1] if found else None


def start_run(out: Path, resume_from: Path | None, overwrite: bool,
              fingerprint: dict[str, Any] | None = None) -> Path:
    """Create OUT, record the settings a --resume must repeat (`run.json`, gone once the run is published)
    and return its log. --overwrite drops the old run's checkpoints, events and log (its finished files stay
    until the new run replaces the folder); a resumed run keeps the log rows up to its checkpoint (it logs
    the later steps again; a torn last line is dropped); a new run starts an empty log. Only the main process
    touches OUT; the others get the log's path."""
    log_path = out / LOG
    if not is_main_process():
        return log_path
    out.mkdir(parents=True, exist_ok=True)
    if fingerprint is not None:
        RunOutput.folder(out, finals=()).begin(fingerprint)
    if overwrite:
        for name in CARRIED:
            shutil.rmtree(out / name, ignore_errors=True)
    if resume_from is not None and log_path.exists():
        step = int(resume_from.name.split("-")[1])
        kept = [row for row in Journal(log_path).load() if row.get("step", 0) <= step]
        write_text(log_path, "".join(dumps_line(row) for row in kept))
    else:
        log_path.unlink(missing_ok=True)
    return log_path


def publish_run(out: Path, save: Callable[[Path], None], files: dict[str, Callable[[Path], None]]) -> None:
    """Replace OUT with the finished run: `save(folder)` writes the model (or adapter) and tokenizer and each
    `files[name](path)` one more file into a hidden sibling, with a copy of the log; then the run's
    checkpoints and events move in (renames) and the folder is swapped into place."""
    with staging_folder(out) as tmp:
        save(tmp)
        for name, write in files.items():
            write(tmp / name)
        if (out / LOG).exists():
            shutil.copy2(out / LOG, tmp / LOG)
    try:
        for name in CARRIED:
            if (out / name).exists():
                os.replace(out / name, tmp / name)
        publish_folder(tmp, out)
    except BaseException:
        for name in CARRIED:
            if (tmp / name).exists() and not (out / name).exists():
                os.replace(tmp / name, out / name)  # the interrupted run stays resumable
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_on_main(trainer: Any, publish: Callable[[dict[str, Any]], None]) -> None:
    """End a finished Trainer's run on every process of a launch: all wait until each has finished training
    (the last checkpoint's per-process files are written before OUT moves), all take part in gathering the
    weights (a collective under FSDP and DeepSpeed ZeRO-3; the model's own tensors otherwise), the main
    process calls `publish(weights)`, and the others wait for it, so that OUT is finished when any process
    returns."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model  # ZeRO-3: its engine
    weights = accelerator.get_state_dict(model)
    if trainer.is_world_process_zero():
        publish(weights)
    accelerator.wait_for_everyone()


def publish_trained(out: Path, trainer: Any, tokenizer: Any, pool: list, manifest: dict[str, Any],
                    curve: str, draw_curve: Callable[[Path], None],
                    weights: dict[str, Any] | None = None) -> None:
    """`publish_run` for a finished Trainer: the adapter (or model) and tokenizer it holds (its `weights`
    from `publish_on_main`: the whole model's, gathered), the pool it kept out of training (evaluation takes
    its exemplars from it), the manifest and its curve (`draw_curve`)."""
    from gsmkit.data.fewshot import write_pool
    from gsmkit.jsonl import write_json

    def save(folder: Path) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    publish_run(out, save, {POOL: lambda p: write_pool(p, pool), MANIFEST: lambda p: write_json(p, manifest),
                            curve: draw_curve})


def sweep_checkpoints(out: Path, last: int, evaluate: Callable[[Path, Path], dict[str, Any]]) -> list[dict]:
    """Evaluate the last `last` checkpoints of the run in OUT, each with `evaluate(adapter, eval_folder)`
    into `sweep/checkpoint-N/`, and compare them in `sweep.json` (written atomically); returns the rows."""
    from gsmkit.jsonl import write_json

    ckpts = sorted((out / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-last:]
    sweep = []
    for c in ckpts:
        m = evaluate(c, out / "sweep" / c.name)
        sweep.append({"checkpoint": c.name, "accuracy_strict": m["accuracy_strict"],
                      "accuracy_flexible": m["accuracy_flexible"]})
    if sweep:
        best = max(sweep, key=lambda r: (r["accuracy_strict"], r["accuracy_flexible"]))
        write_json(out / SWEEP, {"checkpoints": sweep, "best": best})
    return sweep
