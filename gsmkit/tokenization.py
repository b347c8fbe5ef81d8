"""Text to token ids with a scored (or trained) part: the rules `training.masking` and `eval ppl` share.

In: a fast tokenizer, a prompt text and the whole text that starts with it. Out: `tokenize_split`
gives (prompt ids, response ids) of the whole text, cut at the first token that starts at or after the
end of the prompt (a token merged across the boundary counts as prompt); `special_prefix` gives the
ids the tokenizer puts before a text (its BOS, when it adds one); `Encoded` holds ids and labels,
IGNORE_INDEX where a token is not scored.

Training (`training.masking`) and evaluation (`evaluation.perplexity`, `adapters.merge`) both build on
this module, so the tokens a model is trained on and the tokens it is scored on are cut the same way,
and neither package imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gsmkit.errors import ModelError

IGNORE_INDEX = -100  # the label torch's cross_entropy (and HF models) ignore by default


@dataclass(frozen=True)
class Encoded:
    """A tokenised example: `labels[i]` is `input_ids[i]` where trained (or scored), else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    where: str
    truncated: bool

    @property
    def num_trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before text when it adds special tokens (its BOS, if any).

    Probed rather than read from `bos_token_id`: many tokenizers have a BOS they never add, and any
    suffix it adds (an EOS on some) is left out because the EOS is appended as a trained token instead.
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i])
    return []


def tokenize_split(tokenizer: Any, prompt: str, whole: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of `whole`, split at the first token starting at or after len(prompt)."""
    try:
        enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError("response-only training and scoring need a fast tokenizer (one that reports "
                         "character offsets)",
                         hint="use a tokenizer with a tokenizer.json (load it with use_fast=True)") from None
    ids = list(enc["input_ids"])
    # Offsets are non-decreasing, so tokens before the cut are exactly the prompt's.
    cut = next((i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(prompt)), len(ids))
    return ids[:cut], ids[cut:]
