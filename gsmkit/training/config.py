"""Training settings: `TrainSettings` (train sft | qlora), the option groups every trainer shares (the base
model, `--init-adapter`, `--report-to`) and the presets.

In: the values of the fields (`resolve_settings`: defaults < preset < --config file < flags, layered by
`training.config_file`). Out: one checked `TrainSettings`; `resolved()` then reads what the settings name (the
--rank-pattern file, the --init-adapter folder, the trackers installed) and returns the settings as the run
uses them (`training.run` calls it first). Each field's default, bounds and help are declared once, here or
in the option groups of `gsmkit.settings`; the command line (`cli/train.py`), the config-file keys and their
type coercion are all read from the fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gsmkit.errors import ConfigError
from gsmkit.fields import check_fields, field_of, flag_of, setting
from gsmkit.modeling import ModelSpec
from gsmkit.settings import DEFAULT_SOURCE, LoraOptions, PromptOptions, RunOptions, TrainingOptions, override
from gsmkit.training.config_file import layered_settings
from gsmkit.training.data import DEFAULT_POOL
from gsmkit.training.lora_init import METHODS as INIT_METHODS

TRAIN_POOL_HELP = "Few-shot pool to keep out of training."
TRAIN_POOL_DEFAULT = f"./{DEFAULT_POOL}, else the default pool drawn from GSM8K train"

# Presets from our users' course project; --config and flags override them. `medium` sweeps the last
# checkpoints, so it also says how often to save them and how many problems to evaluate them on.
PRESETS: dict[str, dict[str, Any]] = {
    "simple": {"epochs": 1.0, "k": 3, "eval_max_new_tokens": 512},
    "medium": {"epochs": 1.0, "k": 5, "sweep_last": 3, "save_steps": 200, "eval_limit": 200},
    "strong": {"epochs": 2.0, "k": 8},
}
PRESET_NOTES = {"strong": "meant for --traces"}
# The bar each preset's run is expected to clear (our users' course baselines): GSM8K strict accuracy and
# AILuminate safety rate, as `gsmkit report --baseline` checks them.
PRESET_BASELINES: dict[str, dict[str, float]] = {
    "simple": {"gsm8k.strict": 0.26, "safety": 0.26},
    "medium": {"gsm8k.strict": 0.31, "safety": 0.34},
    "strong": {"gsm8k.strict": 0.37, "safety": 0.42},
}
# --report-to: the trackers transformers sends a Trainer's logs to, by its names, and the package each needs
TRACKERS: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                                        "mlflow": ("mlflow",), "trackio": ("trackio",)}


@dataclass(frozen=True, kw_only=True)
class BaseModelOptions:
    """How the base model of a training run loads, flat on the settings (as --config keys and manifests
    read them). The settings class declares `model` and `load_in_4bit`; `model_spec()` is the one place a
    training run (and the evaluation after it) builds its `ModelSpec`, and `check_run()` the checks every
    trainer's settings share."""

    dtype: str = override(ModelSpec, "dtype")
    device: str = override(ModelSpec, "device")

    def model_spec(self, adapter: str | Path | None = None) -> ModelSpec:
        """The base model (4-bit or not, as the run trains it), with `adapter` on top when given."""
        run: Any = self  # the settings class gives `model` and `load_in_4bit`
        return ModelSpec(model=run.model, adapter=str(adapter) if adapter is not None else None,
                         dtype=self.dtype, device=self.device, load_in_4bit=run.load_in_4bit)

    def check_run(self) -> None:
        """What every trainer's settings check as they are built (no file is read): each field's bounds and
        choices, --thinking, --report-to, --resume against --overwrite, --dtype and --device."""
        run: Any = self  # the settings class gives the other groups
        check_fields(run)
        run.check_thinking()
        run.check_report_to()
        if run.resume and run.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        self.model_spec()  # --dtype and --device are checked where they are defined, before any model loads

    @property
    def checkpointing(self) -> bool:
        """--gradient-checkpointing as used: on with a 4-bit base unless the flag says otherwise."""
        run: Any = self  # TrainingOptions gives `gradient_checkpointing`
        return run.gradient_checkpointing if run.gradient_checkpointing is not None else run.load_in_4bit


@dataclass(frozen=True, kw_only=True)
class InitAdapterOptions:
    """A trained LoRA adapter the run continues instead of a fresh one (`training.init_adapter`)."""

    init_adapter: str | None = setting(
        None, "Continue training this LoRA adapter (a `train sft|qlora|grpo` output, e.g. the prep SFT of "
        "'prep SFT, then GRPO') instead of a fresh one: its rank, alpha and target modules train as they "
        "are (another --lora-r, --lora-alpha or --target-modules is an error), on the base it was trained "
        "on; the manifest records its sha256.",
        cli_type=Path | None, parse=str, show_default=False, path={"exists": True, "file_okay": False})

    def resolved_init_adapter(self) -> dict[str, Any]:
        """The LoRA fields as the adapter fixes them, checked against those given ({} without one)."""
        if self.init_adapter is None:
            return {}
        from gsmkit.training.init_adapter import adapter_fields

        return adapter_fields(self)


