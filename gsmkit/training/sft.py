"""Supervised fine-tuning, the recipe: LoRA on a full-precision base, 4-bit QLoRA, or full fine-tuning.

In: `TrainSettings` (`training.config`: model, data, few-shot pool, prompt style, LoRA and optimiser
options). Out: an output folder with the adapter (`adapter_model.safetensors`, `adapter_config.json`),
the tokenizer, `manifest.json`, `trainer_log.jsonl`, `loss_curve.png`, `fewshot_pool.jsonl` (the pool
kept out of training) and `checkpoints/` when `--save-steps` asks for them, published whole
(`training.outputs`). One path for `train sft` and `train qlora`: transformers' Trainer on a PEFT model,
with our collator (response-only labels from `training.masking`); the run's skeleton (folder rules, model,
adapter, publish) is `training.run`'s, and `SftRecipe` states what is SFT's. `--init-adapter` continues a
trained LoRA adapter (`training.init_adapter`): the SFT-vs-GRPO protocol's full SFT starts from its prep SFT.

Leakage: the few-shot pool is removed from the training rows by content hash before anything is
tokenised, and the removed hashes are recorded in the manifest.
Speed: batches are grouped by length (less padding than random batches), padded only to the
longest row of each batch; or, with --packing, a batch's rows are one sequence with no padding at all
(`training.packing`: the same loss and gradients; on CPU slower, its attention being dense).
The evaluation after training (`--eval-limit`, `--sweep-last`) is `gsmkit.recipes.train_and_evaluate`:
training does not import evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.training.config import TrainSettings
from gsmkit.training.data import KeptOutPool, resolve_pool
from gsmkit.training.run import Recipe, TrainingRun


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_rows: int
    removed_fewshot: int
    trainable_tokens: int
    train_loss: float | None
    train_s: float
    tokens_per_s: float
    trainable_params: int
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    eval: dict[str, Any] | None = None
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def kept_out_pool(settings: TrainSettings) -> KeptOutPool:
    """The few-shot pool this run keeps out of its rows (see `training.data.resolve_pool`)."""
    return resolve_pool(settings.pool, settings.data, settings.traces)


def training_rows(settings: TrainSettings) -> tuple[list, list[str], Any]:
    """The training rows with the few-shot pool removed: (rows, removed hashes, the kept-out pool). Read
    before any tokenizer or model loads, so a bad data or pool file fails first."""
    from gsmkit.data.fewshot import pool_hashes
    from gsmkit.training.data import load_train_examples, remove_fewshot

    examples = load_train_examples(settings.train_source, settings.split)
    pool = kept_out_pool(settings)
    examples, removed = remove_fewshot(examples, pool_hashes(pool.examples),
                                       [ex.question for ex in pool.examples])
    if settings.max_samples is not None:
        examples = examples[: settings.max_samples]
    if not examples:
        raise DataError(f"{settings.train_source}: no training rows left after removing the few-shot pool")
    return examples, removed, pool


def prepare_examples(
    settings: TrainSettings, tokenizer: Any, rows: tuple | None = None,
) -> tuple[list, list[str], str, str]:
    """Load (unless `rows` from `training_rows` are given), de-leak and encode the training rows:
    (encoded, removed hashes, pool origin, style)."""
    from gsmkit.prompts import resolve_style
    from gsmkit.training.masking import encode_example

    examples, removed, pool = rows if rows is not None else training_rows(settings)
    style = resolve_style(settings.style, tokenizer, settings.thinking)
    encoded = [encode_example(ex, tokenizer, style, settings.max_length, settings.system_prompt,
                              settings.thinking)
               for ex in examples]
    return encoded, removed, pool.origin, style


def train(
    settings: TrainSettings,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_init: Callable[[str, int, int], None] | None = None,
) -> TrainResult:
    """Run one fine-tuning job end to end (`training.run`) and return its summary (without the evaluation
    after it).

    Callbacks: `on_start(total_steps)`, `on_step(step, total)`, `on_log(trainer log row)`, and
    `on_init(stage, done, total)` while `--init-lora` calibrates and initialises the adapter."""
    from gsmkit.training.run import run_training

    return run_training(settings, lambda resolved: SftRecipe(resolved, on_init), on_start, on_step, on_log)


class SftRecipe(Recipe):
    """`train sft | qlora` on transformers' Trainer: response-only labels, our collator, the chunked loss."""

    curve = "loss_curve.png"

    def __init__(self, settings: TrainSettings, on_init: Callable[[str, int, int], None] | None = None):
        super().__init__(settings)
        self.on_init = on_init
        self.encoded: list = []
        self.rows: tuple | None = None
        self.lora_init: dict[str, Any] | None = None
        self.loss: Any = None
        self.batches: dict[str, Any] | None = None

    @property
    def command(self) -> str:
        return f"train {self.settings.mode}"

    def finished_marker(self, out: Path) -> Path:
        from gsmkit.training.outputs import finished_marker

        return finished_marker(out, self.settings.full)

    def inputs(self) -> tuple:
        s = self.settings
        return (s.model, s.train_source, s.pool, s.init_adapter)

    def data_source(self) -> str:
        return self.settings.train_source

    def read_data(self) -> tuple[Any, list[str]]:
        self.rows = training_rows(self.settings)
        _, removed, pool = self.rows
        return pool, removed

    def prepare(self, tokenizer: Any) -> str:
        self.encoded, _, _, style = prepare_examples(self.settings, tokenizer, self.rows)
        return style

    def check(self) -> None:
        if self.settings.init_lora != "default":
            from gsmkit.training.lora_init import checkpoint_files

            checkpoint_files(self.settings.model)  # the weights the initialisation reads: a .gguf fails here

    def start_adapter(self, run: TrainingRun) -> None:
        if self.settings.init_lora != "default":
            from gsmkit.training.lora import initialise_lora

            self.lora_init = initialise_lora(run.model, self.settings, self.encoded,
                                             run.tokenizer.pad_token_id, self.on_init)

    def trainer(self, run: TrainingRun, callbacks: list) -> Any:
        from datasets import Dataset
        from transformers import Trainer, TrainingArguments

        from gsmkit.training.arguments import trainer_arguments
        from gsmkit.training.collate import PackCollator, PadCollator
        from gsmkit.training.loss import response_loss
        from gsmkit.training.packing import batch_layout

        s = self.settings
        dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels,
                                      "length": len(e.input_ids)} for e in self.encoded])
        self.batches = batch_layout(run.model, s.packing, s.group_by_length)
        packed = self.batches["layout"] == "packed"
        args = trainer_arguments(
            TrainingArguments, s, run.loaded, run.checkpoints,
            group_by_length=self.batches["grouped_by_length"],
            per_device_train_batch_size=s.batch_size, num_train_epochs=s.epochs,
            logging_first_step=True, save_total_limit=s.save_total_limit,
            remove_unused_columns=False,
            # real tokens, the numerator of our tokens/s (a packed batch has no padding and no attention mask)
            include_num_input_tokens_seen="all" if packed else "non_padding",
        )
        self.loss = response_loss(run.model, s.loss_chunk)
        collator = PackCollator() if packed else PadCollator(run.tokenizer.pad_token_id)
        return Trainer(model=run.model, args=args, train_dataset=dataset, data_collator=collator,
                       compute_loss_func=self.loss, callbacks=callbacks)

    def total_steps(self, trainer: Any) -> int:
        s = self.settings
        if trainer.args.max_steps > 0:
            return trainer.args.max_steps
        return math.ceil(len(self.encoded) / (s.batch_size * s.grad_accum)) * math.ceil(s.epochs)

    def resolved(self, run: TrainingRun) -> dict[str, Any]:
        from gsmkit.training.lora import lora_ranks

        loss = self.loss
        return {"loss": f"response positions, chunks of {loss.chunk}" if loss else "the model's own",
                "train_rows": len(self.encoded), "truncated_rows": sum(e.truncated for e in self.encoded),
                "batches": self.batches, "lora_init": self.lora_init,
                "lora_ranks": None if self.settings.full else lora_ranks(run.trainer.model, self.settings)}

    def manifest_inputs(self) -> dict[str, Any]:
        return {"rank_pattern": self.settings.rank_pattern}

    def draw_curve(self, logs: list[dict], path: Path) -> None:
        from gsmkit.training.plots import plot_loss

        plot_loss(logs, path)

    def result(self, run: TrainingRun) -> TrainResult:
        import torch

        from gsmkit.training.collate import tokens_seen

        s, encoded = self.settings, self.encoded
        seen = tokens_seen(run.trainer, encoded, run.steps, s.batch_size * s.grad_accum)
        return TrainResult(
            out=run.out, steps=run.steps, train_rows=len(encoded), removed_fewshot=len(run.removed),
            trainable_tokens=sum(e.num_trainable for e in encoded),
            train_loss=getattr(run.output, "training_loss", None), train_s=round(run.train_s, 2),
            tokens_per_s=round(seen / run.train_s, 2) if run.train_s > 0 else 0.0,
            trainable_params=run.trainable,
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            peak_cuda_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if torch.cuda.is_available() else None,
        )
