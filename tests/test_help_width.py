"""Help that reads at 80 columns: every command's `--help` shows each option name whole (no `…`) beside
a help column a person can read, options sit in the panel of the option group that declares them, a
docstring wraps as paragraphs, and docs/cli.md states on/off defaults as they are.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import typer
import typer.rich_utils
from conftest import load_script
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.cli.help_layout import PANEL_EDGES
from gsmkit.cli.options import PANELS, SettingsCommand, command_from
from gsmkit.fields import field_of, group_of, setting
from gsmkit.settings import LoraOptions, TrainingOptions, override

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MIN_HELP_COLUMN = 30  # at 80 columns the help of every option has at least this many
BIG = ["train sft", "train qlora", "train grpo", "eval gsm8k", "eval safety", "generate-traces",
       "steer vectors", "steer search"]


def _tree(cmd=None, path: tuple[str, ...] = (), parent=None):
    """(path below `gsmkit`, click command, context) for the root, every group and every command."""
    cmd = cmd or typer.main.get_command(app)
    ctx = cmd.context_class(cmd, info_name=path[-1] if path else "gsmkit", parent=parent)
    yield path, cmd, ctx
    for name in getattr(cmd, "list_commands", lambda _ctx: [])(ctx):
        yield from _tree(cmd.get_command(ctx, name), (*path, name), ctx)


COMMANDS = {" ".join(path) or "(root)": (path, cmd, ctx) for path, cmd, ctx in _tree()}


def settings_commands() -> dict[str, SettingsCommand]:
    found: dict[str, SettingsCommand] = {}

    def walk(group: typer.Typer, path: tuple[str, ...]) -> None:
        for info in group.registered_commands:
            if isinstance(info.callback, SettingsCommand):
                found[" ".join((*path, info.name))] = info.callback
        for sub in group.registered_groups:
            walk(sub.typer_instance, (*path, sub.name))

    walk(app, ())
    return found


def show_help(path: tuple[str, ...], width: int, monkeypatch) -> str:
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)  # a TERMINAL_WIDTH in the environment would win
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def panels(text: str) -> dict[str, list[str]]:
    """Each panel's rows (the text between its borders) by title."""
    found: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("╭"):
            title = line.strip("╭─╮ ")
            found[title] = []
        elif line.startswith("╰"):
            title = None
        elif title is not None:
            found[title].append(line[2:-2])
    return found


def names_column(row: str) -> tuple[list[str], int] | None:
    """The option names a row starts with, and where its help column begins (None: not an option row)."""
    if not row.startswith("-"):
        return None
    names = re.split(r"\s{2,}", row)[0]
    tokens = [t for t in re.split(r"[ ,]+", names) if t.startswith("-")]
    rest = row[len(names):]
    return tokens, len(names) + len(rest) - len(rest.lstrip(" "))


def visible_names(cmd, ctx) -> list[str]:
    return [name for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)
            and getattr(p, "param_type_name", "option") == "option" for name in [*p.opts, *p.secondary_opts]]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_name_is_whole_at_80_columns(command, monkeypatch):
    path, cmd, ctx = COMMANDS[command]
    text = show_help(path, 80, monkeypatch)
    assert "…" not in text, f"`gsmkit {command} --help` cuts something at 80 columns:\n{text}"
    assert all(len(line) <= 80 for line in text.splitlines())
    shown, help_columns = set(), []
    for rows in panels(text).values():
        for row in rows:
            if (found := names_column(row)) is not None:
                shown.update(found[0])
                if row[found[1]:].strip():
                    help_columns.append(80 - PANEL_EDGES - found[1])
    missing = [name for name in visible_names(cmd, ctx) if name not in shown]
    assert not missing, f"`gsmkit {command} --help` at 80: {missing} not whole among the names:\n{text}"
    narrowest = min(help_columns, default=80)
    assert narrowest >= MIN_HELP_COLUMN, f"a help column of {narrowest} characters:\n{text}"


@pytest.mark.parametrize("width", [40, 200])
def test_a_narrow_and_a_wide_terminal_keep_names_whole(width, monkeypatch):
    path, cmd, ctx = COMMANDS["train qlora"]
    text = show_help(path, width, monkeypatch)
    assert "…" not in text and all(len(line) <= width for line in text.splitlines())
    shown = {n for rows in panels(text).values() for row in rows if (f := names_column(row)) for n in f[0]}
    assert set(visible_names(cmd, ctx)) <= shown


