"""The commands built from settings dataclasses (Typer checks paths before any model loads), and the
`--json` option they share.

Each option shows in the help panel of the option group (dataclass) that declares its field: `PANELS`
names them, a group not named there gets a title from its class name, `setting(panel=...)` overrides
both, and a command's own fields come first, in Typer's "Options" panel. The panels' layout at any
terminal width is `gsmkit.cli.help_layout`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape

from gsmkit.cli import help_layout
from gsmkit.fields import default_of, field_types, flag_of, group_of

help_layout.install()

# The help panel of each option group, by class name, in the order the panels are shown; None: the
# command's first panel (--overwrite beside --out). tests/test_help_width.py checks that each name here is
# a group some command has, so a renamed group is noticed.
PANELS: dict[str, str | None] = {
    "ModelSpec": "Model",
    "ProblemOptions": "Data",
    "PromptOptions": "Prompt",
    "DecodeOptions": "Generation",
    "BudgetOptions": "Generation",
    "SamplingOptions": "Sampling",
    "SteerOptions": "Steering",
    "LoraOptions": "LoRA",
    "TrainingOptions": "Optimisation",
    "PairedOptions": "Paired comparison",
    "RunOptions": None,
}
_PANEL_ORDER = list(dict.fromkeys(title for title in PANELS.values() if title))  # other panels come after

# --json: the one option every command takes that is not a settings field (it shapes the output only)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Contradictory options found while building settings are usage errors: exit code 2, not 1."""
    from gsmkit.errors import ConfigError

    try:
        yield
    except ConfigError as err:
        raise typer.BadParameter(err.message + (f" (hint: {err.hint})" if err.hint else "")) from None


# ---- commands whose options are a settings dataclass's fields -------------------------------------------


@dataclasses.dataclass
class _Option:
    name: str  # the parameter's (and the field's) name
    field: dataclasses.Field
    owner: str | None  # the nested settings field it belongs to (e.g. "model" for ModelSpec's fields)
    cls: type  # the dataclass that declares the field
    field_type: Any
    aliases: tuple[str, ...]  # names of hidden alias parameters
    panel: str | None  # its help panel (None: the first)


def panel_of(field: dataclasses.Field, cls: type, command_cls: type) -> str | None:
    """The help panel of a field of `cls` (the command's settings `command_cls` or a group nested in it):
    `setting(panel=...)`, else its group's in `PANELS`, else a title made from the group's class name
    ("BaseModelOptions": "Base model"); None for the command's own fields (Typer's first panel)."""
    if "panel" in field.metadata:
        return field.metadata["panel"]
    group = group_of(field, cls)
    if group.__name__ in PANELS:
        return PANELS[group.__name__]
    if group is command_cls or (group in command_cls.__mro__ and not group.__name__.endswith("Options")):
        return None  # declared by the command's settings (or the settings class it extends)
    name = re.sub(r"(Options|Spec)$", "", group.__name__)
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z][a-z0-9]*|[a-z0-9]+", name)
    return " ".join([words[0], *(w if w.isupper() else w.lower() for w in words[1:])]) if words else None


def _cli_type(field_type: Any, meta: dict) -> Any:
    """The Typer type of a field: tuples become repeatable options, choices a Literal."""
    if meta.get("cli_type") is not None:
        return meta["cli_type"]
    optional = type(None) in typing.get_args(field_type)
    base = field_type
    if optional:
        base = next(a for a in typing.get_args(field_type) if a is not type(None))
    if typing.get_origin(base) is tuple:
        return list[typing.get_args(base)[0]] | None
    if meta.get("choices") and base is str:
        base = typing.Literal[tuple(meta["choices"])]  # type: ignore[misc]
    return base | None if optional else base


def _own_fields_first(cls: type) -> list[dataclasses.Field]:
    """The command's own fields first (model, out, ...), then those of its option groups in base order."""
    mro = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]

    def declared_in(f: dataclasses.Field) -> tuple[int, int]:
        # the most derived class that declares the field (an override counts as the command's own)
        i, c = next((i, c) for i, c in enumerate(mro) if f.name in inspect.get_annotations(c))
        return i, list(inspect.get_annotations(c)).index(f.name)

    return sorted(dataclasses.fields(cls), key=declared_in)


