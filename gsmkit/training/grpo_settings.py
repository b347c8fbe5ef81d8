"""`GrpoSettings`: what `train grpo` takes (the model, an SFT adapter to continue, GSM8K problems or a
{question, answer} JSONL, the few-shot pool, the prompt style, reward weights, sampling, rollouts and
optimiser options), and its presets.

In: the values of the fields (`training.config.resolve_settings`: defaults < --preset < --config file <
flags, as for `train sft`). Out: one checked `GrpoSettings`; `resolved()` returns the settings as the run uses
them (`training.run` calls it first): the --init-adapter's LoRA shape, the rollout path on this machine's
device (`training.rollouts.resolve_rollouts`: once, with the real device), --report-to's trackers found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gsmkit.errors import ConfigError
from gsmkit.fields import setting
from gsmkit.modeling import ModelSpec
from gsmkit.settings import (
    DEFAULT_SOURCE,
    LoraOptions,
    PromptOptions,
    RunOptions,
    SamplingOptions,
    TrainingOptions,
    override,
)
from gsmkit.training.config import (
    TRAIN_POOL_DEFAULT,
    TRAIN_POOL_HELP,
    BaseModelOptions,
    InitAdapterOptions,
    LoggingOptions,
)
from gsmkit.training.rewards import DEFAULT_WEIGHTS, parse_weights
from gsmkit.training.rollouts import ROLLOUT_BATCH, ROLLOUTS, check_rollouts, resolve_rollouts

# Presets of `train grpo --preset`, under the names of train sft's; --config and flags override them.
# `simple` is a short run at the defaults' shape; `medium` samples groups of 8 and keeps checkpoints (so an
# interrupted run resumes); `strong` trains longer against a KL anchor (beta 0.04, DeepSeekMath's), and is
# meant to continue a prep SFT adapter (--init-adapter).
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    "simple": {"max_steps": 100, "num_generations": 4},
    "medium": {"max_steps": 250, "num_generations": 8, "save_steps": 50},
    "strong": {"max_steps": 500, "num_generations": 8, "save_steps": 100, "beta": 0.04},
}
GRPO_PRESET_NOTES = {"strong": "meant for --init-adapter"}


def reward_weight_pairs(spec: str) -> tuple[tuple[str, float], ...]:
    """--reward-weights as the field holds it: every reward's weight, the unnamed ones at their default."""
    return tuple(parse_weights(spec).items())


@dataclass(frozen=True, kw_only=True)
class GrpoPromptOptions(PromptOptions):
    """The prompts GRPO samples from: k exemplars (none by default) from the pool kept out of training."""

    pool: Path | None = override(PromptOptions, "pool", help=TRAIN_POOL_HELP, show_default=TRAIN_POOL_DEFAULT)
    k: int = override(PromptOptions, "k", 0, help="Few-shot exemplars in each prompt, from the pool.")


@dataclass(frozen=True, kw_only=True)
class GrpoLoraOptions(LoraOptions):
    lora_dropout: float = override(LoraOptions, "lora_dropout", 0.0)


@dataclass(frozen=True, kw_only=True)
class GrpoTrainingOptions(TrainingOptions):
    """GRPO's optimiser and schedule: a smaller, constant learning rate, a fixed number of steps, every
    step logged."""

    learning_rate: float = override(TrainingOptions, "learning_rate", 2e-5)
    lr_scheduler: str = override(TrainingOptions, "lr_scheduler", "constant")
    warmup_ratio: float = override(TrainingOptions, "warmup_ratio", 0.0)
    max_steps: int = override(TrainingOptions, "max_steps", 100, help="Optimizer steps.", min=1,
                              show_default=True)
    seed: int = override(TrainingOptions, "seed",
                         help="Random seed (rollouts, data order, --train-samples).")
    logging_steps: int = override(TrainingOptions, "logging_steps", 1, help="Log rewards every N steps.")


