"""The next token of each row from its logits: greedy, or sampled with temperature, top-k and top-p.

In: logits [B, V] (float32), one `torch.Generator` per row (None for greedy) and `SamplingSettings`.
Out: `row_generator`, each row's seeded generator; `choose`, the picked token ids and (with
`settings.logprobs`) their log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gsmkit.generation.engine import SamplingSettings, row_seed


def row_generator(settings: SamplingSettings, key: str, sample_index: int, device: Any) -> Any:
    """The generator sample `sample_index` of request `key` draws from, seeded by `row_seed` (None for
    greedy): on the GPU for a CUDA model, else on the CPU."""
    import torch

    if not settings.do_sample:
        return None
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed(row_seed(settings.seed, key, sample_index))
    return g


def choose(logits: Any, generators: Sequence[Any], settings: SamplingSettings,
           forced: Sequence[int | None] | None = None) -> tuple[list[int], list[float]]:
    """The next token of each row, and (with `settings.logprobs`, else []) its log-probability under
    softmax(logits / temperature), before top-k or top-p: what a re-scoring pass computes. A row whose
    `forced` entry is a token id takes that token (a reasoning budget's end tag, `budget`); a sampled row
    draws from its generator all the same, so its later draws do not depend on the forcing."""
    import torch

    if not settings.do_sample:
        picks = _forced(logits.argmax(dim=-1).tolist(), forced)
        return picks, _logprobs(logits, picks, settings)
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
    picks = _forced(picks, forced)
    return picks, _logprobs(tempered, picks, settings)


def _forced(picks: list[int], forced: Sequence[int | None] | None) -> list[int]:
    if forced is None:
        return picks
    return [pick if force is None else force for pick, force in zip(picks, forced, strict=True)]


def _logprobs(scores, picks: list[int], settings: SamplingSettings) -> list[float]:
    import torch

    if not settings.logprobs:
        return []
    index = torch.tensor(picks, device=scores.device)[:, None]
    return torch.log_softmax(scores, dim=-1).gather(-1, index).squeeze(-1).tolist()
