"""Stratified, seeded sampling of one benchmark's examples.

In: a benchmark's `Example`s, how many to draw (-1: all) and a seed. Out: the draw, stratified by
difficulty (proportional allocation, at least one per difficulty when the size allows) and shuffled.
The candidates are sorted by content hash first, so neither file order nor row order changes the draw.
"""

from __future__ import annotations

import random

from gsmkit.data.benchmarks.readers import Example

DIFFICULTY_ORDER = ("easy", "medium", "hard")


def allocate(counts: dict[str, int], n: int) -> dict[str, int]:
    """Split n draws over strata proportionally (largest remainder), at least 1 per stratum when n allows.

    Never more than a stratum holds; n >= sum(counts) takes everything.
    """
    present = {k: c for k, c in counts.items() if c > 0}
    total = sum(present.values())
    if n >= total:
        return dict(present)
    quotas = {k: n * c / total for k, c in present.items()}
    alloc = {k: int(q) for k, q in quotas.items()}
    # ties broken by name so the allocation is deterministic
    order = sorted(present, key=lambda k: (-(quotas[k] - alloc[k]), k))
    for k in order[: n - sum(alloc.values())]:
        alloc[k] += 1
    if n >= len(present):
        for k in sorted(present):
            if alloc[k] == 0:
                donor = max((d for d in alloc if alloc[d] > 1), key=lambda d: (alloc[d] - quotas[d], d))
                alloc[donor] -= 1
                alloc[k] = 1
    return alloc


def _difficulty_rank(level: str) -> tuple[int, str]:
    return (DIFFICULTY_ORDER.index(level) if level in DIFFICULTY_ORDER else len(DIFFICULTY_ORDER), level)


def sample_examples(examples: list[Example], n: int, seed: int) -> list[Example]:
    """Stratified by difficulty; candidates sorted by content hash first, so input order never matters."""
    if n == -1:
        n = len(examples)
    strata: dict[str, list[Example]] = {}
    for ex in sorted(examples, key=Example.sort_key):
        strata.setdefault(ex.difficulty, []).append(ex)
    alloc = allocate({k: len(v) for k, v in strata.items()}, n)
    rng = random.Random(seed)
    picked: list[Example] = []
    for level in sorted(strata, key=_difficulty_rank):
        picked.extend(rng.sample(strata[level], alloc.get(level, 0)))
    # Mixed, so that `eval ppl --limit N` on the file takes a prefix with every difficulty.
    rng.shuffle(picked)
    return picked
