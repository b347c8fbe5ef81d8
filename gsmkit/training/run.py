"""One training run: the skeleton every trainer shares (`train sft|qlora`: `training.sft`, `train grpo`:
`training.grpo`). A recipe (`Recipe`) states only what differs; `run_training` does the rest, in this order:

 1. the settings resolved (`settings.resolved()`: adapters, rank files, devices, trackers read once),
 2. the run's fingerprint and the folder rules (refuse / resume / overwrite, `training.outputs`),
 3. *the data*, read and checked before anything loads (`Recipe.read_data`),
 4. the tokenizer, then *the rows or prompts* made with it (`Recipe.prepare`; a bad style fails here), and
    *the checks* that need no model (`Recipe.check`),
 5. the seed, the base model (4-bit or not), the malloc threshold (`training.memory`),
 6. the weights that train (`trainable`): every weight (--full), the --init-adapter continued
    (`training.init_adapter`), or a fresh LoRA (`training.lora`), wrapped here or handed to a trainer that
    wraps it itself (`Recipe.wraps_lora`); then *its start* (`Recipe.start_adapter`: --init-lora),
 7. the log started, *the trainer* (`Recipe.trainer`) with the shared arguments (`arguments`) and callbacks
    (`callbacks`); its console printer removed, the LoRA dropout made lean, TensorBoard pointed at OUT,
 8. training, timed (resumed from the checkpoint a --resume continues),
 9. on the main process: the manifest (what every run records in `resolved`, then *the recipe's own*,
    `Recipe.resolved`) and the publish (weights, tokenizer, pool, manifest, *the curve*, `Recipe.curve`),
10. *the result* (`Recipe.result`).

In: the settings and the recipe (a class, or a function of the resolved settings), the progress callbacks.
Out: the recipe's result; OUT holds the finished run (`training.outputs.publish_trained`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.training.outputs import LOG


class Recipe:
    """What one kind of training run does differently; subclasses set the class attributes and override the
    steps their run needs. The `TrainingRun` it is handed holds what the skeleton made so far."""

    curve: str = ""  # the plot's file name in OUT
    wraps_lora: bool = True  # False: a fresh adapter's LoraConfig goes to the trainer, which wraps the model

    def __init__(self, settings: Any):
        self.settings = settings

    @property
    def command(self) -> str:
        """The manifest's `command`."""
        raise NotImplementedError

    def finished_marker(self, out: Path) -> Path:
        """The file whose presence makes OUT a finished run."""
        from gsmkit.training.outputs import finished_marker

        return finished_marker(out)

    def inputs(self) -> tuple:
        """The paths the run reads, which OUT (replaced whole at the end) must not hold."""
        s = self.settings
        return (s.model, s.data, s.pool, s.init_adapter)

    def read_data(self) -> tuple[Any, list[str]]:
        """Read and check the training data (before any tokenizer or model loads); returns the kept-out pool
        (`training.data.KeptOutPool`) and the content hashes of the rows removed for being pool problems."""
        raise NotImplementedError

    def prepare(self, tokenizer: Any) -> str:
        """Make the rows or prompts with the tokenizer; returns the prompt style (`auto` resolved)."""
        raise NotImplementedError

    def check(self) -> None:
        """Checks that need the prepared data but no model."""

    def start_adapter(self, run: TrainingRun) -> None:
        """Start a fresh adapter's weights otherwise than PEFT does (`--init-lora`), on a new run."""

    def trainer(self, run: TrainingRun, callbacks: list) -> Any:
        """The trainer, on `run.model` (and `run.peft_config`), with the skeleton's `callbacks`."""
        raise NotImplementedError

    def total_steps(self, trainer: Any) -> int:
        """The optimizer steps the run will take (for the progress bar)."""
        return trainer.args.max_steps

    def resolved(self, run: TrainingRun) -> dict[str, Any]:  # noqa: ARG002 - what recipes override
        """The recipe's own fields of the manifest's `resolved`."""
        return {}

    def manifest_inputs(self) -> dict[str, Any]:
        """Input files the manifest hashes besides the data, the pool and the --init-adapter."""
        return {}

    def data_source(self) -> str:
        """What the manifest names as the training data (`inputs.data`)."""
        return self.settings.data

    def draw_curve(self, logs: list[dict], path: Path) -> None:
        raise NotImplementedError

    def result(self, run: TrainingRun) -> Any:
        raise NotImplementedError


