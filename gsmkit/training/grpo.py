"""The GRPO recipe: LoRA (optionally on a 4-bit base) on TRL's GRPOTrainer, rewarded by `training.rewards`.

In: `GrpoSettings` (`training.grpo_settings`: model, optional SFT adapter to continue from, GSM8K problems or
a {question, answer} JSONL, few-shot pool, prompt style, reward weights, sampling and optimiser options).
Out: an output folder like `train sft`'s: the adapter, the tokenizer, `manifest.json`,
`trainer_log.jsonl` (TRL's logs: reward, each reward's mean, KL, completion lengths),
`reward_curve.png` and `fewshot_pool.jsonl` (the pool kept out of training), published whole
(`training.outputs`). The run's skeleton is `training.run`'s; `GrpoRecipe` states what is GRPO's.

Prompts are the ones `eval gsm8k` sends (`grpo_prompt`: chat messages TRL renders with the same
template, or the rendered plain text), and the few-shot pool is removed from the training problems by
content hash, as in `train sft`.
Completions are sampled by `--rollouts`: gsmkit's engine through TRL's `rollout_func` (the default on a
CPU and on a GPU without vllm; `training.rollouts`), TRL's own `model.generate`, or TRL's colocated vLLM.
`--init-adapter` continues training an SFT adapter (the "prep SFT, then GRPO" recipe;
`training.init_adapter`): its LoRA shape is the adapter's, its dropout the run's. With beta > 0, TRL's KL
reference is the model the run starts from: a frozen copy of the --init-adapter (PEFT >= 0.20), or the base
with a fresh adapter.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.training.grpo_settings import GrpoSettings
from gsmkit.training.run import Recipe, TrainingRun

__all__ = ["GrpoResult", "GrpoSettings", "grpo_prompt", "train_grpo", "training_problems"]


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
    """Run GRPO end to end (`training.run`) and return its summary."""
    from gsmkit.training.run import run_training

    return run_training(settings, GrpoRecipe, on_start, on_step, on_log)


class GrpoRecipe(Recipe):
    """`train grpo` on TRL's GRPOTrainer: eval's prompts, the reward functions, the rollout path."""

    command = "train grpo"
    curve = "reward_curve.png"
    wraps_lora = False  # a fresh adapter's config goes to TRL, which wraps the model itself

    def __init__(self, settings: GrpoSettings):
        super().__init__(settings)
        self.rows: list[dict[str, Any]] = []
        self.pool: Any = None
        self.dataset_rows: list[dict[str, Any]] = []
        self.template_kwargs: dict[str, Any] = {}
        self.fmt = ""
        self.section: Any = None
        self.rollout_func: Any = None

    @property
    def weights(self) -> dict[str, float]:
        """The non-zero reward weights, in the order TRL gets them."""
        return {n: w for n, w in self.settings.weights.items() if w != 0}

    def read_data(self) -> tuple[Any, list[str]]:
        self.rows, removed, self.pool = training_problems(self.settings)
        return self.pool, removed

    def prepare(self, tokenizer: Any) -> str:
        from gsmkit.prompts import answer_format, chat_template_kwargs, resolve_style

        s = self.settings
        style = resolve_style(s.style, tokenizer, s.thinking)
        # TRL applies the chat template to the prompt messages itself: --thinking reaches it by the config
        self.template_kwargs = chat_template_kwargs(s.thinking)  # {} for auto: the template's default
        self.fmt = answer_format(style)
        exemplars = []
        if s.k:
            from gsmkit.data.fewshot import pool_exemplars

            exemplars = pool_exemplars(self.pool.examples, s.k, self.pool.origin)
        self.dataset_rows = [{"prompt": grpo_prompt(style, r["question"], exemplars, tokenizer,
                                                    s.system_prompt), "gold": r["gold"]} for r in self.rows]
        self.section = reasoning_columns(self.dataset_rows, self.rows, style, exemplars, tokenizer, s)
        return style

    def check(self) -> None:
        from trl import GRPOConfig

        s = self.settings
        takes = "chat_template_kwargs" in inspect.signature(GRPOConfig.__init__).parameters
        if self.template_kwargs and not takes:
            raise ConfigError(f"--thinking {s.thinking} needs a TRL whose GRPOConfig takes "
                              "chat_template_kwargs", hint="pip install -U trl, or use --thinking auto")

    def trainer(self, run: TrainingRun, callbacks: list) -> Any:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from gsmkit.training.arguments import trainer_arguments
        from gsmkit.training.rewards import make_reward_funcs
        from gsmkit.training.rollouts import EngineRollouts, log_rollout_time
        from gsmkit.training.shared_prompt import shared_prompt_trainer

        s = self.settings
        switch = {"chat_template_kwargs": self.template_kwargs} if self.template_kwargs else {}
        config = trainer_arguments(
            GRPOConfig, s, run.loaded, run.checkpoints,
            per_device_train_batch_size=s.prompts_per_step * s.num_generations,
            num_generations=s.num_generations, max_completion_length=s.max_completion_length,
            temperature=s.temperature, top_p=s.top_p, beta=s.beta,
            reward_weights=list(self.weights.values()), use_vllm=s.rollouts == "vllm", vllm_mode="colocate",
            log_completions=False,  # completions stay out of the terminal; they are in no log either
            **switch,
        )
        if s.rollouts == "engine":
            self.rollout_func = EngineRollouts(run.tokenizer, max_new_tokens=s.max_completion_length,
                                               temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                                               batch_size=s.rollout_batch_size,
                                               chat_template_kwargs=self.template_kwargs)
        trainer_class = shared_prompt_trainer(GRPOTrainer, s.shared_prompt)
        trainer = trainer_class(
            model=run.model, reward_funcs=make_reward_funcs(self.fmt, list(self.weights), self.section),
            args=config, train_dataset=Dataset.from_list(self.dataset_rows), processing_class=run.tokenizer,
            peft_config=run.peft_config, rollout_func=self.rollout_func, callbacks=callbacks,
        )
        log_rollout_time(trainer)  # rollout_time beside step_time in trainer_log.jsonl
        return trainer

    def total_steps(self, trainer: Any) -> int:  # noqa: ARG002 - the recipe's signature
        return self.settings.max_steps

    def resolved(self, run: TrainingRun) -> dict[str, Any]:
        s = self.settings
        return {"answer_format": self.fmt, "reward_weights": self.weights, "rollouts": s.rollouts,
                "rollout_engine_stats": getattr(self.rollout_func, "stats", None),
                "update": getattr(run.trainer, "shared_prompt_path", {"shared_prompt": False}),
                "train_problems": len(self.rows),
                "completions_per_step": s.prompts_per_step * s.num_generations * s.grad_accum
                * run.trainer.accelerator.num_processes}

    def draw_curve(self, logs: list[dict], path: Path) -> None:
        from gsmkit.training.plots import plot_rewards

        plot_rewards(logs, path)

    def result(self, run: TrainingRun) -> GrpoResult:
        rewarded = [r for r in run.logs if "reward" in r]  # the main process's: it reports
        last = rewarded[-1] if rewarded else {}
        return GrpoResult(
            out=run.out, steps=run.steps, train_problems=len(self.rows), removed_fewshot=len(run.removed),
            train_s=round(run.train_s, 2), trainable_params=run.trainable,
            reward_first=rewarded[0]["reward"] if rewarded else None, reward_last=last.get("reward"),
            rewards_last={k.removeprefix("rewards/").removesuffix("/mean"): v for k, v in last.items()
                          if k.startswith("rewards/") and k.endswith("/mean")},
        )
