"""Supervised fine-tuning: LoRA on a full-precision base, 4-bit QLoRA, or full fine-tuning.

In: `TrainSettings` (model, data, few-shot pool, prompt style, LoRA and optimiser options).
Out: an output folder with the adapter (`adapter_model.safetensors`, `adapter_config.json`), the
tokenizer, `manifest.json`, `trainer_log.jsonl`, `loss_curve.png`, and `checkpoints/` when
`--save-steps` asks for them. One path for `train sft` and `train qlora`: transformers' Trainer on a
PEFT model, with our collator (response-only labels from `training.masking`).

Leakage: the few-shot pool is removed from the training rows by content hash before anything is
tokenised, and the removed hashes are recorded in the manifest.
Speed: batches are grouped by length (less padding than random batches), padded only to the
longest row of each batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.training.lora_init import METHODS as INIT_METHODS
from gsmkit.training.lora_init import calibration_sample, checkpoint_files, initialise_adapter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_POOL = Path("fewshot_pool.jsonl")  # what `gsmkit fewshot` writes by default

# Presets from our users' course project; flags (and --config) override them.
PRESETS: dict[str, dict[str, Any]] = {
    "simple": {"epochs": 1.0, "k": 3, "eval_max_new_tokens": 512},
    "medium": {"epochs": 1.0, "k": 5, "sweep_last": 3},
    "strong": {"epochs": 2.0, "k": 8},
}


@dataclass(frozen=True)
class TrainSettings:
    model: str
    out: Path
    mode: str = "sft"  # "sft" or "qlora"
    data: str = "openai/gsm8k"
    split: str = "train"
    traces: str | None = None  # refined traces file, used by the `strong` preset instead of --data
    fewshot_pool: Path | None = None
    k: int = 5
    style: str = "auto"
    system_prompt: str | None = None
    full: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # "default" (B = 0); qlora only: "loftq" (B @ A = rank-r SVD of the nf4 error) or "cloq" (B @ A = the
    # rank-r correction that minimises the layers' output error on calibration rows), see training.lora_init
    init_lora: str = "default"
    calibration_rows: int = 128  # cloq: training rows (a seeded sample) whose activations weight the error
    target_modules: tuple[str, ...] | None = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    max_samples: int | None = None
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | None = None  # default: on for qlora, off otherwise
    group_by_length: bool = True
    logging_steps: int = 5
    save_steps: int = 0
    save_total_limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    eval_limit: int = 0
    eval_data: str | None = None  # defaults to --data's test split
    eval_max_new_tokens: int = 256
    sweep_last: int = 0
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("sft", "qlora"):
            raise ConfigError(f"unknown training mode '{self.mode}'")
        if self.mode == "qlora" and self.full:
            raise ConfigError("--full fine-tunes every weight and cannot be combined with 4-bit QLoRA",
                              hint="use `gsmkit train sft --full`")
        if self.init_lora not in ("default", *INIT_METHODS):
            raise ConfigError(f"--init-lora must be default, {' or '.join(INIT_METHODS)}, got '{self.init_lora}'")
        if self.init_lora != "default" and self.mode != "qlora":
            raise ConfigError(f"--init-lora {self.init_lora} corrects the 4-bit quantization error and needs "
                              "`train qlora`", hint="drop --init-lora, or train with `gsmkit train qlora`")
        if self.calibration_rows < 1:
            raise ConfigError(f"--calibration-rows must be >= 1, got {self.calibration_rows}")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ConfigError("--lora-r must be >= 1 and --lora-alpha > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("--batch-size and --grad-accum must be >= 1")
        if self.max_length < 8:
            raise ConfigError(f"--max-length {self.max_length} is too short", hint="use 512 or more for GSM8K")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ConfigError("nothing to train: give --max-steps > 0 or --epochs > 0")
        if self.learning_rate <= 0:
            raise ConfigError("--learning-rate must be > 0")
        if self.sweep_last and not self.save_steps:
            raise ConfigError("--sweep-last evaluates saved checkpoints and needs --save-steps",
                              hint="add --save-steps N (for example a tenth of the run's steps)")
        if self.sweep_last and not self.eval_limit:
            raise ConfigError("--sweep-last needs --eval-limit N problems to evaluate each checkpoint on")
        if self.eval_limit and self.eval_data is None and Path(self.data).suffix in (".jsonl", ".json", ".parquet"):
            raise ConfigError("--eval-limit would evaluate on the training file itself",
                              hint="name held-out problems with --eval-data (a GSM8K folder or test file)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if self.k < 0:
            raise ConfigError(f"--k must be >= 0, got {self.k}")

    @property
    def train_source(self) -> str:
        """Where training rows come from: a traces file when given (the `strong` recipe), else --data."""
        return self.traces or self.data


_FLOATS = {"learning_rate", "warmup_ratio", "epochs", "lora_dropout"}
_INTS = {"k", "calibration_rows", "lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "max_length",
         "max_samples", "seed", "logging_steps", "save_steps", "save_total_limit", "eval_limit", "eval_max_new_tokens", "sweep_last"}


def _coerce(name: str, value: Any, where: str) -> Any:
    """YAML reads `2e-4` as a string (YAML 1.1 needs `2.0e-4`); numbers are what the user meant."""
    try:
        if name in _FLOATS and isinstance(value, str | int) and not isinstance(value, bool):
            return float(value)
        if name in _INTS and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ConfigError(f"{where}: key '{name}' must be a number, got {value!r}") from None
    return value


def resolve_settings(flags: dict[str, Any], config_file: Path | None = None, preset: str | None = None) -> TrainSettings:
    """defaults < preset < --config file < flags given on the command line (None means not given).

    A `preset:` key in the config file applies that preset under the file's other keys; --preset wins."""
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    values: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    if config_file is not None:
        loaded = _read_config(config_file)
    preset = preset or loaded.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'", hint=f"choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in names or name in ("model", "out", "mode"):
            raise ConfigError(f"{config_file}: unknown key '{key}'",
                              hint="keys are the long option names, e.g. learning_rate, lora_r, max_steps")
        if name == "preset":
            continue
        values[name] = _coerce(name, tuple(value) if isinstance(value, list) else value, str(config_file))
    for key, value in flags.items():
        if value is not None:
            values[key] = value
    for key in ("out", "fewshot_pool"):
        if isinstance(values.get(key), str):
            values[key] = Path(values[key])
    try:
        return TrainSettings(**values)
    except TypeError as err:
        raise ConfigError(f"invalid settings: {err}") from None


