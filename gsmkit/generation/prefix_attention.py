"""Attention over a prefix that every row shares, read once for the whole batch (Hydragen, arXiv 2402.05099).

In: the shared prefix's keys and values (one copy per layer, encoded once by `HFEngine`), and each row's
own queries, keys, values and mask as the model's attention layers produce them.
Out: `SharedPrefix` (what the engine passes the model as `shared_prefix=`) and `using_shared_prefix` (the
attention implementation, switched for the forward passes that read the prefix and back afterwards).

Why: with a few-shot prompt, every row's KV cache starts with the same ~900 tokens. Copied per row, a
decode step of a batch of B rows reads B copies of them, which costs more than the weights on a small
model and caps the batch by memory. Split instead, each row's cache holds only its own tokens, and each
layer's attention is two parts merged exactly through their log-sum-exp:
- prefix: the queries of all rows against the one copy, as a single matrix-matrix product per KV head
  (the rows become the product's M dimension; no row attends to padding there, so no mask);
- suffix: each row's queries against its own keys, under the engine's mask;
- out = (exp(lse_p) * out_p + exp(lse_s) * out_s) / (exp(lse_p) + exp(lse_s)), computed stably.
Log-sum-exps and the merge are in float32 whatever the weights' dtype. No custom kernel: each part is
PyTorch's fused attention on the CPU (it returns the log-sum-exp) and written out on other devices.

Windows and soft-capping: a layer of window W (families.LayerAttention) sees only the prefix positions
after q - W for a query at position q, so the prefix part is cut to the positions some query sees and
masked per query (a query that sees none of it takes nothing from it: its log-sum-exp is -inf in effect);
the suffix part gets the layer's own windowed mask from the engine. Soft-capped logits (Gemma-2) are
written out, cap * tanh(scores / cap), before the mask, as the family's eager attention does.
Which models it cannot serve (no attention interface, attention sinks):
`families.shared_prefix_unsupported`.
Each forward pass counts the layers that read the prefix, so a model whose layers bypass the interface
fails loudly instead of silently ignoring the prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

ATTENTION_NAME = "gsmkit_shared_prefix"


@dataclass
class SharedPrefix:
    """Keys and values of the shared prefix: per layer a (key, value) pair, each [kv_heads, P, head_dim]."""

    layers: list[tuple[Any, Any]]
    windows: Sequence[int | None] = ()  # each layer's window (families.LayerAttention.window); () = none
    calls: int = 0  # layers that read it since the last `take_calls`
    query_positions: Any = None  # long [B, Q]: the positions of this pass's queries (set by the engine)
    _parts: dict[int, Any] = field(default_factory=dict)  # window -> this pass's prefix part (see `part`)

    def take_calls(self) -> int:
        calls, self.calls = self.calls, 0
        return calls

    def set_queries(self, positions: Any) -> None:
        """The positions of the next forward pass's queries, [B, Q]."""
        self.query_positions = positions
        self._parts.clear()

    def part(self, window: int | None, groups: int, dtype: Any) -> tuple[int, Any] | None:
        """(first prefix position any query of the pass sees, additive mask [1, 1, B*groups*Q, P - first] or
        None when every query sees all of them) for a layer of `window`; None when no query sees the
        prefix. Computed once per pass and window (every layer of that window shares it)."""
        import torch

        P = self.layers[0][0].shape[-2]
        if window is None:
            return 0, None
        key = (window, groups, dtype)
        if key not in self._parts:
            first = self.query_positions - window + 1  # [B, Q]: the first position each query sees
            lo = max(int(first.min()), 0)
            if lo >= P:
                self._parts[key] = None
            elif int(first.max()) <= lo:
                self._parts[key] = (lo, None)
            else:
                B, Q = first.shape
                seen = torch.arange(lo, P, device=first.device)[None, None, :] >= first[:, :, None]
                mask = torch.zeros(seen.shape, dtype=dtype, device=first.device)
                mask.masked_fill_(~seen, torch.finfo(dtype).min)
                mask = mask[:, None].expand(B, groups, Q, P - lo).reshape(1, 1, B * groups * Q, P - lo)
                self._parts[key] = (lo, mask)
        return self._parts[key]


def _attend(q: Any, k: Any, v: Any, mask: Any, scale: float, softcap: float | None = None) -> tuple[Any, Any]:
    """(softmax(cap(q k^T * scale) + mask) v, its log-sum-exp [..., L, 1]), both float32, for q [B, H, L, D]
    and k, v [B, H, S, D]; `mask` is additive, broadcastable to [B, H, L, S], or None; cap is the identity
    without `softcap`.

    On the CPU this is PyTorch's fused flash-attention kernel, which returns the log-sum-exp (3-4x faster
    than the same steps written out, and no [L, S] score tensor in memory); elsewhere, and with soft-capping
    (which the kernel cannot apply), it is written out."""
    import torch

    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return fused_attend(q, k, v, mask, scale, softcap)
    return written_attend(q, k, v, mask, scale, softcap)


