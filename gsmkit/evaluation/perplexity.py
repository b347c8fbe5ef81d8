"""Token-weighted response-only loss and perplexity of a causal LM on encoded examples.

In: a model and `Encoded` examples (labels -100 where not scored, from `training.masking`).
Out: `(sum of negative log-likelihood, number of scored tokens)`; perplexity is exp(sum / n).
Batches are length-sorted so padding stays small; padding is never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


def response_nll(
    model: Any, encoded: Sequence[Any], batch_size: int = 8, pad_id: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[float, int, list[tuple[float, int]]]:
    """(total NLL, scored tokens, per-example (nll, tokens) in input order)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    per: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i].input_ids) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i].input_ids)
                ids[row, :n] = torch.tensor(encoded[i].input_ids)
                labels[row, :n] = torch.tensor(encoded[i].labels)
                attn[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            # position t predicts token t+1
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="none",
            ).view(len(idx), -1)
            mask = shift_labels != -100
            for row, i in enumerate(idx):
                per[i] = (float(nll[row][mask[row]].sum()), int(mask[row].sum()))
            if on_progress:
                on_progress(len(idx))
    total = sum(p[0] for p in per)
    count = sum(p[1] for p in per)
    return total, count, per


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if tokens else float("nan")
