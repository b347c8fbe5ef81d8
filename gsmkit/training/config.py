"""Training settings: `TrainSettings` (train sft | qlora), the base-model group every trainer shares, the
presets and the `--config` YAML file.

In: the flags given on the command line, a preset name and a YAML file of the same keys.
Out: one checked `TrainSettings` (`resolve_settings`), each value taken from, in rising order: the
field's default, the preset, the file, the flags. Each field's default, bounds and help are declared
once, here or in the option groups of `gsmkit.settings`; the command line (`cli/train.py`), the
config-file keys and their type coercion are all read from the fields.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.fields import check_fields, field_of, field_types, flag_of, setting
from gsmkit.modeling import ModelSpec
from gsmkit.settings import LoraOptions, PromptOptions, RunOptions, TrainingOptions, override
from gsmkit.training.lora import read_rank_pattern
from gsmkit.training.lora_init import METHODS as INIT_METHODS

TRAIN_POOL_HELP = "Few-shot pool to keep out of training."
TRAIN_POOL_DEFAULT = "./fewshot_pool.jsonl, else the default pool drawn from GSM8K train"

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


@dataclass(frozen=True, kw_only=True)
class BaseModelOptions:
    """How the base model of a training run loads, flat on the settings (as --config keys and manifests
    read them). The settings class declares `model` and `load_in_4bit`; `model_spec()` is the one place a
    training run (and the evaluation after it) builds its `ModelSpec`."""

    dtype: str = override(ModelSpec, "dtype")
    device: str = override(ModelSpec, "device")

    def model_spec(self, adapter: str | Path | None = None) -> ModelSpec:
        """The base model (4-bit or not, as the run trains it), with `adapter` on top when given."""
        run: Any = self  # the settings class gives `model` and `load_in_4bit`
        return ModelSpec(model=run.model, adapter=str(adapter) if adapter is not None else None,
                         dtype=self.dtype, device=self.device, load_in_4bit=run.load_in_4bit)

    @property
    def checkpointing(self) -> bool:
        """--gradient-checkpointing as used: on with a 4-bit base unless the flag says otherwise."""
        run: Any = self  # TrainingOptions gives `gradient_checkpointing`
        return run.gradient_checkpointing if run.gradient_checkpointing is not None else run.load_in_4bit


@dataclass(frozen=True, kw_only=True)
class TrainPromptOptions(PromptOptions):
    """PromptOptions as train sft|qlora use them: the pool is the one kept out of training (and the one the
    evaluation after training draws from), k the exemplars of that evaluation."""

    pool: Path | None = override(PromptOptions, "pool", help=TRAIN_POOL_HELP, show_default=TRAIN_POOL_DEFAULT)
    k: int = override(PromptOptions, "k", 5,
                      help="Exemplars the run's evaluation uses (recorded in the manifest).")


@dataclass(frozen=True, kw_only=True)
class TrainSettings(BaseModelOptions, TrainPromptOptions, LoraOptions, TrainingOptions, RunOptions):
    model: str = override(ModelSpec, "model")
    out: Path  # the command's own option: its default depends on the command
    mode: str = setting("sft", "sft (LoRA or --full on a full-precision base) or qlora (LoRA on 4-bit).",
                        choices=("sft", "qlora"), cli=False)
    data: str = setting("openai/gsm8k", "Training data: GSM8K Hub id or local file/folder, or a JSONL of "
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
    group_by_length: bool = setting(True, "Batch rows of similar length together (less padding).", cli=False)
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
        check_fields(self)
        self.check_thinking()
        if self.mode == "qlora" and self.full:
            raise ConfigError("--full fine-tunes every weight and cannot be combined with 4-bit QLoRA",
                              hint="use `gsmkit train sft --full`")
        if self.rank_pattern is not None:
            if self.full:
                raise ConfigError("--rank-pattern sets LoRA ranks and cannot be combined with --full",
                                  hint="drop --full to train a LoRA adapter with those ranks")
            read_rank_pattern(self.rank_pattern)  # a bad file (DataError) fails here, before any model loads
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
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        self.model_spec()  # --dtype and --device are checked where they are defined, before any model loads

    @property
    def train_source(self) -> str:
        """Where training rows come from: a traces file when given (the `strong` recipe), else --data."""
        return self.traces or self.data

    @property
    def load_in_4bit(self) -> bool:
        return self.mode == "qlora"


def preset_help() -> str:
    """--preset's help, from PRESETS itself."""
    def describe(name: str) -> str:
        values = ", ".join(f"{flag_of(field_of(TrainSettings, k))} {v:g}" if isinstance(v, float)
                           else f"{flag_of(field_of(TrainSettings, k))} {v}"
                           for k, v in PRESETS[name].items())
        return f"{name} ({values}{'; ' + PRESET_NOTES[name] if name in PRESET_NOTES else ''})"

    return " | ".join(describe(n) for n in PRESETS) + ". --config and flags override them."


