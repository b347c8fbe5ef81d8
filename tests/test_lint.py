"""The code passes `ruff check` with the project's settings (pyproject.toml), as `pip install -e .[dev]`
installs it (without ruff the test is skipped, and fails where CI is set)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import dev_tool

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = dev_tool("ruff", "ruff")
    done = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
