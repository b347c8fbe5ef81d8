"""gsmkit.data.benchmarks and `gsmkit convert-benchmarks`: readers, stratified seeded sampling,
decontamination, the output file and its manifest."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.data.benchmarks import (
    GPQA_COLUMNS,
    ConvertSettings,
    allocate,
    convert_benchmarks,
    read_drop,
    read_gpqa,
    read_humaneval,
    read_mgsm,
    read_mmlu,
)
from gsmkit.errors import ConfigError, DataError

SHARED = SHARED_DATA / "benchmarks"
REAL = ("humaneval", "mgsm", "mmlu", "math", "math500")

GPQA_HEADER = [*GPQA_COLUMNS, "Explanation", "Subdomain", "High-level domain", "Record ID",
               "Writer's Difficulty Estimate"]


def _gpqa_rows(n: int) -> list[list[str]]:
    return [[f"Which particle number {i}, with a comma, is meant?", f"right {i}", f"wrong a{i}",
             f"wrong b{i}", f"wrong c{i}", "because", "Physics", "Physics", f"rec{i}", "Hard graduate level"]
            for i in range(n)]


def write_gpqa(folder: Path, n: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "gpqa_main.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(GPQA_HEADER)
        w.writerows(_gpqa_rows(n))


def write_drop(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    empty_date = {"day": "", "month": "", "year": ""}
    data = {
        "nfl_1": {"passage": "The Bears scored 3 touchdowns.\nThe Lions kicked a field goal.",
                  "wiki_url": "x",
                  "qa_pairs": [
                      {"question": "How many touchdowns?", "query_id": "q1", "validated_answers": [],
                       "answer": {"number": "3", "date": empty_date, "spans": []}},
                      {"question": "Who kicked a field goal?", "query_id": "q2", "validated_answers": [],
                       "answer": {"number": "", "date": empty_date, "spans": ["the Lions", "kicker"]}},
                  ]},
        "hist_2": {"passage": "The treaty was signed in May 1648.", "wiki_url": "y",
                   "qa_pairs": [{"question": "When was it signed?", "query_id": "q3", "validated_answers": [],
                                 "answer": {"number": "", "date": {"day": "", "month": "May", "year": "1648"},
                                            "spans": []}}]},
    }
    (folder / "drop_dataset_dev.json").write_text(json.dumps(data), encoding="utf-8")


MGSM_LANGUAGES = ("en", "de", "fr", "es", "zh", "ja", "ru")
MMLU_SUBJECTS = ("abstract_algebra", "astronomy", "marketing")  # hard, medium, medium
SYNTHETIC_ROWS = 120  # rows of each synthetic benchmark (MGSM: per language, 20)


def write_real_layouts(root: Path, n: int = SYNTHETIC_ROWS) -> Path:
    """humaneval, mgsm, mmlu, math and math500 folders in the layouts of the real files (../shared's README):
    HumanEval.jsonl.gz, mgsm_<lang>.tsv (answers with thousands separators now and then), MMLU's
    test/<subject>_test.csv without a header, MATH's 'Level N' and MATH-500's int levels; n rows each."""
    import gzip

    (root / "humaneval").mkdir(parents=True)
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"task_id": f"HumanEval/{i}", "prompt": f"def add_{i}(x):\n    return\n",
                                  "entry_point": f"add_{i}", "canonical_solution": f"    return x + {i}\n",
                                  "test": f"assert add_{i}(1) == {i + 1}"}) + "\n" for i in range(n))
    (root / "mgsm").mkdir()
    per = n // len(MGSM_LANGUAGES) + 3
    for lang in MGSM_LANGUAGES:
        (root / "mgsm" / f"mgsm_{lang}.tsv").write_text("".join(
            f"[{lang}] A farm has {i} rows of 97 trees. How many trees?\t{i * 97:,}\n"
            for i in range(1, per + 1)), encoding="utf-8")
    (root / "mmlu" / "test").mkdir(parents=True)
    for s, subject in enumerate(MMLU_SUBJECTS):
        with (root / "mmlu" / "test" / f"{subject}_test.csv").open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([f"Which, in {subject}, is item {i}?", f"a{i}", f"b{i}", f"c{i}",
                                      f"d{i}", "ABCD"[(i + s) % 4]] for i in range(n // len(MMLU_SUBJECTS)))
    for name in ("math", "math500"):
        (root / name).mkdir()
        rows = []
        for i in range(n):
            level = i % 5 + 1
            row = {"problem": f"What is ${i} \\times {level}$?",
                   "solution": f"It is $\\boxed{{{i * level}}}$.",
                   "level": f"Level {level}" if name == "math" else level}
            row |= ({"type": "Algebra"} if name == "math" else {
                "subject": "Prealgebra", "answer": str(i * level), "unique_id": f"test/prealgebra/{i}.json"})
            rows.append(json.dumps(row) + "\n")
        (root / name / "test.jsonl").write_text("".join(rows), encoding="utf-8")
    return root


@pytest.fixture()
def bench_dir(tmp_path: Path) -> Path:
    """Benchmark folders in the real files' layouts (synthetic rows) plus GPQA and DROP fixtures."""
    root = write_real_layouts(tmp_path / "bench")
    write_gpqa(root / "gpqa", 12)
    write_drop(root / "drop")
    return root


# --- allocation -----------------------------------------------------------------------------------

def test_allocate_known_values():
    assert allocate({"medium": 1331, "hard": 3669}, 100) == {"medium": 27, "hard": 73}
    assert allocate({"easy": 1000, "medium": 1, "hard": 1}, 3) == {"easy": 1, "medium": 1, "hard": 1}
    assert allocate({"easy": 2, "hard": 3}, 100) == {"easy": 2, "hard": 3}  # fewer than asked: all
    assert sum(allocate({"a": 1, "b": 1, "c": 1}, 2).values()) == 2


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["easy", "medium", "hard", "x"]), st.integers(1, 500), min_size=1),
       st.integers(1, 600))
