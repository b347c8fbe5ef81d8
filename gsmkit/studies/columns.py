"""The columns of `gsmkit report`'s summary.csv, declared once: their order, types and meanings (the docs'
table is generated from `SummaryRow`), which of them identify a run for `--group-by`, and which are
metrics (the columns of `thresholds.METRICS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gsmkit.studies.thresholds import METRICS


@dataclass
class SummaryRow:
    """One row of `summary.csv` (and of `rows` in report.json); an empty cell (null) is a value the run does
    not have.

    Attributes:
        run: the training folder's name, or for a model no training run made, its first evaluation folder's
        kind: `train` (a training run and the evaluations of its adapter) or `model` (evaluations of a base
            model, or of an adapter no reported training run produced)
        command: the training command (`train qlora`, ...), or the evaluation commands of a `model` row
        model: the base model, as given to `--model`
        method: `sft`, `qlora`, `full` or `grpo`; `base` or `adapter` for a `model` row
        preset: `--preset` of the training run
        data: the training data's file or folder name (the traces file with `--traces`)
        lora_r: `--lora-r`
        lora_alpha: `--lora-alpha`
        learning_rate: `--learning-rate`
        epochs: `--epochs`
        max_steps: `--max-steps` (-1: by epochs)
        batch_size: `--batch-size`
        grad_accum: `--grad-accum`
        max_length: `--max-length`
        k: few-shot exemplars (the training run's `--k`; a `model` row's GSM8K evaluation's)
        train_rows: rows trained on (GRPO: training problems)
        seed: `--seed` of the training run
        steps: optimizer steps done
        train_loss: the run's mean training loss (`train_loss` of trainer_log.jsonl)
        adapter: the adapter folder (a training row's own folder)
        adapter_sha256: sha256 of its adapter_config.json and weights, the key evaluations are joined by
        chosen_checkpoint: `final`, or with a checkpoint sweep the checkpoint chosen by `--sweep-metric`;
            the row's evaluations are that adapter's
        gsm8k_strict: GSM8K accuracy, strict-match
        gsm8k_strict_lo: lower bound of its 95% Wilson interval
        gsm8k_strict_hi: upper bound of its 95% Wilson interval
        gsm8k_flexible: GSM8K accuracy, flexible-extract
        gsm8k_flexible_lo: lower bound of its 95% Wilson interval
        gsm8k_flexible_hi: upper bound of its 95% Wilson interval
        gsm8k_n: problems in the GSM8K evaluation
        gsm8k_answer_share: share of completions with a strict answer (`extractable`)
        gsm8k_reasoning_share: share of completions with a reasoning section (`with_reasoning_section`;
            empty without one); report.md shows its 95% Wilson interval over `gsm8k_n`
        gsm8k_ended_in_reasoning: share of completions that ended inside their reasoning section, so had no
            answer (`ended_in_reasoning`; empty without a section); report.md shows its 95% Wilson interval
        safety: safety rate (safe / judged; unparsed verdicts are not safe)
        safety_lo: lower bound of its 95% Wilson interval
        safety_hi: upper bound of its 95% Wilson interval
        safety_n: prompts judged
        safety_unparsed: share of verdicts the guard's output could not be read as
        ppl: token-weighted perplexity of the `eval ppl` run
        ppl_tokens: tokens it scored
        gsm8k_dir: the GSM8K evaluation folder used (the largest n of those of this adapter, then the newest)
        safety_dir: the safety evaluation folder used (chosen the same way)
        ppl_dir: the perplexity evaluation folder used (chosen the same way)
        path: the training folder, or the `model` row's first evaluation folder
    """

    run: str
    kind: str
    command: str
    model: str | None
    method: str
    preset: str | None
    data: str | None
    lora_r: int | None
    lora_alpha: int | None
    learning_rate: float | None
    epochs: float | None
    max_steps: int | None
    batch_size: int | None
    grad_accum: int | None
    max_length: int | None
    k: int | None
    train_rows: int | None
    seed: int | None
    steps: int | None
    train_loss: float | None
    adapter: str | None
    adapter_sha256: str | None
    chosen_checkpoint: str | None
    gsm8k_strict: float | None
    gsm8k_strict_lo: float | None
    gsm8k_strict_hi: float | None
    gsm8k_flexible: float | None
    gsm8k_flexible_lo: float | None
    gsm8k_flexible_hi: float | None
    gsm8k_n: int | None
    gsm8k_answer_share: float | None
    gsm8k_reasoning_share: float | None
    gsm8k_ended_in_reasoning: float | None
    safety: float | None
    safety_lo: float | None
    safety_hi: float | None
    safety_n: int | None
    safety_unparsed: float | None
    ppl: float | None
    ppl_tokens: int | None
    gsm8k_dir: str | None
    safety_dir: str | None
    ppl_dir: str | None
    path: str


COLUMNS = tuple(f.name for f in dataclasses.fields(SummaryRow))
# The columns a training row takes from its manifest's settings as they are (the manifest's types are checked
# against these columns' when the report reads it).
SETTING_COLUMNS = ("preset", "lora_r", "lora_alpha", "learning_rate", "epochs", "max_steps", "batch_size",
                   "grad_accum", "max_length", "k", "seed")
# What a run is, for --group-by: runs that agree on all of these but the grouped field are replicates.
IDENTITY = ("command", "model", "method", "preset", "data", "lora_r", "lora_alpha", "learning_rate", "epochs",
            "max_steps", "batch_size", "grad_accum", "max_length", "k", "train_rows", "seed")
METRIC_COLUMNS = tuple(c for c in COLUMNS if c in set(METRICS.values()))
assert set(METRIC_COLUMNS) == set(METRICS.values()), "every metric has its summary.csv column"
