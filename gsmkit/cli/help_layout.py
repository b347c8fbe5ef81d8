"""Option panels that read at any terminal width.

In: Typer's rich help (`typer.rich_utils`), which lays each option panel out as seven columns sized by
rich (required mark, long names, short names, negative names, their short forms, type, help). At 80
columns rich shrinks all of them at once: option names are cut (`--gradient-che…`) and the help is 17
characters wide. Out: `install()` puts this module's `print_options_panel` in Typer's place. Its layout
has two columns: the names, whole and never wrapped (a flag's negative form on the next line), with the
value type beside them where it fits and below them where it does not; and the help, which takes the
rest, with the option's range, default and [required] after it as one paragraph. The names column is
as wide as the command's longest option name (so every panel of a command aligns), widened for types up
to `HELP_WIDTH` columns of help; below `MIN_HELP_WIDTH` (a very narrow terminal) each option's help goes
under its names instead.

Only the layout changes: the names, types and help texts are Typer's own (`display_type_rich`,
`_get_parameter_help`). tests/test_help_width.py walks every command at 80 columns.
"""

from __future__ import annotations

from typing import Any

HELP_WIDTH = 40  # the names column grows (to hold a type beside its option) while the help keeps this much
MIN_HELP_WIDTH = 24  # narrower than this, the help goes under the names
PANEL_EDGES = 4  # the panel's border and padding: "│ " and " │"
GAP = 2  # between the two columns (the table's padding of (0, 1) on each side)


def install() -> None:
    """Use `print_options_panel` for every option and argument panel of Typer's rich help."""
    from typer import rich_utils

    rich_utils._print_options_panel = print_options_panel


def print_options_panel(*, name: str, params: list[Any], ctx: Any, markup_mode: Any, console: Any) -> None:
    """One panel (`name`) of options or arguments, in the signature of the function it replaces."""
    if not params:
        return
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table
    from typer import rich_utils

    inner = console.width - PANEL_EDGES
    names = [_names(p) for p in params]
    types = [_type(p, ctx) for p in params]
    command = [p for p in ctx.command.get_params(ctx) if not getattr(p, "hidden", False)]
    width = _names_width(command or params, ctx, inner)
    table = Table(show_header=False, box=None, expand=True, pad_edge=False, padding=(0, 1))
    stacked = inner - GAP - width < MIN_HELP_WIDTH
    if stacked:
        table.add_column(ratio=1, overflow="fold")
    else:
        table.add_column(no_wrap=True, width=width)
        table.add_column(ratio=1, overflow="fold")  # a long word (a comma list) is folded, never cut
    for param, lines, type_text in zip(params, names, types, strict=True):
        cell = _names_cell(lines, type_text, width if not stacked else inner)
        help_cell = _help(param, ctx, markup_mode)
        if stacked:
            table.add_row(cell)
            table.add_row(Padding(help_cell, (0, 0, 0, 4)))
        else:
            table.add_row(cell, help_cell)
    console.print(Panel(table, border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=rich_utils.ALIGN_OPTIONS_PANEL))


def _names_width(params: list[Any], ctx: Any, inner: int) -> int:
    """The names column of every panel of a command: its longest option name, widened to hold the types
    beside their options while the help keeps `HELP_WIDTH` columns."""
    widest = max(len(line) for p in params for line in _names(p))
    beside = max((len(_names(p)[0]) + 1 + len(t) for p in params if (t := _type(p, ctx))), default=0)
    return max(widest, min(beside, inner - GAP - HELP_WIDTH))


def _names(param: Any) -> list[str]:
    """The option's names, one line each: long and short names, then the negative forms of a flag."""
    if getattr(param, "param_type_name", "option") == "argument":
        shown = param.display_name_raw
        return [shown + ("..." if param.metavar is None and param.nargs != 1 else "")]
    long = [o for o in param.opts if o.startswith("--")]
    lines = [", ".join(long + [o for o in param.opts if o not in long])]
    if param.secondary_opts:
        lines.append(", ".join(param.secondary_opts))
    return lines


def _type(param: Any, ctx: Any) -> str:
    """The value's type as Typer writes it (`<int>`, `<auto|chat|plain>`); none for a flag. A number's
    range is said in the help, so `<int range>` is `<int>`."""
    if getattr(param, "is_flag", False):
        return ""
    shown = param.display_type_rich(ctx=ctx) or ""
    return shown.replace(" range>", ">") if _range(param) else shown


def _range(param: Any) -> str | None:
    get = getattr(param, "_get_number_range_help_str", None)
    return get() if get is not None else None


def _names_cell(lines: list[str], type_text: str, width: int) -> Any:
    """The names, with the type beside the first one where it fits and otherwise below, broken after a
    `|` between choices (a piece longer than the column is folded)."""
    from rich.text import Text
    from typer import rich_utils

    cell = Text()
    for i, line in enumerate(lines):
        if i:
            cell.append("\n")
        highlight = rich_utils.highlighter if i == 0 else rich_utils.negative_highlighter
        cell.append_text(highlight(Text(line)))
        if i == 0 and type_text and len(line) + 1 + len(type_text) <= width:
            cell.append_text(_styled_type(" " + type_text))
            type_text = ""
    if type_text:
        for piece in _wrap_type(type_text, width - 2):
            cell.append("\n  ")
            cell.append_text(_styled_type(piece))
    return cell


def _styled_type(text: str) -> Any:
    from rich.text import Text
    from typer import rich_utils

    return rich_utils.types_highlighter(Text(text, style=rich_utils.STYLE_TYPES))


def _wrap_type(text: str, width: int) -> list[str]:
    width = max(width, 1)
    pieces = [p + "|" for p in text.split("|")]
    pieces[-1] = pieces[-1][:-1]
    lines = [""]
    for piece in pieces:
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return [line[i:i + width] for line in lines for i in range(0, len(line), width)]


def _help(param: Any, ctx: Any, markup_mode: Any) -> Any:
    """Typer's help of the option (its text, default, [required]) as one paragraph, with the range
    Typer would show beside the type."""
    from rich.columns import Columns
    from rich.text import Text
    from typer import rich_utils

    items = list(rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode).renderables)
    if (shown_range := _range(param)) is not None:  # after the help and default, before [required]
        items.insert(len(items) - bool(param.required),
                     Text(f"[{shown_range}]", style=rich_utils.STYLE_OPTION_DEFAULT))
    if all(isinstance(item, Text) for item in items):
        return Text(" ").join(items)
    return Columns(items)  # Markdown help (rich_markup_mode="markdown"): Typer's own arrangement