def test_allocate_properties(counts, n):
    alloc = allocate(counts, n)
    total = sum(counts.values())
    assert sum(alloc.values()) == min(n, total)
    assert all(0 <= alloc[k] <= counts[k] for k in alloc)
    if n >= len(counts):
        assert all(alloc[k] >= 1 for k in counts)
    quotas = {k: min(n, total) * c / total for k, c in counts.items()}
    if all(q >= 1 for q in quotas.values()):  # no minimum to enforce: plain largest remainder
        assert all(abs(alloc[k] - quotas[k]) < 1 for k in counts)


# --- readers --------------------------------------------------------------------------------------

def test_gpqa_fixture_options_shuffled_and_seeded(tmp_path):
    write_gpqa(tmp_path / "gpqa", 12)
    ex, files = read_gpqa(tmp_path / "gpqa", 1)
    assert len(ex) == 12 and files[0].name == "gpqa_main.csv"
    first = ex[0]
    assert first.prompt.endswith("\nD. " + first.prompt.split("\nD. ")[1])
    assert first.prompt.endswith("Answer:")
    letter, text = first.response.split(". ", 1)
    assert text == "right 0" and f"\n{letter}. right 0\n" in first.prompt
    assert first.metadata["difficulty"] == "hard" and first.metadata["domain"] == "science"
    letters = {e.response[0] for e in ex}
    assert len(letters) > 1  # the correct answer is not always A
    again, _ = read_gpqa(tmp_path / "gpqa", 1)
    assert [e.prompt for e in again] == [e.prompt for e in ex]


def test_drop_fixture_answers(tmp_path):
    write_drop(tmp_path / "drop")
    ex, _ = read_drop(tmp_path / "drop")
    assert [e.response for e in ex] == ["3", "the Lions, kicker", "May 1648"]
    assert ex[0].prompt.startswith("The Bears scored")
    assert ex[0].prompt.endswith("Question: How many touchdowns?\nAnswer:")
    assert ex[0].metadata == {"difficulty": "easy", "domain": "reading comprehension", "source": "drop",
                              "passage_id": "nfl_1", "query_id": "q1"}