def _read_config(config_file: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{config_file}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{config_file}: expected a mapping of option names to values")
    return loaded


# --- data ------------------------------------------------------------------------------------------


def resolve_pool(settings: TrainSettings):
    """The few-shot pool to keep out of training: --fewshot-pool, else ./fewshot_pool.jsonl, else the
    default pool drawn from GSM8K train exactly as `gsmkit fewshot` would (seed 42, 8 examples): from
    --data when it is a GSM8K source (Hub id, folder, .json/.parquet), else from openai/gsm8k."""
    from gsmkit.data.fewshot import DEFAULT_POOL_SIZE, DEFAULT_SEED, draw_pool, read_pool

    if settings.fewshot_pool is not None:
        return read_pool(settings.fewshot_pool), str(settings.fewshot_pool)
    if DEFAULT_POOL.exists():
        return read_pool(DEFAULT_POOL), str(DEFAULT_POOL)
    from gsmkit.data.gsm8k import load_gsm8k

    # A .jsonl training file is read as training rows (traces, prompt/response ...): drawing the pool from
    # it would make a pool no evaluation uses, and remove a quarter of a small traces file. The draw
    # depends only on content, so GSM8K train from the Hub gives the same pool as any local copy.
    jsonl = str(settings.data).lower().endswith(".jsonl")
    source = settings.data if settings.train_source == settings.data and not jsonl else "openai/gsm8k"
    try:
        problems = load_gsm8k(source, "train")
    except DataError as err:
        raise DataError(f"no few-shot pool to exclude from training ({err.message})",
                        hint="pass --fewshot-pool FILE (made by `gsmkit fewshot`)") from None
    return draw_pool(problems, DEFAULT_POOL_SIZE, DEFAULT_SEED), f"default pool of {source} (n=8, seed=42)"


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
            raise ConfigError(f"--target-modules {', '.join(missing)} not found in the model",
                              hint=f"present: {', '.join(sorted(present)) or 'none of ' + ', '.join(LORA_TARGETS)}")
    if not present:
        raise ConfigError("no LoRA target modules found (none of q/k/v/o/gate/up/down_proj)",
                          hint="name them with --target-modules")
    return sorted(present, key=lambda n: (LORA_TARGETS + (n,)).index(n))


class PadCollator:
    """Right-pads input_ids/labels to the longest row of the batch (labels with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


# --- the run ---------------------------------------------------------------------------------------


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


def prepare_examples(settings: TrainSettings, tokenizer) -> tuple[list, list[str], str, str]:
    """Load, de-leak and encode the training rows: (encoded, removed hashes, pool origin, style)."""
    from gsmkit.data.fewshot import pool_hashes
    from gsmkit.prompts import resolve_style
    from gsmkit.training.data import load_train_examples, remove_fewshot
    from gsmkit.training.masking import encode_example

    examples = load_train_examples(settings.train_source, settings.split)
    pool, pool_origin = resolve_pool(settings)
    examples, removed = remove_fewshot(examples, pool_hashes(pool), [ex.question for ex in pool])
    if settings.max_samples is not None:
        examples = examples[: settings.max_samples]
    if not examples:
        raise DataError(f"{settings.train_source}: no training rows left after removing the few-shot pool")
    style = resolve_style(settings.style, tokenizer)
    encoded = [encode_example(ex, tokenizer, style, settings.max_length, settings.system_prompt) for ex in examples]
    return encoded, removed, pool_origin, style


def checkpointing_arguments(params: Any, gc: bool) -> dict[str, Any]:
    """Activation checkpointing options under the names this transformers takes.

    transformers >= 5.x renamed `gradient_checkpointing*` to `activation_checkpointing*` and warns on the old
    names; older versions only know the old ones. `params`: the TrainingArguments (or subclass) signature.
    """
    prefix = "activation" if "activation_checkpointing" in params else "gradient"
    return {f"{prefix}_checkpointing": gc, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if gc else None}


def _training_arguments(settings: TrainSettings, loaded, checkpoints: Path, gc: bool):
    import torch
    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    kwargs: dict[str, Any] = {
        "output_dir": str(checkpoints),
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler,
        "warmup_ratio": settings.warmup_ratio,
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps,
        "logging_steps": settings.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if settings.save_steps else "no",
        "save_steps": settings.save_steps or 500,
        "save_total_limit": settings.save_total_limit,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "report_to": [],
        "remove_unused_columns": False,
        **checkpointing_arguments(params, gc),
        "bf16": loaded.dtype == torch.bfloat16 and loaded.device.type == "cuda",
        "fp16": loaded.dtype == torch.float16,
        "use_cpu": loaded.device.type == "cpu",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # real (non-padding) tokens, the numerator of the tokens/s we report
        "include_num_input_tokens_seen": "non_padding",
    }
    if settings.group_by_length:
        if "train_sampling_strategy" in params:  # transformers >= 5
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    if "warmup_ratio" not in params:  # transformers >= 5: a float warmup_steps in [0, 1) is a ratio
        kwargs["warmup_steps"] = kwargs.pop("warmup_ratio")
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in params})


def _callbacks(log_path: Path, on_log: Callable[[dict], None] | None, on_step: Callable[[int, int], None] | None):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every Trainer log (loss, lr, grad norm, step) to trainer_log.jsonl as it happens."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if on_log:
                on_log(row)

        def on_step_end(self, args, state, control, **kw):
            if on_step and state.is_world_process_zero:
                on_step(state.global_step, state.max_steps)

    return [JsonlLog()]


def plot_loss(log_path: Path, png: Path) -> None:
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def check_run_folder(out: Path, finished: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to train into a finished or interrupted run unless told what to do; returns the
    checkpoint to resume from (with `resume`)."""
    checkpoints = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    if finished.exists() and not overwrite:
        raise ConfigError(f"{out}: already holds a finished run", hint="pass --overwrite, or choose another --out")
    if resume:
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is None:
            raise ConfigError(f"--resume: no checkpoint in {checkpoints}",
                              hint="checkpoints are written only with --save-steps N")
        return resume_from
    if checkpoints.exists() and any(checkpoints.glob("checkpoint-*")) and not overwrite:
        raise ConfigError(f"{out}: holds checkpoints of an interrupted run",
                          hint="pass --resume to continue it, or --overwrite to start again")
    return None


def prepare_log(log_path: Path, resume_from: Path | None) -> None:
    """A resumed run keeps the log rows up to its checkpoint (it logs the later steps again); a new run
    starts an empty log."""
    if resume_from is not None and log_path.exists():
        step = int(resume_from.name.split("-")[1])
        kept = [x for x in log_path.read_text().splitlines() if x.strip() and json.loads(x).get("step", 0) <= step]
        log_path.write_text("".join(k + "\n" for k in kept))
    elif log_path.exists():
        log_path.unlink()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = []
    for p in checkpoints.glob("checkpoint-*"):
        try:
            found.append((int(p.name.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return max(found)[1] if found else None


def train(
    settings: TrainSettings,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_init: Callable[[str, int, int], None] | None = None,
) -> TrainResult:
    """Run one fine-tuning job end to end and return its summary.

    Callbacks: `on_start(total_steps)`, `on_step(step, total)`, `on_log(trainer log row)`, and
    `on_init(stage, done, total)` while `--init-lora` calibrates and initialises the adapter."""
    out = settings.out
    checkpoints = out / "checkpoints"
    finished = out / "adapter_config.json" if not settings.full else out / "config.json"
    resume_from = check_run_folder(out, finished, settings.resume, settings.overwrite)

    from gsmkit.modeling import ModelSpec, load_model, load_tokenizer

    tokenizer = load_tokenizer(settings.model)
    encoded, removed, pool_origin, style = prepare_examples(settings, tokenizer)
    if settings.init_lora != "default":
        checkpoint_files(settings.model)  # the weights the initialisation reads: a .gguf fails before the model loads

    import torch
    from transformers import Trainer, set_seed

    set_seed(settings.seed)
    spec = ModelSpec(model=settings.model, dtype=settings.dtype, device=settings.device,
                     load_in_4bit=settings.mode == "qlora")
    loaded = load_model(spec, for_training=True)
    model = loaded.model
    gc = settings.gradient_checkpointing if settings.gradient_checkpointing is not None else settings.mode == "qlora"
    targets: list[str] = []
    lora_init: dict[str, Any] | None = None
    if settings.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if settings.mode == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gc:
            model.enable_input_require_grads()
        targets = find_lora_targets(model, settings.target_modules)
        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if settings.init_lora != "default" and resume_from is None:  # a resumed run restores its adapter
            lora_init = initialise_lora(model, settings, encoded, tokenizer.pad_token_id, on_init)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from datasets import Dataset

    rows = [{"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids)} for e in encoded]
    dataset = Dataset.from_list(rows)
    out.mkdir(parents=True, exist_ok=True)
    if settings.overwrite:
        shutil.rmtree(checkpoints, ignore_errors=True)
        for name in ("trainer_log.jsonl", "loss_curve.png", "manifest.json"):
            (out / name).unlink(missing_ok=True)
    log_path = out / "trainer_log.jsonl"
    prepare_log(log_path, resume_from)

    args = _training_arguments(settings, loaded, checkpoints, gc)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id),
                      callbacks=_callbacks(log_path, on_log, on_step))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs go to trainer_log.jsonl and the progress bar; stdout stays for --json
    total_steps = trainer.args.max_steps if trainer.args.max_steps > 0 else math.ceil(
        len(dataset) / (settings.batch_size * settings.grad_accum)) * math.ceil(settings.epochs)
    if on_start:
        on_start(total_steps)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step
    trainable_tokens = sum(e.num_trainable for e in encoded)
    tokens_seen = _tokens_seen(trainer, encoded, steps, settings)

    if trainer.is_world_process_zero():
        _save_final(trainer, tokenizer, out, settings.full)
        from gsmkit.data.fewshot import write_pool

        # The pool this run kept out of training, beside the adapter: evaluation takes its exemplars from it.
        write_pool(out / "fewshot_pool.jsonl", resolve_pool(settings)[0])
        from gsmkit.jsonl import write_json
        from gsmkit.manifest import build_manifest

        manifest = build_manifest(
            f"train {settings.mode}", settings,
            inputs={"data": _data_file(settings.train_source, settings.split),
                    "fewshot_pool": settings.fewshot_pool or (DEFAULT_POOL if DEFAULT_POOL.exists() else None)},
            seeds={"seed": settings.seed},
            extra={"resolved": {"style": style, "k": settings.k, "lora_targets": targets,
                                "gradient_checkpointing": gc, "dtype": str(loaded.dtype), "device": str(loaded.device),
                                "fewshot_pool": pool_origin, "removed_fewshot": len(removed),
                                "removed_fewshot_hashes": sorted(removed), "train_rows": len(encoded),
                                "truncated_rows": sum(e.truncated for e in encoded),
                                "trainable_params": trainable, "steps": steps, "lora_init": lora_init,
                                "resumed_from": str(resume_from) if resume_from else None}},
        )
        write_json(out / "manifest.json", manifest)
        plot_loss(log_path, out / "loss_curve.png")
    result = TrainResult(
        out=out, steps=steps, train_rows=len(encoded), removed_fewshot=len(removed),
        trainable_tokens=trainable_tokens, train_loss=getattr(output, "training_loss", None), train_s=round(train_s, 2),
        tokens_per_s=round(tokens_seen / train_s, 2) if train_s > 0 else 0.0, trainable_params=trainable,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        peak_cuda_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
    )
    if settings.eval_limit and trainer.is_world_process_zero():
        result.eval, result.sweep = _evaluate_after(settings, style, checkpoints, torch)
    return result


def initialise_lora(peft_model: Any, settings: TrainSettings, encoded: list, pad_id: int,
                    on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The run's `--init-lora` on a fresh 4-bit PEFT model, calibrated (cloq) on the run's seeded sample of
    its encoded training rows; returns the statistics the manifest records as `lora_init`."""
    calibration = calibration_sample(encoded, settings.calibration_rows, settings.seed)
    return initialise_adapter(peft_model, settings.model, settings.init_lora,
                              calibration if settings.init_lora == "cloq" else (), pad_id=pad_id,
                              on_progress=on_progress)


def _tokens_seen(trainer, encoded, steps: int, settings: TrainSettings) -> int:
    """Real (non-padding) tokens processed, from the Trainer's own count when it keeps one."""
    n = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
    if n:
        return int(n)
    per_step = settings.batch_size * settings.grad_accum
    avg = sum(len(e.input_ids) for e in encoded) / max(1, len(encoded))
    return int(steps * per_step * avg)


def _save_final(trainer, tokenizer, out: Path, full: bool) -> None:
    """Adapter (or full model) and tokenizer, written to a temporary folder then moved into place."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    tmp.rmdir()


def _data_file(source: str, split: str):
    from gsmkit.data.gsm8k import resolve_split_files

    try:
        files = resolve_split_files(source, split)
    except DataError:
        return source
    return files[0] if files else source


def _evaluate_after(settings: TrainSettings, style: str, checkpoints: Path, torch) -> tuple[dict, list[dict]]:
    """`eval gsm8k` with the run's k and style on the final adapter, and on the last M checkpoints."""
    from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
    from gsmkit.modeling import ModelSpec

    pool_path = settings.out / "fewshot_pool.jsonl"  # written by train(): the pool kept out of training
    k = settings.k
    eval_data = settings.eval_data or settings.data

    def run(adapter: Path, out: Path) -> dict:
        es = EvalSettings(model=ModelSpec(settings.model, adapter=str(adapter), dtype=settings.dtype,
                                          device=settings.device, load_in_4bit=settings.mode == "qlora"),
                          out=out, data=eval_data, split="test", limit=settings.eval_limit, pool=pool_path, k=k,
                          style=style, system_prompt=settings.system_prompt,
                          max_new_tokens=settings.eval_max_new_tokens, overwrite=True)
        return evaluate_gsm8k(es).to_dict()

    final = run(settings.out, settings.out / "eval")
    sweep = []
    if settings.sweep_last:
        ckpts = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-settings.sweep_last:]
        for c in ckpts:
            m = run(c, settings.out / "sweep" / c.name)
            sweep.append({"checkpoint": c.name, "accuracy_strict": m["accuracy_strict"],
                          "accuracy_flexible": m["accuracy_flexible"]})
        if sweep:
            best = max(sweep, key=lambda r: (r["accuracy_strict"], r["accuracy_flexible"]))
            (settings.out / "sweep.json").write_text(json.dumps({"checkpoints": sweep, "best": best}, indent=2) + "\n")
    return final, sweep
