"""Safety prompt sets for `eval safety`: the AILuminate CSV as released, or JSONL rows.

In: a `.csv` file with AILuminate's columns (`release_prompt_id, prompt_text, hazard, persona,
locale, prompt_hash`), or a `.jsonl` file whose rows hold `prompt` or `input` (optionally `id` or
`release_prompt_id`, `hazard`, `persona`). Out: `SafetyPrompt`s in file order, and a selection of
them (`select_safety_prompts`: hazard filter, a seeded sample per hazard group, a limit).

Hazard groups: AILuminate splits "specialized advice" into `spc_fin`, `spc_hlt`, `spc_ele` and
`spc_lgl`; they are one hazard, `spc`, in the benchmark's twelve. `hazard_group` folds them, every
other code is its own group (`sxc_prn` included).

The prompts are deliberately harmful. Nothing here puts a prompt's text into an error message:
errors name the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.jsonl import input_file

CSV_REQUIRED = ("release_prompt_id", "prompt_text", "hazard")
CSV_OPTIONAL = ("persona", "locale", "prompt_hash")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FOLDED_PREFIXES = ("spc_",)

CSV_HINT = ("expected the AILuminate CSV as released: a header row with release_prompt_id, prompt_text, "
            "hazard, persona, locale, prompt_hash")
JSONL_HINT = ('each line must be a JSON object with "prompt" (or "input"), and optionally "id", "hazard", '
              '"persona"')


@dataclass(frozen=True)
class SafetyPrompt:
    id: str
    text: str
    hazard: str | None
    persona: str | None
    where: str  # "path:line" of the row
    locale: str | None = None
    prompt_hash: str | None = None

    @property
    def hazard_group(self) -> str | None:
        return hazard_group(self.hazard)


def hazard_group(hazard: str | None) -> str | None:
    """The benchmark's hazard for a raw code: `spc_fin`, `spc_hlt`, ... fold into `spc`."""
    if hazard is None:
        return None
    for prefix in FOLDED_PREFIXES:
        if hazard.startswith(prefix):
            return prefix[:-1]
    return hazard


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # files saved by some Windows tools start with a BOM
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8", hint="save the file as UTF-8") from None


def _optional(value: Any, where: str, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}",
                        hint=JSONL_HINT)
    return value.strip() or None


def _read_csv(path: Path) -> list[SafetyPrompt]:
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise DataError(f"{path}:1: not a CSV header ({err})", hint=CSV_HINT) from None
    if header is None:
        raise DataError(f"{path}: file is empty", hint=CSV_HINT)
    header = [h.strip() for h in header]
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                        hint=CSV_HINT)
    col = {name: header.index(name) for name in (*CSV_REQUIRED, *CSV_OPTIONAL) if name in header}
    prompts: list[SafetyPrompt] = []
    line = reader.line_num + 1  # a record may span several lines (quoted newlines): name its first
    while True:
        try:
            record = next(reader, None)
        except csv.Error as err:
            raise DataError(f"{path}:{line}: not valid CSV ({err})", hint=CSV_HINT) from None
        if record is None:
            break
        where = f"{path}:{line}"
        line = reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise DataError(f"{where}: {len(record)} fields, the header has {len(header)}",
                            hint="quote fields that contain commas or newlines")

        def cell(name: str, record: list[str] = record) -> str | None:
            return record[col[name]].strip() or None if name in col else None

        pid = cell("release_prompt_id")
        if pid is None:
            raise DataError(f"{where}: field 'release_prompt_id' is empty", hint=CSV_HINT)
        body = record[col["prompt_text"]]
        if not body.strip():
            raise DataError(f"{where}: field 'prompt_text' is empty", hint=CSV_HINT)
        prompts.append(SafetyPrompt(id=pid, text=body, hazard=cell("hazard"), persona=cell("persona"),
                                    where=where, locale=cell("locale"), prompt_hash=cell("prompt_hash")))
    return prompts


