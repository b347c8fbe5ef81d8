"""GRPO's policy update with each group's prompt computed once (Prefix Grouper, arXiv 2506.05433).

In: what TRL's `GRPOTrainer._get_per_token_logps_and_entropies` receives: the rows' `input_ids` (left-padded
prompt, then the completion), their `attention_mask` and `logits_to_keep` (the completion length C), on a
model with TRL's fused LM head. Out: `packed_logps` -> the same per-token log-probabilities (and entropies)
of every completion token, [rows, C], or None where it cannot serve the batch exactly (then TRL's own
computation runs); `SharedPromptGRPO`, the trainer mixin that uses it (`shared_prompt_trainer`).

How: the rows of one prompt (GRPO's group: identical prompt ids and padding) become ONE sequence: the prompt
but its last token, once, then one segment per row holding the prompt's last token and the row's completion.
Each segment attends to the shared prompt and, causally, to itself, never to another segment; every token
keeps the position it has in TRL's unshared row (prompt padding included), and padding is masked as TRL
masks it. So each completion token sees exactly the keys and positions it sees in TRL's batch, and the
prompt's forward and backward run once per group instead of once per row: the loss and gradients are TRL's
(up to float summation order). Only the prompt's last token is computed per row (it predicts the
completion's first token).

Served: models on transformers' attention interface that take a 4-D mask (Llama, Qwen2/3, Phi-3, GPT-2
...). Not served (TRL's path, said once on stderr): any layer with a sliding window (Mistral, Gemma-2/3: the
4-D mask would override it), models outside the attention interface, multimodal inputs, an MoE aux loss.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from gsmkit.families import model_family, shared_prefix_unsupported


def unsupported(model: Any) -> str | None:
    """Why the shared-prompt update cannot serve `model` exactly; None if it can."""
    why = shared_prefix_unsupported(model)
    if why is not None:
        return why
    family = model_family(model)
    if family.windows:
        return f"{family.model_type} has sliding-window layers (window {family.windows[0]})"
    if family.unknown_layer_types:
        return f"{family.model_type} has layer types {', '.join(family.unknown_layer_types)}"
    return None


def groups_of(prompt_ids: Any, prompt_mask: Any) -> list[list[int]]:
    """Rows with the same prompt (ids and padding), in order of first appearance."""
    seen: dict[tuple, list[int]] = {}
    for row, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True)):
        seen.setdefault((tuple(ids), tuple(mask)), []).append(row)
    return list(seen.values())


def packed_batch(input_ids: Any, attention_mask: Any, logits_to_keep: int, groups: Sequence[Sequence[int]],
                 dtype: Any) -> dict[str, Any]:
    """The packed sequences of `groups` (one per group, right-padded to the longest): token ids, an
    additive 4-D mask [G, 1, L, L], position ids, pre-shifted labels (-100 where nothing is scored), and
    where each row's C completion positions start."""
    import torch

    device = input_ids.device
    R, T = input_ids.shape
    C = logits_to_keep
    P = T - C
    lengths = [P - 1 + len(g) * (C + 1) for g in groups]
    L = max(lengths)
    G = len(groups)
    ids = torch.zeros(G, L, dtype=torch.long, device=device)
    pos = torch.zeros(G, L, dtype=torch.long, device=device)
    labels = torch.full((G, L), -100, dtype=torch.long, device=device)
    segment = torch.full((G, L), -2, dtype=torch.long, device=device)  # -1: shared prompt, -2: padding
    valid = torch.zeros(G, L, dtype=torch.bool, device=device)  # a key a query may see
    starts = torch.zeros(R, dtype=torch.long, device=device)  # each row's first completion logit position
    for g, rows in enumerate(groups):
        first = rows[0]
        ids[g, :P - 1] = input_ids[first, :P - 1]
        pos[g, :P - 1] = torch.arange(P - 1, device=device)
        segment[g, :P - 1] = -1
        valid[g, :P - 1] = attention_mask[first, :P - 1].bool()
        for i, row in enumerate(rows):
            a = P - 1 + i * (C + 1)
            ids[g, a:a + C + 1] = input_ids[row, P - 1:]
            pos[g, a:a + C + 1] = torch.arange(P - 1, P + C, device=device)
            segment[g, a:a + C + 1] = i
            valid[g, a:a + C + 1] = attention_mask[row, P - 1:].bool()
            completion = input_ids[row, P:]
            labels[g, a:a + C] = completion.masked_fill(attention_mask[row, P:] == 0, -100)
            starts[row] = g * L + a
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    idx = torch.arange(L, device=device)
    causal = idx[None, :, None] >= idx[None, None, :]
    # a query sees the shared prompt's real keys and its own segment's, causally; padding queries see
    # themselves only (no row of the softmax is empty)
    allowed = causal & valid[:, None, :] & ((k_seg == -1) | (k_seg == q_seg)) & (q_seg != -2)
    allowed |= torch.eye(L, dtype=torch.bool, device=device)[None]
    mask = torch.zeros(G, 1, L, L, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "shift_labels": labels,
            "starts": starts}


