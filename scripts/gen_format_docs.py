"""Generate the field tables of docs/formats.md from the record, metrics and settings dataclasses.

In: docs/formats.md, where a table to generate sits between two markers that name its dataclass,

    <!-- fields: gsmkit.records.Prediction -->
    | field | type | meaning |
    ...
    <!-- /fields -->

(`<!-- fields: module.Class omit=a,b -->` leaves fields a and b out). Out: the same file with each
marked table rewritten from the dataclass, one row per field in declaration order:

- a record or metrics class (each field's meaning under `Attributes:` in its docstring): field | type |
  meaning, plus a `required` column when the class lists the fields an input row must have in a
  `REQUIRED` class variable (`gsmkit.records.Problem`);
- a settings class (fields declared with `gsmkit.fields.setting(default, help)`): key | type |
  default | meaning, the type with the field's bounds (`int, >= 1`) and the default with what an unset
  value means where the field says (`show_default="--data"`).

The type comes from the annotation, in the words of the docs (`str | None` -> "string or null",
`tuple[float, float]` -> "[float, float]", `dict[...]` -> "object"), the meaning from the field's
`help`. Everything outside the markers is left as it is.

    python scripts/gen_format_docs.py           # rewrite docs/formats.md
    python scripts/gen_format_docs.py --check   # exit 1 (and show the difference) when it is out of date

tests/test_format_docs.py runs the check, so a changed field or help text without regenerated docs
fails the test run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import re
import sys
import types
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
FORMATS_MD = ROOT / "docs" / "formats.md"

START = re.compile(r"^<!-- fields: (?P<target>[\w.]+)(?P<options>[^>]*?) -->\n", re.MULTILINE)
END = "<!-- /fields -->"

_SIMPLE = {str: "string", int: "int", float: "float", bool: "bool", type(None): "null", Any: "any"}


class FormatDocsError(Exception):
    """A marker that names no dataclass, an unclosed marker, or a field without help."""


# ---- one type ------------------------------------------------------------------------------------


def type_label(annotation: Any) -> str:
    """An annotation in the words of docs/formats.md: `str | None` -> "string or null"."""
    if annotation in _SIMPLE:
        return _SIMPLE[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        label = " or ".join(type_label(a) for a in present)
        return label + " or null" if len(present) < len(args) else label
    if origin is Literal:
        return " or ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return "[" + ", ".join(type_label(a) for a in args) + "]"
    if origin in (list, tuple, set, frozenset, Sequence) or annotation in (list, tuple, set, frozenset):
        return f"[{type_label(args[0])}]" if args else "list"
    if origin in (dict, Mapping) or annotation is dict or dataclasses.is_dataclass(annotation):
        return "object"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "string (a path)"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def default_label(field: dataclasses.Field) -> str:
    """A settings field's default as a YAML reader would write it: null, true, `auto`, 0.0002."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    label = _value_label(value)
    shown = field.metadata.get("show_default")
    # `setting(..., show_default="on with a 4-bit base")`: what an unset value means, as --help says it
    return f"{label} ({shown})" if isinstance(shown, str) and shown else label


def _value_label(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, PurePath):
        value = value.as_posix()
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def bounds_label(field: dataclasses.Field) -> str:
    """`setting(min=..., max=...)` as the type column adds it: ", >= 1", ", > 0", ", 0 to 0.999"."""
    lo, hi, open_ = field.metadata.get("min"), field.metadata.get("max"), field.metadata.get("min_open")
    if lo is not None and hi is not None and not open_:
        return f", {lo:g} to {hi:g}"
    parts = [f"{'>' if open_ else '>='} {lo:g}"] if lo is not None else []
    parts += [f"<= {hi:g}"] if hi is not None else []
    return ", " + " and ".join(parts) if parts else ""


# ---- one table -----------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Markdown-safe text: `<split>` outside code spans would be read as an HTML tag and vanish."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def cell(text: str) -> str:
    """One table cell: one line, with `|` escaped (also inside code spans, as tables require)."""
    return _escape(" ".join(text.split())).replace("|", "\\|")


