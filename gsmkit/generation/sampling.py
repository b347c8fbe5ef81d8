"""The next token of each row from its logits: greedy, or sampled with temperature, top-k and top-p.

In: logits [B, V] (float32), one `torch.Generator` per row (None for greedy) and `SamplingSettings`.
Out: `choose`, the picked token ids and (with `settings.logprobs`) their log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gsmkit.generation.engine import SamplingSettings


def choose(logits: Any, generators: Sequence[Any],
           settings: SamplingSettings) -> tuple[list[int], list[float]]:
    """The next token of each row, and (with `settings.logprobs`, else []) its log-probability under
    softmax(logits / temperature), before top-k or top-p: what a re-scoring pass computes."""
    import torch

    if not settings.do_sample:
        picks = logits.argmax(dim=-1)
        return picks.tolist(), _logprobs(logits, picks, settings)
    tempered = logits / settings.temperature
    scores = tempered
    if settings.top_k > 0:
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if settings.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= settings.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    picks = []
    for i, generator in enumerate(generators):
        picks.append(int(torch.multinomial(probs[i], 1, generator=generator).item()))
    return picks, _logprobs(tempered, torch.tensor(picks, device=logits.device), settings)

def _logprobs(scores, picks, settings: SamplingSettings) -> list[float]:
    import torch

    if not settings.logprobs:
        return []
    return torch.log_softmax(scores, dim=-1).gather(-1, picks[:, None]).squeeze(-1).tolist()
