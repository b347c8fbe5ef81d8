"""The files of finished runs that `report`, `compare` and `bench` read, checked in one place before anything
is written.

In: a run's file (manifest.json, metrics.json, trainer_log.jsonl, bench.json, a JSON Lines row) and the types
its fields must have. Out: `read_object` -> the file's JSON object; `check_shape` -> nothing, or the first
field that is missing or of the wrong type; `read_trainer_log` -> the rows of a trainer log and, when its last
line was cut off, a note. A file of the wrong shape is one `DataError` naming the file (and line) and the
field, with a hint, never a traceback; the commands read every file before they write anything.

The types come from the annotations of the dataclasses that write the files (`EvalMetrics`, `SafetyMetrics`,
`PplMetrics`, `SummaryRow`, `Gate`, `Benched`, ...), so a field's type is declared once. In JSON words:
`int` is an integer (not true or false), `float` any number, `str` a string, `bool` true or false, `None`
null, `tuple[float, float]` a list of two numbers, `list[X]` a list, `dict[str, X]` an object, and a
dataclass an object whose fields, where present, have their types. A field is looked up by its dotted name
(`settings.model.adapter`) in nested objects.

A trainer log is appended to as training goes; a run killed mid-write leaves its last line torn. That line
(the file's last, with no newline after it, not a JSON object) is left out with a note, as eval's journals
recover from the same damage; a bad line anywhere else is an error naming the line.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.evaluation.gsm8k import EvalMetrics
from gsmkit.evaluation.perplexity import PplMetrics
from gsmkit.evaluation.safety import SafetyMetrics
from gsmkit.fields import field_types
from gsmkit.jsonl import parse_line
from gsmkit.studies.columns import SETTING_COLUMNS, SummaryRow

_MISSING = object()


def read_object(path: Path, hint: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`; DataError naming the file when it cannot be read, is not UTF-8 JSON, or
    holds another JSON value than an object."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})", hint=hint) from None
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not readable JSON (not UTF-8: byte {err.start + 1})", hint=hint) from None
    except json.JSONDecodeError as err:
        what = f"{err.msg} at line {err.lineno} column {err.colno}" if data.strip() else "the file is empty"
        raise DataError(f"{path}: not readable JSON ({what})", hint=hint) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {json_kind(obj)}", hint=hint)
    return obj


def kinds_of(cls: type, names: Iterable[str] | None = None, prefix: str = "") -> dict[str, Any]:
    """{`prefix` + field name: annotation} of a dataclass, for `names` (all fields when None)."""
    found = field_types(cls)
    return {prefix + name: found[name] for name in (found if names is None else names)}


def check_shape(obj: dict[str, Any], where: str | Path, kinds: dict[str, Any], *,
                required: Iterable[str] = (), hint: str | None = None, prefix: str = "") -> None:
    """DataError `where: missing field 'x'` for a name in `required` that is absent, or `where: field 'x'
    must be ..., got ...` for the first field of `kinds` (dotted names reach into nested objects) whose value
    has another type; names in the message start with `prefix` (`probe.`, `variants[2].`)."""
    required = set(required)
    for name, kind in kinds.items():
        value = _lookup(obj, name)
        if value is _MISSING:
            if name in required:
                raise DataError(f"{where}: missing field '{prefix}{name}'", hint=hint)
            continue
        bad = _mismatch(value, kind, name)
        if bad is not None:
            field, expected, got = bad
            raise DataError(f"{where}: field '{prefix}{field}' must be {expected}, got {json_kind(got)}",
                            hint=hint)


def read_trainer_log(path: Path, kinds: dict[str, Any], required: Iterable[str] = (),
                     hint: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """(the rows of a trainer log, a note when its torn last line was left out). Every other line must be
    one JSON object whose fields have `kinds` (DataError `path:line: ...`); blank lines are skipped."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})", hint=hint) from None
    lines = data.split(b"\n")
    note = None
    if lines[-1].strip() and not _whole(lines[-1]):
        note = (f"{path}: its last line (line {len(lines)}) was cut off while it was written (the run was "
                f"stopped); read the {len(lines) - 1} lines before it")
    if note or not lines[-1].strip():
        lines = lines[:-1]
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start + 1} of the line)",
                            hint=hint) from None
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = parse_line(line, where)
        except DataError as err:
            raise DataError(err.message, hint=hint or err.hint) from None
        check_shape(row, where, kinds, required=required, hint=hint)
        rows.append(row)
    return rows, note


