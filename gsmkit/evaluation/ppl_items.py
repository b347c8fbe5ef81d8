"""The rows `eval ppl` (and `merge --verify-data`) score, and the windows they are scored in.

In: a JSONL file of `{prompt, response}` rows (the response scored), `{text}` rows (every token after the
first scored), or GSM8K `{question, answer}` rows (`question_answer`), each with optional
`metadata: {source, difficulty, domain, ...}`. Out: `PplItem`s (`read_ppl_items`), their token ids and
labels (`encode_item`, labels -100 where not scored) and, for texts longer than the window, the
`sliding_windows` that score every token exactly once.

How a row becomes tokens: the prompt and the response are concatenated as given (nothing is
inserted between them) and tokenised together, as for training (`gsmkit.tokenization`); a token is
scored iff it starts at or after the end of the prompt text (a token merged across the boundary counts
as prompt). The tokenizer's BOS is put in front when it adds one and the text does not already start
with it. No EOS is appended: the file's text is scored, nothing else.

Texts longer than the window (`max_length` tokens) are scored with a sliding window as in the
Hugging Face perplexity guide (https://huggingface.co/docs/transformers/perplexity): windows start
every `stride` tokens, each window scores only the tokens that no earlier window scored, so every
token is scored exactly once, with at least `max_length - stride` tokens of left context. Nothing is
ever truncated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.tokenization import IGNORE_INDEX, special_prefix, tokenize_split

GROUP_FIELDS = ("source", "difficulty", "domain")  # metadata fields that get their own breakdown
ROW_HINT = ('each row needs {"prompt", "response"} (loss on the response only) or {"text"} (loss on every '
            'token after the first), optionally with "metadata": {"source", "difficulty", "domain", ...}')


@dataclass(frozen=True)
class PplItem:
    """One row to score: `prompt` is "" in text mode, where `response` holds the whole text."""

    index: int
    where: str
    mode: str  # "response" ({prompt, response}) or "text" ({text})
    prompt: str
    response: str
    groups: dict[str, str] = field(default_factory=dict)  # metadata source/difficulty/domain as strings


def _group_values(obj: dict[str, Any], where: str) -> dict[str, str]:
    if "metadata" not in obj or obj["metadata"] is None:
        return {}
    meta = obj["metadata"]
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'metadata': must be an object, got {type(meta).__name__}",
                        hint=ROW_HINT)
    groups: dict[str, str] = {}
    for name in GROUP_FIELDS:
        value = meta.get(name)
        if value is None:
            continue
        if isinstance(value, dict | list):
            raise DataError(f"{where}: field 'metadata.{name}': must be a string or number, "
                            f"got {type(value).__name__}", hint=ROW_HINT)
        # Numbers and booleans are grouped by their JSON spelling: 3 -> "3", true -> "true".
        groups[name] = value if isinstance(value, str) else json.dumps(value)
    return groups


def _text_field(obj: dict[str, Any], key: str, where: str, *, allow_empty: bool) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': must be a string, got {type(value).__name__}",
                        hint=ROW_HINT)
    if not allow_empty and not value:
        raise DataError(f"{where}: field '{key}': empty", hint=ROW_HINT)
    return value


def parse_ppl_row(obj: dict[str, Any], where: str, index: int, *, question_answer: bool = False) -> PplItem:
    """One validated item from a JSONL row; `question_answer` also accepts GSM8K `{question, answer}`
    rows, scored on the answer as `Question: q\\nAnswer: a` (the plain prompt style)."""
    has_pr = "prompt" in obj or "response" in obj
    has_text = "text" in obj
    has_qa = question_answer and ("question" in obj or "answer" in obj)
    if has_pr + has_text + has_qa > 1:
        raise DataError(f"{where}: row has the fields of more than one shape",
                        hint="keep one of them; " + ROW_HINT)
    groups = _group_values(obj, where)
    if has_text:
        text = _text_field(obj, "text", where, allow_empty=False)
        return PplItem(index, where, "text", "", text, groups)
    if has_pr or has_qa:
        keys = ("prompt", "response") if has_pr else ("question", "answer")
        missing = next((k for k in keys if k not in obj), None)
        if missing:
            raise DataError(f"{where}: missing field '{missing}'", hint=ROW_HINT)
        if has_pr:
            # The prompt may be empty (then the response is scored from its second token, or its
            # first after a BOS); the response may not, or there would be nothing to score.
            prompt = _text_field(obj, "prompt", where, allow_empty=True)
            response = _text_field(obj, "response", where, allow_empty=False)
            return PplItem(index, where, "response", prompt, response, groups)
        from gsmkit.prompts import render_prompt, render_target

        question = _text_field(obj, "question", where, allow_empty=False)
        answer = _text_field(obj, "answer", where, allow_empty=False)
        return PplItem(index, where, "response", render_prompt("plain", question),
                       render_target("plain", answer), groups)
    shapes = ROW_HINT + (', or a GSM8K {"question", "answer"} row' if question_answer else "")
    raise DataError(f"{where}: row has neither 'prompt'/'response' nor 'text'", hint=shapes)


def read_ppl_items(path: str | Path, limit: int | None = None, *,
                   question_answer: bool = False) -> list[PplItem]:
    """The first `limit` rows of a JSONL file as validated items (missing/empty file: DataError)."""
    from gsmkit.jsonl import iter_jsonl

    items: list[PplItem] = []
    for lineno, obj in iter_jsonl(path):
        if limit is not None and len(items) >= limit:
            break
        items.append(parse_ppl_row(obj, f"{path}:{lineno}", len(items), question_answer=question_answer))
    return items


# --- encoding and sliding windows ---------------------------------------------------------------


def encode_item(item: PplItem, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole text; labels are IGNORE_INDEX except on scored tokens.

    The first token is never scored (nothing predicts it); see the module docstring for the rest.
    """
    prompt_ids, response_ids = tokenize_split(tokenizer, item.prompt, item.prompt + item.response)
    ids = prompt_ids + response_ids
    bos = special_prefix(tokenizer)
    prefix = bos if bos and ids[:len(bos)] != bos else []
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + response_ids
    ids = prefix + ids
    if labels:
        labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{item.where}: nothing to score: the "
                        f"{'text' if item.mode == 'text' else 'response'} gives no token after the first",
                        hint="a text needs at least two tokens; a response must add a token after the prompt")
    return ids, labels


