"""When a row of the HF engine ends, and the text it ends with: an end-of-sequence token, a stop string, or
`--max-new-tokens`.

In: the tokenizer, the end-of-sequence ids and `SamplingSettings`; a row's tokens after each step.
Out: `RowEnd.check(tokens)`: None while the row goes on, else (body tokens, text, finish reason, end token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gsmkit.generation.engine import SamplingSettings, cut_at_stop


class RowEnd:
    def __init__(self, tokenizer: Any, stop_token_ids: frozenset[int], settings: SamplingSettings):
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.settings = settings
        # A stop string the newest token completes lies within the last `tail` tokens (a token decodes to at
        # least one character, but for special tokens and pieces of a multi-byte character: hence the
        # margin), so each step decodes those, not the whole row; a hit is then cut on the whole row.
        self.tail = max((len(s) for s in settings.stop), default=0) + 8

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def check(self, tokens: Sequence[int]) -> tuple[list[int], str, str, int | None] | None:
        """None while the row goes on; else its body (the end-of-sequence token left out), its text cut at the
        first stop string, "stop" or "length", and the end-of-sequence token that ended it."""
        stop = self.settings.stop
        last = tokens[-1]
        if last in self.stop_token_ids:
            body = list(tokens[:-1])
            return body, cut_at_stop(self._decode(body), stop)[0], "stop", last
        full = len(tokens) >= self.settings.max_new_tokens
        if not stop and not full:
            return None  # no stop string to look for: nothing to decode until the row ends
        if not full and not any(s in self._decode(tokens[-self.tail:]) for s in stop):
            return None  # no stop string ends in the newest tokens: the row goes on
        text, hit = cut_at_stop(self._decode(tokens), stop)
        if hit or full:
            return list(tokens), text, "stop" if hit else "length", None
        return None