# ---- defaults < preset < --config < flags ----------------------------------------------------------------


NOT_IN_CONFIG = ("model", "out", "mode")  # the command line names these


def config_keys(cls: type = TrainSettings) -> dict[str, str]:
    """Config-file key -> field name: each field's name and its option names (`lr`, `fewshot_pool`)."""
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_IN_CONFIG:
            continue
        keys[f.name] = f.name
        if f.metadata:
            for flag in (flag_of(f).split("/")[0], *f.metadata.get("aliases", ()),
                         *f.metadata.get("hidden_aliases", ())):
                if flag.startswith("--"):
                    keys.setdefault(flag[2:].replace("-", "_"), f.name)
    return keys


def _coerce(name: str, value: Any, field_type: Any, where: str) -> Any:
    """A YAML value as the field's type: YAML 1.1 reads `2e-4` as a string, and a list is a tuple here."""
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    base = args[0] if type(None) in typing.get_args(field_type) and len(args) == 1 else field_type
    if value is None or isinstance(value, bool):
        return value
    try:
        if base is float and isinstance(value, str | int):
            return float(value)
        if base is int and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ConfigError(f"{where}: key '{name}' must be a number, got {value!r}") from None
    if base is Path and isinstance(value, str):
        return Path(value)
    if typing.get_origin(base) is tuple and isinstance(value, list | tuple | str):
        return (value,) if isinstance(value, str) else tuple(value)
    return value


def resolve_settings(flags: dict[str, Any], config_file: Path | None = None,
                     preset: str | None = None) -> TrainSettings:
    """defaults < preset < --config file < flags given on the command line (None means not given).

    A `preset:` key in the config file applies that preset under the file's other keys; --preset wins.
    An error caused by a value the preset set says so."""
    types = field_types(TrainSettings)
    keys = config_keys()
    from_file: dict[str, Any] = {}
    loaded = _read_config(config_file) if config_file is not None else {}
    for key, value in loaded.items():
        name = keys.get(str(key).replace("-", "_"))
        if name is None:
            raise ConfigError(f"{config_file}: unknown key '{key}'",
                              hint="keys are the long option names, e.g. learning_rate, lora_r, max_steps")
        from_file[name] = _coerce(name, value, types[name], str(config_file))
    preset = preset or from_file.pop("preset", None)
    from_file.pop("preset", None)
    from_preset: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'", hint=f"choose one of {', '.join(PRESETS)}")
        from_preset = dict(PRESETS[preset])
    given = {k: _coerce(k, v, types[k], "flags") if k in types else v
             for k, v in flags.items() if v is not None}
    values = {**from_preset, **from_file, **given, "preset": preset}
    try:
        return TrainSettings(**values)
    except ConfigError as err:
        kept = {k: v for k, v in from_preset.items() if k not in from_file and k not in given}
        raise _blame_preset(err, preset, kept) from None
    except TypeError as err:
        raise ConfigError(f"invalid settings: {err}") from None


def _blame_preset(err: ConfigError, preset: str | None, kept: dict[str, Any]) -> ConfigError:
    """The error, saying which of the preset's values it is about (the user never typed those flags)."""
    named = []
    for name, value in kept.items():
        flag = flag_of(field_of(TrainSettings, name))
        if re.search(re.escape(flag) + r"(?![\w-])", err.message):
            named.append(f"{flag} {value}")
    if not named:
        return err
    return ConfigError(f"--preset {preset} sets {', '.join(named)}: {err.message}", hint=err.hint)


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