@dataclass(frozen=True)
class Window:
    """Tokens `[begin, end)` of an item; `labels` (length end - begin) score only this window's targets."""

    item: int
    begin: int
    end: int
    input_ids: list[int]
    labels: list[int]


def sliding_windows(ids: Sequence[int], labels: Sequence[int], max_length: int, stride: int,
                    item: int = 0) -> list[Window]:
    """Windows that together score each scored token of `labels` exactly once.

    As in the HF perplexity guide: windows start at 0, stride, 2*stride, ... and are `max_length`
    long (the last may be shorter); a window scores the tokens after the previous window's end, so a
    scored token has at least `max_length - stride` tokens of context (all of them in the first
    window). Windows with no scored token are left out. Needs 1 <= stride < max_length.
    """
    if not 1 <= stride < max_length:
        raise ConfigError(f"the stride must be at least 1 and smaller than the window, got stride {stride} "
                          f"and window {max_length}", hint="use --stride <= --max-length / 2")
    n = len(ids)
    if n <= max_length:
        scored = any(lb != IGNORE_INDEX for lb in labels)
        return [Window(item, 0, n, list(ids), list(labels))] if scored else []
    windows: list[Window] = []
    begin = prev_end = 0
    while True:
        end = min(begin + max_length, n)
        window_labels = [IGNORE_INDEX] * (end - begin)
        # Position `begin` has no context inside the window: only the first window may start there,
        # and it is never a target (the first token of an item is not scored).
        for t in range(max(prev_end, begin + 1), end):
            window_labels[t - begin] = labels[t]
        if any(lb != IGNORE_INDEX for lb in window_labels):
            windows.append(Window(item, begin, end, list(ids[begin:end]), window_labels))
        prev_end = end
        if end == n:
            return windows
        begin += stride