@dataclass(frozen=True, kw_only=True)
class GrpoSettings(BaseModelOptions, GrpoPromptOptions, InitAdapterOptions, GrpoLoraOptions, LoggingOptions,
                   GrpoTrainingOptions, RunOptions):
    presets: ClassVar[dict[str, dict[str, Any]]] = GRPO_PRESETS

    model: str = override(ModelSpec, "model")
    out: Path = setting(Path("runs/grpo"), "Output folder for the adapter, logs, reward curve and manifest.",
                        short="-o", path={"file_okay": False, "dir_okay": True})
    load_in_4bit: bool = override(ModelSpec, "load_in_4bit", help="QLoRA: nf4 base with double quantization.")
    data: str = setting(DEFAULT_SOURCE, "GSM8K Hub id or local file/folder, or a JSONL of {question, answer} "
                        "rows (traces too).")
    split: str = setting("train", "Split of a GSM8K source.")
    train_samples: int | None = setting(None, "Sample budget: train on N problems drawn with --seed "
                                        "(default: all).", min=1, show_default=False)
    reward_weights: tuple[tuple[str, float], ...] = setting(
        tuple(DEFAULT_WEIGHTS.items()),
        f"name=weight pairs, comma-separated; names: {', '.join(DEFAULT_WEIGHTS)}; 0 drops one.",
        cli_type=str | None, parse=reward_weight_pairs,
        show_default=",".join(f"{n}={w:g}" for n, w in DEFAULT_WEIGHTS.items()))
    num_generations: int = setting(4, "Completions sampled per prompt (the group).", min=2)
    prompts_per_step: int = setting(2, "Prompts per device per optimizer step (times --num-generations "
                                    "completions).", min=1)
    max_completion_length: int = setting(256, "Tokens per completion.", min=1)
    temperature: float = override(SamplingOptions, "temperature", 1.0, min_open=True,
                                  help="Sampling temperature of the rollouts (> 0: GRPO learns from "
                                  "differences between samples).")
    top_p: float = override(SamplingOptions, "top_p", 1.0, help="Nucleus sampling mass of the rollouts.")
    beta: float = setting(0.0, "KL coefficient (0: no reference model).", min=0.0)
    time_limit: float | None = setting(None, "Stop after the step that uses up this many minutes of "
                                       "training, and save (at most --max-steps).", min=0.0,
                                       min_open=True, show_default=False)
    rollouts: str = setting("auto", "What samples the completions: engine (gsmkit's engine: shared prefix "
                            "encoded once, a group's prompt prefilled once), trl (TRL's model.generate), "
                            "vllm (TRL's colocated vLLM, needs vllm and a GPU); auto: vllm on a GPU where "
                            "vllm is installed, else engine.", choices=ROLLOUTS)
    rollout_batch_size: int = setting(ROLLOUT_BATCH, "Most completions the engine decodes at once "
                                      "(--rollouts engine).", min=1)
    use_vllm: bool = setting(False, "Same as --rollouts vllm (kept for older scripts).")
    shared_prompt: bool = setting(
        True, "Compute each group's prompt once in the policy update (the same loss and gradients as TRL's "
        "unshared batch); models it cannot serve exactly (sliding windows) take TRL's path, said once.",
        flag="--shared-prompt/--no-shared-prompt", panel="GRPO")
    preset: str | None = setting(None, "The preset the values came from (recorded in the manifest).",
                                 choices=tuple(GRPO_PRESETS), cli=False)

    def __post_init__(self) -> None:
        self.check_run()
        if not any(w != 0 for w in self.weights.values()):
            raise ConfigError("--reward-weights: every weight is 0, so there is nothing to learn from")
        check_rollouts(self.rollouts, self.use_vllm)

    def resolved(self) -> GrpoSettings:
        """These settings as the run uses them (a new object; idempotent; `training.run` calls it before
        anything else): the --init-adapter read and checked (a damaged one fails here, before any model
        loads) and its LoRA shape, `rollouts` the path this machine takes (vllm checked to be usable),
        --report-to with its trackers found installed."""
        from gsmkit.modeling import resolve_device

        rollouts = resolve_rollouts(self.rollouts, self.use_vllm, resolve_device(self.device).type)
        if rollouts == "vllm":
            from gsmkit.generation import check_vllm_available

            check_vllm_available()
        return dataclasses.replace(self, rollouts=rollouts, **self.resolved_init_adapter(),
                                   **self.resolved_report_to())

    @property
    def weights(self) -> dict[str, float]:
        return {**DEFAULT_WEIGHTS, **dict(self.reward_weights)}

    @property
    def time_limit_s(self) -> float | None:
        return self.time_limit * 60 if self.time_limit is not None else None
