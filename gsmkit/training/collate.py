"""Batches for the Trainer: encoded rows (input_ids, labels) in, tensors out, padded (`PadCollator`) or packed
into one sequence (`PackCollator`, `train sft --packing`); and the count of real tokens a run processed, the
numerator of the tokens/s every training summary reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PadCollator:
    """Right-pads input_ids/labels to the longest row of the batch (labels with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


class PackCollator:
    """The rows of a batch one after another in ONE sequence (batch dimension 1, no padding), with position
    ids restarting at 0 for each row and no attention mask: transformers then builds the block-diagonal
    causal mask from the restarting positions (`masking_utils.find_packed_sequence_indices`), so no token
    sees another row's (`training.packing` checks that the model does). Each row's first label is -100: in
    a padded batch no position predicts a row's first token, and here the previous row's last token would.
    So the shifted labels (the loss's and the Trainer's `num_items_in_batch`) are the padded batch's."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        positions: list[int] = []
        labels: list[int] = []
        for r in rows:
            n = len(r["input_ids"])
            ids += r["input_ids"]
            positions += range(n)
            labels += [-100, *r["labels"][1:]] if n else []
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "use_cache": False}  # a cache switches transformers' packed-sequence detection off


def tokens_seen(trainer: Any, encoded: Sequence[Any], steps: int, rows_per_step: int) -> int:
    """Real (non-padding) tokens processed, from the Trainer's own count when it keeps one, else estimated
    from the mean row length."""
    n = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
    if n:
        return int(n)
    avg = sum(len(e.input_ids) for e in encoded) / max(1, len(encoded))
    return int(steps * rows_per_step * avg)
