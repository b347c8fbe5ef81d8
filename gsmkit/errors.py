"""Errors the library raises for user mistakes. The CLI prints them as one line plus a hint.

Each subclass carries an optional `hint` telling the user how to fix the problem. Anything that is
not a `GsmkitError` is a bug and is shown with a traceback only under `--debug`.
"""

from __future__ import annotations

# The exit code of a run that finished and wrote its files but missed a threshold the user set (--min-safety,
# report --require / --baseline, bench --gate); 1 is a user error, 2 a misused option.
THRESHOLD_MISSED_EXIT = 3


class GsmkitError(Exception):
    """A problem the user can fix; `str(err)` is one line, `err.hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class DataError(GsmkitError):
    """An input file is missing, empty or malformed (message names file, line and field)."""


class ModelError(GsmkitError):
    """A model, tokenizer or adapter cannot be loaded or does not fit together."""


class ConfigError(GsmkitError):
    """Settings that contradict each other or ask for something unavailable here."""


class UsageError(ConfigError):
    """An option that cannot apply to this input, found once the input is read (a tokenizer): a misused
    option, exit code 2, like those the command line itself rejects."""

    exit_code = 2


class ResumeError(GsmkitError):
    """An output folder holds a partial run made with different settings."""


class SteeringCheckError(GsmkitError):
    """Steering hooks at alpha = 0 changed what the model generates (the zero-steering check failed)."""
