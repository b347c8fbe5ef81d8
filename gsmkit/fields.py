"""Field declarations for settings, records and metrics: the one home of each default, bound and help text.

In: `setting(default, help, min=..., choices=..., flag=...)` in a settings dataclass. Out:
`dataclasses.Field`s whose metadata
the CLI (`gsmkit.cli.options.command_from`) turns into Typer options, `check_fields` turns into
`ConfigError`s, and `scripts/gen_format_docs.py` turns into the field tables of docs/formats.md. Each
field remembers the dataclass that declares it (`group_of`): the CLI shows an option in that group's help
panel.
A record or metrics dataclass says what each field holds under `Attributes:` in its docstring
(`field_help` reads both).

So changing a default or a bound here changes the behaviour, `--help` and the docs together.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from gsmkit.errors import ConfigError

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    hidden_aliases: Sequence[str] = (),
    short: str | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    choices: Sequence[str] | None = None,
    cli: bool = True,
    cli_type: Any = None,
    parse: Callable[[Any], Any] | None = None,
    show_default: bool | str = True,
    path: dict[str, bool] | None = None,
    panel: str | None = _MISSING,  # type: ignore[assignment]
    default_factory: Any = _MISSING,
) -> Any:
    """A settings field. `help` is the option's help and the docs' meaning; `min`/`max`/`choices` are
    checked by Typer (exit 2) and again by `check_fields` (library use); `flag` defaults to
    `--field-name`; `cli=False` keeps the field out of the command line; `cli_type` and `parse` let the
    option take another form than the field (a comma list, minutes) and convert it; `path` holds
    Typer's path checks (`exists`, `dir_okay`, `file_okay`); `panel` names the option's help panel instead
    of its group's (None: the command's first panel)."""
    metadata = {
        "help": help, "flag": flag, "aliases": tuple(aliases), "hidden_aliases": tuple(hidden_aliases),
        "short": short, "min": min, "max": max, "min_open": min_open,
        "choices": tuple(choices) if choices is not None else None, "cli": cli, "cli_type": cli_type,
        "parse": parse, "show_default": show_default, "path": path or {},
    }
    if panel is not _MISSING:
        metadata["panel"] = panel
    if default_factory is not _MISSING:
        f = dataclasses.field(default_factory=default_factory, metadata=metadata)
    else:
        f = dataclasses.field(default=default, metadata=metadata)
    f.__class__ = _Setting  # the same layout: only __set_name__ differs
    return f


class _Setting(dataclasses.Field):
    """A `setting(...)` field: when its class is created it records that class in its metadata as "group".
    A field redeclared with `settings.override` copies the metadata, so it keeps the group it came from."""

    __slots__ = ()

    def __set_name__(self, owner: type, name: str) -> None:
        super().__set_name__(owner, name)
        if "group" not in self.metadata:
            self.metadata = types.MappingProxyType({**self.metadata, "group": owner})


def group_of(f: dataclasses.Field, cls: type) -> type:
    """The dataclass that declared field `f` with `setting(...)` (for a plain field: `cls`, where it is)."""
    return f.metadata.get("group", cls)


class Record:
    """A dataclass written as one JSON object: `to_dict()` is its fields, nested dataclasses included."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def field_help(cls: type) -> dict[str, str]:
    """The meaning of each field of a dataclass: a settings field's `help`, else the entry under
    `Attributes:` in the docstring of the class that declares it (Google style: `name: text`, continued on
    more deeply indented lines). A field with neither is missing from the result."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_attribute_docs(klass.__dict__.get("__doc__") or ""))
    found = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") or docs.get(f.name)
        if text:
            found[f.name] = text
    return found


def _attribute_docs(doc: str) -> dict[str, str]:
    import inspect

    entries: dict[str, list[str]] = {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return {}
    current = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        stripped = line.strip()
        if line.startswith("    ") and not line.startswith("     ") and ":" in stripped:
            current, _, text = stripped.partition(":")
            entries[current] = [text.strip()]
        elif current and stripped:
            entries[current].append(stripped)
    return {name: " ".join(parts) for name, parts in entries.items()}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_of(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def default_of(cls: type, name: str) -> Any:
    """A field's default (its factory called), or MISSING."""
    f = field_of(cls, name)
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (modules use `from __future__ import annotations`); a
    class's annotations never change, and the CLI asks for them on every command it builds."""
    import sys

    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, globalns=vars(module), include_extras=False)


def check_fields(obj: Any) -> None:
    """The bounds and choices declared with `setting(...)`, as ConfigErrors naming the flag (None passes)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if value is None or isinstance(value, bool) or not meta:
            continue
        flag = flag_of(f)
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, int | float):
            # written as "not above" so that NaN fails every bound instead of passing it
            if lo is not None and not (value > lo if meta.get("min_open") else value >= lo):
                rel = ">" if meta.get("min_open") else ">="
                raise ConfigError(f"{flag} must be {rel} {lo:g}, got {value:g}")
            if hi is not None and not value <= hi:
                raise ConfigError(f"{flag} must be <= {hi:g}, got {value:g}")
        choices = meta.get("choices")
        if choices and isinstance(value, str) and value not in choices:
            raise ConfigError(f"unknown {flag} '{value}'", hint=f"choose one of {', '.join(choices)}")
