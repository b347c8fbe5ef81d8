"""gsmkit.data.gsm8k: the same problems from every local layout; clear errors; never a surprise Hub call."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from conftest import SHARED_GSM8K, TEST_ROWS, TRAIN_ROWS

from gsmkit.data.gsm8k import find_split_files, load_gsm8k, resolve_split_files, select_problems
from gsmkit.errors import ConfigError, DataError
from gsmkit.records import problem_id

ROWS = [
    {"question": "Ann has 2 cats. She gets 3 more. How many cats?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "A box holds 1,000 pens. Half are sold. How many remain?",
     "answer": "1000 / 2 = 500\n#### 500"},
    {"question": "Bo earns $12 an hour for 10 hours. How much?", "answer": "12 * 10 = 120\n#### 1,20"},
    {"question": "What is 7 minus 10?", "answer": "7 - 10 = -3\n#### -3"},
]


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _parquet(path: Path, rows) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _fake_datasets(monkeypatch, load_dataset) -> None:
    """Stand-in `datasets` module (the real one is slow to import and would try the network)."""
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the Hugging Face Hub."""

    def refuse(*args, **_kwargs):
        raise AssertionError(f"unexpected Hub lookup: load_dataset{args}")

    _fake_datasets(monkeypatch, refuse)


def _layouts(tmp_path: Path) -> dict[str, Path]:
    """The same four problems in every layout `load_gsm8k` accepts for split 'test'."""
    out = {}
    (tmp_path / "file.jsonl").write_text(_jsonl(ROWS), encoding="utf-8")
    out["jsonl file"] = tmp_path / "file.jsonl"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "test.jsonl").write_text(_jsonl(ROWS), encoding="utf-8")
    (tmp_path / "folder" / "train.jsonl").write_text(_jsonl(ROWS[:1]), encoding="utf-8")
    out["folder with test.jsonl"] = tmp_path / "folder"
    (tmp_path / "array.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    out["json array"] = tmp_path / "array.json"
    out["parquet file"] = _parquet(tmp_path / "test.parquet", ROWS)
    _parquet(tmp_path / "hub" / "main" / "test-00000-of-00001.parquet", ROWS)
    _parquet(tmp_path / "hub" / "main" / "train-00000-of-00001.parquet", ROWS[:2])
    out["hub export folder"] = tmp_path / "hub"
    return out


@pytest.mark.usefixtures("no_hub")
def test_every_layout_gives_the_same_problems(tmp_path):
    expected_ids = [problem_id(r["question"]) for r in ROWS]
    loaded = {name: load_gsm8k(path, "test") for name, path in _layouts(tmp_path).items()}
    reference = loaded["jsonl file"]
    assert [p.id for p in reference] == expected_ids
    assert [p.gold for p in reference] == ["5", "500", "120", "-3"]
    for name, problems in loaded.items():
        assert problems == reference, name


@pytest.mark.usefixtures("no_hub")
def test_string_and_path_sources_agree(tmp_path):
    folder = _layouts(tmp_path)["hub export folder"]
    assert load_gsm8k(str(folder), "test") == load_gsm8k(folder, "test")
    assert [p.question for p in load_gsm8k(folder, "train")] == [r["question"] for r in ROWS[:2]]


@pytest.mark.usefixtures("no_hub")
def test_json_file_written_as_json_lines(tmp_path):
    """`datasets.Dataset.to_json` writes JSON Lines into a .json file; that is accepted too."""
    path = tmp_path / "test.json"
    path.write_text(_jsonl(ROWS), encoding="utf-8")
    assert [p.id for p in load_gsm8k(path)] == [problem_id(r["question"]) for r in ROWS]


def test_folder_prefers_jsonl_and_finds_split_files(tmp_path):
    (tmp_path / "test.jsonl").write_text(_jsonl(ROWS), encoding="utf-8")
    (tmp_path / "test.json").write_text(json.dumps(ROWS), encoding="utf-8")
    assert find_split_files(tmp_path, "test") == [tmp_path / "test.jsonl"]
    assert find_split_files(tmp_path, "train") == []


@pytest.mark.usefixtures("no_hub")
def test_sharded_parquet_is_read_in_shard_order(tmp_path):
    _parquet(tmp_path / "main" / "test-00001-of-00002.parquet", ROWS[2:])
    _parquet(tmp_path / "main" / "test-00000-of-00002.parquet", ROWS[:2])
    assert [p.id for p in load_gsm8k(tmp_path, "test")] == [problem_id(r["question"]) for r in ROWS]


@pytest.mark.usefixtures("no_hub")
def test_folder_without_the_split_lists_what_is_there(tmp_path):
    (tmp_path / "train.jsonl").write_text(_jsonl(ROWS), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        load_gsm8k(tmp_path, "test")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: no file for split 'test'")
    assert "notes.txt" in msg and "train.jsonl" in msg
    assert "test.jsonl" in info.value.hint


@pytest.mark.usefixtures("no_hub")
def test_empty_folder_says_nothing_is_there(tmp_path):
    with pytest.raises(DataError, match=r"\(found: nothing\)"):
        load_gsm8k(tmp_path, "test")


@pytest.mark.parametrize(
    "source",
    ["missing/test.jsonl", "no/such/folder", "./gsm8k", "gsm8k.parquet", "data dir/gsm8k", "a\\b", "nope/"],
)
@pytest.mark.usefixtures("no_hub")
def test_missing_local_path_is_a_data_error_not_a_hub_lookup(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        load_gsm8k(source, "test")
    assert str(info.value) == f"{source}: no such file or folder"


@pytest.mark.usefixtures("no_hub")
def test_missing_folder_under_an_existing_parent_is_a_path(tmp_path, monkeypatch):
    """`data/gsm8k` could be a Hub id, but with a local `data/` the user meant the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no such file or folder"):
        load_gsm8k("data/gsm8k", "test")


@pytest.mark.parametrize("source", ["openai/gsm8k", "gsm8k", "my-org/gsm8k.v2"])
def test_hub_ids_are_not_local_paths(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    assert resolve_split_files(source, "test") is None


def test_hub_rows_are_validated_like_local_ones(tmp_path, monkeypatch):
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [dict(r) for r in ROWS + ROWS[:1]]

    monkeypatch.chdir(tmp_path)
    _fake_datasets(monkeypatch, fake_load)
    problems = load_gsm8k("openai/gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [p.id for p in problems] == [problem_id(r["question"]) for r in ROWS]


def test_hub_failure_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def offline(*_args, **_kwargs):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DataError, match=r"^openai/gsm8k: cannot load split 'test' from the Hugging Face Hub"):
        load_gsm8k("openai/gsm8k", "test")


@pytest.mark.usefixtures("no_hub")
def test_duplicate_questions_are_kept_once(tmp_path):
    dup = {**ROWS[0], "question": "  " + ROWS[0]["question"].replace(" ", "   ") + "\n"}
    path = tmp_path / "test.jsonl"
    path.write_text(_jsonl([ROWS[0], ROWS[1], dup, ROWS[1], ROWS[2]]), encoding="utf-8")
    problems = load_gsm8k(path)
    assert [p.question for p in problems] == [r["question"] for r in ROWS[:3]]  # first copy, source order


@pytest.mark.usefixtures("no_hub")
def test_given_ids_cannot_hide_duplicates_or_merge_problems(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(_jsonl([{**ROWS[0], "id": "x1"}, {**ROWS[0], "id": "x2"}]), encoding="utf-8")
    assert [p.id for p in load_gsm8k(path)] == ["x1"]
    path.write_text(_jsonl([{**ROWS[0], "id": "x1"}, {**ROWS[1], "id": "x1"}]), encoding="utf-8")
    message = f"{path}:2: id 'x1' is already used by a different question"
    with pytest.raises(DataError, match=re.escape(message)):
        load_gsm8k(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps(ROWS[0]) + "\n{oops\n", ":2: not valid JSON"),
        (json.dumps(ROWS[0]) + "\n" + json.dumps({"question": "q"}) + "\n", ":2: missing field 'answer'"),
        (json.dumps(ROWS[0]) + "\n\n[1]\n", ":3: expected a JSON object, got list"),
        ("\n  \n", ": file is empty"),
    ],
)
@pytest.mark.usefixtures("no_hub")
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "test.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_gsm8k(path)
    assert str(info.value).startswith(f"{path}{message}")


@pytest.mark.usefixtures("no_hub")
def test_bad_array_item_is_named(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([ROWS[0], {"question": "q", "answer": "no number"}]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:item 2: field 'answer'")):
        load_gsm8k(path)


@pytest.mark.usefixtures("no_hub")
def test_bad_parquet_row_is_named(tmp_path):
    path = _parquet(tmp_path / "test.parquet", [ROWS[0], {"question": "", "answer": "#### 1"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:row 2: field 'question' is empty")):
        load_gsm8k(path)


@pytest.mark.usefixtures("no_hub")
def test_corrupt_parquet(tmp_path):
    path = tmp_path / "test.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read parquet")):
        load_gsm8k(path)


@pytest.mark.usefixtures("no_hub")
def test_unicode_line_separators_inside_rows(tmp_path):
    """U+2028 / U+0085 are legal unescaped in JSON strings; they must not split a JSON line."""
    rows = [{**ROWS[0], "question": "Line\u2028sep\x85x?"}, ROWS[1]]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [p.question for p in load_gsm8k(path)] == [r["question"] for r in rows]


@pytest.mark.usefixtures("no_hub")
def test_byte_order_mark_and_bad_encoding(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(ROWS).encode())
    assert len(load_gsm8k(path)) == len(ROWS)
    path.write_bytes(_jsonl(ROWS).encode() + b'{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: not valid UTF-8")):
        load_gsm8k(path)


# --- select_problems -----------------------------------------------------------------------------


@pytest.fixture
def ten(tmp_path):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}"} for i in range(10)]
    path = tmp_path / "test.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return load_gsm8k(path)


@pytest.mark.parametrize(
    ("offset", "limit", "golds"),
    [
        (0, None, list(range(1, 11))),
        (0, 3, [1, 2, 3]),
        (4, 2, [5, 6]),
        (8, 5, [9, 10]),
        (3, None, list(range(4, 11))),
        (3, -1, list(range(4, 11))),
        (10, 2, []),
    ],
)
def test_select_problems(ten, offset, limit, golds):
    assert [int(p.gold) for p in select_problems(ten, offset, limit)] == golds


def test_select_problems_negative_offset(ten):
    with pytest.raises(ConfigError, match="offset"):
        select_problems(ten, -2, 1)


# --- the synthetic data of the fixtures, and the real data beside the repository --------------------------


@pytest.fixture(scope="module",
                params=["synthetic", pytest.param("real", marks=pytest.mark.shared_data("gsm8k"))])
def files(request, gsm8k_dir) -> tuple[Path, dict[str, int]]:
    """A GSM8K folder and its split sizes."""
    if request.param == "real":
        return SHARED_GSM8K, {"train": 7473, "test": 1319}
    return gsm8k_dir, {"train": TRAIN_ROWS, "test": TEST_ROWS}


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_splits(files, split):
    folder, sizes = files
    problems = load_gsm8k(folder, split)
    assert len(problems) == sizes[split]
    assert len({p.id for p in problems}) == sizes[split]
    assert all(re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", p.gold) for p in problems)
    # folder and file give the same problems
    assert [p.id for p in load_gsm8k(folder / f"{split}.jsonl", split)] == [p.id for p in problems]


def test_train_and_test_do_not_overlap(files):
    folder, _ = files
    train, test = (load_gsm8k(folder, split) for split in ("train", "test"))
    assert not {p.sha256 for p in train} & {p.sha256 for p in test}