@dataclass
class Callbacks:
    """The caller's progress functions: `on_start(total steps)`, `on_step(step, total)`, `on_log(log row)`."""

    on_start: Callable[[int], None] | None = None
    on_step: Callable[[int, int], None] | None = None
    on_log: Callable[[dict], None] | None = None


class TrainingRun:
    """The state of one run as the skeleton builds it (what a recipe's steps read): the resolved settings,
    OUT, the checkpoint resumed from, the pool and removed rows, the tokenizer and style, the loaded base,
    the model that trains and its adapter, the trainer, the log, and after training its output and times."""

    def __init__(self, settings: Any, recipe: Callable[[Any], Recipe], callbacks: Callbacks):
        self.settings = settings.resolved()  # before anything else: what the settings name, read once
        self.recipe = recipe(self.settings)
        self.callbacks = callbacks
        self.out: Path = self.settings.out
        self.resume_from: Path | None = None
        self.pool: Any = None
        self.removed: list[str] = []
        self.tokenizer: Any = None
        self.style = ""
        self.loaded: Any = None
        self.model: Any = None
        self.peft_config: Any = None
        self.targets: list[str] = []
        self.mmap_threshold: int | None = None
        self.log_path = self.out / LOG
        self.trainer: Any = None
        self.output: Any = None
        self.train_s = 0.0
        self.steps = 0
        self.trainable = 0
        self.wrapped: list[str] = []
        self.logs: list[dict] = []

    @property
    def checkpoints(self) -> Path:
        from gsmkit.training.outputs import CHECKPOINTS

        return self.out / CHECKPOINTS

    def run(self) -> Any:
        """The steps in order (the module's docstring); returns the recipe's result."""
        from gsmkit.training.outputs import publish_on_main, training_fingerprint

        fingerprint = training_fingerprint(self.settings)
        self.check_folder(fingerprint)
        self.read_inputs()
        self.load_model()
        self.build_trainer(fingerprint)
        self.train()
        publish_on_main(self.trainer, self._publish)
        return self.recipe.result(self)

    def check_folder(self, fingerprint: dict[str, Any]) -> None:
        """The folder rules: refuse, resume (from which checkpoint) or overwrite."""
        from gsmkit.training.outputs import check_run_folder

        s = self.settings
        self.resume_from = check_run_folder(self.out, self.recipe.finished_marker(self.out), s.resume,
                                            s.overwrite, fingerprint, inputs=self.recipe.inputs())

    def read_inputs(self) -> None:
        """The data (checked before anything loads), the tokenizer, the rows or prompts made with it."""
        from gsmkit.modeling import load_tokenizer

        self.pool, self.removed = self.recipe.read_data()
        self.tokenizer = load_tokenizer(self.settings.model)
        self.style = self.recipe.prepare(self.tokenizer)
        self.recipe.check()

    def load_model(self) -> None:
        """The seeded base model and the weights that train."""
        from transformers import set_seed

        from gsmkit.modeling import load_model
        from gsmkit.training.memory import return_freed_memory

        s = self.settings
        set_seed(s.seed)
        self.loaded = load_model(s.model_spec(), for_training=True)
        self.mmap_threshold = return_freed_memory(self.loaded.device)
        self.model, self.peft_config, self.targets = trainable(self.loaded.model, s, self.recipe.wraps_lora)
        if self.resume_from is None and s.init_adapter is None:  # a resumed run restores its adapter
            self.recipe.start_adapter(self)

    def build_trainer(self, fingerprint: dict[str, Any]) -> None:
        """The log started, the recipe's trainer with the shared callbacks, and what every trainer needs
        done to it; the trainable weights counted (none is a bug, never a silent run)."""
        from transformers.trainer_callback import PrinterCallback

        from gsmkit.training import callbacks as cb
        from gsmkit.training.lora import lean_dropout, lora_modules
        from gsmkit.training.outputs import TENSORBOARD, start_run

        s, calls = self.settings, self.callbacks
        self.log_path = start_run(self.out, self.resume_from, s.overwrite, fingerprint)
        self.trainer = self.recipe.trainer(self, cb.log_callbacks(self.log_path, calls.on_log, calls.on_step)
                                           + cb.time_limit_callbacks(getattr(s, "time_limit_s", None)))
        self.trainer.remove_callback(PrinterCallback)  # logs go to the log and the bar; stdout is --json's
        cb.place_tensorboard(self.trainer, self.out / TENSORBOARD)
        lean_dropout(self.trainer.model)  # the adapter the trainer holds, whoever attached it
        self.wrapped = lora_modules(self.trainer.model)
        self.trainable = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
        if self.trainable == 0:
            raise RuntimeError("no trainable parameter: the adapter was frozen")

    def train(self) -> None:
        """Training, timed, from the checkpoint a --resume continues."""
        if self.callbacks.on_start:
            self.callbacks.on_start(self.recipe.total_steps(self.trainer))
        t0 = time.perf_counter()
        resume = str(self.resume_from) if self.resume_from else None
        self.output = self.trainer.train(resume_from_checkpoint=resume)
        self.train_s = time.perf_counter() - t0
        self.steps = self.trainer.state.global_step

    def resolved(self) -> dict[str, Any]:
        """The manifest's `resolved`: what every run records, then the recipe's own fields."""
        from gsmkit.training.init_adapter import record

        s, loaded = self.settings, self.loaded
        return {"style": self.style, "k": s.k, "lora_targets": list(self.targets),
                "lora_module_count": len(self.wrapped), "gradient_checkpointing": s.checkpointing,
                "dtype": str(loaded.dtype), "device": str(loaded.device),
                "malloc_mmap_threshold": self.mmap_threshold,
                "processes": self.trainer.accelerator.num_processes, "fewshot_pool": self.pool.origin,
                "removed_fewshot": len(self.removed), "removed_fewshot_hashes": sorted(self.removed),
                "trainable_params": self.trainable, "steps": self.steps,
                "init_adapter": record(s.init_adapter),
                "resumed_from": str(self.resume_from) if self.resume_from else None,
                **self.recipe.resolved(self)}

    def _publish(self, weights: dict[str, Any]) -> None:
        """The finished run, swapped into OUT whole (on the main process): the adapter (or model) from the
        gathered `weights`, the tokenizer, the pool kept out of training (evaluation takes its exemplars
        from it), the manifest and the curve."""
        from gsmkit.data.gsm8k import source_file
        from gsmkit.manifest import build_manifest
        from gsmkit.training.callbacks import read_log
        from gsmkit.training.outputs import publish_trained

        s, recipe = self.settings, self.recipe
        self.logs = read_log(self.log_path)  # complete on the main process, the one that reports
        init = Path(s.init_adapter) / "adapter_config.json" if s.init_adapter else None
        manifest = build_manifest(
            recipe.command, s,
            inputs={"data": source_file(recipe.data_source(), s.split), "fewshot_pool": self.pool.path,
                    "init_adapter": init, **recipe.manifest_inputs()},
            seeds={"seed": s.seed}, extra={"resolved": self.resolved()},
        )
        publish_trained(self.out, self.trainer, self.tokenizer, self.pool.examples, manifest, recipe.curve,
                        lambda path: recipe.draw_curve(self.logs, path), weights)