def test_the_console_script_at_80_columns():
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("TERMINAL_WIDTH", None)
    gsmkit = os.path.join(os.path.dirname(sys.executable), "gsmkit")
    command = [gsmkit] if os.path.exists(gsmkit) else [sys.executable, "-m", "gsmkit"]
    out = subprocess.run([*command, "train", "qlora", "--help"], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert "…" not in out and "--gradient-checkpointing" in out and "--learning-rate" in out


@pytest.mark.parametrize("command", BIG)
def test_big_commands_group_their_options_by_option_group(command, monkeypatch):
    path, _cmd, _ctx = COMMANDS[command]
    shown = panels(show_help(path, 80, monkeypatch))
    assert len(shown) >= 4, f"`gsmkit {command} --help` has panels {list(shown)}"
    where = {name: title for title, rows in shown.items() for row in rows if (f := names_column(row))
             for name in f[0]}
    built = settings_commands()[command]
    for opt in built.options():
        flag = opt.field.metadata.get("flag") or "--" + opt.name.replace("_", "-")
        assert where[flag.split("/")[0]] == (opt.panel or "Options"), (command, flag, where)
    assert where["--model"] == "Model"
    expected = {"--lora-r": "LoRA", "--learning-rate": "Optimisation", "--temperature": "Sampling",
                "--max-new-tokens": "Generation", "--style": "Prompt", "--steer": "Steering"}
    for flag, title in expected.items():
        if flag in where:
            assert where[flag] == title, (command, flag, where[flag])
    first = next(iter(shown))
    assert first == "Options" and any(r.startswith("--help") for r in shown[first])


@dataclass(frozen=True, kw_only=True)
class SafeguardModelOptions:  # a group PANELS does not name
    guard: str = setting("g", "The guard.")


@dataclass(frozen=True, kw_only=True)
class Demo(SafeguardModelOptions, LoraOptions):
    name: str = setting("x", "Own.")
    lora_r: int = override(LoraOptions, "lora_r", 4)
    report: str = setting("r", "Where it goes.", panel="Output")
    learning_rate: float = override(TrainingOptions, "learning_rate", 1e-3)


def test_a_redeclared_field_keeps_its_group_and_a_new_group_gets_a_panel():
    """`override` keeps the group (so the panel), an unnamed group is titled from its class name, and
    `setting(panel=...)` wins; the command's own fields come first."""
    assert group_of(field_of(Demo, "lora_r"), Demo) is LoraOptions
    assert group_of(field_of(Demo, "learning_rate"), Demo) is TrainingOptions
    demo = typer.Typer()

    @demo.command()
    @command_from(Demo)
    def run(settings: Demo) -> None:
        pass

    got = {opt.name: opt.panel for opt in run.options()}
    assert got["name"] is None and got["guard"] == "Safeguard model" and got["report"] == "Output"
    assert got["lora_r"] == "LoRA" and got["learning_rate"] == "Optimisation"
    assert next(iter(got)) == "name"
    result = CliRunner().invoke(demo, ["--help"], env={"COLUMNS": "80"})
    shown = panels(ANSI.sub("", result.output))
    assert {"Options", "Safeguard model", "LoRA", "Optimisation", "Output"} <= set(shown)


def test_every_named_panel_group_is_one_the_commands_use():
    """A renamed option group would silently lose its panel title: each name in PANELS must be in use."""
    used = {group_of(opt.field, opt.cls).__name__
            for command in settings_commands().values() for opt in command.options()}
    assert set(PANELS) <= used, f"PANELS names groups no command has: {set(PANELS) - used}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_docstrings_wrap_as_paragraphs(command, monkeypatch):
    path, cmd, _ctx = COMMANDS[command]
    for para in (cmd.help or "").split("\n\n"):
        body = para.removeprefix("Example:\n") if para.startswith("Example:") else para
        assert "\n" not in body, f"`gsmkit {command}`: a hard line break inside a paragraph: {para!r}"
    text = show_help(path, 80, monkeypatch)
    if "Example:" in (cmd.help or ""):
        example = " ".join(cmd.help.split("Example:", 1)[1].split())
        described = " ".join(text.split("Example:", 1)[1].split("╭", 1)[0].split())
        assert described == example  # the example is whole, wrapped only at spaces


def test_docs_render_on_off_and_described_defaults():
    gen = load_script("gen_cli_docs")

    def row(command: str, flag: str) -> list[str]:
        _path, cmd, ctx = COMMANDS[command]
        line = next(line for line in gen.render_command(cmd, ctx) if line.startswith(f"| `{flag}`"))
        return [cell.strip() for cell in line.strip("|").split(" | ")]

    assert row("eval gsm8k", "--prefix-cache")[2] == "on"  # on by default
    assert row("eval gsm8k", "--overwrite")[2] == "off"  # off by default
    described = field_of(TrainingOptions, "gradient_checkpointing").metadata["show_default"]
    assert field_of(TrainingOptions, "gradient_checkpointing").default is None
    qlora = row("train qlora", "--gradient-checkpointing")
    assert qlora[2] == described and "default" not in qlora[3]  # unset: the default the field describes
    assert row("train qlora", "--lora-r")[2] == f"`{dataclasses.fields(LoraOptions)[0].default}`"
