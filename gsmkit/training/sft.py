"""Supervised fine-tuning, the recipe: LoRA on a full-precision base, 4-bit QLoRA, or full fine-tuning.

In: `TrainSettings` (`training.config`: model, data, few-shot pool, prompt style, LoRA and optimiser
options). Out: an output folder with the adapter (`adapter_model.safetensors`, `adapter_config.json`),
the tokenizer, `manifest.json`, `trainer_log.jsonl`, `loss_curve.png`, `fewshot_pool.jsonl` (the pool
kept out of training) and `checkpoints/` when `--save-steps` asks for them, published whole
(`training.outputs`). One path for `train sft` and `train qlora`: transformers' Trainer on a PEFT model,
with our collator (response-only labels from `training.masking`).

Leakage: the few-shot pool is removed from the training rows by content hash before anything is
tokenised, and the removed hashes are recorded in the manifest.
Speed: batches are grouped by length (less padding than random batches), padded only to the
longest row of each batch.
The evaluation after training (`--eval-limit`, `--sweep-last`) is `gsmkit.recipes.train_and_evaluate`:
training does not import evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.training.config import TrainSettings
from gsmkit.training.data import KeptOutPool, resolve_pool


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
    """Run one fine-tuning job end to end and return its summary (without the evaluation after it).

    Callbacks: `on_start(total_steps)`, `on_step(step, total)`, `on_log(trainer log row)`, and
    `on_init(stage, done, total)` while `--init-lora` calibrates and initialises the adapter."""
    from gsmkit.training.outputs import check_run_folder, finished_marker, start_run, training_fingerprint

    out = settings.out
    checkpoints = out / "checkpoints"
    fingerprint = training_fingerprint(settings)
    resume_from = check_run_folder(out, finished_marker(out, settings.full), settings.resume,
                                   settings.overwrite, fingerprint,
                                   inputs=(settings.model, settings.train_source, settings.pool))

    from gsmkit.modeling import load_model, load_tokenizer

    rows = training_rows(settings)  # the data and pool are checked before anything loads
    tokenizer = load_tokenizer(settings.model)
    encoded, removed, pool_origin, style = prepare_examples(settings, tokenizer, rows)
    if settings.init_lora != "default":
        from gsmkit.training.lora_init import checkpoint_files

        # the weights the initialisation reads: a .gguf fails before the model loads
        checkpoint_files(settings.model)

    import torch
    from transformers import Trainer, set_seed

    from gsmkit.training.lora import add_lora, initialise_lora, lora_modules, lora_ranks, prepare_base
    from gsmkit.training.memory import return_freed_memory

    set_seed(settings.seed)
    loaded = load_model(settings.model_spec(), for_training=True)
    mmap_threshold = return_freed_memory(loaded.device)
    model = loaded.model
    targets: list[str] = []
    wrapped: list[str] = []
    lora_init: dict[str, Any] | None = None
    ranks: dict[str, Any] | None = None
    if settings.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = prepare_base(model, settings.load_in_4bit, settings.checkpointing)
        model, targets = add_lora(model, settings)
        wrapped = lora_modules(model)
        ranks = lora_ranks(model, settings)
        if settings.init_lora != "default" and resume_from is None:  # a resumed run restores its adapter
            lora_init = initialise_lora(model, settings, encoded, tokenizer.pad_token_id, on_init)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from datasets import Dataset

    from gsmkit.training.arguments import trainer_arguments
    from gsmkit.training.callbacks import log_callbacks
    from gsmkit.training.collate import PadCollator, tokens_seen

    rows = [{"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids)} for e in encoded]
    dataset = Dataset.from_list(rows)
    log_path = start_run(out, resume_from, settings.overwrite, fingerprint)
    from transformers import TrainingArguments

    args = trainer_arguments(
        TrainingArguments, settings, loaded, checkpoints, group_by_length=settings.group_by_length,
        per_device_train_batch_size=settings.batch_size, num_train_epochs=settings.epochs,
        logging_first_step=True, save_total_limit=settings.save_total_limit,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",  # real tokens, the numerator of the tokens/s we report
    )
    from gsmkit.training.loss import response_loss

    loss = response_loss(model, settings.loss_chunk)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=PadCollator(tokenizer.pad_token_id), compute_loss_func=loss,
                      callbacks=log_callbacks(log_path, on_log, on_step))
    from transformers.trainer_callback import PrinterCallback

    # logs go to trainer_log.jsonl and the progress bar; stdout stays for --json
    trainer.remove_callback(PrinterCallback)
    total_steps = trainer.args.max_steps if trainer.args.max_steps > 0 else math.ceil(
        len(dataset) / (settings.batch_size * settings.grad_accum)) * math.ceil(settings.epochs)
    if on_start:
        on_start(total_steps)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step

    from gsmkit.training.outputs import publish_on_main

    resolved = {"style": style, "k": settings.k, "lora_targets": targets,
                "lora_module_count": len(wrapped),
                "gradient_checkpointing": settings.checkpointing, "dtype": str(loaded.dtype),
                "loss": f"response positions, chunks of {loss.chunk}" if loss else "the model's own",
                "malloc_mmap_threshold": mmap_threshold,
                "device": str(loaded.device), "processes": trainer.accelerator.num_processes,
                "fewshot_pool": pool_origin, "removed_fewshot": len(removed),
                "removed_fewshot_hashes": sorted(removed), "train_rows": len(encoded),
                "truncated_rows": sum(e.truncated for e in encoded), "trainable_params": trainable,
                "steps": steps, "lora_init": lora_init, "lora_ranks": ranks,
                "resumed_from": str(resume_from) if resume_from else None}
    publish_on_main(trainer, lambda weights: _publish(settings, trainer, tokenizer, log_path, resolved,
                                                      weights))
    seen = tokens_seen(trainer, encoded, steps, settings.batch_size * settings.grad_accum)
    return TrainResult(
        out=out, steps=steps, train_rows=len(encoded), removed_fewshot=len(removed),
        trainable_tokens=sum(e.num_trainable for e in encoded),
        train_loss=getattr(output, "training_loss", None), train_s=round(train_s, 2),
        tokens_per_s=round(seen / train_s, 2) if train_s > 0 else 0.0, trainable_params=trainable,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        peak_cuda_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available() else None,
    )


def _publish(settings: TrainSettings, trainer: Any, tokenizer: Any, log_path: Path, resolved: dict,
             weights: dict[str, Any]) -> None:
    """The finished run, swapped into --out whole (on the main process): the adapter (or model) from the
    gathered `weights`, the tokenizer, the pool kept out of training (evaluation takes its exemplars from
    it), the manifest and the loss curve."""
    from gsmkit.data.gsm8k import source_file
    from gsmkit.manifest import build_manifest
    from gsmkit.training.callbacks import read_log
    from gsmkit.training.outputs import publish_trained
    from gsmkit.training.plots import plot_loss

    pool = kept_out_pool(settings)
    manifest = build_manifest(
        f"train {settings.mode}", settings,
        inputs={"data": source_file(settings.train_source, settings.split), "fewshot_pool": pool.path,
                "rank_pattern": settings.rank_pattern},
        seeds={"seed": settings.seed}, extra={"resolved": resolved},
    )

    publish_trained(settings.out, trainer, tokenizer, pool.examples, manifest, "loss_curve.png",
                    lambda p: plot_loss(read_log(log_path), p), weights)
