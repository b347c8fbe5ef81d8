"""gsmkit.data.fewshot: a deterministic, content-defined pool, removed from training by content hash
(`gsmkit.training.data.remove_fewshot`), and `make_pool` behind `gsmkit fewshot`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gsmkit.data.fewshot import (
    DEFAULT_POOL_SIZE,
    FewshotSettings,
    draw_pool,
    make_pool,
    pool_exemplars,
    pool_hashes,
    read_pool,
    write_pool,
)
from gsmkit.data.gsm8k import load_gsm8k
from gsmkit.errors import ConfigError, DataError
from gsmkit.prompts import Exemplar
from gsmkit.records import FewshotExample, Problem, content_hash
from gsmkit.training.data import TrainExample, remove_fewshot


def _problems(n: int) -> list[Problem]:
    return [Problem.from_dict({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}, f"mem:{i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def train(gsm8k_dir) -> list[Problem]:
    return load_gsm8k(gsm8k_dir, "train")


# --- drawing on a train split -------------------------------------------------------------


def test_pool_file_is_byte_identical_across_draws(train, tmp_path):
    write_pool(tmp_path / "a.jsonl", draw_pool(train, 8, seed=42))
    write_pool(tmp_path / "b.jsonl", draw_pool(list(train), 8, seed=42))
    a, b = (tmp_path / "a.jsonl").read_bytes(), (tmp_path / "b.jsonl").read_bytes()
    assert a == b
    assert a.count(b"\n") == 8


def test_pool_depends_on_the_seed(train):
    ids = {seed: [ex.id for ex in draw_pool(train, 8, seed=seed)] for seed in (0, 1, 42)}
    assert ids[0] != ids[1] and ids[1] != ids[42] and ids[0] != ids[42]


def test_pool_is_independent_of_row_order(train):
    shuffled = list(train)
    random.Random(7).shuffle(shuffled)
    assert shuffled != train
    assert draw_pool(shuffled, 8, seed=42) == draw_pool(train, 8, seed=42)
    assert draw_pool(list(reversed(train)), 8, seed=3) == draw_pool(train, 8, seed=3)


def test_pool_rows_are_train_problems_with_hashes(train):
    pool = draw_pool(train, 16, seed=42)
    by_id = {p.id: p for p in train}
    assert len({ex.sha256 for ex in pool}) == 16
    for ex in pool:
        assert ex.to_problem() == by_id[ex.id]
        assert ex.sha256 == content_hash(ex.question)


def test_larger_pool_is_a_different_draw_not_a_prefix_change(train):
    assert len(draw_pool(train, DEFAULT_POOL_SIZE)) == DEFAULT_POOL_SIZE
    # Same seed, same size: identical; the default arguments are the documented ones.
    assert draw_pool(train) == draw_pool(train, DEFAULT_POOL_SIZE, 42)


# --- drawing: edge cases ------------------------------------------------------------------------


def test_pool_size_limits():
    problems = _problems(5)
    assert len(draw_pool(problems, 5, seed=1)) == 5
    with pytest.raises(ConfigError, match="larger than the 5"):
        draw_pool(problems, 6)
    for n in (0, -1):
        with pytest.raises(ConfigError, match="at least 1"):
            draw_pool(problems, n)


def test_duplicate_questions_enter_the_pool_once_and_do_not_break_order_independence():
    problems = _problems(6)
    dup = Problem(id="other-id", question="  " + problems[2].question + " ", answer="#### 4", gold="4")
    with_dup = problems + [dup]
    pool = draw_pool(with_dup, 6, seed=0)
    assert len({ex.sha256 for ex in pool}) == 6
    for seed in range(20):
        assert draw_pool(with_dup, 3, seed) == draw_pool(list(reversed(with_dup)), 3, seed)
    with pytest.raises(ConfigError, match="6 distinct problems"):
        draw_pool(with_dup, 7)


def test_whitespace_copies_with_the_same_id_do_not_make_the_draw_order_dependent():
    problems = _problems(4)
    p = problems[1]
    copies = [Problem(id=p.id, question=p.question.replace(" ", ws), answer=p.answer, gold=p.gold)
              for ws in ("  ", "\n", "\t")]
    rows = problems + copies
    for seed in range(10):
        pools = {tuple(ex.question for ex in draw_pool(order, 4, seed)) for order in (rows, rows[::-1])}
        assert len(pools) == 1


def test_write_and_read_pool_round_trip(tmp_path):
    pool = draw_pool(_problems(10), 4, seed=5)
    path = tmp_path / "pool.jsonl"
    write_pool(path, pool)
    assert read_pool(path) == pool
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["id", "question", "answer", "gold", "sha256"]


def test_read_pool_rejects_hand_edited_rows(tmp_path):
    pool = draw_pool(_problems(4), 2, seed=5)
    rows = [ex.to_dict() for ex in pool]
    rows[1]["question"] += " Then double it."
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=f"{path.name}:2: field 'sha256'"):
        read_pool(path)


def test_read_pool_empty_file(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_pool(path)


# --- exemplars ----------------------------------------------------------------------------------


def test_pool_exemplars_first_k_in_file_order():
    pool = draw_pool(_problems(10), 5, seed=9)
    ex = pool_exemplars(pool, 3)
    assert ex == [Exemplar(question=p.question, answer=p.answer) for p in pool[:3]]
    assert pool_exemplars(pool, 0) == []
    assert len(pool_exemplars(pool, 5)) == 5


def test_pool_exemplars_k_larger_than_pool():
    pool = draw_pool(_problems(10), 3, seed=9)
    with pytest.raises(ConfigError) as info:
        pool_exemplars(pool, 4, "pool.jsonl")
    assert str(info.value) == "--k 4 asks for more exemplars than the 3 in pool.jsonl"
    assert "--n" in info.value.hint
    with pytest.raises(ConfigError, match=">= 0"):
        pool_exemplars(pool, -1)


# --- removal from training data -------------------------------------------------------------------


def _rows(questions: list[str]) -> list[TrainExample]:
    return [TrainExample(where=f"t:{i}", question=q, answer="#### 1") for i, q in enumerate(questions)]


def test_remove_pool_by_content_hash_despite_whitespace_and_shifted_rows():
    problems = _problems(12)
    pool = [FewshotExample.from_problem(problems[i]) for i in (3, 7)]
    # Training rows as some other tool wrote them: extra rows in front (indices shift) and other
    # whitespace in the pooled questions.
    questions = ["A warm-up question?", "Another one?"]
    for i, p in enumerate(problems):
        q = p.question
        if i == 3:
            q = "\n  " + q.replace(" ", "\t ") + "  "
        if i == 7:
            q = q.replace(" ", "\n")
        questions.append(q)
    rows = _rows(questions)
    kept, removed = remove_fewshot(rows, pool_hashes(pool))
    assert sorted(removed) == sorted(ex.sha256 for ex in pool)
    # everything else untouched, in order
    assert kept == [r for i, r in enumerate(rows) if i - 2 not in (3, 7)]


def test_remove_pool_reports_every_removed_row():
    problems = _problems(3)
    hashes = pool_hashes([FewshotExample.from_problem(problems[0])])
    rows = _rows([p.question for p in problems + [problems[0]]])
    kept, removed = remove_fewshot(rows, hashes)
    assert kept == rows[1:3]
    assert removed == [problems[0].sha256, problems[0].sha256]


def test_remove_pool_keeps_near_misses():
    """Only the whitespace-normalised question counts: a changed word or case is another problem."""
    problems = _problems(2)
    hashes = pool_hashes([FewshotExample.from_problem(problems[0])])
    rows = _rows([problems[0].question.upper(), problems[0].question + "!", problems[1].question])
    kept, removed = remove_fewshot(rows, hashes)
    assert kept == rows and removed == []


def test_remove_a_drawn_pool_from_its_train_split(train):
    pool = draw_pool(train, 8, seed=42)
    kept, removed = remove_fewshot(_rows([p.question for p in train]), pool_hashes(pool))
    assert len(kept) == len(train) - 8 and len(removed) == 8
    assert not {content_hash(r.question) for r in kept} & pool_hashes(pool)


# --- make_pool: the file and its manifest -------------------------------------------------------


def _gsm8k_file(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def test_make_pool_writes_the_pool_and_its_manifest_and_replaces_them(tmp_path):
    data = _gsm8k_file(tmp_path)
    out = tmp_path / "pool.jsonl"
    settings = FewshotSettings(out=out, data=str(data), n=4, seed=3)
    summary = make_pool(settings)
    first = out.read_bytes()
    assert summary["n"] == 4 and summary["source_rows"] == 10 and len(summary["ids"]) == 4
    assert read_pool(out) == draw_pool(load_gsm8k(data, "train"), 4, seed=3)
    manifest = json.loads((tmp_path / "pool.jsonl.manifest.json").read_text())
    assert manifest["command"] == "fewshot" and manifest["settings"]["n"] == 4
    assert manifest["inputs"]["data"]["sha256"]
    make_pool(settings)  # the same inputs again: replaced, byte for byte
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.jsonl", "pool.jsonl.manifest.json",
                                                          "train.jsonl"]


def test_make_pool_writes_nothing_when_the_draw_fails(tmp_path):
    data = _gsm8k_file(tmp_path, 3)
    with pytest.raises(ConfigError, match="larger than the 3"):
        make_pool(FewshotSettings(out=tmp_path / "pool.jsonl", data=str(data), n=4))
    with pytest.raises(ConfigError, match="--n must be >= 1"):
        FewshotSettings(out=tmp_path / "pool.jsonl", data=str(data), n=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
