"""Decontamination: benchmark examples whose question is also a training question are dropped.

In: training JSONL files (rows with `question`, `prompt`, `problem` or `messages`) and a benchmark's
`Example`s. Out: the whitespace-normalised training texts, and the examples that match none of them
(by the bare question or by the whole prompt), in their order.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from gsmkit.data.benchmarks.readers import Example
from gsmkit.jsonl import iter_jsonl
from gsmkit.records import normalize_text


def load_exclusions(paths: Iterable[Path]) -> set[str]:
    """Normalised questions / prompts / user messages from training JSONL files."""
    seen: set[str] = set()
    for path in paths:
        for _, obj in iter_jsonl(path):
            for key in ("question", "prompt", "problem"):
                if isinstance(obj.get(key), str):
                    seen.add(normalize_text(obj[key]))
            for msg in obj.get("messages") or []:
                if (isinstance(msg, dict) and msg.get("role", "user") == "user"
                        and isinstance(msg.get("content"), str)):
                    seen.add(normalize_text(msg["content"]))
    seen.discard("")
    return seen


def decontaminate(examples: list[Example], excluded: set[str]) -> list[Example]:
    """The examples whose question and prompt are both absent from `excluded` (see load_exclusions)."""
    if not excluded:
        return list(examples)
    return [ex for ex in examples
            if normalize_text(ex.question) not in excluded and normalize_text(ex.prompt) not in excluded]