def trainable(model: Any, settings: Any, wrap: bool) -> tuple[Any, Any, list[str]]:
    """The weights a run trains, as (model, LoraConfig for a trainer that wraps the model itself, targets):
    every weight with --full; else the base prepared for an adapter (`lora.prepare_base`: k-bit preparation
    freezes every parameter it finds, so the adapter comes after it) with the --init-adapter attached
    trainable, or a fresh LoRA on the run's targets (wrapped here when `wrap`)."""
    from gsmkit.training.lora import add_lora, lora_config, prepare_base, resolve_targets

    if getattr(settings, "full", False):
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None, []
    model = prepare_base(model, settings.load_in_4bit, settings.checkpointing)
    if settings.init_adapter is not None:
        from gsmkit.training.init_adapter import attach_trainable

        return attach_trainable(model, settings), None, list(settings.target_modules or ())
    if wrap:
        model, targets = add_lora(model, settings)
        return model, None, targets
    targets = resolve_targets(model, settings.target_modules)
    return model, lora_config(settings, model, targets), targets


def run_training(settings: Any, recipe: Callable[[Any], Recipe],
                 on_start: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None,
                 on_log: Callable[[dict], None] | None = None) -> Any:
    """Run one training job end to end with `recipe` (called with the resolved settings) and return its
    result."""
    return TrainingRun(settings, recipe, Callbacks(on_start, on_step, on_log)).run()
