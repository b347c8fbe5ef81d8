"""The problems of a steering search, split so that nothing is tuned or tested on what built the vectors.

In: the GSM8K source, the few-shot pool and k, the problems the vector folders were averaged over (their
`steer.json` `ids` and `sha256`), how many validation and test problems. Out: `SearchSplits`: the
validation problems (the first `--val-limit` train problems that are neither vector problems, few-shot
exemplars nor test problems), the test problems (the first `--test-limit` of the test split, the pool's
exemplars left out: exactly the problems `eval gsm8k --split test --limit M` evaluates), and `to_dict()`,
what `splits.json` holds. The four sets (vector problems, validation, test, exemplars) are checked to be
disjoint by content id (`check_disjoint`): a violation is an error, never a warning.

A problem's content id is its `id` (derived from the question's content: `records.problem_id`) and the
sha256 of its whitespace-normalised question; both are compared, so a file that names its rows with its own
ids cannot hide a repeated question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError

SPLITS_FORMAT = "gsmkit-steer-splits"
VALIDATION_SPLIT = "train"
TEST_SPLIT = "test"


@dataclass(frozen=True)
class SearchSplits:
    validation: list  # records.Problem, in dataset order
    test: list  # records.Problem, in dataset order
    vector_ids: dict[str, list[str]]  # vector folder -> the ids its vectors were averaged over
    vector_hashes: dict[str, list[str]]  # vector folder -> the content hashes of those problems (steer.json)
    exemplar_ids: list[str]  # the k few-shot exemplars (left out of all three)
    excluded: dict[str, int]  # why train problems were not validation candidates: reason -> count

    @property
    def validation_ids(self) -> list[str]:
        return [p.id for p in self.validation]

    @property
    def test_ids(self) -> list[str]:
        return [p.id for p in self.test]

    def to_dict(self) -> dict[str, Any]:
        """`splits.json`."""
        every = sorted({i for ids in self.vector_ids.values() for i in ids})
        hashes = sorted({h for hs in self.vector_hashes.values() for h in hs})
        return {
            "format": SPLITS_FORMAT, "version": 1,
            "vectors": {"ids": every, "sha256": hashes, "n": len(every), "folders": self.vector_ids},
            "validation": {"split": VALIDATION_SPLIT, "n": len(self.validation), "ids": self.validation_ids},
            "test": {"split": TEST_SPLIT, "n": len(self.test), "ids": self.test_ids},
            "exemplars": {"n": len(self.exemplar_ids), "ids": self.exemplar_ids},
            "excluded_from_validation": self.excluded,
            "disjoint": True,
        }


def check_disjoint(sets: dict[str, Sequence[str]]) -> None:
    """DataError naming the first two sets that share an id (and the id)."""
    names = list(sets)
    seen = {name: set(ids) for name, ids in sets.items()}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = seen[a] & seen[b]
            if common:
                example = min(common, key=lambda name: (len(name), name))  # an id rather than a hash
                raise DataError(f"the {a} and {b} problems share problem {example}: the splits of a search "
                                "must be disjoint",
                                hint="make the vectors from train problems (`steer vectors --split train`) "
                                     "and keep the pool's exemplars out of them")


def _content_ids(problems: Sequence[Any]) -> set[str]:
    """Every name a problem goes by: its id, the id its question content gives, its content hash."""
    from gsmkit.records import problem_id

    return {x for p in problems for x in (p.id, problem_id(p.question), p.sha256)}


def build_splits(data: str, pool: Path | None, k: int, vector_ids: dict[str, list[str]],
                 vector_hashes: dict[str, list[str]], val_limit: int, test_limit: int) -> SearchSplits:
    """The validation and test problems of a search (see the module docstring); reads GSM8K, no model."""
    from gsmkit.data.fewshot import problems_for_run, read_pool
    from gsmkit.records import problem_id

    exemplars = read_pool(pool)[:k] if k > 0 and pool is not None else []
    exemplar_names = {x for ex in exemplars for x in (ex.id, problem_id(ex.question), ex.sha256)}
    test, _, _ = problems_for_run(data, TEST_SPLIT, 0, test_limit, pool, k)
    train, _, pooled = problems_for_run(data, VALIDATION_SPLIT, 0, None, pool, k)
    if not test:
        raise DataError(f"{data}: the {TEST_SPLIT} split has no problems to test on",
                        hint="pass a GSM8K source with a test split")
    vectors = {i for names in (*vector_ids.values(), *vector_hashes.values()) for i in names}
    in_test = _content_ids(test)
    excluded = {"vectors": 0, "test": 0, "exemplars": pooled}
    candidates = []
    for p in train:
        names = {p.id, problem_id(p.question), p.sha256}
        if names & vectors:
            excluded["vectors"] += 1
        elif names & in_test:
            excluded["test"] += 1
        elif names & exemplar_names:
            excluded["exemplars"] += 1
        else:
            candidates.append(p)
    if len(candidates) < val_limit:  # too few to keep validation apart from the rest
        raise ConfigError(
            f"--val-limit {val_limit}: only {len(candidates)} {VALIDATION_SPLIT} problems are left once the "
            f"{excluded['vectors']} vector problems, {excluded['exemplars']} few-shot exemplars and "
            f"{excluded['test']} test problems are taken out",
            hint="lower --val-limit (or --test-limit), or make the vectors from fewer problems")
    validation = candidates[:val_limit]
    splits = SearchSplits(validation, test, {str(f): list(ids) for f, ids in vector_ids.items()},
                          {str(f): list(hs) for f, hs in vector_hashes.items()}, [ex.id for ex in exemplars],
                          excluded)
    assert_disjoint(splits)
    return splits


def assert_disjoint(splits: SearchSplits) -> None:
    """The invariant `splits.json` promises, checked on every name of every problem (DataError if not)."""
    vectors = sorted({i for names in (*splits.vector_ids.values(), *splits.vector_hashes.values())
                      for i in names})
    check_disjoint({"vector": vectors, "validation": sorted(_content_ids(splits.validation)),
                    "test": sorted(_content_ids(splits.test)), "few-shot exemplar": splits.exemplar_ids})
