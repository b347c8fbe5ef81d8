"""The few-shot pool: a fixed, seeded draw of worked GSM8K examples that is kept out of training.

In: GSM8K problems (usually the train split), a size and a seed.
Out: `FewshotExample` rows, each with the sha256 of its whitespace-normalised question.

The draw is made from the problems sorted by content hash, so the pool depends only on the data's
content and the seed, not on whether it came from the Hub, a jsonl or a parquet file, nor on row order.
Removal from training data matches on the question's content hash, never on row indices.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from gsmkit.errors import ConfigError, DataError
from gsmkit.jsonl import read_jsonl, write_jsonl
from gsmkit.prompts import Exemplar
from gsmkit.records import FewshotExample, Problem, content_hash

T = TypeVar("T")
DEFAULT_POOL_SIZE = 8
DEFAULT_SEED = 42


def draw_pool(problems: Sequence[Problem], n: int = DEFAULT_POOL_SIZE, seed: int = DEFAULT_SEED) -> list[FewshotExample]:
    """n problems drawn with `seed` from the problems ordered by content hash (see the module docstring)."""
    if n < 1:
        raise ConfigError(f"pool size must be at least 1, got {n}", hint="use --n 8 (the default)")
    # Sorted by content hash; ties (the same question twice) broken by every other field, then kept
    # once, so neither row order nor duplicates can change the draw or put one question in twice.
    # Each hash is computed once; sorting on the key alone because Problems do not compare.
    keyed = sorted((((p.sha256, p.answer, p.id, p.question, p.gold), p) for p in problems), key=lambda kp: kp[0])
    ordered: list[Problem] = []
    last = None
    for (digest, *_), p in keyed:
        if digest != last:
            ordered.append(p)
            last = digest
    if n > len(ordered):
        raise ConfigError(f"pool size {n} is larger than the {len(ordered)} distinct problems available",
                          hint="lower --n")
    picks = random.Random(seed).sample(range(len(ordered)), n)
    return [FewshotExample.from_problem(ordered[i]) for i in picks]


def write_pool(path: str | Path, pool: Sequence[FewshotExample]) -> None:
    write_jsonl(path, (ex.to_dict() for ex in pool))


def read_pool(path: str | Path) -> list[FewshotExample]:
    pool = read_jsonl(path, FewshotExample.from_dict)
    if not pool:
        raise DataError(f"{path}: the few-shot pool is empty")
    return pool


def pool_exemplars(pool: Sequence[FewshotExample], k: int, where: str = "pool") -> list[Exemplar]:
    """The first k examples of the pool, in file order (the same k a training run records)."""
    if k < 0:
        raise ConfigError(f"--k must be >= 0, got {k}")
    if k > len(pool):
        raise ConfigError(f"--k {k} asks for more exemplars than the {len(pool)} in {where}",
                          hint="lower --k or draw a larger pool with `gsmkit fewshot --n`")
    return [Exemplar(question=ex.question, answer=ex.answer) for ex in pool[:k]]


def pool_hashes(pool: Iterable[FewshotExample]) -> set[str]:
    return {ex.sha256 for ex in pool}


def remove_pool(rows: Iterable[T], hashes: set[str], question_of: Callable[[T], str]) -> tuple[list[T], list[str]]:
    """Drop every row whose question hashes into the pool; returns (kept rows, hashes removed)."""
    kept: list[T] = []
    removed: list[str] = []
    for row in rows:
        h = content_hash(question_of(row))
        if h in hashes:
            removed.append(h)
        else:
            kept.append(row)
    return kept, removed


def problems_for_run(data: str, split: str, offset: int, limit: int | None, pool_path, k: int
                     ) -> tuple[list, list[Exemplar], int]:
    """The problems a generating run works on (`--offset`, `--limit`), and the k exemplars of `pool_path`:
    (problems without those k, exemplars, how many were left out). A problem that is its own exemplar
    would give its answer away."""
    from gsmkit.data.gsm8k import load_gsm8k, select_problems

    problems = select_problems(load_gsm8k(data, split), offset, limit)
    if k <= 0:
        return problems, [], 0
    pool = read_pool(pool_path)
    exemplars = pool_exemplars(pool, k, str(pool_path))
    hashes = pool_hashes(pool[:k])
    kept = [p for p in problems if p.sha256 not in hashes]
    return kept, exemplars, len(problems) - len(kept)
