"""The documentation stays true to the code.

- The README's Quickstart commands are exactly what CI runs (.ci/run).
- docs/cli.md is what scripts/gen_cli_docs.py generates from the CLI today.
- Every command answers `--help` and its docstring carries a runnable `Example:`.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
from conftest import load_script
from typer.testing import CliRunner

from gsmkit.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
QUICKSTART_START = "<!-- quickstart -->"
QUICKSTART_END = "<!-- /quickstart -->"


def quickstart_commands(readme: str) -> list[str]:
    """The ```bash blocks between the quickstart markers, one command each."""
    start = readme.index(QUICKSTART_START)
    end = readme.index(QUICKSTART_END, start)
    blocks = re.findall(r"```bash\n(.*?)\n```", readme[start:end], flags=re.DOTALL)
    return [block.strip() for block in blocks]


def leaf_commands() -> list[tuple[tuple[str, ...], object]]:
    """(path below `gsmkit`, command) for every command that is not a group."""
    leaves: list[tuple[tuple[str, ...], object]] = []

    def walk(cmd, path: tuple[str, ...], parent) -> None:
        ctx = cmd.context_class(cmd, info_name=path[-1] if path else "gsmkit", parent=parent)
        if not hasattr(cmd, "list_commands"):
            leaves.append((path, cmd))
            return
        for name in cmd.list_commands(ctx):
            walk(cmd.get_command(ctx, name), (*path, name), ctx)

    walk(typer.main.get_command(app), (), None)
    return leaves


def load_gen_cli_docs():
    return load_script("gen_cli_docs")


def test_ci_runs_readme_commands():
    commands = quickstart_commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 2, f"expected 2 quickstart commands in README.md, found {commands}"
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    for command in commands:
        assert "\n" not in command, f"a quickstart command must be one line: {command!r}"
        assert command in ci_lines, f".ci/run does not run this README command verbatim:\n{command}"
    # ... and nothing else: every line that runs something is one of them (no hidden install step).
    scaffolding = ("#", "echo ", "set -", "cd ")
    extra = [line for line in ci_lines if line and not line.startswith(scaffolding) and line not in commands]
    assert not extra, f".ci/run runs commands the README does not show: {extra}"


def test_cli_md_is_current(capsys):
    status = load_gen_cli_docs().main(["--check"])
    assert status == 0, (
        "docs/cli.md is out of date: run `python scripts/gen_cli_docs.py`\n" + capsys.readouterr().err
    )


def test_every_command_has_help_with_example():
    runner = CliRunner()
    leaves = leaf_commands()
    assert leaves, "no commands found under gsmkit"
    for path, cmd in leaves:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (
            f"`gsmkit {' '.join(path)} --help` exited {result.exit_code}:\n{result.output}"
        )
        doc = cmd.help or ""
        assert "Example:" in doc, f"the docstring of `gsmkit {' '.join(path)}` has no 'Example:'"
        example = " ".join(doc.split("Example:", 1)[1].split())
        assert example.startswith(f"gsmkit {' '.join(path)} "), (
            f"the example does not run its own command: {example}"
        )