def test_readers_on_the_real_layouts(tmp_path):
    root = write_real_layouts(tmp_path)
    he, _ = read_humaneval(root / "humaneval")
    assert len(he) == SYNTHETIC_ROWS and he[3].prompt.startswith("def add_3(x):")
    assert he[3].response == "    return x + 3\n" and he[3].metadata["entry_point"] == "add_3"
    mg, _ = read_mgsm(root / "mgsm")
    assert {e.metadata["language"] for e in mg} == set(MGSM_LANGUAGES)
    assert [e.response for e in mg if e.metadata["language"] == "en"][14] == "1455"  # written 1,455
    mm, _ = read_mmlu(root / "mmlu")
    assert len(mm) == SYNTHETIC_ROWS
    assert {e.metadata["subject"]: e.metadata["difficulty"] for e in mm} == {
        "abstract_algebra": "hard", "astronomy": "medium", "marketing": "medium"}
    assert mm[0].prompt.startswith("Which, in abstract_algebra, is item 0?\nA. a0")
    assert mm[0].response == "A. a0"


@pytest.mark.shared_data("benchmarks")
def test_real_readers():
    he, _ = read_humaneval(SHARED / "humaneval")
    assert len(he) == 164 and he[0].prompt.startswith("from typing import List")
    mg, _ = read_mgsm(SHARED / "mgsm")
    assert len(mg) == 7 * 250 and all(e.response.lstrip("-").isdigit() for e in mg)
    assert {e.metadata["language"] for e in mg} == {"en", "de", "fr", "es", "zh", "ja", "ru"}
    mm, _ = read_mmlu(SHARED / "mmlu")
    assert len(mm) == 14079  # as pandas counts the 57 test CSVs; rows with U+0085 inside a field stay whole
    algebra = next(e for e in mm if e.metadata["subject"] == "abstract_algebra")
    assert algebra.metadata["difficulty"] == "hard"