def _whole(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a write cut inside a character
        return False


def _lookup(obj: dict[str, Any], name: str) -> Any:
    value: Any = obj
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


# ---- what the studies read of each file --------------------------------------------------------------------

# Every manifest the studies read: what the run is, when it was made, the model and adapter it used.
_MANIFEST_KINDS: dict[str, Any] = {
    "command": str, "created_at": str, "settings": dict, "resolved": dict, "settings.model": str | dict,
    "settings.model.model": str, "settings.model.adapter": str | None, "adapter": dict | None,
    "adapter.path": str, "adapter.sha256": str | None}
# The settings and resolved values a training row of summary.csv shows, typed as its columns are.
_TRAIN_KINDS: dict[str, Any] = {
    "settings.data": str | None, "settings.traces": str | None,
    **kinds_of(SummaryRow, SETTING_COLUMNS, "settings."),
    **{f"resolved.{name}": kind for name, kind in kinds_of(SummaryRow, ("train_rows", "steps")).items()},
    "resolved.train_problems": kinds_of(SummaryRow, ("train_rows",))["train_rows"]}
_EVAL_KINDS: dict[str, dict[str, Any]] = {"eval gsm8k": kinds_of(SummaryRow, ("k",), "settings.")}

# metrics.json of each evaluation: (the dataclass that writes it, the fields the studies read that every
# version of gsmkit wrote, those added since: an older file without them reads as null).
_METRICS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    "eval gsm8k": (EvalMetrics, ("n", "accuracy_strict", "accuracy_flexible", "ci95_strict", "ci95_flexible",
                                 "extractable"),
                   ("style", "reasoning_section", "with_reasoning_section", "ended_in_reasoning")),
    "eval safety": (SafetyMetrics, ("total", "safety_rate", "ci95", "unparsed_rate"), ()),
    "eval ppl": (PplMetrics, ("n", "tokens", "ppl"), ("groups",)),
}

# trainer_log.jsonl: every row has its step; the losses the report shows are numbers.
_LOG_KINDS: dict[str, Any] = {"step": int, "loss": float, "train_loss": float}


def rerun_hint(path: Path, command: str) -> str:
    return f"{path.name} is written by `gsmkit {command}`; run it again (--overwrite) to write a good one"


def check_manifest(manifest: dict[str, Any], path: Path, command: str, prefix: str = "") -> None:
    """The fields of a `command` run's manifest the studies read (DataError naming the file and field;
    `prefix`: where the manifest sits in the file, `manifest.` when a metrics.json embeds it)."""
    kinds = {**_MANIFEST_KINDS, **(_TRAIN_KINDS if command.startswith("train ") else {}),
             **_EVAL_KINDS.get(command, {})}
    check_shape(manifest, path, kinds, required=("command",), hint=rerun_hint(path, command), prefix=prefix)


def check_metrics(metrics: dict[str, Any], path: Path, command: str) -> None:
    """The fields of an evaluation's metrics.json the studies read (DataError naming the file and field)."""
    cls, required, newer = _METRICS[command]
    check_shape(metrics, path, kinds_of(cls, required + newer), required=required,
                hint=rerun_hint(path, command))


def read_metrics(path: Path, command: str) -> dict[str, Any]:
    """An evaluation's metrics.json, its fields checked, without the manifest it embeds."""
    metrics = read_object(path, rerun_hint(path, command))
    check_metrics(metrics, path, command)
    return {k: v for k, v in metrics.items() if k != "manifest"}


def read_training_log(path: Path, command: str) -> tuple[list[dict[str, Any]], str | None]:
    """A training run's trainer_log.jsonl (`read_trainer_log`): its rows, and a note for a torn last line."""
    return read_trainer_log(path, _LOG_KINDS, required=("step",), hint=rerun_hint(path, command))


# ---- one value against one annotation ---------------------------------------------------------------------


def json_kind(value: Any) -> str:
    """What a JSON value is, in words: `a string`, `a number`, `true`, `null`, `a list`, `an object`."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def describe(kind: Any) -> str:
    """An annotation in the words of the errors: `float | None` -> "a number or null"."""
    simple = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              type(None): "null", list: "a list", dict: "an object", Any: "any value"}
    if kind in simple:
        return simple[kind]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(k) for k in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        inner = {describe(k) for k in args}
        return f"a list of {len(args)} " + ("numbers" if inner == {"a number"} else "values")
    if origin in (list, tuple):
        return "a list"
    return "an object"  # dict[...] and dataclasses


def _mismatch(value: Any, kind: Any, name: str) -> tuple[str, str, Any] | None:
    """None when `value` has the type `kind`, else (the field that does not, what it must be, its value)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return None
    if origin in (types.UnionType, typing.Union):
        found = [_mismatch(value, k, name) for k in args]
        if any(f is None for f in found):
            return None
        deeper = [f for f in found if f is not None and f[0] != name]  # an object or list of the right kind
        return deeper[0] if deeper else (name, describe(kind), value)
    if origin is tuple or kind is tuple:
        if not isinstance(value, list) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            return name, describe(kind), value
        each = args[:1] * len(value) if args and args[-1] is Ellipsis else args
        return _first(_mismatch(v, k, f"{name}[{i}]") for i, (v, k) in enumerate(zip(value, each)))
    if origin is list or kind is list:
        if not isinstance(value, list):
            return name, describe(kind), value
        return _first(_mismatch(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)) if args else None
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            return name, describe(kind), value
        return _first(_mismatch(v, args[1], f"{name}.{k}") for k, v in value.items()) if args else None
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            return name, describe(kind), value
        return _first(_mismatch(value[f], k, f"{name}.{f}") for f, k in field_types(kind).items()
                      if f in value)
    checks = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}
    if kind not in checks:
        raise TypeError(f"no JSON rule for the annotation {kind!r} of field {name!r}")
    return None if checks[kind](value) else (name, describe(kind), value)


def _first(found: Iterable[tuple[str, str, Any] | None]) -> tuple[str, str, Any] | None:
    return next((f for f in found if f is not None), None)
