"""Convert public benchmarks into `{prompt, response, metadata}` rows that `gsmkit eval ppl` reads.

In: a folder with one subfolder per benchmark (`DIR/<name>/`), holding either the canonical upstream
files or a Hugging Face dataset export (JSONL / parquet with the Hub's field names).
Out: a stratified, seeded sample per benchmark, decontaminated against training files, and a summary.

Each reader returns `Example`s; a malformed file raises `DataError("path:line: reason")`. A missing
or empty benchmark folder is reported in the summary (status "missing" / "empty") and skipped.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.jsonl import iter_jsonl, parse_line
from gsmkit.records import content_hash, normalize_text

BENCHMARKS = ("drop", "gpqa", "humaneval", "math", "math500", "mmlu", "mgsm", "gsm8k")
DIFFICULTY_ORDER = ("easy", "medium", "hard")

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
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
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


@dataclass
class ConvertSettings:
    input_dir: Path
    out: Path
    benchmarks: tuple[str, ...] = BENCHMARKS
    samples_per_benchmark: int = 100  # -1: every example
    seed: int = 42
    exclude: tuple[Path, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.input_dir = Path(self.input_dir)
        self.out = Path(self.out)
        self.benchmarks = tuple(b.strip().lower() for b in self.benchmarks if b.strip())
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ConfigError(f"unknown benchmark(s): {', '.join(unknown)}", hint=f"choose from {','.join(BENCHMARKS)}")
        if not self.benchmarks:
            raise ConfigError("no benchmarks selected", hint=f"choose from {','.join(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError("a benchmark is listed twice in --benchmarks")
        if self.samples_per_benchmark == 0 or self.samples_per_benchmark < -1:
            raise ConfigError(f"--samples-per-benchmark must be >= 1 or -1 (all), got {self.samples_per_benchmark}")
        self.exclude = tuple(Path(p) for p in self.exclude)


# ---------------------------------------------------------------- file reading helpers


def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DataError(f"{path}: truncated or corrupt file ({err})", hint="download the file again") from None
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
        raise DataError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
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


def read_humaneval(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
    files = _prefer_test(_data_files(folder))
    out = []
    for path in files:
        for where, obj in _iter_json_lines(path):
            prompt = _field(obj, "prompt", where)
            out.append(Example(prompt, _field(obj, "canonical_solution", where), {
                "difficulty": "medium", "domain": "code generation", "source": "humaneval",
                "task_id": _field(obj, "task_id", where), "entry_point": _field(obj, "entry_point", where)}, prompt))
    return out, files


def _clean_number(text: str) -> str:
    # thousands separators: "114,200", "114 200", "114.200" (only when groups of three follow)
    text = text.strip().replace("\u202f", "").replace("\u00a0", "").replace(" ", "").replace(",", "")
    if re.fullmatch(r"-?\d{1,3}(\.\d{3})+", text):
        text = text.replace(".", "")
    return text


def read_mgsm(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
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
                    raise DataError(f"{path}:{lineno}: expected 2 tab-separated columns (question, answer), got {len(parts)}")
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
        "difficulty": "hard" if subject in MMLU_TECHNICAL else "medium", "domain": "knowledge", "source": "mmlu",
        "subject": subject}, question)


def read_mmlu(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
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
                        raise DataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
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
                answer = LETTERS.index(answer.strip().upper()) if answer.strip().upper() in LETTERS[:len(choices)] else -1
            if not 0 <= answer < len(choices):
                raise DataError(f"{where}: answer {obj['answer']!r} is not an index into choices")
            out.append(_mmlu_example(_field(obj, "question", where), [str(c) for c in choices], answer,
                                     str(obj.get("subject", "unknown"))))
    return out, files


def _math_difficulty(level: int) -> str:
    return "medium" if level <= 2 else "hard"


def read_math(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
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


def read_math500(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
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
                        "subdomain": row.get("Subdomain", ""), "high_level_domain": row.get("High-level domain", ""),
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


def read_drop(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
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


def read_gsm8k(folder: Path, seed: int) -> tuple[list[Example], list[Path]]:
    from gsmkit.data.gsm8k import load_gsm8k, resolve_split_files

    if not any(p.is_file() for p in folder.rglob("*")):
        return [], []
    files = resolve_split_files(folder, "test") or []
    problems = load_gsm8k(folder, "test")
    return [Example(f"Question: {p.question.strip()}\nAnswer:", p.answer, {
        "difficulty": "medium", "domain": "math", "source": "gsm8k"}, p.question) for p in problems], list(files)


READERS: dict[str, Callable[[Path, int], tuple[list[Example], list[Path]]]] = {
    "drop": read_drop, "gpqa": read_gpqa, "humaneval": read_humaneval, "math": read_math,
    "math500": read_math500, "mmlu": read_mmlu, "mgsm": read_mgsm, "gsm8k": read_gsm8k,
}


# ---------------------------------------------------------------- sampling and decontamination


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
    for level in sorted(strata, key=lambda d: (DIFFICULTY_ORDER.index(d) if d in DIFFICULTY_ORDER else 9, d)):
        picked.extend(rng.sample(strata[level], alloc.get(level, 0)))
    # Mixed, so that `eval ppl --limit N` on the file takes a prefix with every difficulty.
    rng.shuffle(picked)
    return picked


def load_exclusions(paths: tuple[Path, ...]) -> set[str]:
    """Normalised questions / prompts / user messages from training JSONL files."""
    from gsmkit.jsonl import iter_jsonl

    seen: set[str] = set()
    for path in paths:
        for _, obj in iter_jsonl(path):
            for key in ("question", "prompt", "problem"):
                if isinstance(obj.get(key), str):
                    seen.add(normalize_text(obj[key]))
            for msg in obj.get("messages") or []:
                if isinstance(msg, dict) and msg.get("role", "user") == "user" and isinstance(msg.get("content"), str):
                    seen.add(normalize_text(msg["content"]))
    seen.discard("")
    return seen


def convert_benchmarks(settings: ConvertSettings, on_progress: Callable[[str, str, int], None] | None = None) -> dict[str, Any]:
    """Read, decontaminate, sample and write; `on_progress(benchmark, stage, count)` after each stage."""
    from gsmkit.jsonl import write_jsonl

    notify = on_progress or (lambda *_: None)
    excluded_texts = load_exclusions(settings.exclude)
    rows: list[dict[str, Any]] = []
    per: dict[str, dict[str, Any]] = {}
    inputs: dict[str, Path] = {}
    warnings: list[str] = []
    for name in settings.benchmarks:
        folder = settings.input_dir / name
        info: dict[str, Any] = {"status": "ok", "available": 0, "excluded": 0, "written": 0, "files": []}
        per[name] = info
        if not folder.is_dir():
            info["status"] = "missing"
            warnings.append(f"{name}: no folder {folder}; skipped")
            notify(name, "missing", 0)
            continue
        examples, files = READERS[name](folder, settings.seed)
        info["files"] = [str(f) for f in files]
        for f in files:
            inputs[f"{name}/{Path(f).relative_to(folder)}"] = Path(f)
        notify(name, "read", len(examples))
        if not examples:
            info["status"] = "empty"
            warnings.append(f"{name}: no examples found in {folder}; skipped")
            continue
        kept = [ex for ex in examples if not excluded_texts or (
            normalize_text(ex.question) not in excluded_texts and normalize_text(ex.prompt) not in excluded_texts)]
        info["available"] = len(examples)
        info["excluded"] = len(examples) - len(kept)
        notify(name, "decontaminated", len(kept))
        picked = sample_examples(kept, settings.samples_per_benchmark, settings.seed)
        info["written"] = len(picked)
        by_diff: dict[str, int] = {}
        for ex in picked:
            by_diff[ex.difficulty] = by_diff.get(ex.difficulty, 0) + 1
        info["by_difficulty"] = by_diff
        if settings.samples_per_benchmark != -1 and len(picked) < settings.samples_per_benchmark:
            warnings.append(f"{name}: only {len(picked)} examples available, fewer than {settings.samples_per_benchmark}")
        rows.extend(ex.to_dict() for ex in picked)
        notify(name, "sampled", len(picked))
    if not rows:
        raise DataError(f"{settings.input_dir}: none of the benchmarks {','.join(settings.benchmarks)} has examples",
                        hint="expected one subfolder per benchmark, e.g. DIR/mmlu/test/*.csv")
    write_jsonl(settings.out, rows)
    table: dict[tuple[str, str, str], int] = {}
    for r in rows:
        m = r["metadata"]
        key = (m["source"], m["difficulty"], m["domain"])
        table[key] = table.get(key, 0) + 1
    return {
        "out": str(settings.out), "seed": settings.seed, "samples_per_benchmark": settings.samples_per_benchmark,
        "written": len(rows), "benchmarks": per,
        "missing": [n for n, i in per.items() if i["status"] != "ok"],
        "excluded": {n: i["excluded"] for n, i in per.items()},
        "table": [{"source": s, "difficulty": d, "domain": dm, "n": c} for (s, d, dm), c in sorted(table.items())],
        "warnings": warnings, "inputs": {k: str(v) for k, v in inputs.items()},
    }