def test_hub_exports(tmp_path):
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "test.jsonl").write_text(json.dumps(
        {"question": "2+2?", "subject": "college_mathematics", "choices": ["3", "4", "5", "6"],
         "answer": 1}) + "\n")
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "test.jsonl").write_text(json.dumps(
        {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "",
         "entry_point": "f"}) + "\n")
    (tmp_path / "mgsm" / "fr").mkdir(parents=True)
    (tmp_path / "mgsm" / "fr" / "test.jsonl").write_text(
        json.dumps({"question": "Combien?", "answer_number": 1200.0}) + "\n")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "two\n#### 2"}) + "\n")
    out = tmp_path / "o.jsonl"
    summary = convert_benchmarks(ConvertSettings(tmp_path, out,
                                                 benchmarks=("mmlu", "humaneval", "mgsm", "gsm8k")))
    rows = {r["metadata"]["source"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["mmlu"]["response"] == "B. 4" and rows["mmlu"]["metadata"]["difficulty"] == "hard"
    assert rows["humaneval"]["response"] == "    return 1\n"
    assert rows["mgsm"]["response"] == "1200" and rows["mgsm"]["metadata"]["language"] == "fr"
    assert rows["gsm8k"]["response"] == "two\n#### 2"
    assert summary["written"] == 4


# --- malformed inputs -----------------------------------------------------------------------------

def test_bad_csv_row_names_file_and_line(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c\n")
    with pytest.raises(DataError, match=r"anatomy_test.csv:2: expected 6 columns"):
        read_mmlu(tmp_path / "mmlu")


def test_truncated_gzip_is_a_data_error(tmp_path):
    data = (write_real_layouts(tmp_path / "whole") / "humaneval" / "HumanEval.jsonl.gz").read_bytes()
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "HumanEval.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"HumanEval.jsonl.gz:\d+: truncated or corrupt gzip"):
        read_humaneval(tmp_path / "humaneval")


def test_missing_column_and_field(tmp_path):
    (tmp_path / "gpqa").mkdir()
    (tmp_path / "gpqa" / "gpqa_main.csv").write_text("Question,Correct Answer\nq,a\n")
    with pytest.raises(DataError, match=r"gpqa_main.csv:1: missing column 'Incorrect Answer 1'"):
        read_gpqa(tmp_path / "gpqa", 0)
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "h.jsonl").write_text('{"task_id": "a", "prompt": "p", "entry_point": "f"}\n')
    with pytest.raises(DataError, match=r"h.jsonl:1: missing field 'canonical_solution'"):
        read_humaneval(tmp_path / "humaneval")


def test_cli_malformed_exit_1_no_output(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c\n")
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(app, ["convert-benchmarks", "--input-dir", str(tmp_path), "--out", str(out),
                                   "--benchmarks", "mmlu"])
    assert res.exit_code == 1
    assert "anatomy_test.csv:2" in res.output and res.output.count("error:") == 1
    assert not out.exists() and not list(tmp_path.glob("o.jsonl*"))


def test_settings_validation(tmp_path):
    with pytest.raises(ConfigError, match="unknown benchmark"):
        ConvertSettings(tmp_path, tmp_path / "o", benchmarks=("mmlu", "squad"))
    with pytest.raises(ConfigError, match="samples-per-benchmark"):
        ConvertSettings(tmp_path, tmp_path / "o", samples_per_benchmark=0)
    res = CliRunner().invoke(app, ["convert-benchmarks", "--input-dir", str(tmp_path),
                                   "--out", str(tmp_path / "o"), "--benchmarks", "squad"])
    assert res.exit_code == 2


# --- end to end on the real files' layouts -------------------------------------------------------

def test_full_conversion_100_each(bench_dir, tmp_path):
    out = tmp_path / "bench.jsonl"
    start = time.perf_counter()
    res = CliRunner().invoke(app, ["convert-benchmarks", "--input-dir", str(bench_dir), "--out", str(out),
                                   "--samples-per-benchmark", "100", "--json"])
    elapsed = time.perf_counter() - start
    assert res.exit_code == 0, res.output
    assert elapsed < 30
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["metadata"]["source"]] = counts.get(r["metadata"]["source"], 0) + 1
        assert set(r) == {"prompt", "response", "metadata"} and r["response"]
    assert counts == {b: 100 for b in REAL} | {"gpqa": 12, "drop": 3}
    assert summary["missing"] == ["gsm8k"] and summary["benchmarks"]["gsm8k"]["status"] == "missing"
    assert "warning: gsm8k" in res.stderr
    # output ordered by benchmark
    order = [r["metadata"]["source"] for r in rows]
    assert order == sorted(order, key=["drop", "gpqa", "humaneval", "math", "math500", "mmlu", "mgsm"].index)
    math = [r for r in rows if r["metadata"]["source"] == "math"]
    assert {r["metadata"]["difficulty"] for r in math} == {"medium", "hard"}
    assert all(r["metadata"]["difficulty"] == ("medium" if r["metadata"]["level"] <= 2 else "hard")
               for r in math)
    manifest = json.loads((tmp_path / "bench.jsonl.manifest.json").read_text())
    assert manifest["command"] == "convert-benchmarks" and manifest["seeds"] == {"seed": 42}


def test_determinism(bench_dir, tmp_path):
    def run(seed: int, name: str) -> bytes:
        out = tmp_path / name
        convert_benchmarks(ConvertSettings(bench_dir, out, benchmarks=("math500", "mgsm", "gpqa"), seed=seed,
                                           samples_per_benchmark=20))
        return out.read_bytes()

    a, b, c = run(1, "a.jsonl"), run(1, "b.jsonl"), run(2, "c.jsonl")
    assert a == b
    assert a != c


def test_decontamination_counts(bench_dir, tmp_path):
    mgsm_en = (bench_dir / "mgsm" / "mgsm_en.tsv").read_text(encoding="utf-8").splitlines()
    mgsm_rows = sum(len((bench_dir / "mgsm" / f"mgsm_{lang}.tsv").read_text().splitlines())
                    for lang in MGSM_LANGUAGES)
    train = tmp_path / "train.jsonl"
    with train.open("w") as fh:
        fh.write(json.dumps({"question": "  " + mgsm_en[0].split("\t")[0].replace(" ", "  ") + " "}) + "\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": mgsm_en[1].split("\t")[0]},
                                          {"role": "assistant", "content": "x"}]}) + "\n")
        fh.write(json.dumps({"prompt": "How many touchdowns?"}) + "\n")
    out = tmp_path / "o.jsonl"
    summary = convert_benchmarks(ConvertSettings(bench_dir, out, benchmarks=("mgsm", "drop"),
                                                 samples_per_benchmark=-1, exclude=(train,)))
    assert summary["excluded"] == {"mgsm": 2, "drop": 1}
    assert summary["benchmarks"]["mgsm"]["written"] == mgsm_rows - 2
    assert summary["benchmarks"]["drop"]["written"] == 2
    text = out.read_text()
    assert "How many touchdowns?" not in text


