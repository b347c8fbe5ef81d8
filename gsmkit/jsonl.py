"""Validated JSONL reading and safe writing.

Reading: every line is parsed and checked; a bad line raises `DataError("path:line: reason")`.
Writing: final files are written to a temporary sibling and renamed into place (never half-written);
resumable runs append to a journal (`*.partial.jsonl`) that tolerates a torn last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gsmkit.errors import DataError

T = TypeVar("T")
_BOM = b"\xef\xbb\xbf"


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One JSON Lines record; DataError `where: reason` when it is not a JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno})",
            hint="each line must be one JSON object (JSON Lines)",
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object, got {type(obj).__name__}",
            hint="each line must be one JSON object (JSON Lines)",
        )
    return obj


PATH_HINT = "check the path (relative paths are from the current folder)"


def input_file(path: str | Path, expected: str, hint: str = PATH_HINT) -> Path:
    """`path` when it names an existing file; else a DataError saying what it is instead of `expected`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", hint=hint)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected {expected}")
    return path


def iter_jsonl(path: str | Path, *, allow_empty: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; raise DataError naming path:line."""
    path = input_file(path, "a .jsonl file")
    seen = 0
    # Bytes, split on b"\n" only: JSON Lines separates records by "\n", while text-mode iteration
    # would also split on a lone "\r", and decoding per line lets a bad byte name its line.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]  # files saved by some Windows editors start with a BOM
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {err.start + 1} of the line)",
                    hint="save the file as UTF-8 JSON Lines",
                ) from None
            if not line.strip():
                continue
            seen += 1
            yield lineno, parse_line(line, f"{path}:{lineno}")
    if seen == 0 and not allow_empty:
        raise DataError(f"{path}: file is empty", hint="expected at least one JSON object per line")


def read_jsonl(
    path: str | Path, parse: Callable[[dict[str, Any], str], T] | None = None, *, allow_empty: bool = False
) -> list[T]:
    """Read a JSONL file; `parse(obj, where)` validates each row, `where` is "path:line"."""
    rows: list[Any] = []
    for lineno, obj in iter_jsonl(path, allow_empty=allow_empty):
        rows.append(parse(obj, f"{path}:{lineno}") if parse else obj)
    return rows


def dumps_line(obj: dict[str, Any]) -> str:
    """One canonical JSON line: stable key order as given, UTF-8, no trailing spaces."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def _create_temp_sibling(path: Path) -> tuple[int, Path]:
    """Create a new, empty hidden sibling of `path`; returns (fd, its path).

    Not `tempfile.mkstemp`: that creates mode 0600, and the renamed result would then be unreadable
    by the group or other users (shared volumes, containers). `os.open` with 0666 applies the umask,
    like any ordinarily created file.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path`; on success fsync and rename over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_sibling(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Atomically write rows as JSONL; returns the number of rows."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(dumps_line(row))
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


class Journal:
    """Append-only JSONL log of finished rows for a resumable run.

    `Journal(path).load()` returns the rows already there; a torn last line (the process was killed
    mid-write) is cut off. `append(row)` writes one line and flushes it to disk, so a kill loses at
    most the row being written, and a rerun redoes exactly that row.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = None

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows: list[dict[str, Any]] = []
        good_bytes = 0
        with self.path.open("rb") as fh:
            data = fh.read()
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn write: drop it
            try:
                obj = json.loads(raw)
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError for garbage bytes
                break
            if not isinstance(obj, dict):
                break  # every row this class writes is an object; anything else is damage
            rows.append(obj)
            good_bytes += len(raw)
        if good_bytes != len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(good_bytes)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(dumps_line(row))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
