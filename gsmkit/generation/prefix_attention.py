"""Attention over a prefix that every row shares, read once for the whole batch (Hydragen, arXiv 2402.05099).

In: the shared prefix's keys and values (one copy per layer, encoded once by `HFEngine`), and each row's
own queries, keys, values and mask as the model's attention layers produce them.
Out: `SharedPrefix` (what the engine passes the model as `shared_prefix=`), `shared_prefix_unsupported`
(why a model cannot use it, or None) and `using_shared_prefix` (the attention implementation, switched
for the forward passes that read the prefix and back afterwards).

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

A model can use it only if its attention layers go through transformers' attention interface with
plain softmax attention over every position: no sliding window, no logit soft-capping, no attention
sinks. Each forward pass counts the layers that read the prefix, so a model whose layers bypass the
interface fails loudly instead of silently ignoring the prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ATTENTION_NAME = "gsmkit_shared_prefix"


@dataclass
class SharedPrefix:
    """Keys and values of the shared prefix: per layer a (key, value) pair, each [kv_heads, P, head_dim]."""

    layers: list[tuple[Any, Any]]
    calls: int = 0  # layers that read it since the last `take_calls`

    def take_calls(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def shared_prefix_unsupported(model: Any) -> str | None:
    """Why `model`'s attention cannot read a shared prefix once for all rows; None if it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = _text_config(base)
    name = type(base).__name__
    if not getattr(base, "_supports_attention_backend", False):
        return f"{name} does not use transformers' attention interface"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return f"{name} has layers that are not full attention ({sorted(set(layer_types))})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and not layer_types:
        return f"{name} uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{name} soft-caps its attention logits"
    if any(hasattr(m, "sinks") for m in base.modules()):
        return f"{name} has attention sinks"
    return None


def _attend(q: Any, k: Any, v: Any, mask: Any, scale: float) -> tuple[Any, Any]:
    """(softmax(q k^T * scale + mask) v, its log-sum-exp [..., L, 1]), both float32, for q [B, H, L, D]
    and k, v [B, H, S, D]; `mask` is additive, broadcastable to [B, H, L, S], or None.

    On the CPU this is PyTorch's fused flash-attention kernel, which returns the log-sum-exp (3-4x faster
    than the same steps written out, and no [L, S] score tensor in memory); elsewhere it is written out."""
    import torch

    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return fused_attend(q, k, v, mask, scale)
    return written_attend(q, k, v, mask, scale)


def fused_attend(q: Any, k: Any, v: Any, mask: Any, scale: float) -> tuple[Any, Any]:
    import torch

    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)[:2]
    return out.float(), lse.float()[..., None]


def written_attend(q: Any, k: Any, v: Any, mask: Any, scale: float) -> tuple[Any, Any]:
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse).to(v.dtype), v).float(), lse


def shared_prefix_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                            scaling: float | None = None, dropout: float = 0.0,  # noqa: ARG001
                            shared_prefix: Any = None, **_kwargs: Any) -> tuple[Any, None]:
    """Softmax attention of `query` [B, H, Q, D] over the shared prefix and then `key`/`value`
    [B, kv_heads, T, D] (each row's own slots) under `attention_mask` [B, 1, Q, T] (additive); returns
    the output as [B, Q, H, D], as transformers' attention functions do. Generation: no dropout."""
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

    # prefix: the queries of every row against the one copy, one product per KV head
    qp = q.transpose(0, 1).reshape(1, kv_heads, B * g * Q, D)
    out_p, lse_p = _attend(qp, kp[None], vp[None], None, scale)  # [1, kv, B*g*Q, D], [1, kv, B*g*Q, 1]
    out_p = out_p[0].reshape(kv_heads, B, g * Q, D).transpose(0, 1)  # [B, kv, g*Q, D]
    lse_p = lse_p[0].reshape(kv_heads, B, g * Q, 1).transpose(0, 1)

    # suffix: each row against its own slots, under the engine's mask
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :T]  # [B, 1, Q, T]
        if Q > 1 and g > 1:  # rows of q are (head in group, query): the mask repeats per head
            mask = mask[:, :, None].expand(B, 1, g, Q, T).reshape(B, 1, g * Q, T)
    out_s, lse_s = _attend(q, key, value, mask, scale)

    lse = torch.logaddexp(lse_p, lse_s)
    out = out_p * torch.exp(lse_p - lse) + out_s * torch.exp(lse_s - lse)
    return out.to(query.dtype).reshape(B, H, Q, D).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `shared_prefix_attention` known to transformers under ATTENTION_NAME (once per engine)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


@contextlib.contextmanager
def using_shared_prefix(model: Any) -> Iterator[None]:
    """`model`'s attention layers run `shared_prefix_attention` inside (after `register`), their own
    implementation after."""
    config = _text_config(model.get_base_model() if hasattr(model, "get_base_model") else model)
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
