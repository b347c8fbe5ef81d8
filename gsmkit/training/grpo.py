"""The GRPO recipe: LoRA (optionally on a 4-bit base) on TRL's GRPOTrainer, rewarded by `training.rewards`.

In: `GrpoSettings` (model, optional SFT adapter to continue from, GSM8K problems or a {question,
answer} JSONL, few-shot pool, prompt style, reward weights, sampling and optimiser options).
Out: an output folder like `train sft`'s: the adapter, the tokenizer, `manifest.json`,
`trainer_log.jsonl` (TRL's logs: reward, each reward's mean, KL, completion lengths),
`reward_curve.png` and `fewshot_pool.jsonl` (the pool kept out of training), published whole
(`training.outputs`).

Prompts are the ones `eval gsm8k` sends (`grpo_prompt`: chat messages TRL renders with the same
template, or the rendered plain text), and the
few-shot pool is removed from the training problems by content hash, as in `train sft`.
Completions are sampled by `--rollouts`: gsmkit's engine through TRL's `rollout_func` (the default on a
CPU and on a GPU without vllm; `training.rollouts`), TRL's own `model.generate`, or TRL's colocated vLLM.
`--init-adapter` continues training an SFT adapter (the "prep SFT, then GRPO" recipe); its LoRA
shape is the adapter's. With beta > 0, TRL's KL reference for a PEFT model is the base with the
adapter disabled, i.e. the model before SFT as well.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.fields import check_fields, setting
from gsmkit.modeling import ModelSpec
from gsmkit.settings import (
    LoraOptions,
    PromptOptions,
    RunOptions,
    SamplingOptions,
    TrainingOptions,
    override,
)
from gsmkit.training.config import TRAIN_POOL_DEFAULT, TRAIN_POOL_HELP, BaseModelOptions
from gsmkit.training.rewards import DEFAULT_WEIGHTS, parse_weights
from gsmkit.training.rollouts import ROLLOUTS, resolve_rollouts


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
class GrpoSettings(BaseModelOptions, GrpoPromptOptions, GrpoLoraOptions, GrpoTrainingOptions, RunOptions):
    model: str = override(ModelSpec, "model")
    out: Path = setting(Path("runs/grpo"), "Output folder for the adapter, logs, reward curve and manifest.",
                        short="-o", path={"file_okay": False, "dir_okay": True})
    init_adapter: str | None = setting(
        None, "Continue training this SFT adapter (the 'prep SFT, then GRPO' recipe) instead of a fresh "
        "LoRA.",
        cli_type=Path | None, parse=str, show_default=False, path={"exists": True, "file_okay": False})
    load_in_4bit: bool = override(ModelSpec, "load_in_4bit", help="QLoRA: nf4 base with double quantization.")
    data: str = setting("openai/gsm8k", "GSM8K Hub id or local file/folder, or a JSONL of {question, answer} "
                        "rows (traces too).")
    split: str = setting("train", "Split of a GSM8K source.")
    train_samples: int | None = setting(None, "Sample budget: train on N problems drawn with --seed "
                                        "(default: all).", min=1, show_default=False)
    reward_weights: tuple[tuple[str, float], ...] = setting(
        tuple(DEFAULT_WEIGHTS.items()), "name=weight pairs, comma-separated; names: correctness, "
        "strict_format, soft_format, integer; 0 drops one.", cli_type=str | None, parse=reward_weight_pairs,
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
                            "vllm "
                            "(TRL's colocated vLLM, needs vllm and a GPU); auto: vllm on a GPU where vllm is "
                            "installed, else engine.", choices=ROLLOUTS)
    rollout_batch_size: int = setting(64, "Most completions the engine decodes at once (--rollouts engine).",
                                      min=1)
    use_vllm: bool = setting(False, "Same as --rollouts vllm (kept for older scripts).")

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_thinking()
        if not any(w != 0 for w in self.weights.values()):
            raise ConfigError("--reward-weights: every weight is 0, so there is nothing to learn from")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        resolve_rollouts(self.rollouts, self.use_vllm, "cpu")  # a contradiction fails here
        if self.init_adapter is not None and self.target_modules:
            raise ConfigError("--target-modules does not apply with --init-adapter",
                              hint="the adapter's own modules train")
        self.model_spec()  # --dtype and --device are checked where they are defined, before any model loads
        if self.init_adapter is not None:
            from gsmkit.modeling import check_adapter

            check_adapter(self.init_adapter)  # a damaged adapter fails here, before any model loads

    @property
    def weights(self) -> dict[str, float]:
        return {**DEFAULT_WEIGHTS, **dict(self.reward_weights)}

    @property
    def time_limit_s(self) -> float | None:
        return self.time_limit * 60 if self.time_limit is not None else None


@dataclass
class GrpoResult:
    out: Path
    steps: int
    train_problems: int
    removed_fewshot: int
    train_s: float
    trainable_params: int
    reward_first: float | None
    reward_last: float | None
    rewards_last: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def training_problems(settings: GrpoSettings):
    """Training problems: GSM8K, or a JSONL of {question, answer} rows (traces included), minus the pool;
    returns (rows of question and gold, removed hashes, the pool kept out)."""
    from gsmkit.answers import gold_from_solution
    from gsmkit.data.fewshot import pool_hashes
    from gsmkit.training.data import load_train_examples, remove_fewshot, resolve_pool

    examples = load_train_examples(settings.data, settings.split)
    if examples and examples[0].kind != "qa":
        raise DataError(f"{examples[0].where}: GRPO needs question/answer rows (the answer ends in '#### n')",
                        hint="use GSM8K rows or generate-traces output")
    pool = resolve_pool(settings.pool, settings.data)
    kept, removed = remove_fewshot(examples, pool_hashes(pool.examples),
                                   [ex.question for ex in pool.examples])
    rows = []
    for ex in kept:
        gold = gold_from_solution(ex.answer or "")
        if gold is None:
            raise DataError(f"{ex.where}: field 'answer' has no final '#### <number>' line",
                            hint="the correctness reward compares with that number")
        rows.append({"question": ex.question, "gold": gold})
    if settings.train_samples is not None:
        import random

        rng = random.Random(settings.seed)
        rows = rng.sample(rows, min(settings.train_samples, len(rows)))
    if not rows:
        raise DataError(f"{settings.data}: no training problems left after removing the few-shot pool")
    return rows, removed, pool


def grpo_prompt(style: str, question: str, exemplars, tokenizer, system_prompt: str | None):
    """The dataset prompt TRL gets: chat messages for `chat`/`tags` (TRL applies the chat template itself,
    without adding special tokens twice), the rendered text for `plain` (TRL tokenizes it with the
    tokenizer's BOS, as `eval gsm8k` does). Either way the model sees eval's prompt token for token."""
    from gsmkit.prompts import prompt_messages, render_prompt

    if style in ("chat", "tags"):
        return prompt_messages(style, question, exemplars, system_prompt)
    return render_prompt(style, question, exemplars, tokenizer, system_prompt)


def reasoning_columns(dataset_rows: list[dict[str, Any]], rows: list[dict[str, Any]], style: str, exemplars,
                      tokenizer, settings: GrpoSettings):
    """The style's reasoning section (`reasoning.section_for`), which the rewards read answers after, and each
    dataset row's `opened` column: whether its rendered prompt already opened the section (TRL gives the
    rewards the generated text only, and the dataset's columns)."""
    from gsmkit.prompts import render_prompt
    from gsmkit.reasoning import opened_by_prompt, section_for

    section = section_for(style, tokenizer)
    if section is None:
        return None
    for row, r in zip(dataset_rows, rows, strict=True):
        prompt = render_prompt(style, r["question"], exemplars, tokenizer, settings.system_prompt,
                               settings.thinking)
        row["opened"] = opened_by_prompt(prompt, section)
    return section


def train_grpo(
    settings: GrpoSettings,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> GrpoResult:
    """Run GRPO end to end and return its summary."""
    from gsmkit.training.outputs import check_run_folder, finished_marker, start_run, training_fingerprint

    out = settings.out
    checkpoints = out / "checkpoints"
    fingerprint = training_fingerprint(settings)
    resume_from = check_run_folder(out, finished_marker(out), settings.resume, settings.overwrite,
                                   fingerprint, inputs=(settings.model, settings.data, settings.pool,
                                                        settings.init_adapter))
    if settings.use_vllm or settings.rollouts == "vllm":
        from gsmkit.generation import check_vllm_available

        check_vllm_available()
    weights = {n: w for n, w in settings.weights.items() if w != 0}

    from gsmkit.modeling import load_model, load_tokenizer
    from gsmkit.prompts import answer_format, chat_template_kwargs, resolve_style

    rows, removed, pool = training_problems(settings)  # the data is checked before anything loads
    tokenizer = load_tokenizer(settings.model)
    style = resolve_style(settings.style, tokenizer, settings.thinking)
    # TRL applies the chat template to the prompt messages itself: --thinking reaches it through the config
    template_kwargs = chat_template_kwargs(settings.thinking)  # {} for auto: the template's default
    switch = {"chat_template_kwargs": template_kwargs} if template_kwargs else {}
    fmt = answer_format(style)
    exemplars = []
    if settings.k:
        from gsmkit.data.fewshot import pool_exemplars

        exemplars = pool_exemplars(pool.examples, settings.k, pool.origin)
    dataset_rows = [{"prompt": grpo_prompt(style, r["question"], exemplars, tokenizer,
                                           settings.system_prompt), "gold": r["gold"]} for r in rows]
    section = reasoning_columns(dataset_rows, rows, style, exemplars, tokenizer, settings)

    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    if switch and "chat_template_kwargs" not in inspect.signature(GRPOConfig.__init__).parameters:
        raise ConfigError(f"--thinking {settings.thinking} needs a TRL whose GRPOConfig takes "
                          "chat_template_kwargs", hint="pip install -U trl, or use --thinking auto")

    from gsmkit.training.lora import lean_dropout, lora_config, lora_modules, prepare_base, resolve_targets

    set_seed(settings.seed)
    loaded = load_model(settings.model_spec(), for_training=True)
    from gsmkit.training.memory import return_freed_memory

    mmap_threshold = return_freed_memory(loaded.device)
    rollouts = resolve_rollouts(settings.rollouts, settings.use_vllm, loaded.device.type)
    # The adapter is attached after the k-bit preparation, which freezes every parameter it finds.
    model = prepare_base(loaded.model, settings.load_in_4bit, settings.checkpointing)
    peft_config = None
    if settings.init_adapter is None:
        targets = resolve_targets(model, settings.target_modules)
        peft_config = lora_config(settings, model, targets)
    else:
        from gsmkit.modeling import attach_adapter

        model = attach_adapter(model, settings.init_adapter, settings.model, is_trainable=True)
        targets = sorted(getattr(model.peft_config["default"], "target_modules", None) or [])

    from datasets import Dataset

    from gsmkit.training.arguments import trainer_arguments
    from gsmkit.training.callbacks import log_callbacks, read_log, time_limit_callbacks
    from gsmkit.training.rewards import make_reward_funcs

    log_path = start_run(out, resume_from, settings.overwrite, fingerprint)
    config = trainer_arguments(
        GRPOConfig, settings, loaded, checkpoints,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, top_p=settings.top_p, beta=settings.beta,
        reward_weights=list(weights.values()), use_vllm=rollouts == "vllm", vllm_mode="colocate",
        log_completions=False,  # completions stay out of the terminal; they are in no log either
        **switch,
    )
    rollout_func = None
    if rollouts == "engine":
        from gsmkit.training.rollouts import EngineRollouts

        rollout_func = EngineRollouts(tokenizer, max_new_tokens=settings.max_completion_length,
                                      temperature=settings.temperature, top_p=settings.top_p,
                                      seed=settings.seed,
                                      batch_size=settings.rollout_batch_size,
                                      chat_template_kwargs=template_kwargs)
    trainer = GRPOTrainer(
        model=model, reward_funcs=make_reward_funcs(fmt, list(weights), section), args=config,
        train_dataset=Dataset.from_list(dataset_rows), processing_class=tokenizer, peft_config=peft_config,
        rollout_func=rollout_func,
        callbacks=log_callbacks(log_path, on_log, on_step) + time_limit_callbacks(settings.time_limit_s),
    )
    from transformers.trainer_callback import PrinterCallback

    # logs go to trainer_log.jsonl and the progress bar; stdout stays for --json
    trainer.remove_callback(PrinterCallback)
    from gsmkit.training.rollouts import log_rollout_time

    log_rollout_time(trainer)  # rollout_time beside step_time in trainer_log.jsonl
    lean_dropout(trainer.model)  # the adapter TRL attached, or the --init-adapter one
    wrapped = lora_modules(trainer.model)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainable == 0:  # a bug, never a silent run that trains nothing
        raise RuntimeError("no trainable parameter: the adapter was frozen")
    if on_start:
        on_start(settings.max_steps)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step

    from gsmkit.training.outputs import publish_on_main

    logs = read_log(log_path)  # complete on the main process, the one that reports and publishes
    rewarded = [r for r in logs if "reward" in r]
    resolved = {"style": style, "answer_format": fmt, "k": settings.k, "reward_weights": weights,
                "rollouts": rollouts, "rollout_engine_stats": getattr(rollout_func, "stats", None),
                "lora_targets": list(targets), "lora_module_count": len(wrapped),
                "gradient_checkpointing": settings.checkpointing,
                "dtype": str(loaded.dtype), "device": str(loaded.device),
                "malloc_mmap_threshold": mmap_threshold,
                "processes": trainer.accelerator.num_processes, "fewshot_pool": pool.origin,
                "removed_fewshot": len(removed), "removed_fewshot_hashes": sorted(removed),
                "train_problems": len(rows), "trainable_params": trainable, "steps": steps,
                "completions_per_step": settings.prompts_per_step * settings.num_generations
                * settings.grad_accum * trainer.accelerator.num_processes,
                "resumed_from": str(resume_from) if resume_from else None}
    publish_on_main(trainer, lambda gathered: _publish(settings, trainer, tokenizer, pool, logs, resolved,
                                                       gathered))
    last = rewarded[-1] if rewarded else {}
    return GrpoResult(
        out=out, steps=steps, train_problems=len(rows), removed_fewshot=len(removed),
        train_s=round(train_s, 2),
        trainable_params=trainable, reward_first=rewarded[0]["reward"] if rewarded else None,
        reward_last=last.get("reward"),
        rewards_last={k.removeprefix("rewards/").removesuffix("/mean"): v for k, v in last.items()
                      if k.startswith("rewards/") and k.endswith("/mean")},
    )


def _publish(settings: GrpoSettings, trainer: Any, tokenizer: Any, pool: Any, logs: list[dict],
             resolved: dict, gathered: dict[str, Any]) -> None:
    """The finished run, swapped into --out whole (on the main process): the adapter from the `gathered`
    weights, tokenizer, pool, manifest, reward curve."""
    from gsmkit.data.gsm8k import source_file
    from gsmkit.manifest import build_manifest
    from gsmkit.training.outputs import publish_trained
    from gsmkit.training.plots import plot_rewards

    init = Path(settings.init_adapter) / "adapter_config.json" if settings.init_adapter else None
    manifest = build_manifest(
        "train grpo", settings,
        inputs={"data": source_file(settings.data, settings.split), "fewshot_pool": pool.path,
                "init_adapter": init},
        seeds={"seed": settings.seed}, extra={"resolved": resolved},
    )

    publish_trained(settings.out, trainer, tokenizer, pool.examples, manifest, "reward_curve.png",
                    lambda p: plot_rewards(logs, p), gathered)