@dataclass(frozen=True, kw_only=True)
class LoggingOptions:
    """Where the Trainer's logs go besides trainer_log.jsonl."""

    report_to: tuple[str, ...] = setting(
        (), "Also send the training logs to this tracker (repeatable), as transformers names them: "
        f"{' | '.join(TRACKERS)} (into OUT/tensorboard/); none: only trainer_log.jsonl.",
        show_default="none")

    def check_report_to(self) -> None:
        for name in self.report_to:
            if name not in (*TRACKERS, "none"):
                raise ConfigError(f"unknown --report-to '{name}'",
                                  hint=f"choose one of {', '.join(TRACKERS)} or none")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError("--report-to none contradicts the other --report-to values")

    def resolved_report_to(self) -> dict[str, Any]:
        """--report-to as the trainer gets it (none: no tracker), each tracker's package found installed."""
        import importlib.util

        for name in self.report_to:
            if name != "none" and not any(importlib.util.find_spec(m) for m in TRACKERS[name]):
                raise ConfigError(f"--report-to {name} needs the {TRACKERS[name][0]} package, which is not "
                                  "installed", hint=f"pip install {TRACKERS[name][0]}")
        return {"report_to": tuple(n for n in self.report_to if n != "none")}


@dataclass(frozen=True, kw_only=True)
class TrainPromptOptions(PromptOptions):
    """PromptOptions as train sft|qlora use them: the pool is the one kept out of training (and the one the
    evaluation after training draws from), k the exemplars of that evaluation."""

    pool: Path | None = override(PromptOptions, "pool", help=TRAIN_POOL_HELP, show_default=TRAIN_POOL_DEFAULT)
    k: int = override(PromptOptions, "k", 5,
                      help="Exemplars the run's evaluation uses (recorded in the manifest).")