def fused_attend(q: Any, k: Any, v: Any, mask: Any, scale: float,
                 softcap: float | None = None) -> tuple[Any, Any]:
    import torch

    if softcap:  # the kernel cannot cap the logits
        return written_attend(q, k, v, mask, scale, softcap)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)[:2]
    return out.float(), lse.float()[..., None]


def written_attend(q: Any, k: Any, v: Any, mask: Any, scale: float,
                   softcap: float | None = None) -> tuple[Any, Any]:
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse).to(v.dtype), v).float(), lse


def shared_prefix_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                            scaling: float | None = None, dropout: float = 0.0,  # noqa: ARG001
                            shared_prefix: Any = None, softcap: float | None = None,
                            **_kwargs: Any) -> tuple[Any, None]:
    """Softmax attention of `query` [B, H, Q, D] over the shared prefix (the part of it the layer's window
    lets each query see) and then `key`/`value` [B, kv_heads, T, D] (each row's own slots) under
    `attention_mask` [B, 1, Q, T] (additive, the layer's window already in it); returns the output as
    [B, Q, H, D], as transformers' attention functions do. Generation: no dropout."""
    import torch

    if shared_prefix is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' was called without shared_prefix=")
    kp, vp = shared_prefix.layers[module.layer_idx]
    shared_prefix.calls += 1
    B, H, Q, D = query.shape
    kv_heads, T = key.shape[1], key.shape[2]
    g = H // kv_heads  # query heads per KV head (head h reads KV head h // g, as repeat_kv orders them)
    scale = scaling if scaling is not None else D ** -0.5
    q = query.reshape(B, kv_heads, g * Q, D)

    # suffix: each row against its own slots, under the engine's mask
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :T]  # [B, 1, Q, T]
        if Q > 1 and g > 1:  # rows of q are (head in group, query): the mask repeats per head
            mask = mask[:, :, None].expand(B, 1, g, Q, T).reshape(B, 1, g * Q, T)
    out_s, lse_s = _attend(q, key, value, mask, scale, softcap)

    # prefix: the queries of every row against the one copy (the positions the window shows them), one
    # product per KV head
    windows = shared_prefix.windows
    part = shared_prefix.part(windows[module.layer_idx] if windows else None, g, query.dtype)
    if part is None:  # no query of this pass sees the prefix any more
        return out_s.to(query.dtype).reshape(B, H, Q, D).transpose(1, 2).contiguous(), None
    first, prefix_mask = part
    qp = q.transpose(0, 1).reshape(1, kv_heads, B * g * Q, D)
    out_p, lse_p = _attend(qp, kp[None, :, first:], vp[None, :, first:], prefix_mask, scale, softcap)
    out_p = out_p[0].reshape(kv_heads, B, g * Q, D).transpose(0, 1)  # [B, kv, g*Q, D]
    lse_p = lse_p[0].reshape(kv_heads, B, g * Q, 1).transpose(0, 1)

    lse = torch.logaddexp(lse_p, lse_s)
    out = out_p * torch.exp(lse_p - lse) + out_s * torch.exp(lse_s - lse)
    return out.to(query.dtype).reshape(B, H, Q, D).transpose(1, 2).contiguous(), None


_ANNOUNCED: set[str] = set()  # fallbacks said on stderr in this process


def prepare(model: Any) -> str | None:
    """Ready `model` for the shared prefix: None (registered), or why it cannot read one (then the engine
    copies the prefix into each row: exact, slower), said once per process on stderr."""
    from gsmkit.families import shared_prefix_unsupported

    why = shared_prefix_unsupported(model)
    if why is None:
        register()
    elif why not in _ANNOUNCED:
        from gsmkit.progress import stderr_console

        _ANNOUNCED.add(why)
        stderr_console().print(f"note: {why}, so the shared prompt prefix is copied into each row (exact, "
                               "slower)", highlight=False, soft_wrap=True)
    return why


def describe_path(prefix_cache: bool, fallback: str | None) -> dict[str, str]:
    """The attention path of an engine, for manifests: the shared prefix, a copied one (and why), or none."""
    if not prefix_cache:
        return {"path": "no prefix cache"}
    if fallback is not None:
        return {"path": "prefix copied per row", "why": fallback}
    return {"path": "shared prefix"}


def register() -> None:
    """Make `shared_prefix_attention` known to transformers under ATTENTION_NAME (once per engine)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


@contextlib.contextmanager
def using_shared_prefix(model: Any) -> Iterator[None]:
    """`model`'s attention layers run `shared_prefix_attention` inside (after `register`), their own
    implementation after."""
    from gsmkit.families import text_config

    config = text_config((model.get_base_model() if hasattr(model, "get_base_model") else model).config)
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
