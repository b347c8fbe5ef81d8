"""One reader per benchmark: a benchmark's folder in, `Example`s (prompt, response, metadata) out.

In: one benchmark's folder (`DIR/<name>/`), holding either the canonical upstream files or a Hugging Face
dataset export (JSONL / parquet with the Hub's field names). Out: (examples, the files read), in file
order; a malformed file raises `DataError("path:line: reason")`. `read_benchmark(name, folder, seed)`
picks the reader; only GPQA's needs the seed (it shuffles each question's options).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.jsonl import iter_jsonl, parse_line
from gsmkit.records import content_hash

BENCHMARKS = ("drop", "gpqa", "humaneval", "math", "math500", "mmlu", "mgsm", "gsm8k")

# MMLU subjects that need technical or professional expertise: "hard"; every other subject is "medium".
MMLU_TECHNICAL = frozenset({
    "abstract_algebra", "anatomy", "clinical_knowledge", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "international_law",
    "jurisprudence", "machine_learning", "medical_genetics", "professional_law", "professional_medicine",
    "virology",
})
# GPQA ships three overlapping files (diamond ⊂ main ⊂ extended); one is read, in this preference.
GPQA_FILES = ("gpqa_main.csv", "gpqa_diamond.csv", "gpqa_extended.csv")
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                "Incorrect Answer 3")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    metadata: dict[str, Any]
    question: str  # the bare question, compared with training questions for decontamination

    @property
    def difficulty(self) -> str:
        return self.metadata["difficulty"]

    def sort_key(self) -> str:
        return content_hash(self.prompt + "\n" + self.response)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "response": self.response, "metadata": self.metadata}


# ---------------------------------------------------------------- file reading helpers


def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DataError(f"{path}: truncated or corrupt file ({err})",
                        hint="download the file again") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None


def _iter_json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("path:line", object) for .jsonl, .jsonl.gz and .parquet files."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - any pyarrow failure is a bad file to the user
            raise DataError(f"{path}: cannot read parquet ({err})") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}:row {i}", row
        return
    if path.name.endswith(".gz"):
        # Decompress line by line so a truncated archive is reported at the line where it breaks.
        lineno = 0
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        yield f"{path}:{lineno}", parse_line(line, f"{path}:{lineno}")
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"{path}:{lineno + 1}: truncated or corrupt gzip ({err})",
                            hint="download the file again") from None
        return
    for lineno, obj in iter_jsonl(path, allow_empty=True):
        yield f"{path}:{lineno}", obj


def _field(obj: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind):
        expected = getattr(kind, "__name__", kind)
        raise DataError(f"{where}: field '{key}' should be {expected}, got {type(value).__name__}")
    return value


def _data_files(folder: Path, exts: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".parquet")) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(exts))


def _prefer_test(files: list[Path]) -> list[Path]:
    """Hub exports often hold several splits; use the test split when one is named."""
    test = [p for p in files if "test" in p.name or p.parent.name == "test"]
    return test or files


def _lettered(question: str, options: list[str]) -> str:
    lines = [question.strip(), *(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)), "Answer:"]
    return "\n".join(lines)


# ---------------------------------------------------------------- readers, one per benchmark


def read_humaneval(folder: Path) -> tuple[list[Example], list[Path]]:
    files = _prefer_test(_data_files(folder))
    out = []
    for path in files:
        for where, obj in _iter_json_lines(path):
            prompt = _field(obj, "prompt", where)
            out.append(Example(prompt, _field(obj, "canonical_solution", where), {
                "difficulty": "medium", "domain": "code generation", "source": "humaneval",
                "task_id": _field(obj, "task_id", where), "entry_point": _field(obj, "entry_point", where),
            }, prompt))
    return out, files


def _clean_number(text: str) -> str:
    # thousands separators: "114,200", "114 200", "114.200" (only when groups of three follow)
    text = text.strip().replace("\u202f", "").replace("\u00a0", "").replace(" ", "").replace(",", "")
    if re.fullmatch(r"-?\d{1,3}(\.\d{3})+", text):
        text = text.replace(".", "")
    return text


def read_mgsm(folder: Path) -> tuple[list[Example], list[Path]]:
    tsvs = sorted(folder.rglob("mgsm_*.tsv"))
    out: list[Example] = []

    def add(question: str, answer: str, lang: str) -> None:
        out.append(Example(f"Question: {question.strip()}\nAnswer:", _clean_number(answer), {
            "difficulty": "medium", "domain": "math", "source": "mgsm", "language": lang}, question))

    if tsvs:
        for path in tsvs:
            lang = path.stem.removeprefix("mgsm_")
            for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r").split("\t")
                if len(parts) != 2:
                    raise DataError(f"{path}:{lineno}: expected 2 tab-separated columns (question, answer), "
                                    f"got {len(parts)}")
                add(parts[0], parts[1], lang)
        return out, tsvs
    files = _prefer_test(_data_files(folder))
    for path in files:
        m = re.search(r"mgsm_([a-z]{2})", path.name)
        lang = m.group(1) if m else (path.parent.name if path.parent != folder else path.stem.split("-")[0])
        for where, obj in _iter_json_lines(path):
            ans = _field(obj, "answer_number", where, (int, float, str))
            if isinstance(ans, float) and ans.is_integer():
                ans = int(ans)
            add(_field(obj, "question", where), str(ans), str(obj.get("language", lang)))
    return out, files


def _mmlu_example(question: str, options: list[str], answer: int, subject: str) -> Example:
    return Example(_lettered(question, options), f"{LETTERS[answer]}. {options[answer]}", {
        "difficulty": "hard" if subject in MMLU_TECHNICAL else "medium", "domain": "knowledge",
        "source": "mmlu", "subject": subject}, question)


def read_mmlu(folder: Path) -> tuple[list[Example], list[Path]]:
    csvs = sorted((folder / "test").glob("*_test.csv")) if (folder / "test").is_dir() else []
    out: list[Example] = []
    if csvs:
        for path in csvs:
            subject = path.stem.removesuffix("_test")
            reader = csv.reader(io.StringIO(_read_text(path), newline=""))
            try:
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if not row:
                        continue
                    if len(row) != 6:
                        raise DataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), "
                                        f"got {len(row)}")
                    letter = row[5].strip().upper()
                    if letter not in "ABCD" or len(letter) != 1:
                        raise DataError(f"{where}: answer should be A, B, C or D, got {row[5]!r}")
                    out.append(_mmlu_example(row[0], row[1:5], "ABCD".index(letter), subject))
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: bad CSV ({err})") from None
        return out, csvs
    files = _prefer_test(_data_files(folder))
    for path in files:
        for where, obj in _iter_json_lines(path):
            choices = list(_field(obj, "choices", where, (list, tuple)))
            answer = _field(obj, "answer", where, (int, str))
            if isinstance(answer, str):
                letter = answer.strip().upper()
                answer = LETTERS.index(letter) if letter in LETTERS[:len(choices)] else -1
            if not 0 <= answer < len(choices):
                raise DataError(f"{where}: answer {obj['answer']!r} is not an index into choices")
            out.append(_mmlu_example(_field(obj, "question", where), [str(c) for c in choices], answer,
                                     str(obj.get("subject", "unknown"))))
    return out, files


def _math_difficulty(level: int) -> str:
    return "medium" if level <= 2 else "hard"


def read_math(folder: Path) -> tuple[list[Example], list[Path]]:
    files = _prefer_test(_data_files(folder))
    out = []
    for path in files:
        for where, obj in _iter_json_lines(path):
            raw = _field(obj, "level", where, (str, int))
            m = re.fullmatch(r"(?:Level )?(\d)", str(raw).strip())
            if not m:
                raise DataError(f"{where}: level should be 'Level N', got {raw!r}")
            level = int(m.group(1))
            problem = _field(obj, "problem", where)
            out.append(Example(f"Problem: {problem.strip()}\nSolution:", _field(obj, "solution", where), {
                "difficulty": _math_difficulty(level), "domain": "math", "source": "math", "level": level,
                "type": _field(obj, "type", where)}, problem))
    return out, files


def read_math500(folder: Path) -> tuple[list[Example], list[Path]]:
    files = _prefer_test(_data_files(folder))
    out = []
    for path in files:
        for where, obj in _iter_json_lines(path):
            level = _field(obj, "level", where, int)
            problem = _field(obj, "problem", where)
            out.append(Example(f"Problem: {problem.strip()}\nSolution:", _field(obj, "solution", where), {
                "difficulty": _math_difficulty(level), "domain": "math", "source": "math500", "level": level,
                "type": _field(obj, "subject", where), "answer": _field(obj, "answer", where),
                "unique_id": _field(obj, "unique_id", where)}, problem))
    return out, files


def read_gpqa(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
    chosen = next((folder / n for n in GPQA_FILES if (folder / n).is_file()), None)
    files = [chosen] if chosen else sorted(folder.glob("*.csv"))[:1]
    out = []
    for path in files:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        try:
            header = reader.fieldnames or []
            for col in GPQA_COLUMNS:
                if col not in header:
                    raise DataError(f"{path}:1: missing column '{col}'", hint="expected the GPQA CSV columns")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(row.get(c) is None for c in GPQA_COLUMNS):
                    raise DataError(f"{where}: expected {len(header)} columns")
                question = row["Question"].strip()
                correct = row["Correct Answer"].strip()
                options = [correct] + [row[f"Incorrect Answer {i}"].strip() for i in (1, 2, 3)]
                # Seeded by the seed and the question, so the shuffle never depends on row order.
                random.Random(f"{seed}:{content_hash(question)}").shuffle(options)
                k = options.index(correct)
                meta = {"difficulty": "hard", "domain": "science", "source": "gpqa",
                        "subdomain": row.get("Subdomain", ""),
                        "high_level_domain": row.get("High-level domain", ""),
                        "record_id": row.get("Record ID", ""), "file": path.name}
                out.append(Example(_lettered(question, options), f"{LETTERS[k]}. {correct}", meta, question))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: bad CSV ({err})") from None
    return out, files


def _drop_answer(ans: Any, where: str) -> str:
    if not isinstance(ans, dict):
        raise DataError(f"{where}: 'answer' should be an object")
    if str(ans.get("number", "")).strip():
        return str(ans["number"]).strip()
    spans = [s for s in ans.get("spans") or [] if str(s).strip()]
    if spans:
        return ", ".join(str(s).strip() for s in spans)
    date = ans.get("date") or {}
    parts = [str(date.get(k, "")).strip() for k in ("day", "month", "year")]
    return " ".join(p for p in parts if p)


def read_drop(folder: Path) -> tuple[list[Example], list[Path]]:
    files = sorted(folder.glob("*.json"))
    dev = [p for p in files if "dev" in p.name]
    files = dev or files
    out = []
    for path in files:
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected an object of passages")
        for pid, item in data.items():
            where = f"{path}: passage {pid}"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected an object")
            passage = _field(item, "passage", where)
            for i, qa in enumerate(_field(item, "qa_pairs", where, list)):
                qwhere = f"{where}, qa_pairs[{i}]"
                question = _field(qa, "question", qwhere)
                answer = _drop_answer(_field(qa, "answer", qwhere, dict), qwhere)
                if not answer:
                    continue  # DROP has a few unanswered questions; they cannot be scored
                out.append(Example(f"{passage.strip()}\n\nQuestion: {question.strip()}\nAnswer:", answer, {
                    "difficulty": "easy", "domain": "reading comprehension", "source": "drop",
                    "passage_id": pid, "query_id": qa.get("query_id", "")}, question))
    return out, files


def read_gsm8k(folder: Path) -> tuple[list[Example], list[Path]]:
    from gsmkit.data.gsm8k import load_gsm8k, resolve_split_files

    if not any(p.is_file() for p in folder.rglob("*")):
        return [], []
    files = resolve_split_files(folder, "test") or []
    problems = load_gsm8k(folder, "test")
    meta = {"difficulty": "medium", "domain": "math", "source": "gsm8k"}
    examples = [Example(f"Question: {p.question.strip()}\nAnswer:", p.answer, dict(meta), p.question)
                for p in problems]
    return examples, list(files)


# The readers without randomness; GPQA's takes the seed too (see read_benchmark).
READERS: dict[str, Callable[[Path], tuple[list[Example], list[Path]]]] = {
    "drop": read_drop, "humaneval": read_humaneval, "math": read_math, "math500": read_math500,
    "mmlu": read_mmlu, "mgsm": read_mgsm, "gsm8k": read_gsm8k,
}


def read_benchmark(name: str, folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
    """The examples of benchmark `name` (one of BENCHMARKS) in `folder`, and the files they came from."""
    if name == "gpqa":
        return read_gpqa(folder, seed)  # the one reader with randomness: it shuffles the options
    return READERS[name](folder)