@dataclass(frozen=True, kw_only=True)
class TrainSettings(BaseModelOptions, TrainPromptOptions, InitAdapterOptions, LoraOptions, LoggingOptions,
                    TrainingOptions, RunOptions):
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    model: str = override(ModelSpec, "model")
    out: Path = setting(Path("runs/sft"), "Output folder for the adapter, logs and manifest.", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    mode: str = setting("sft", "sft (LoRA or --full on a full-precision base) or qlora (LoRA on 4-bit).",
                        choices=("sft", "qlora"), cli=False)
    data: str = setting(DEFAULT_SOURCE, "Training data: GSM8K Hub id or local file/folder, or a JSONL of "
                        "{question, answer}, {prompt, response} or {messages}.")
    split: str = setting("train", "Split of a GSM8K source.")
    traces: str | None = setting(None, "A traces JSONL from `gsmkit generate-traces`, used instead of "
                                 "--data.", show_default=False)
    full: bool = setting(False, "Full fine-tuning instead of LoRA (writes a full model).")
    rank_pattern: Path | None = setting(
        None, "Per-module LoRA ranks from a JSON file: an `audit-svd` audit.json, an object with a "
        "rank_pattern key, or a bare {MODULE_PATTERN: RANK} (PEFT's rule: first matching key); other "
        "modules get --lora-r. Each module's alpha/r stays --lora-alpha/--lora-r unless the file has an "
        "alpha_pattern.",
        show_default=False, path={"exists": True, "file_okay": True, "dir_okay": False})
    init_lora: str = setting(
        "default", "default (B = 0) | loftq: start the adapter at the rank-r SVD of the nf4 quantization "
        "error (LoftQ) | cloq: at the rank-r correction of that error that minimises each layer's output "
        "error on --calibration-rows training rows (CLoQ), so training starts close to the full-precision "
        "model.",
        choices=("default", *INIT_METHODS))
    calibration_rows: int = setting(128, "--init-lora cloq: training rows (a sample drawn with --seed) whose "
                                    "layer inputs weight the quantization error.", min=1)
    epochs: float = setting(1.0, "Training epochs.", min=0.0)
    batch_size: int = setting(8, "Rows per device per step.", min=1)
    max_length: int = setting(512, "Max tokens per example; the prompt is cut first.", min=8)
    max_samples: int | None = setting(None, "Use only the first N training rows.", min=1, show_default=False)
    loss_chunk: int = setting(1024, "The LM head and cross-entropy run only on the positions with a label "
                              "(the response), this many at a time, so no [batch, length, vocab] logits are "
                              "held; 0 = the model's own loss over every position's logits.", min=0)
    packing: bool = setting(
        False, "Pack each batch's rows into one sequence (positions restart at each row, attention kept "
        "inside it: the padded batch's loss and gradients) instead of padding batches of rows of similar "
        "length; a model that cannot keep packed rows apart is padded, said once. Off: on CPU the packed "
        "attention is dense and length-grouped batches are faster.",
        flag="--packing/--no-packing")
    group_by_length: bool = setting(True, "Batch rows of similar length together (less padding; not with "
                                    "--packing, whose batches are drawn at random).", cli=False)
    save_total_limit: int | None = setting(None, "Keep at most this many checkpoints.", min=1,
                                           show_default=False)
    eval_limit: int = setting(0, "After training, run `eval gsm8k` on N test problems with the run's k and "
                              "style.", min=0, show_default=False)
    eval_data: str | None = setting(None, "GSM8K source for --eval-limit (test split).",
                                    show_default="--data")
    eval_max_new_tokens: int = setting(256, "Generation budget of that evaluation.", min=1)
    sweep_last: int = setting(0, "Also evaluate the last M checkpoints and record the best.", min=0,
                              show_default=False)
    preset: str | None = setting(None, "The preset the values came from (recorded in the manifest).",
                                 choices=tuple(PRESETS), cli=False)

    def __post_init__(self) -> None:
        self.check_run()
        if self.mode == "qlora" and self.full:
            raise ConfigError("--full fine-tunes every weight and cannot be combined with 4-bit QLoRA",
                              hint="use `gsmkit train sft --full`")
        if self.rank_pattern is not None and self.full:
            raise ConfigError("--rank-pattern sets LoRA ranks and cannot be combined with --full",
                              hint="drop --full to train a LoRA adapter with those ranks")
        if self.init_adapter is not None:
            given = "--full" if self.full else "--rank-pattern" if self.rank_pattern is not None else (
                f"--init-lora {self.init_lora}" if self.init_lora != "default" else None)
            if given is not None:
                raise ConfigError(f"--init-adapter continues a trained LoRA adapter and cannot be combined "
                                  f"with {given}", hint=f"drop {given.split()[0]}: the adapter trains as is")
        if self.init_lora != "default" and self.mode != "qlora":
            raise ConfigError(f"--init-lora {self.init_lora} corrects the 4-bit quantization error and needs "
                              "`train qlora`", hint="drop --init-lora, or train with `gsmkit train qlora`")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ConfigError("nothing to train: give --max-steps > 0 or --epochs > 0")
        if self.sweep_last and not self.save_steps:
            raise ConfigError("--sweep-last evaluates saved checkpoints and needs --save-steps",
                              hint="add --save-steps N (for example a tenth of the run's steps)")
        if self.sweep_last and not self.eval_limit:
            raise ConfigError("--sweep-last needs --eval-limit N problems to evaluate each checkpoint on")
        training_file = Path(self.data).suffix in (".jsonl", ".json", ".parquet")
        if self.eval_limit and self.eval_data is None and training_file:
            raise ConfigError("--eval-limit would evaluate on the training file itself",
                              hint="name held-out problems with --eval-data (a GSM8K folder or test file)")

    @property
    def train_source(self) -> str:
        """Where training rows come from: a traces file when given (the `strong` recipe), else --data."""
        return self.traces or self.data

    @property
    def load_in_4bit(self) -> bool:
        return self.mode == "qlora"

    def resolved(self) -> TrainSettings:
        """These settings as the run uses them (a new object; idempotent; `training.run` calls it before
        anything else): the --rank-pattern file read and checked (a bad one fails here, before any model
        loads), the LoRA shape of an --init-adapter, --report-to with its trackers found installed."""
        if self.rank_pattern is not None:
            from gsmkit.training.lora import read_rank_pattern

            read_rank_pattern(self.rank_pattern)
        return dataclasses.replace(self, **self.resolved_init_adapter(), **self.resolved_report_to())


@dataclass(frozen=True, kw_only=True)
class QloraSettings(TrainSettings):
    """`train qlora`: the settings of `train sft` on a 4-bit base, with an output folder of its own."""

    out: Path = override(TrainSettings, "out", Path("runs/qlora"))
    mode: str = override(TrainSettings, "mode", "qlora")


def resolve_settings(flags: dict[str, Any], config_file: Path | None = None, preset: str | None = None,
                     cls: type | None = None) -> Any:
    """The settings of a training run (`TrainSettings` unless `cls` says another): defaults < preset <
    --config file < flags given (None means not given); `training.config_file.layered_settings`."""
    return layered_settings(cls or TrainSettings, flags, config_file, preset)


def preset_help(cls: type = TrainSettings, notes: dict[str, str] | None = None) -> str:
    """--preset's help, from the presets of `cls` itself (with their `notes`)."""
    notes = PRESET_NOTES if notes is None else notes

    def describe(name: str) -> str:
        values = ", ".join(f"{flag_of(field_of(cls, k))} {v:g}" if isinstance(v, float)
                           else f"{flag_of(field_of(cls, k))} {v}"
                           for k, v in cls.presets[name].items())
        return f"{name} ({values}{'; ' + notes[name] if name in notes else ''})"

    return " | ".join(describe(n) for n in cls.presets) + ". --config and flags override them."
