"""Each default, bound and help text lives in one place: the settings field (gsmkit.fields.setting).

Changing a field's default or help changes the command's behaviour, its `--help` and docs/cli.md
together; bounds declared once are enforced by the CLI (exit 2) and by the library (ConfigError).
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import load_script
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.cli.options import command_from
from gsmkit.errors import ConfigError
from gsmkit.evaluation.gsm8k import EvalSettings
from gsmkit.fields import check_fields, field_of, setting
from gsmkit.modeling import ModelSpec

ROOT = Path(__file__).resolve().parent.parent




@pytest.fixture
def captured(record_settings):
    """`evaluate_gsm8k` replaced by a recorder: the settings the command built, and nothing run."""
    return record_settings("gsmkit.evaluation.gsm8k.evaluate_gsm8k")


def test_one_changed_default_and_help_move_behaviour_help_and_docs(monkeypatch, captured):
    f = field_of(EvalSettings, "max_new_tokens")
    monkeypatch.setattr(f, "default", 77)
    changed = types.MappingProxyType({**f.metadata, "help": "Tokens per answer, changed."})
    monkeypatch.setattr(f, "metadata", changed)
    runner = CliRunner()
    shown = runner.invoke(app, ["eval", "gsm8k", "--help"], env={"COLUMNS": "200"}).output
    assert "Tokens per answer, changed." in shown and "[default: 77]" in shown
    docs = load_script("gen_cli_docs").render()
    assert "Tokens per answer, changed." in docs
    row = next(line for line in docs.splitlines() if "Tokens per answer, changed." in line)
    assert "77" in row
    runner.invoke(app, ["eval", "gsm8k", "--model", "m"])
    assert captured["settings"].max_new_tokens == 77


def test_bounds_are_declared_once_and_checked_by_cli_and_library(captured):
    result = CliRunner().invoke(app, ["eval", "gsm8k", "--model", "m", "--batch-size", "0"])
    assert result.exit_code == 2 and "settings" not in captured
    with pytest.raises(ConfigError, match="--batch-size must be >= 1, got 0"):
        EvalSettings(model=ModelSpec(model="m"), batch_size=0)
    with pytest.raises(ConfigError, match="unknown --style 'fancy'"):
        EvalSettings(model=ModelSpec(model="m"), style="fancy")


def test_nested_groups_tuples_and_hidden_alias(tmp_path, captured):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("{}\n")
    result = CliRunner().invoke(app, ["eval", "gsm8k", "--model", "m", "--dtype", "float32", "--stop", "A",
                                      "--stop", "B", "--fewshot-pool", str(pool), "--k", "1"])
    assert result.exit_code == 0, result.output
    s = captured["settings"]
    assert s.model == ModelSpec(model="m", dtype="float32")
    assert s.stop == ("A", "B") and s.pool == pool and s.k == 1
    shown = CliRunner().invoke(app, ["eval", "gsm8k", "--help"], env={"COLUMNS": "200"}).output
    assert "--pool" in shown and "--fewshot-pool" not in shown  # the old name works but is not advertised


@dataclass(frozen=True)
class _Demo:
    name: str = setting(help="A required name.")
    size: int = setting(8, "A size.", min=1)
    tags: tuple[str, ...] = setting((), "Tags.")
    on: bool = setting(False, "A switch.")

    def __post_init__(self) -> None:
        check_fields(self)


def test_as_flags_passes_only_the_options_given_and_shows_the_field_default():
    import typer

    got = {}
    demo = typer.Typer()

    @demo.command()
    @command_from(_Demo, as_flags=True)
    def run(flags: dict) -> None:
        got.update(flags)

    runner = CliRunner()
    assert runner.invoke(demo, ["--name", "x"]).exit_code == 0
    assert got == {"name": "x"}  # size, tags and the unset switch are "not given": a preset may set them
    got.clear()
    assert runner.invoke(demo, ["--name", "x", "--size", "3", "--tags", "a", "--on"]).exit_code == 0
    assert got == {"name": "x", "size": 3, "tags": ("a",), "on": True}
    shown = runner.invoke(demo, ["--help"], env={"COLUMNS": "200"}).output
    assert "[default: 8]" in shown
    assert runner.invoke(demo, ["--name", "x", "--size", "0"]).exit_code == 2


def test_every_settings_field_with_cli_metadata_has_help():
    from gsmkit.cli.options import SettingsCommand

    commands = []

    def walk(group):
        for info in group.registered_commands:
            commands.append(info.callback)
        for sub in group.registered_groups:
            walk(sub.typer_instance)

    walk(app)
    built = [c for c in commands if isinstance(c, SettingsCommand)]
    assert built, "no command is built from a settings dataclass"
    for command in built:
        for opt in command.options():
            assert opt.field.metadata.get("help"), f"{command.cls.__name__}.{opt.name} has no help"
    assert all(dataclasses.is_dataclass(c.cls) for c in built)


def test_nan_fails_every_declared_bound():
    with pytest.raises(ConfigError, match="--top-p"):
        EvalSettings(model=ModelSpec(model="m"), top_p=float("nan"))
