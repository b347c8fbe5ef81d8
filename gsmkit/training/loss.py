"""The SFT loss computed only where it is defined: the LM head and cross-entropy of the positions whose
label is not -100, in chunks of bounded size, never the `[batch, length, vocab]` float32 logits.

In: the model being trained (a PEFT model or a plain causal LM) and, per batch, the Trainer's `outputs`,
`labels` and `num_items_in_batch`. Out: `response_loss(model, chunk)`, a `compute_loss_func` for
transformers' `Trainer` (or None where the model's own loss must be used), equal to the model's own
`ForCausalLMLoss` (sum of the shifted token cross-entropies / `num_items_in_batch`, logits in float32).

How: a forward hook on the decoder keeps its last hidden state (after the final norm), and a forward
pre-hook asks the causal LM for the logits of the last position only (`logits_to_keep=1`) while it
trains. The loss then gathers the hidden states of the scored positions and runs `LinearCrossEntropy`:
per chunk of `chunk` positions, the logits in float32, their log-sum-exp and target logit, and at once
the gradient of the hidden states (and of the head's weight when it trains, as in `--full`), so the
backward pass is a multiplication by the upstream gradient; no chunk's logits outlive its iteration.
Peak memory of the loss: one chunk's `[chunk, vocab]` float32 logits (about 200 MB for 1024 positions of
a 49k vocabulary) instead of the whole batch's (the model's own loss keeps their log-softmax, 0.70 GB at
batch 8 x 468 on SmolLM2-135M, and its temporaries cost more: `benchmarks/train_sft.py memory`).

Why not TRL's `add_fused_lm_head` (what `SFTTrainer` and `GRPOTrainer` use): off Triton devices it scores
every position, prompt and padding included, and it recomputes each tile's logits in the backward pass;
here only the labelled positions are scored, once. `train grpo` keeps TRL's (its loss is TRL's).

Where the model's head is not a plain linear map of the last hidden state (soft-capped or scaled logits,
a LoRA-wrapped head, MoE router losses, no `logits_to_keep`), `response_loss` returns None and the run
keeps the model's own loss.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

# config attributes that make the logits more than `hidden @ head.weight.T`: the model's own loss is kept
NOT_PLAIN_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                  "lm_head_multiplier", "output_router_logits")


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def plain_head(lm: Any) -> Any | None:
    """The LM head when the logits are exactly `hidden @ weight.T (+ bias)` and the model takes
    `logits_to_keep`; None otherwise."""
    import torch

    config = getattr(lm, "config", None)
    if config is None or any(getattr(config, name, None) for name in NOT_PLAIN_HEAD):
        return None
    from gsmkit.families import text_config

    text = text_config(config)
    if any(getattr(text, name, None) for name in NOT_PLAIN_HEAD):
        return None
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not hasattr(lm, "get_decoder"):
        return None
    return head


def response_loss(model: Any, chunk: int) -> ResponseLoss | None:
    """The chunked response-only loss for `model`, or None (chunk 0, or a head it cannot reproduce)."""
    if chunk <= 0:
        return None
    lm = causal_lm(model)
    head = plain_head(lm)
    return ResponseLoss(lm, head, chunk) if head is not None else None


class ResponseLoss:
    """`compute_loss_func(outputs, labels, num_items_in_batch)` for transformers' Trainer."""

    def __init__(self, lm: Any, head: Any, chunk: int):
        self.head = head
        self.chunk = chunk
        self.hidden = None
        self.hooks = [lm.get_decoder().register_forward_hook(self._keep_hidden),
                      lm.register_forward_pre_hook(self._last_logits_only, with_kwargs=True)]

    def _keep_hidden(self, module: Any, _args: Any, output: Any) -> None:
        if module.training:
            self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @staticmethod
    def _last_logits_only(module: Any, args: Any, kwargs: dict) -> tuple[Any, dict] | None:
        if module.training and kwargs.get("labels") is None:
            return args, {**kwargs, "logits_to_keep": 1}
        return None

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def __call__(self, _outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("response loss: the decoder's hidden state was not captured this step")
        targets = labels[..., 1:].to(hidden.device)
        scored = targets != -100
        h = hidden[..., :-1, :][scored]  # [n, hidden]: the positions that predict a labelled token
        y = targets[scored]
        denominator = num_items_in_batch if num_items_in_batch is not None else max(1, int(y.numel()))
        return linear_cross_entropy(h, self.head.weight, self.head.bias, y, self.chunk) / denominator


def linear_cross_entropy(hidden: Any, weight: Any, bias: Any, targets: Any, chunk: int) -> Any:
    """Sum over rows of `cross_entropy(hidden @ weight.T + bias, targets)` in float32, `chunk` rows at a
    time, differentiable in hidden, weight and bias."""
    import torch

    return _function().apply(hidden, weight, bias, targets, chunk, torch.is_grad_enabled())


@functools.cache
def _function() -> type:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """The gradients are computed in the forward pass, per chunk: the softmax minus the one-hot target,
        times the weight (for the hidden states) or the hidden states (for the weight)."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any, chunk: int,
                    grad: bool) -> Any:
            need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
            need_b = grad and bias is not None and bias.requires_grad
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start:start + chunk], targets[start:start + chunk]
                logits = torch.nn.functional.linear(h, weight, bias).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d(sum of CE) / d(logits)
                if need_b:
                    grad_b += probs.sum(0)
                if need_w:
                    grad_w += probs.t() @ h.float()
                if need_h:
                    grad_h[start:start + chunk] = probs.to(hidden.dtype) @ weight
            ctx.grads = (grad_h, grad_w, grad_b)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> tuple:
            grads = tuple(None if g is None else (g * grad_total).to(dtype)
                          for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True))
            ctx.grads = None
            return (*grads, None, None, None)

    return LinearCrossEntropy