def test_empty_benchmark_reported(tmp_path):
    write_drop(tmp_path / "drop")
    (tmp_path / "gpqa").mkdir()
    summary = convert_benchmarks(ConvertSettings(tmp_path, tmp_path / "o.jsonl",
                                                 benchmarks=("drop", "gpqa", "mmlu")))
    assert summary["benchmarks"]["gpqa"]["status"] == "empty"
    assert summary["benchmarks"]["mmlu"]["status"] == "missing"
    assert summary["missing"] == ["gpqa", "mmlu"] and len(summary["warnings"]) == 3  # + drop has < 100
    with pytest.raises(DataError, match="none of the benchmarks"):
        convert_benchmarks(ConvertSettings(tmp_path, tmp_path / "p.jsonl", benchmarks=("gpqa",)))


def test_hub_parquet_export_of_mmlu(tmp_path):
    """The Hub's parquet layout (`mmlu/test-00000-of-00001.parquet`, int answer, choices list)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "mmlu").mkdir()
    rows = [{"question": f"What is {i}+1?", "subject": "abstract_algebra" if i % 2 else "marketing",
             "choices": [str(i), str(i + 1), str(i + 2), str(i + 3)], "answer": 1} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmlu" / "test-00000-of-00001.parquet")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["convert-benchmarks", "--input-dir", str(tmp_path), "--benchmarks", "mmlu",
                                   "--out", str(out), "--samples-per-benchmark", "-1"])
    assert res.exit_code == 0, res.output
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(got) == 10
    by_q = {r["prompt"].split("\n")[0]: r for r in got}
    first = by_q["What is 3+1?"]
    assert first["response"] == "B. 4" and first["metadata"]["difficulty"] == "hard"
    assert by_q["What is 2+1?"]["metadata"]["difficulty"] == "medium"


# --- the output file, its manifest, and the --benchmarks list ---------------------------------------

def test_output_and_manifest_are_replaced_byte_identically(tmp_path):
    write_drop(tmp_path / "bench" / "drop")
    write_gpqa(tmp_path / "bench" / "gpqa", 6)
    out = tmp_path / "out" / "bench.jsonl"
    settings = ConvertSettings(tmp_path / "bench", out, benchmarks=("drop", "gpqa"), samples_per_benchmark=4)
    summary = convert_benchmarks(settings)
    first = out.read_bytes()
    manifest = json.loads((tmp_path / "out" / "bench.jsonl.manifest.json").read_text())
    assert manifest["command"] == "convert-benchmarks" and manifest["summary"] == summary
    assert manifest["settings"]["benchmarks"] == ["drop", "gpqa"]
    assert set(manifest["inputs"]) == {"drop/drop_dataset_dev.json", "gpqa/gpqa_main.csv"}
    convert_benchmarks(settings)  # it runs again over its own output: replaced, byte for byte
    assert out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.jsonl", "bench.jsonl.manifest.json"]


def test_benchmarks_as_a_comma_list_or_repeated(tmp_path):
    write_drop(tmp_path / "drop")
    write_gpqa(tmp_path / "gpqa", 3)
    given = ConvertSettings(tmp_path, tmp_path / "o", benchmarks="GPQA, drop")
    assert given.resolved().benchmarks == ("gpqa", "drop")
    for args in (["--benchmarks", "gpqa,drop"], ["--benchmarks", "gpqa", "--benchmarks", "drop"]):
        out = tmp_path / "o.jsonl"
        res = CliRunner().invoke(app, ["convert-benchmarks", "--input-dir", str(tmp_path), "--out", str(out),
                                       "--json", *args])
        assert res.exit_code == 0, res.output
        assert list(json.loads(res.stdout.strip().splitlines()[-1])["benchmarks"]) == ["gpqa", "drop"]
    res = CliRunner().invoke(app, ["convert-benchmarks", "--input-dir", str(tmp_path), "--out", str(out),
                                   "--benchmarks", "drop,drop"])
    assert res.exit_code == 2 and "listed twice" in res.output