def _options(cls: type, exclude: tuple[str, ...], owner: str | None = None,
             command_cls: type | None = None) -> list[_Option]:
    command_cls = command_cls or cls
    types = field_types(cls)
    found: list[_Option] = []
    for f in _own_fields_first(cls):
        if f.name in exclude or (f.metadata and not f.metadata.get("cli", True)):
            continue
        ftype = types[f.name]
        if dataclasses.is_dataclass(ftype):  # a settings group (ModelSpec, ...): its fields are options too
            found += _options(ftype, exclude, owner=f.name, command_cls=command_cls)
            continue
        if not f.metadata:
            continue  # a field the command line never sets (no help, no flag)
        aliases = tuple(f"{f.name}__alias{i}" for i in range(len(f.metadata.get("hidden_aliases", ()))))
        found.append(_Option(f.name, f, owner, cls, ftype, aliases, panel_of(f, cls, command_cls)))
    return found


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _optional(t: Any) -> Any:
    return t if t is bool or type(None) in typing.get_args(t) else t | None


def _parameters(opt: _Option, as_flags: bool) -> list[inspect.Parameter]:
    f, meta = opt.field, opt.field.metadata
    default = default_of(opt.cls, opt.name)
    missing = default is dataclasses.MISSING
    show = meta.get("show_default", True)
    cli_type = _cli_type(opt.field_type, meta)
    # The help is rich markup to Typer: a field's own text is escaped ("[batch, length, vocab]" stays).
    kwargs: dict[str, Any] = {"help": escape(meta.get("help", "")), "rich_help_panel": opt.panel}
    if as_flags and not missing:
        # A preset or --config file may set this too: the flag overrides them only when given, so the
        # option's own default is None and the help says what applies when nothing sets it.
        shown = show if isinstance(show, str) else None
        if shown is None and show and default not in (None, ()):
            shown = _show(default)
        if shown is not None and not isinstance(default, bool):
            kwargs["help"] += f" \\[default: {shown}]"  # escaped: the help is rich markup
        kwargs["show_default"] = False
        cli_type = _optional(cli_type)
        param_default = default if isinstance(default, bool) else None
    elif missing:
        param_default = inspect.Parameter.empty
        kwargs["show_default"] = False
    else:
        # A described default ("./fewshot_pool.jsonl, else ...") reads as the help's own words, as above;
        # click would print it in parentheses, and docs/cli.md would not show it at all.
        if isinstance(show, str):
            kwargs["help"] += f" \\[default: {show}]"
        kwargs["show_default"] = show if not isinstance(show, str) else False
        param_default = (list(default) or None) if isinstance(default, tuple) else default
        if meta.get("cli_type") is not None:
            param_default = None  # the option's own form (a comma list): unset means the field's default
    for bound in ("min", "max"):
        if meta.get(bound) is not None and not (bound == "min" and meta.get("min_open")):
            kwargs[bound] = meta[bound]
    kwargs.update(meta.get("path") or {})
    decls = [flag_of(f), *meta.get("aliases", ())] + ([meta["short"]] if meta.get("short") else [])
    params = [inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=param_default,
                                annotation=Annotated[cli_type, typer.Option(*decls, **kwargs)])]
    hidden = {k: v for k, v in kwargs.items() if k not in ("help", "show_default", "rich_help_panel")}
    for alias_name, alias in zip(opt.aliases, meta.get("hidden_aliases", ()), strict=True):
        option = typer.Option(alias, hidden=True, help=f"Old name of {flag_of(f)}.", **hidden)
        params.append(inspect.Parameter(alias_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[_optional(cli_type), option]))
    return params


def paragraphs(doc: str | None) -> str | None:
    """A command's docstring as its help: each paragraph on one line, which the terminal (and Markdown)
    wraps, with blank lines between them; an `Example:` paragraph keeps its command on a line of its
    own, and a paragraph that starts with \\b keeps its lines."""
    if not doc:
        return doc
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        if not para.startswith("\b"):
            para = " ".join(para.split())
            if para.startswith("Example:"):
                para = "Example:\n" + para.removeprefix("Example:").strip()
        out.append(para)
    return "\n\n".join(p for p in out if p)