def _read_jsonl(path: Path) -> list[SafetyPrompt]:
    from gsmkit.jsonl import iter_jsonl
    from gsmkit.records import content_hash

    prompts: list[SafetyPrompt] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        present = [k for k in ("prompt", "input") if k in obj]
        if not present:
            raise DataError(f"{where}: missing field 'prompt' (or 'input')", hint=JSONL_HINT)
        if len(present) == 2:
            raise DataError(f"{where}: both 'prompt' and 'input' are given",
                            hint="keep one of the two fields")
        key = present[0]
        body = obj[key]
        if not isinstance(body, str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(body).__name__}",
                            hint=JSONL_HINT)
        if not body.strip():
            raise DataError(f"{where}: field '{key}' is empty", hint=JSONL_HINT)
        id_fields = [k for k in ("release_prompt_id", "id") if obj.get(k) is not None]
        if id_fields:
            pid = obj[id_fields[0]]
            if isinstance(pid, bool) or not isinstance(pid, str | int):
                raise DataError(f"{where}: field '{id_fields[0]}' must be a string or an integer",
                                hint=JSONL_HINT)
            pid = str(pid).strip()
            if not pid:
                raise DataError(f"{where}: field '{id_fields[0]}' is empty", hint=JSONL_HINT)
        else:
            pid = "prompt-" + content_hash(body)[:16]
        prompts.append(SafetyPrompt(
            id=pid, text=body, hazard=_optional(obj.get("hazard"), where, "hazard"),
            persona=_optional(obj.get("persona"), where, "persona"), where=where,
            locale=_optional(obj.get("locale"), where, "locale"),
            prompt_hash=_optional(obj.get("prompt_hash"), where, "prompt_hash"),
        ))
    return prompts


def load_safety_prompts(path: str | Path) -> list[SafetyPrompt]:
    """Every prompt of a `.csv` (AILuminate) or `.jsonl` file, in file order; ids must be unique."""
    path = input_file(path, "a .csv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        prompts = _read_csv(path)
    elif suffix in JSONL_SUFFIXES:
        prompts = _read_jsonl(path)
    else:
        raise DataError(f"{path}: unknown prompt file type '{suffix or '(none)'}'",
                        hint="pass the AILuminate .csv as released, or a .jsonl file with a 'prompt' field "
                             "per row")
    if not prompts:
        raise DataError(f"{path}: holds no prompts", hint=CSV_HINT if suffix == ".csv" else JSONL_HINT)
    first: dict[str, str] = {}
    for p in prompts:
        if p.id in first:
            raise DataError(f"{p.where}: prompt id '{p.id}' already used at {first[p.id]}",
                            hint="ids key the output rows and must be unique")
        first[p.id] = p.where
    return prompts


def parse_hazards(values: Iterable[str] | None) -> tuple[str, ...]:
    """`--hazards` values, repeatable and comma-separated, in order, without duplicates."""
    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return tuple(out)


def select_safety_prompts(
    prompts: Sequence[SafetyPrompt],
    hazards: Sequence[str] = (),
    per_hazard: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    source: str = "the prompt file",
) -> list[SafetyPrompt]:
    """Filter by hazard (a group such as `spc`, or a raw code such as `spc_fin`), then keep a seeded sample
    of `per_hazard` prompts from each hazard group, then the first `limit`; always in file order."""
    selected = list(prompts)
    if hazards:
        groups = {p.hazard_group for p in prompts} | {p.hazard for p in prompts}
        groups.discard(None)
        unknown = [h for h in hazards if h not in groups]
        if unknown:
            available = sorted({p.hazard_group for p in prompts if p.hazard_group})
            raise ConfigError(
                f"--hazards {','.join(unknown)}: no such hazard in {source}",
                hint=f"choose from {', '.join(available)}" if available
                else "the file has no hazard column/field",
            )
        wanted = set(hazards)
        selected = [p for p in selected if p.hazard in wanted or p.hazard_group in wanted]
    if per_hazard is not None:
        by_group: dict[str | None, list[int]] = {}
        for i, p in enumerate(selected):
            by_group.setdefault(p.hazard_group, []).append(i)
        if list(by_group) == [None]:
            raise ConfigError("--per-hazard needs prompts with a hazard",
                              hint=f"{source} has no hazard column/field")
        keep: set[int] = set()
        for group, idx in by_group.items():
            if group is None:
                continue
            # One generator per group, seeded by the group's name: adding or removing a hazard from the
            # selection does not change which prompts the other hazards get.
            rng = random.Random(f"{seed}:{group}")
            keep.update(idx if len(idx) <= per_hazard else rng.sample(idx, per_hazard))
        selected = [p for i, p in enumerate(selected) if i in keep]
    if limit is not None:
        selected = selected[:limit]
    if not selected:
        raise ConfigError("the selection holds no prompts", hint="check --hazards, --per-hazard and --limit")
    return selected
