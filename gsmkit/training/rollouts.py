"""GRPO rollouts on gsmkit's own engine: the `rollout_func` `train grpo` hands TRL's `GRPOTrainer`.

In: the prompts TRL gives one process for one generation round (each prompt repeated `num_generations`
times, one group after another) and the trainer (its current policy, step and end-of-sequence ids).
Out: what TRL needs of every completion, in the order of the prompts: `prompt_ids`, `completion_ids`
(the end-of-sequence token included when the completion ended on one, as TRL's own generation keeps
it) and `logprobs` (each completion token's log softmax(logits / temperature) under the policy that
sampled it: what TRL's re-scoring pass computes).

Why it is faster than TRL's default `model.generate`: `HFEngine` encodes the token prefix shared by the
round's prompts (the few-shot exemplars, the system prompt) once, prefills each prompt's own suffix once
for its whole group, and lets rows leave the batch as they finish.

The policy is the trainer's model as it is at this step (the LoRA weights of this step), in eval mode
(dropout off) and without gradients; its training mode is restored afterwards. Sample `i` of the `j`-th
group of a round is drawn from a generator seeded with (seed, step, process, j, i) (`generation.row_seed`),
so a run resumed from a checkpoint draws the same completions for the same steps as one that was
never interrupted.

Several processes (DDP): each process samples its own prompts (TRL gives each its share of whole groups)
with its own copy of the policy, the module under DDP's wrapper, and no collective between them, so the
processes may decode different numbers of tokens. Under FSDP or DeepSpeed ZeRO-3 a process holds only a
shard of the weights and every forward pass is a collective: the engine refuses (TRL's path handles it).

`log_rollout_time` adds each round's seconds to the trainer's log (`rollout_time`) on every path.
`resolve_rollouts` decides the path: `engine` (this module), `trl` (TRL's `model.generate`) or `vllm`
(TRL's colocated vLLM); `auto` is vllm on a CUDA GPU where vllm is installed, engine everywhere else.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from gsmkit.errors import ConfigError

ROLLOUTS = ("auto", "engine", "trl", "vllm")
ROLLOUT_BATCH = 64  # --rollout-batch-size: the most completions the engine decodes at once


def check_rollouts(choice: str, use_vllm: bool) -> None:
    """`--use-vllm` is the old spelling of `--rollouts vllm`: with another path it is a contradiction."""
    if use_vllm and choice not in ("auto", "vllm"):
        raise ConfigError(f"--use-vllm contradicts --rollouts {choice}", hint="use --rollouts vllm alone")


def resolve_rollouts(choice: str, use_vllm: bool, device_type: str) -> str:
    """The rollout path a run takes on a device of `device_type`: `--rollouts`, with `--use-vllm` as the old
    spelling of `vllm`."""
    check_rollouts(choice, use_vllm)
    if use_vllm:
        return "vllm"
    if choice != "auto":
        return choice
    return "vllm" if device_type == "cuda" and importlib.util.find_spec("vllm") is not None else "engine"


def prompt_token_ids(prompt: Any, tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None
                     ) -> list[int]:
    """The ids TRL feeds the model for one dataset prompt: chat messages through the chat template with the
    generation prompt (and `chat_template_kwargs`, as TRL passes its config's: `enable_thinking`), text
    through the tokenizer with its special tokens (`grpo_prompt` makes either equal `eval gsm8k`'s prompt)."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True,
                                                  **(chat_template_kwargs or {}))["input_ids"])
    return list(tokenizer(text=[prompt])["input_ids"][0])


class EngineRollouts:
    """TRL's `rollout_func(prompts, trainer)`, sampling with `HFEngine` from the policy of the current step.

    `last` keeps the round's results (`GenResult`s in prompt order) and `stats` the engine's counters summed
    over the run, for logs and benchmarks."""

    def __init__(self, tokenizer: Any, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 batch_size: int = ROLLOUT_BATCH, chat_template_kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.batch_size = batch_size
        self.last: list[Any] = []
        self.stats: dict[str, int] = {}

    def __call__(self, prompts: Sequence[Any], trainer: Any) -> dict[str, list]:
        import torch

        from gsmkit.generation import GenRequest, HFEngine, SamplingSettings

        check_whole_weights(trainer)
        ids = [prompt_token_ids(p, self.tokenizer, self.chat_template_kwargs) for p in prompts]
        groups = _groups(ids)
        step, rank = trainer.state.global_step, trainer.accelerator.process_index
        requests = [GenRequest(f"{step}/{rank}/{j}", tuple(ids[start]), num_samples=n)
                    for j, (start, n) in enumerate(groups)]
        settings = SamplingSettings(max_new_tokens=self.max_new_tokens, do_sample=True,
                                    temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                                    logprobs=True)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        engine = HFEngine(policy, self.tokenizer, batch_size=min(self.batch_size, len(prompts)),
                          stop_token_ids=trainer.eos_token_ids)
        was_training = policy.training
        policy.eval()  # dropout off: the completions are the policy's own
        try:
            with torch.no_grad():
                results = {(r.key, r.sample_index): r for r in engine.generate(requests, settings)}
        finally:
            policy.train(was_training)
        for name, value in engine.stats.items():
            self.stats[name] = self.stats.get(name, 0) + value
        ordered = [results[(req.key, i)] for req in requests for i in range(req.num_samples)]
        self.last = ordered
        completions = [list(r.token_ids) + ([r.end_token] if r.end_token is not None else [])
                       for r in ordered]
        return {"prompt_ids": ids, "completion_ids": completions,
                "logprobs": [list(r.logprobs) for r in ordered]}


def check_whole_weights(trainer: Any) -> None:
    """Fail where each process holds only a shard of the policy (FSDP, DeepSpeed ZeRO-3)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) or (plugin is not None and plugin.zero_stage == 3):
        raise ConfigError("--rollouts engine needs the whole policy on each process, but FSDP or ZeRO-3 "
                          "shards it", hint="use --rollouts trl (or vllm), or DDP / ZeRO-2")


def log_rollout_time(trainer: Any) -> None:
    """Log each generation round's seconds as `rollout_time`, beside TRL's `step_time` (which includes it),
    whatever the rollout path: the trainer's generation method is wrapped with a timer; the rest of the
    step is the update. Without that method (another TRL), nothing is logged."""
    import time

    generate = getattr(trainer, "_generate", None)
    metrics = getattr(trainer, "_metrics", None)
    if generate is None or metrics is None:
        return

    def timed(prompts):
        start = time.perf_counter()
        out = generate(prompts)
        mode = "train" if trainer.model.training else "eval"
        metrics[mode]["rollout_time"].append(time.perf_counter() - start)
        return out

    trainer._generate = timed


def _groups(ids: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(first index, length) of each run of consecutive identical prompts: one request, its samples."""
    groups: list[tuple[int, int]] = []
    for i, seq in enumerate(ids):
        if groups and ids[groups[-1][0]] == seq:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((i, 1))
    return groups