class SettingsCommand:
    """A Typer command whose options are the fields of a settings dataclass (and of its nested groups).

    The help, default and bounds of each option are read from the field (`gsmkit.fields.setting`) each
    time the CLI is built, so they cannot drift from what the library does. The wrapped function gets
    `settings=` (the built dataclass; contradictions are usage errors, exit 2) or, with `as_flags`,
    `flags=` (only the options given: presets and config files fill in the rest), plus its own options.
    """

    def __init__(self, fn: Callable[..., Any], cls: type, exclude: tuple[str, ...], as_flags: bool,
                 fixed: dict[str, Any]):
        self.fn, self.cls, self.exclude, self.as_flags, self.fixed = fn, cls, exclude, as_flags, fixed
        self.__name__, self.__qualname__ = fn.__name__, fn.__qualname__
        self.__module__, self.__doc__ = fn.__module__, paragraphs(fn.__doc__)
        self._signature: tuple[tuple, inspect.Signature] | None = None

    def _own(self) -> list[inspect.Parameter]:
        own = inspect.signature(self.fn, eval_str=True).parameters.values()
        keyword = inspect.Parameter.KEYWORD_ONLY
        return [p.replace(kind=keyword) for p in own if p.name not in ("settings", "flags")]

    def options(self) -> list[_Option]:
        """The options in help order: the command's own, then each panel's in `PANELS` order."""
        found = _options(self.cls, self.exclude + tuple(self.fixed))
        rank = {p: i for i, p in enumerate([None, *_PANEL_ORDER])}
        return sorted(found, key=lambda opt: rank.get(opt.panel, len(rank)))

    @property
    def __signature__(self) -> inspect.Signature:
        # Typer reads the signature several times per command each time it builds the CLI: build it once
        # per state of the fields (a changed default or help is a new object, so it is seen at once).
        key = tuple((id(f), id(f.default), id(f.metadata)) for f in dataclasses.fields(self.cls))
        if self._signature is None or self._signature[0] != key:
            params = [p for opt in self.options() for p in _parameters(opt, self.as_flags)]
            self._signature = (key, inspect.Signature(params + self._own()))
        return self._signature[1]

    @property
    def __annotations__(self) -> dict[str, Any]:  # typing.get_type_hints reads this
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **kwargs: Any) -> Any:
        values: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for opt in self.options():
            value = kwargs.pop(opt.name)
            for alias in opt.aliases:
                alias_value = kwargs.pop(alias)
                if value is None and alias_value is not None:
                    value = alias_value
            if isinstance(value, list):
                value = tuple(value)
            parse = opt.field.metadata.get("parse")
            if parse is not None and value is not None:
                with usage_errors():
                    value = parse(value)
            if self.as_flags and value is None:
                continue
            if self.as_flags and isinstance(value, bool) and value == opt.field.default and value is False:
                continue  # an unset switch is "not given"
            if value is None and default_of(opt.cls, opt.name) not in (None, dataclasses.MISSING):
                continue  # not given: the field's own default applies (a tuple, or a value in another form)
            (nested.setdefault(opt.owner, {}) if opt.owner else values)[opt.name] = value
        if self.as_flags:
            return self.fn(flags={**values, **self.fixed}, **kwargs)
        with usage_errors():
            settings = build_settings(self.cls, {**values, **self.fixed}, nested)
        return self.fn(settings=settings, **kwargs)


def build_settings(cls: type, values: dict[str, Any], nested: dict[str, dict[str, Any]]) -> Any:
    types = field_types(cls)
    for owner, group in nested.items():
        values[owner] = types[owner](**group)
    return cls(**values)


def command_from(cls: type, *, exclude: tuple[str, ...] = (), as_flags: bool = False,
                 fixed: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], SettingsCommand]:
    """Decorate a command function `fn(settings, **own_options)` (or `fn(flags, ...)` with `as_flags`) so
    its options come from `cls`; `exclude` leaves fields out, `fixed` sets fields the command decides."""

    def decorate(fn: Callable[..., Any]) -> SettingsCommand:
        return SettingsCommand(fn, cls, exclude, as_flags, dict(fixed or {}))

    return decorate


def launch_note(console: Any) -> bool:
    """Whether this is the main process of the launch (it alone shows bars and reports); tells the user when
    `accelerate launch --cpu` started one process instead of several."""
    from gsmkit.processes import is_main_process, single_process_note

    if (note := single_process_note()) is not None:
        console.print(f"[yellow]note:[/yellow] {note}")
    return is_main_process()


def run_with_bar(command: str, unit: str, run: Callable[..., Any], settings: Any) -> Any | None:
    """`run(settings, on_start=..., on_progress=...)` under a progress bar with rate and ETA, shown by the
    main process of a launch only; its result there, None on the other processes (the main one reports)."""
    from gsmkit.progress import ProgressTask, stderr_console

    console = stderr_console()
    main = launch_note(console)
    with ProgressTask(command, unit, console, disable=not main) as bar:
        result = run(settings, on_start=bar.start, on_progress=bar.advance)
    return result if main else None
