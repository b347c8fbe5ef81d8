"""Load GSM8K problems from the Hugging Face Hub or from local files.

In: a source (`openai/gsm8k` or another Hub id, a .jsonl/.json/.parquet file, or a folder holding
`<split>.jsonl`, `<split>.json`, `<split>.parquet` or the Hub's `main/<split>-*.parquet` export) and a split.
Out: a list of validated `Problem` records with content-derived ids, in source order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.jsonl import parse_line
from gsmkit.records import Problem
from gsmkit.settings import DEFAULT_SOURCE

DEFAULT_CONFIG = "main"
_EXTENSIONS = (".jsonl", ".json", ".parquet")


def find_split_files(folder: Path, split: str) -> list[Path]:
    """Files holding `split` inside a local folder, in the layouts users actually have."""
    candidates = [folder / f"{split}{ext}" for ext in _EXTENSIONS]
    found = [p for p in candidates if p.is_file()]
    if found:
        return found[:1]
    for pattern in (f"{split}-*.parquet", f"main/{split}-*.parquet", f"{split}/*.parquet",
                    f"data/{split}-*.parquet"):
        matches = sorted(folder.glob(pattern))
        if matches:
            return matches
    return []


def _rows_from_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs; `where` is `path:line` for JSON lines, `path:row N` for parquet and arrays."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({err})") from None
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    try:
        # utf-8-sig: a leading byte-order mark (Windows editors) is not part of the first row.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start + 1})",
                        hint="expected UTF-8 JSON Lines, a JSON array or parquet") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty", hint="expected one GSM8K problem per line")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        return [(f"{path}:item {i + 1}", r) for i, r in enumerate(rows)]
    # split("\n"), not splitlines(): JSON strings may hold U+2028, U+2029 or U+0085 unescaped, and
    # splitlines() would cut a row in two there (and misnumber every later line).
    return [(f"{path}:{lineno}", parse_line(line, f"{path}:{lineno}"))
            for lineno, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _validate(pairs: list[tuple[str, Any]], origin: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()  # content hashes
    ids: dict[str, str] = {}  # id -> where it was first given
    for where, row in pairs:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        p = Problem.from_dict(row, where)
        # The same question twice (up to whitespace) would be scored twice and break resume: keep
        # the first. Matched on content, not id, so a file's own 'id' column cannot hide a duplicate.
        if p.sha256 in seen:
            continue
        if p.id in ids:
            # Two different questions under one id: dropping either would lose a problem silently.
            raise DataError(f"{where}: id '{p.id}' is already used by a different question at {ids[p.id]}",
                            hint="ids must be unique; drop the 'id' column to use content-derived ids")
        seen.add(p.sha256)
        ids[p.id] = where
        problems.append(p)
    if not problems:
        raise DataError(f"{origin}: no problems found", hint="expected rows with 'question' and 'answer'")
    return problems


def resolve_split_files(source: str | Path, split: str) -> list[Path] | None:
    """Local files for (source, split), or None when `source` is not a local path."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = find_split_files(path, split)
        if not files:
            present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise DataError(
                f"{path}: no file for split '{split}' (found: {present})",
                hint=f"expected {split}.jsonl, {split}.json, {split}.parquet or main/{split}-*.parquet",
            )
        return files
    if _looks_like_path(source):
        raise DataError(f"{source}: no such file or folder",
                        hint="check the path, or give a Hub id such as openai/gsm8k")
    return None


def source_file(source: str | Path, split: str) -> str | Path:
    """What a manifest records as the input: the local file of (source, split), else the source as named
    (a Hub id, or a training file that is not a GSM8K split)."""
    try:
        files = resolve_split_files(source, split)
    except DataError:
        return source
    return files[0] if files else source


# A Hub repo id is `name` or `namespace/name` from these characters (huggingface_hub's validate_repo_id).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _looks_like_path(source: str | Path) -> bool:
    """True when a source that does not exist locally cannot be a Hub id, so it must be a mistyped path.

    Without this, `data/gsm8k/test.jsonl`-style typos would go to the Hub and fail with a network error.
    """
    source = str(source)
    if source.startswith((".", "/", "~")) or source.endswith(_EXTENSIONS):
        return True
    if not _HUB_ID.fullmatch(source) or ".." in source or "--" in source or source.endswith("."):
        return True  # two or more slashes, backslashes, spaces, trailing slash ...: not a repo id
    # `data/gsm8k` is a valid id, but when `data/` exists here the user meant a local folder.
    parent = Path(source).parent
    return parent != Path(".") and parent.is_dir()


def load_gsm8k(source: str | Path = DEFAULT_SOURCE, split: str = "test",
               config: str = DEFAULT_CONFIG) -> list[Problem]:
    """Load and validate GSM8K problems from a local path or the Hub."""
    files = resolve_split_files(source, split)
    if files is not None:
        pairs: list[tuple[str, Any]] = []
        for f in files:
            pairs.extend(_rows_from_file(f))
        return _validate(pairs, str(source))
    try:
        import datasets

        ds = datasets.load_dataset(str(source), config, split=split)
    except Exception as err:  # noqa: BLE001 - network, auth, missing config: all one message for the user
        raise DataError(
            f"{source}: cannot load split '{split}' from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err)[:200]})",
            hint="without network access, pass a local file or folder, e.g. --data ./gsm8k",
        ) from None
    return _validate([(f"{source}[{split}]:row {i + 1}", dict(r)) for i, r in enumerate(ds)], str(source))


def select_problems(problems: list[Problem], offset: int = 0, limit: int | None = None) -> list[Problem]:
    """Rows [offset, offset+limit) in source order: the same slice lm-eval's --limit takes at offset 0.

    `limit` None (or negative) means to the end.
    """
    if offset < 0:  # a negative offset would silently count from the end of the split
        raise ConfigError(f"--offset must be >= 0, got {offset}")
    end = None if limit is None or limit < 0 else offset + limit
    return problems[offset:end]