def packed_logps(model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int,
                 compute_entropy: bool = False, autocast: Any = None) -> tuple[Any, Any, int] | None:
    """(log-probs [R, C], entropies [R, C] or None, positions run through the model) of every completion
    token, each group's prompt computed once; None when no two rows share a prompt (nothing to share)."""
    import contextlib

    import torch

    C = logits_to_keep
    P = input_ids.shape[1] - C
    if P < 1 or C < 1:
        return None
    groups = groups_of(input_ids[:, :P], attention_mask[:, :P])
    if all(len(g) == 1 for g in groups):
        return None
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    batch = packed_batch(input_ids, attention_mask, C, groups, dtype)
    starts = batch.pop("starts")
    with autocast if autocast is not None else contextlib.nullcontext():
        out = model(**batch, fused_lm_head=True)
    take = starts[:, None] + torch.arange(C, device=starts.device)[None, :]
    logps = out.log_probs.reshape(-1)[take]
    entropy = getattr(out, "entropy", None)
    entropies = entropy.reshape(-1)[take] if compute_entropy and entropy is not None else None
    return logps, entropies, batch["input_ids"].numel()


class SharedPromptGRPO:
    """Mixed in before TRL's `GRPOTrainer`: its per-token log-probabilities (policy update, old and reference
    policy) come from `packed_logps` where that serves the batch exactly, else from TRL's own computation.
    `shared_prompt_path` says which ran (for the manifest)."""

    shared_prompt = True
    _shared_prompt_why: str | None = None
    shared_prompt_calls: ClassVar[dict[str, int]] = {"shared": 0, "unshared": 0}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **extra):
        why = self._shared_prompt_refusal(model, compute_aux_loss, extra)
        result = None
        if why is None:
            result = packed_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy,
                                  self.accelerator.autocast())
        if result is None:
            self._count_call("unshared", model, input_ids.numel())
            return super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                compute_aux_loss, **extra)
        self._count_call("shared", model, result[2])
        return result[0], result[1], None

    def _count_call(self, path: str, model: Any, positions: int) -> None:
        """Count a log-probability computation by path, and log the positions it ran through the model
        (`logps_positions`: padding included, as computed; TRL averages it over the logging interval)."""
        self.shared_prompt_calls = {**self.shared_prompt_calls, path: self.shared_prompt_calls[path] + 1}
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics["train" if model.training else "eval"]["logps_positions"].append(float(positions))

    def _shared_prompt_refusal(self, model: Any, compute_aux_loss: bool, extra: dict[str, Any]) -> str | None:
        if not self.shared_prompt:
            return "--no-shared-prompt"
        if compute_aux_loss or any(v is not None for v in extra.values()):
            return "multimodal inputs or an MoE aux loss"
        if self._shared_prompt_why is None:
            why = unsupported(self.accelerator.unwrap_model(model)) or ""  # (DDP wraps it in a launch)
            if why:
                print(f"note: the GRPO update runs TRL's unshared path: {why}", file=sys.stderr)
            self._shared_prompt_why = why
        return self._shared_prompt_why or None

    @property
    def shared_prompt_path(self) -> dict[str, Any]:
        """What the manifest records: the path asked for, why it could not run (if so), and how many
        log-probability computations each path served."""
        why = self._shared_prompt_why or None if self.shared_prompt else "--no-shared-prompt"
        return {"shared_prompt": self.shared_prompt, "unshared_because": why,
                "calls": dict(self.shared_prompt_calls)}


def shared_prompt_trainer(base: type, shared: bool = True) -> type:
    """TRL's trainer class `base` (GRPOTrainer) with `SharedPromptGRPO` in front of it; with `shared` False
    every computation is TRL's own (the mixin only counts them and their positions)."""
    return type(f"SharedPrompt{base.__name__}", (SharedPromptGRPO, base), {"shared_prompt": shared})
