"""GRPO reward functions, built on `answers.py` and `reasoning.py`: the correctness reward reads answers with
the very extractor the metric's strict column uses (`reasoning.read_answer`), so "rewarded" and "scored
correct" cannot drift apart.

With a reasoning section (`reasoning.section_for`: `<think>...</think>` of a thinking template, or the tags
style's working-out tags), answers are read only after it; a completion that ended inside its reasoning has
no answer and earns no reward. TRL hands the rewards the generated text only: whether the prompt itself
opened the section comes from the dataset's `opened` column (absent: not opened).

Each reward has TRL's reward-function signature, `f(prompts, completions, **columns) -> list[float]`,
reads the dataset's `gold` column where it needs it, and returns 0.0 or 1.0 per completion; the
weights (`--reward-weights`) scale them. Completions may be strings or chat messages (TRL passes
`[{"role": "assistant", "content": ...}]` for conversational prompts).

- `correctness`: the format's answer (`#### n`, or `<SOLUTION>n</SOLUTION>` in the tags style) equals gold;
- `strict_format`: the whole completion has the format's shape and ends with its answer
  (`...\\n#### n`; or `<start_working_out>...<end_working_out>` then `<SOLUTION>n</SOLUTION>`
  and nothing else);
- `soft_format`: the format's answer marker is somewhere (tags: a non-empty reasoning section, then a
  solution tag);
- `integer`: the format's answer is a whole number (GSM8K answers are).

The `#### n` format checks read the text after a `<think>` section; the tags format's checks read the whole
completion, whose shape is the section.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from gsmkit.answers import (
    REASONING_END,
    REASONING_START,
    SOLUTION_END,
    SOLUTION_START,
    STRICT_PATTERN,
    answers_equal,
)
from gsmkit.errors import ConfigError
from gsmkit.reasoning import Section, has_reasoning_section, read_answer, split_completion

DEFAULT_WEIGHTS = {"correctness": 2.0, "strict_format": 0.5, "soft_format": 0.5, "integer": 0.5}

_HASH_STRICT = re.compile(r"\S.*\n#### -?[0-9][0-9,]*(?:\.[0-9]+)?\s*", re.DOTALL)
_TAGS_STRICT = re.compile(
    r"\s*" + re.escape(REASONING_START) + r"(?P<r>.+?)" + re.escape(REASONING_END) + r"\s*"
    + re.escape(SOLUTION_START) + r"[^<]+?" + re.escape(SOLUTION_END) + r"\s*", re.DOTALL)
_TAGS_SOFT = re.compile(
    re.escape(REASONING_END) + r".*?" + re.escape(SOLUTION_START) + r".+?" + re.escape(SOLUTION_END),
    re.DOTALL)
_INTEGER = re.compile(r"-?[0-9]+")


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def correctness(text: str, gold: str, answer_format: str, section: Section | None = None,
                opened: bool = False) -> float:
    return 1.0 if answers_equal(read_answer(text, answer_format, section, opened), gold) else 0.0


def _whole(text: str, section: Section | None, opened: bool) -> str:
    """The completion with the start tag the prompt wrote for it: the tags format's shape is checked whole."""
    return section.start + text if opened and section is not None else text


def strict_format(text: str, answer_format: str, section: Section | None = None,
                  opened: bool = False) -> float:
    if answer_format == "tags":
        m = _TAGS_STRICT.fullmatch(_whole(text, section, opened))
        return 1.0 if m and m.group("r").strip() else 0.0
    split = split_completion(text, section, opened)
    if split.ended_in_reasoning:
        return 0.0
    # after a section, the answer starts where its text does (`</think>` is followed by a blank line)
    answer = split.answer if split.reasoning is None else split.answer.lstrip()
    # exactly one `#### n`, on the last line, after some working
    return 1.0 if _HASH_STRICT.fullmatch(answer) and answer.count("####") == 1 else 0.0


def soft_format(text: str, answer_format: str, section: Section | None = None,
                opened: bool = False) -> float:
    if answer_format == "tags":
        whole = _whole(text, section, opened)
        return 1.0 if has_reasoning_section(whole) and _TAGS_SOFT.search(whole) else 0.0
    split = split_completion(text, section, opened)
    return 1.0 if STRICT_PATTERN.search(split.answer) else 0.0


def integer_answer(text: str, answer_format: str, section: Section | None = None,
                   opened: bool = False) -> float:
    answer = read_answer(text, answer_format, section, opened)
    return 1.0 if answer is not None and _INTEGER.fullmatch(answer) else 0.0


def make_reward_funcs(answer_format: str, names: Sequence[str],
                      section: Section | None = None) -> list[Callable[..., list[float]]]:
    """TRL reward functions for `names` (keys of DEFAULT_WEIGHTS), in that order; each is named after its key
    so TRL logs `rewards/<name>/mean`. `section`: the style's reasoning section (`reasoning.section_for`);
    answers are read after it."""

    def per_text(score: Callable[[str, dict[str, Any]], float], name: str):
        def reward(prompts=None, completions=(),  # noqa: ARG001 - TRL passes it by keyword
                   **columns) -> list[float]:
            golds = columns.get("gold") or [None] * len(completions)
            opened = columns.get("opened") or [False] * len(completions)
            return [score(completion_text(c), {"gold": g, "opened": bool(o)})
                    for c, g, o in zip(completions, golds, opened, strict=True)]

        reward.__name__ = name
        return reward

    table = {
        "correctness": lambda t, row: correctness(t, row["gold"], answer_format, section, row["opened"]),
        "strict_format": lambda t, row: strict_format(t, answer_format, section, row["opened"]),
        "soft_format": lambda t, row: soft_format(t, answer_format, section, row["opened"]),
        "integer": lambda t, row: integer_answer(t, answer_format, section, row["opened"]),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown reward '{unknown[0]}'", hint=f"choose from {', '.join(table)}")
    return [per_text(table[n], n) for n in names]


def parse_weights(spec: str | None) -> dict[str, float]:
    """`correctness=2,strict_format=0.5` -> weights; rewards not named keep their default, 0 drops one."""
    weights = dict(DEFAULT_WEIGHTS)
    if not spec:
        return weights
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ConfigError(f"--reward-weights: cannot read '{part.strip()}'",
                              hint=f"give name=weight pairs separated by commas; names: {', '.join(weights)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--reward-weights: '{value.strip()}' for {name} is not a number") from None
    if not any(w != 0 for w in weights.values()):
        raise ConfigError("--reward-weights: every weight is 0, so there is nothing to learn from")
    return weights
