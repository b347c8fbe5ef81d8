"""The few-shot pool: a fixed, seeded draw of worked GSM8K examples that is kept out of training.

In: GSM8K problems (usually the train split), a size and a seed; for `gsmkit fewshot`, `FewshotSettings`.
Out: `FewshotExample` rows, each with the sha256 of its whitespace-normalised question; `make_pool` writes
them to `<out>` with `<out>.manifest.json` beside it (both replaced, byte-identical for the same inputs).

The draw is made from the problems sorted by content hash, so the pool depends only on the data's
content and the seed, not on whether it came from the Hub, a jsonl or a parquet file, nor on row order.
Removal from training data (`gsmkit.training.data.remove_fewshot`) matches on the question's content
hash, never on row indices.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.fields import check_fields, setting
from gsmkit.jsonl import read_jsonl, write_jsonl
from gsmkit.prompts import Exemplar
from gsmkit.records import FewshotExample, Problem
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.settings import DecodeOptions, ProblemOptions, override

DEFAULT_POOL_SIZE = 8
DEFAULT_SEED = 42


@dataclass(frozen=True)
class FewshotSettings:
    """`gsmkit fewshot`: where the pool goes, which GSM8K split it is drawn from, its size and seed."""

    out: Path = setting(Path("fewshot_pool.jsonl"), "Pool file to write (JSONL).", short="-o",
                        path={"dir_okay": False})
    data: str = override(ProblemOptions, "data")
    split: str = override(ProblemOptions, "split", "train")
    n: int = setting(DEFAULT_POOL_SIZE, "Number of examples in the pool.", min=1)
    seed: int = override(DecodeOptions, "seed", DEFAULT_SEED)

    def __post_init__(self) -> None:
        check_fields(self)


def draw_pool(problems: Sequence[Problem], n: int = DEFAULT_POOL_SIZE,
              seed: int = DEFAULT_SEED) -> list[FewshotExample]:
    """n problems drawn with `seed` from the problems ordered by content hash (see the module docstring)."""
    if n < 1:
        raise ConfigError(f"pool size must be at least 1, got {n}", hint="use --n 8 (the default)")
    # Sorted by content hash; ties (the same question twice) broken by every other field, then kept
    # once, so neither row order nor duplicates can change the draw or put one question in twice.
    # Each hash is computed once; sorting on the key alone because Problems do not compare.
    keyed = sorted((((p.sha256, p.answer, p.id, p.question, p.gold), p) for p in problems),
                   key=lambda kp: kp[0])
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


def make_pool(settings: FewshotSettings) -> dict[str, Any]:
    """Draw the pool of `settings` and write `<out>` and `<out>.manifest.json`; returns a summary
    (out, n, seed, split, source_rows, ids). Nothing is written unless the draw succeeds."""
    from gsmkit.data.gsm8k import load_gsm8k, source_file
    from gsmkit.manifest import build_manifest

    output = RunOutput.file(settings.out, sidecars=(), overwrite=True, what="few-shot pool", keep_suffix=True,
                            inputs=(settings.data, source_file(settings.data, settings.split)))
    problems = load_gsm8k(settings.data, settings.split)
    pool = draw_pool(problems, n=settings.n, seed=settings.seed)
    inputs = {"data": source_file(settings.data, settings.split)}
    manifest = build_manifest("fewshot", settings, inputs=inputs, seeds={"seed": settings.seed})
    output.publish({"main": jsonl_writer(ex.to_dict() for ex in pool), MANIFEST: json_writer(manifest)})
    return {"out": str(settings.out), "n": len(pool), "seed": settings.seed, "split": settings.split,
            "source_rows": len(problems), "ids": [ex.id for ex in pool]}


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