def is_settings(cls: type) -> bool:
    """Declared with `setting(...)`: its metadata names the command-line flag."""
    return any("flag" in f.metadata for f in dataclasses.fields(cls))


def field_table(cls: type, omit: Sequence[str] = ()) -> list[str]:
    """The Markdown table of a dataclass's fields, one row per field, in declaration order."""
    from gsmkit.fields import field_help, field_types

    if not dataclasses.is_dataclass(cls):
        raise FormatDocsError(f"{cls!r} is not a dataclass")
    kinds = field_types(cls)
    chosen = [f for f in dataclasses.fields(cls) if f.name not in omit]
    unknown = sorted(set(omit) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        name = f"{cls.__module__}.{cls.__qualname__}"
        raise FormatDocsError(f"{name} has no field {', '.join(unknown)} to omit")
    meanings = field_help(cls)
    missing = [f.name for f in chosen if f.name not in meanings]
    if missing:
        raise FormatDocsError(
            f"{cls.__module__}.{cls.__qualname__}: no meaning for {', '.join(missing)}: give each field an "
            "entry under `Attributes:` in the class docstring, or declare it with setting(default, help)")
    settings = is_settings(cls)
    required = getattr(cls, "REQUIRED", None)
    if settings:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    elif required is not None:
        lines = ["| field | type | required | meaning |", "|---|---|---|---|"]
    else:
        lines = ["| field | type | meaning |", "|---|---|---|"]
    for f in chosen:
        row = [f"`{f.name}`", cell(type_label(kinds[f.name]) + (bounds_label(f) if settings else ""))]
        if settings:
            row.append(cell(default_label(f)))
        elif required is not None:
            row.append("yes" if f.name in required else "no")
        row.append(cell(meanings[f.name]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


# ---- the page ------------------------------------------------------------------------------------


def resolve(target: str) -> type:
    """`gsmkit.records.Prediction` -> the class."""
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise FormatDocsError(f"<!-- fields: {target} -->: no such class ({err})") from None
    return cls


def _options(text: str, target: str) -> list[str]:
    omit: list[str] = []
    for word in text.split():
        key, _, value = word.partition("=")
        if key != "omit" or not value:
            raise FormatDocsError(f"<!-- fields: {target} -->: unknown option {word!r} (only omit=a,b)")
        omit += value.split(",")
    return omit


def render(text: str) -> str:
    """`text` with every marked table regenerated."""
    out: list[str] = []
    pos = 0
    for match in START.finditer(text):
        if match.start() < pos:
            raise FormatDocsError(f"<!-- fields: {match['target']} --> inside another marked table")
        end = text.find(END, match.end())
        if end < 0:
            raise FormatDocsError(f"<!-- fields: {match['target']} --> has no {END}")
        table = field_table(resolve(match["target"]), _options(match["options"], match["target"]))
        out += [text[pos:match.end()], "\n".join(table), "\n"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def marked_classes(text: str) -> list[str]:
    return [m["target"] for m in START.finditer(text)]


def diff_summary(current: str, generated: str, name: str, limit: int = 60) -> str:
    lines = list(difflib.unified_diff(current.splitlines(), generated.splitlines(), f"{name} (as it is)",
                                      f"{name} (generated)", lineterm="", n=1))
    if len(lines) > limit:
        lines = [*lines[:limit], f"... {len(lines) - limit} more diff lines"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the field tables of docs/formats.md.")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the tables are out of date, showing the difference; write nothing")
    parser.add_argument("--output", type=Path, default=FORMATS_MD,
                        help="file to rewrite or check (default docs/formats.md)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    current = args.output.read_text(encoding="utf-8")
    try:
        generated = render(current)
    except FormatDocsError as err:
        print(f"error: {args.output}: {err}", file=sys.stderr)
        return 1
    if args.check:
        if current != generated:
            print(f"{args.output} is out of date: run `python scripts/gen_format_docs.py`\n"
                  + diff_summary(current, generated, args.output.name), file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({len(marked_classes(current))} generated tables)")
        return 0
    if generated != current:
        args.output.write_text(generated, encoding="utf-8", newline="\n")
        print(f"wrote {args.output}")
    else:
        print(f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
