"""Runs that chain a training run with the evaluation of what it wrote: `train sft|qlora --eval-limit N`
(and `--sweep-last M`).

This sits above `gsmkit.training` and `gsmkit.evaluation`, which never import each other: training
writes an adapter folder (with the pool it kept out and its manifest), evaluation reads one, exactly as
`gsmkit train ...` followed by `gsmkit eval gsm8k --adapter OUT` would.

In: `TrainSettings`. Out: the `TrainResult` of `training.sft.train`, with `eval` (the final adapter's
metrics, written to OUT/eval/) and `sweep` (the last M checkpoints, OUT/sweep/ and OUT/sweep.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gsmkit.training.config import TrainSettings
from gsmkit.training.sft import TrainResult, train


def train_and_evaluate(settings: TrainSettings, **callbacks: Any) -> TrainResult:
    """`training.sft.train` (its progress callbacks passed through), then (with --eval-limit, on the main
    process) `evaluate_run`."""
    result = train(settings, **callbacks)
    if settings.eval_limit and _main_process():
        result.eval, result.sweep = evaluate_run(settings)
    return result


def evaluate_run(settings: TrainSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`eval gsm8k` on the first --eval-limit test problems of --eval-data (default --data), with the run's
    k, style and system prompt and the pool it kept out, on the finished adapter in OUT (into OUT/eval/),
    and on its last --sweep-last checkpoints (`training.outputs.sweep_checkpoints`)."""
    from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
    from gsmkit.training.outputs import POOL, sweep_checkpoints

    out = settings.out
    style = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["resolved"]["style"]

    def evaluate(adapter: Path, eval_out: Path) -> dict[str, Any]:
        es = EvalSettings(model=settings.model_spec(adapter), out=eval_out,
                          data=settings.eval_data or settings.data, split="test", limit=settings.eval_limit,
                          pool=out / POOL, k=settings.k, style=style, system_prompt=settings.system_prompt,
                          thinking=settings.thinking,
                          max_new_tokens=settings.eval_max_new_tokens, overwrite=True)
        return evaluate_gsm8k(es).to_dict()

    final = evaluate(out, out / "eval")
    sweep = sweep_checkpoints(out, settings.sweep_last, evaluate) if settings.sweep_last else []
    return final, sweep


def _main_process() -> bool:
    """Under `accelerate launch` every process trains; one evaluates (the one that published the run)."""
    from gsmkit.processes import is_main_process

    return is_main_process()
