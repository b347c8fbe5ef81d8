"""GRPO with LoRA (optionally on a 4-bit base) on TRL's GRPOTrainer, rewarded by `training.rewards`.

In: `GrpoSettings` (model, optional SFT adapter to continue from, GSM8K problems or a {question,
answer} JSONL, few-shot pool, prompt style, reward weights, sampling and optimiser options).
Out: an output folder like `train sft`'s: the adapter, the tokenizer, `manifest.json`,
`trainer_log.jsonl` (TRL's logs: reward, each reward's mean, KL, completion lengths),
`reward_curve.png` and `fewshot_pool.jsonl` (the pool kept out of training).

Prompts are the ones `eval gsm8k` sends (`grpo_prompt`: chat messages TRL renders with the same
template, or the rendered plain text), and the
few-shot pool is removed from the training problems by content hash, as in `train sft`.
`--init-adapter` continues training an SFT adapter (the "prep SFT, then GRPO" recipe); its LoRA
shape is the adapter's. With beta > 0, TRL's KL reference for a PEFT model is the base with the
adapter disabled, i.e. the model before SFT as well.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class GrpoSettings:
    model: str
    out: Path
    init_adapter: str | None = None
    load_in_4bit: bool = False
    data: str = "openai/gsm8k"
    split: str = "train"
    train_samples: int | None = None  # the sample budget: training problems drawn (seeded) from the data
    fewshot_pool: Path | None = None
    k: int = 0  # exemplars in each prompt (from the pool)
    style: str = "auto"
    system_prompt: str | None = None
    reward_weights: tuple[tuple[str, float], ...] = ()
    num_generations: int = 4
    prompts_per_step: int = 2
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    learning_rate: float = 2e-5
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    max_steps: int = 100
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | None = None
    logging_steps: int = 1
    save_steps: int = 0
    time_limit_s: float | None = None  # stop (and save) after the step that crosses this wall-clock budget
    resume: bool = False
    overwrite: bool = False
    use_vllm: bool = False

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("--num-generations must be >= 2: GRPO compares completions of one prompt")
        if self.prompts_per_step < 1 or self.grad_accum < 1:
            raise ConfigError("--prompts-per-step and --grad-accum must be >= 1")
        if self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_completion_length < 1:
            raise ConfigError("--max-completion-length must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0: GRPO learns from differences between samples")
        if self.beta < 0 or self.learning_rate <= 0:
            raise ConfigError("--beta must be >= 0 and --learning-rate > 0")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ConfigError("--time-limit must be > 0 minutes")
        if self.train_samples is not None and self.train_samples < 1:
            raise ConfigError("--train-samples must be >= 1")
        if self.k < 0:
            raise ConfigError(f"--k must be >= 0, got {self.k}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if self.init_adapter is not None and self.target_modules:
            raise ConfigError("--target-modules does not apply with --init-adapter", hint="the adapter's own modules train")
        if self.init_adapter is not None:
            from gsmkit.modeling import check_adapter

            check_adapter(self.init_adapter)  # a damaged adapter fails here, before any model loads

    @property
    def weights(self) -> dict[str, float]:
        from gsmkit.training.rewards import DEFAULT_WEIGHTS

        return {**DEFAULT_WEIGHTS, **dict(self.reward_weights)}


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


def _problems(settings: GrpoSettings):
    """Training problems: GSM8K, or a JSONL of {question, answer} rows (traces included), minus the pool."""
    from gsmkit.answers import gold_from_solution
    from gsmkit.data.fewshot import pool_hashes
    from gsmkit.training.data import load_train_examples, remove_fewshot
    from gsmkit.training.sft import TrainSettings, resolve_pool

    examples = load_train_examples(settings.data, settings.split)
    if examples and examples[0].kind != "qa":
        raise DataError(f"{examples[0].where}: GRPO needs question/answer rows (the answer ends in '#### n')",
                        hint="use GSM8K rows or generate-traces output")
    pool_settings = TrainSettings(model=settings.model, out=settings.out, data=settings.data,
                                  fewshot_pool=settings.fewshot_pool)
    pool, origin = resolve_pool(pool_settings)
    kept, removed = remove_fewshot(examples, pool_hashes(pool), [ex.question for ex in pool])
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
    return rows, removed, pool, origin


def grpo_prompt(style: str, question: str, exemplars, tokenizer, system_prompt: str | None):
    """The dataset prompt TRL gets: chat messages for `chat`/`tags` (TRL applies the chat template itself,
    without adding special tokens twice), the rendered text for `plain` (TRL tokenizes it with the
    tokenizer's BOS, as `eval gsm8k` does). Either way the model sees eval's prompt token for token."""
    from gsmkit.prompts import prompt_messages, render_prompt

    if style in ("chat", "tags"):
        return prompt_messages(style, question, exemplars, system_prompt)
    return render_prompt(style, question, exemplars, tokenizer, system_prompt)


def _time_limit(seconds: float | None) -> list:
    """A callback that ends training after the step during which `seconds` of training time ran out."""
    if seconds is None:
        return []
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.start >= seconds:
                control.should_training_stop = True

    return [TimeLimit()]


def plot_rewards(log_path: Path, png: Path) -> None:
    """The total reward and each weighted component's mean per logged step."""
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    keys = ["reward"] + sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if key == "reward" else None,
                    linewidth=2 if key == "reward" else 1, label=key.removeprefix("rewards/").removesuffix("/mean"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def train_grpo(
    settings: GrpoSettings,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> GrpoResult:
    """Run GRPO end to end and return its summary."""
    from gsmkit.training.rewards import make_reward_funcs
    from gsmkit.training.sft import (
        _callbacks,
        _save_final,
        check_run_folder,
        checkpointing_arguments,
        find_lora_targets,
        prepare_log,
    )

    out = settings.out
    checkpoints = out / "checkpoints"
    resume_from = check_run_folder(out, out / "adapter_config.json", settings.resume, settings.overwrite)
    if settings.init_adapter is not None:
        from gsmkit.modeling import read_adapter_config

        read_adapter_config(settings.init_adapter)
    if settings.use_vllm:
        from gsmkit.generation import check_vllm_available

        check_vllm_available()
    weights = {n: w for n, w in settings.weights.items() if w != 0}
    if not weights:
        raise ConfigError("--reward-weights: every weight is 0, so there is nothing to learn from")

    from gsmkit.modeling import ModelSpec, load_model, load_tokenizer
    from gsmkit.prompts import answer_format, resolve_style

    tokenizer = load_tokenizer(settings.model)
    style = resolve_style(settings.style, tokenizer)
    fmt = answer_format(style)
    rows, removed, pool, pool_origin = _problems(settings)
    exemplars = []
    if settings.k:
        from gsmkit.data.fewshot import pool_exemplars

        exemplars = pool_exemplars(pool, settings.k, pool_origin)
    dataset_rows = [{"prompt": grpo_prompt(style, r["question"], exemplars, tokenizer, settings.system_prompt),
                     "gold": r["gold"]} for r in rows]

    import torch
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    set_seed(settings.seed)
    # The adapter is attached after the k-bit preparation, which freezes every parameter it finds.
    loaded = load_model(ModelSpec(model=settings.model, dtype=settings.dtype, device=settings.device,
                                  load_in_4bit=settings.load_in_4bit), for_training=True)
    model = loaded.model
    gc = settings.gradient_checkpointing if settings.gradient_checkpointing is not None else settings.load_in_4bit
    peft_config = None
    if settings.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.init_adapter is None:
        from peft import LoraConfig

        targets = find_lora_targets(model, settings.target_modules)
        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
    else:
        from gsmkit.modeling import attach_adapter

        model = attach_adapter(model, settings.init_adapter, settings.model, is_trainable=True)
        targets = sorted(getattr(model.peft_config["default"], "target_modules", None) or [])

    from datasets import Dataset

    out.mkdir(parents=True, exist_ok=True)
    if settings.overwrite:
        shutil.rmtree(checkpoints, ignore_errors=True)
        for name in ("trainer_log.jsonl", "reward_curve.png", "manifest.json"):
            (out / name).unlink(missing_ok=True)
    log_path = out / "trainer_log.jsonl"
    prepare_log(log_path, resume_from)

    on_cuda = loaded.device.type == "cuda"
    config = GRPOConfig(
        output_dir=str(checkpoints),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        gradient_accumulation_steps=settings.grad_accum,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        reward_weights=list(weights.values()),
        **checkpointing_arguments(inspect.signature(GRPOConfig.__init__).parameters, gc),
        bf16=loaded.dtype == torch.bfloat16 and on_cuda,
        fp16=loaded.dtype == torch.float16,
        use_cpu=loaded.device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_vllm=settings.use_vllm,
        vllm_mode="colocate",
        log_completions=False,  # completions stay out of the terminal; they are in no log either
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=make_reward_funcs(fmt, list(weights)), args=config,
        train_dataset=Dataset.from_list(dataset_rows), processing_class=tokenizer, peft_config=peft_config,
        callbacks=_callbacks(log_path, on_log, on_step) + _time_limit(settings.time_limit_s),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs go to trainer_log.jsonl and the progress bar; stdout stays for --json
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainable == 0:  # a bug, never a silent run that trains nothing
        raise RuntimeError("no trainable parameter: the adapter was frozen")
    if on_start:
        on_start(settings.max_steps)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step

    logs = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    rewarded = [r for r in logs if "reward" in r]
    if trainer.is_world_process_zero():
        _save_final(trainer, tokenizer, out, full=False)
        from gsmkit.data.fewshot import write_pool
        from gsmkit.jsonl import write_json
        from gsmkit.manifest import build_manifest

        write_pool(out / "fewshot_pool.jsonl", pool)
        manifest = build_manifest(
            "train grpo", settings,
            inputs={"data": _data_file(settings), "fewshot_pool": settings.fewshot_pool,
                    "init_adapter": Path(settings.init_adapter) / "adapter_config.json" if settings.init_adapter else None},
            seeds={"seed": settings.seed},
            extra={"resolved": {"style": style, "answer_format": fmt, "k": settings.k, "reward_weights": weights,
                                "lora_targets": list(targets), "gradient_checkpointing": gc,
                                "dtype": str(loaded.dtype), "device": str(loaded.device), "fewshot_pool": pool_origin,
                                "removed_fewshot": len(removed), "removed_fewshot_hashes": sorted(removed),
                                "train_problems": len(rows), "trainable_params": trainable, "steps": steps,
                                "completions_per_step": settings.prompts_per_step * settings.num_generations
                                * settings.grad_accum,
                                "resumed_from": str(resume_from) if resume_from else None}},
        )
        write_json(out / "manifest.json", manifest)
        plot_rewards(log_path, out / "reward_curve.png")
    last = rewarded[-1] if rewarded else {}
    return GrpoResult(
        out=out, steps=steps, train_problems=len(rows), removed_fewshot=len(removed), train_s=round(train_s, 2),
        trainable_params=trainable, reward_first=rewarded[0]["reward"] if rewarded else None,
        reward_last=last.get("reward"),
        rewards_last={k.removeprefix("rewards/").removesuffix("/mean"): v for k, v in last.items()
                      if k.startswith("rewards/") and k.endswith("/mean")},
    )


def _data_file(settings: GrpoSettings):
    from gsmkit.training.sft import _data_file as data_file

    return data_file(settings.data, settings.split)

