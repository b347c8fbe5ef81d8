"""The batched generation engine on transformers: `HFEngine`, the fast path on a CPU or one GPU.

In: a loaded causal LM and its tokenizer; `GenRequest`s (a key, the prompt's token ids, how many samples)
and `SamplingSettings`.
Out: one `GenResult` per (request, sample), yielded as soon as it finishes.

Why it is fast on few-shot prompts:
- The token prefix shared by every prompt (the few-shot exemplars) is encoded once, so only each
  problem's own suffix is prefilled, and every row reads it from one copy (`prefix_attention`): a
  row's KV cache holds only its own tokens, so a decode step reads the prefix once, not once per row,
  and the batch can be larger in the same memory (`--batch-size` auto, `batch_size`). Models whose
  attention the split cannot serve (no attention interface, sinks: `families`) copy it into each row,
  and say so once.
- Rows admitted together are prefilled in passes of at most 16, longest first, so little is padding.
- A stop string is looked for in the newest tokens' text each step, not in the whole row's (`row_end`).
- A reasoning budget (`--thinking-budget`, `budget`) puts a row's end tag in place of its picks; the row
  stays in the batch.
- Rows leave the batch the moment they finish (stop string, end-of-sequence or length) and waiting
  requests are admitted in their place (continuous refill), so the batch stays full.
- Requests are admitted longest-suffix first, so rows prefilled together have similar lengths.
- Several samples of one request (`num_samples`) share one encoding of its suffix; a caller that no
  longer needs some samples (`cancelled(key, sample_index)`) stops them at the next step.

How rows of different lengths share one batch: every row's keys and values are right-aligned in a
common slot axis; a boolean slot mask says which slots hold real tokens for which row, and each row
carries its own position ids. Keys are stored already rotated (RoPE) at their true positions, so a
row's slots may sit anywhere in the axis. We pass the model a 4-D additive mask we build ourselves
rather than a 2-D padding mask, so no model-side padding heuristics apply; layers with a sliding window
get that mask cut to their window, by position (`layer_masks`).

Sampling draws from a per-(request, sample) generator seeded from `seed`, so a result does not depend
on which other rows shared its batch: resumed runs reproduce uninterrupted ones.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.families import model_family
from gsmkit.generation import prefix_attention as split  # the shared prefix read from one copy
from gsmkit.generation.batch_size import auto_batch_size
from gsmkit.generation.budget import RowBudget, budgets_for, forced_tokens
from gsmkit.generation.engine import (
    Cancelled,
    GenRequest,
    GenResult,
    OnResult,
    SamplingSettings,
    checked_requests,
    common_prefix_length,
    describe_device,
)
from gsmkit.generation.layer_masks import LayerMasks
from gsmkit.generation.row_end import RowEnd
from gsmkit.generation.sampling import choose, row_generator
from gsmkit.generation.slot_cache import (
    cache_argument,
    contiguous_input,
    merge_rows,
    slot_layer_class,
    trim_unused,
)
from gsmkit.generation.steering import decode_index, installed, prefill_index, prefix_index, steered_forward


@dataclass
class _Row:
    request: GenRequest
    sample_index: int
    generator: Any
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # with SamplingSettings.logprobs
    budget: RowBudget | None = None  # with SamplingSettings.thinking_budget


class HFEngine:
    """Batched generation on a transformers causal LM with prefix sharing and continuous refill; an `Engine`.

    A cancelled sample costs nothing more: queued ones are never started, running ones leave the batch at
    the next decode step."""

    min_prefix_tokens = 8  # below this, sharing saves less than the bookkeeping costs
    prefill_rows = 16  # rows prefilled in one forward pass

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int | None = None,
        prefix_cache: bool = True,
        stop_token_ids: Iterable[int] = (),
        refill_fraction: float = 0.25,
        steering: Any = None,
    ):
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.requested_batch_size = batch_size  # None: auto, per call (batch_size.auto_batch_size)
        self.batch_size = batch_size  # the last call's
        self.refill_fraction = refill_fraction
        self.prefix_cache = prefix_cache
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.device = next(model.parameters()).device
        self.family = model_family(model)
        self.num_layers = self.family.num_layers
        self._layer_masks = LayerMasks(self.family)  # each layer's window
        self._slot_layer = slot_layer_class()
        self._cache_arg = cache_argument(model)
        # Rows read the shared prefix from one copy (prefix_attention) unless the model cannot; then each
        # row's cache starts with a copy of it.
        self.shared_prefix_fallback = split.prepare(model) if prefix_cache else None
        self._prefix: split.SharedPrefix | None = None  # the one copy, while a call runs
        self.steering = steering  # a steering.Steering, applied by generate() and next_token_logprobs()
        self._hooks = None  # its SteeringHooks while a call runs
        self.stats = {"prefix_tokens": 0, "prefill_tokens": 0, "decode_steps": 0, "generated_tokens": 0}

    def describe(self) -> dict[str, str]:
        """What runs the model, for manifests: the device its weights are on and their dtype."""
        dtype = getattr(self.model, "dtype", None) or next(self.model.parameters()).dtype
        described = {"backend": "hf", **describe_device(self.device), "dtype": str(dtype),
                     "batch_size": self.batch_size if self.batch_size is not None else "auto"}
        if self.steering is not None:
            described["steering"] = self.steering.describe()
        # which attention path ran, and why, with the model's layout (windows, soft-capping)
        path = split.describe_path(self.prefix_cache, self.shared_prefix_fallback)
        return {**described, "attention": {**path, **self.family.describe()}}

    # -- model calls ---------------------------------------------------------------------------------

    def _forward(self, input_ids, position_ids, mask_bool, cache):
        """One forward pass; `mask_bool` is [B, Q, T] (True = may attend)."""
        import torch

        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32

        def additive(allowed):
            out = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
            return out.masked_fill_(~allowed, torch.finfo(dtype).min)

        extra: dict[str, Any] = {self._cache_arg: cache}
        prefix = self._prefix
        if prefix is not None:
            extra["shared_prefix"] = prefix
            prefix.set_queries(position_ids)
        first = prefix.layers[0][0].shape[-2] if prefix is not None else 0  # the rows' first own position
        full = additive(mask_bool)[:, None]
        self._layer_masks.set(mask_bool, full, position_ids, first, additive)
        with split.using_shared_prefix(self.model) if prefix is not None else contextlib.nullcontext():
            try:
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                 attention_mask=full, logits_to_keep=1, **extra)
            finally:
                self._layer_masks.clear()
        if prefix is not None and prefix.take_calls() != self.num_layers:
            raise ConfigError(f"{type(self.model).__name__}: not every attention layer read the shared "
                              "prefix", hint="run with --no-prefix-cache")
        return out.logits[:, -1, :].float(), getattr(out, self._cache_arg)

    def _new_cache(self):
        from transformers.cache_utils import Cache

        return Cache(layers=[self._slot_layer() for _ in range(self.num_layers)])

    def _encode_prefix(self, prefix: Sequence[int]):
        """KV tensors of the shared prefix, one (key, value) pair per layer, each [1, H, P, D]."""
        import torch

        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        pos = torch.arange(len(prefix), device=self.device)[None, :]
        causal = torch.ones(len(prefix), len(prefix), dtype=torch.bool, device=self.device).tril()[None]
        index = prefix_index(self._hooks.steering, len(prefix), self.device) if self._hooks else None
        _, cache = steered_forward(self._forward, self._hooks, index, self._new_cache(), ids, pos, causal)
        self.stats["prefix_tokens"] += len(prefix)
        return [(layer.keys, layer.values) for layer in cache.layers]

    # -- the loop ------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], settings: SamplingSettings, on_result: OnResult = None,
                 cancelled: Cancelled = None) -> Iterator[GenResult]:
        """Yield results as rows finish. `cancelled(key, sample_index)` lets a caller drop samples it no
        longer needs (queued ones are never started, running ones leave the batch at the next step).
        With `steering` set, its hooks are on the model from the first step to the last (or until the
        caller stops iterating), and off otherwise."""
        with self._call():
            yield from self._generate(requests, settings, on_result, cancelled)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One call: the steering hooks and the lm head's contiguous-input hook on, and the shared prefix it
        encodes forgotten when it ends."""
        head = self.model.get_output_embeddings()
        contiguous = head.register_forward_pre_hook(contiguous_input) if head is not None else None
        with installed(self.model, self.steering) as hooks, self._layer_masks.installed(self.model):
            self._hooks = hooks
            try:
                yield
            finally:
                self._hooks = None
                self._prefix = None
                if contiguous is not None:
                    contiguous.remove()

    def _generate(self, requests: Sequence[GenRequest], settings: SamplingSettings, on_result: OnResult,
                  cancelled: Cancelled) -> Iterator[GenResult]:
        import torch

        requests = checked_requests(requests)
        if not requests:
            return

        budgets = budgets_for(settings.thinking_budget, self.tokenizer)
        P, prefix_kv = self._shared_prefix(requests)
        batch = self._batch_for(requests, P, prefix_kv, settings.max_new_tokens)
        # Admit new rows once this share of the batch is free: one prefill for several rows is cheaper
        # than one per row, and the slot axis is rebuilt once per admission.
        refill_at = max(1, round(batch * self.refill_fraction))

        # Longest suffix first; Python's sort is stable, so ties keep the caller's order.
        queue: deque[tuple[GenRequest, int]] = deque(
            (r, s) for r in sorted(requests, key=lambda r: -len(r.prompt_ids)) for s in range(r.num_samples)
        )
        rows: list[_Row] = []
        cache = None  # KV cache (SlotLayer per model layer) over the active rows
        mask = None  # bool [B, T]
        positions = None  # long [B]: position id of each row's next token
        next_tokens: list[int] = []
        next_logprobs: list[float] = []  # with settings.logprobs: those of next_tokens

        def ended(row: _Row, body: list[int], text: str, reason: str, end: int | None = None) -> GenResult:
            return GenResult(row.request.key, row.sample_index, tuple(body), text, reason,
                             len(row.request.prompt_ids), end_token=end,
                             logprobs=tuple(row.logprobs) if settings.logprobs else None,
                             budget_forced=row.budget is not None and row.budget.forced_at is not None)

        row_end = RowEnd(self.tokenizer, self.stop_token_ids, settings)

        def finish_check(row: _Row) -> GenResult | None:
            end = row_end.check(row.tokens)
            return None if end is None else ended(row, *end)

        while queue or rows:
            # ---- admission: prefill new rows' suffixes on top of the shared prefix ----
            free = batch - len(rows)
            if queue and (free >= refill_at or not rows):
                group: list[_Row] = []
                while queue and len(group) < free:
                    req, s = queue.popleft()
                    if cancelled is not None and cancelled(req.key, s):
                        continue
                    group.append(_Row(req, s, row_generator(settings, req.key, s, self.device),
                                      budget=budgets.row(req.prompt_ids) if budgets else None))
                if group:
                    new_cache, new_mask, new_pos, logits = self._prefill(group, P, prefix_kv)
                    first, first_logprobs = choose(logits, [r.generator for r in group], settings,
                                                   forced_tokens([r.budget for r in group]))
                    cache, mask, positions = merge_rows(cache, mask, positions, new_cache, new_mask, new_pos)
                    rows.extend(group)
                    next_tokens.extend(first)
                    next_logprobs.extend(first_logprobs)
            if not rows:
                continue

            # ---- bookkeeping: append chosen tokens, emit finished rows, drop them from the batch ----
            keep: list[int] = []
            for i, (row, tok) in enumerate(zip(rows, next_tokens, strict=True)):
                if cancelled is not None and cancelled(row.request.key, row.sample_index):
                    continue
                row.tokens.append(tok)
                if settings.logprobs:
                    row.logprobs.append(next_logprobs[i])
                if row.budget is not None:
                    row.budget.saw(row.tokens)
                self.stats["generated_tokens"] += 1
                result = finish_check(row)
                if result is None:
                    keep.append(i)
                    continue
                if on_result is not None:
                    on_result(result)
                yield result
            if len(keep) != len(rows):
                rows = [rows[i] for i in keep]
                next_tokens = [next_tokens[i] for i in keep]
                next_logprobs = [next_logprobs[i] for i in keep] if settings.logprobs else []
                if not rows:
                    cache = mask = positions = None
                    continue
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(idx)
                mask = mask[idx]
                positions = positions[idx]
                cache, mask = trim_unused(cache, mask)

            # ---- one decode step for every active row ----
            ids = torch.tensor(next_tokens, dtype=torch.long, device=self.device)[:, None]
            ones = torch.ones(len(rows), 1, dtype=torch.bool, device=self.device)
            step_mask = torch.cat([mask, ones], dim=1)
            index = (decode_index(self._hooks.steering, [len(r.tokens) for r in rows], self.device)
                     if self._hooks else None)
            logits, cache = steered_forward(self._forward, self._hooks, index, cache, ids, positions[:, None],
                                            step_mask[:, None, :])
            mask = step_mask
            positions = positions + 1
            next_tokens, next_logprobs = choose(logits, [r.generator for r in rows], settings,
                                                forced_tokens([r.budget for r in rows]))
            self.stats["decode_steps"] += 1

    def next_token_logprobs(
        self, requests: Sequence[GenRequest], token_ids: Sequence[int],
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[str, list[float]]]:
        """`(key, log-probabilities of token_ids)` as the next token after each prompt, one forward pass per
        batch and the shared prefix encoded once: scoring without generating (ShieldGemma's Yes/No)."""
        requests = list(requests)
        for r in requests:
            if not r.prompt_ids:
                raise ConfigError(f"request '{r.key}' has an empty prompt")
        if not requests:
            return
        with self._call():
            yield from self._next_token_logprobs(requests, token_ids, on_batch)

    def _next_token_logprobs(self, requests, token_ids, on_batch) -> Iterator[tuple[str, list[float]]]:
        import torch

        P, prefix_kv = self._shared_prefix(requests)
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        order = sorted(requests, key=lambda r: -len(r.prompt_ids))  # similar lengths share a batch
        batch = self._batch_for(requests, P, prefix_kv, 0)
        for start in range(0, len(order), batch):
            group = [_Row(r, 0, None) for r in order[start:start + batch]]
            _, _, _, logits = self._prefill(group, P, prefix_kv)
            picked = torch.log_softmax(logits, dim=-1)[:, ids].tolist()
            for row, values in zip(group, picked, strict=True):
                yield row.request.key, values
            if on_batch is not None:
                on_batch(len(group))

    def _batch_for(self, requests: Sequence[GenRequest], P: int, prefix_kv, new_tokens: int) -> int:
        """The batch size of this call: the one asked for, or the most rows whose cache fits (auto). A row's
        cache holds its prompt after the shared prefix (all of it when the prefix is copied into it)."""
        if self.requested_batch_size is None:
            own = max(len(r.prompt_ids) for r in requests) - (P if prefix_kv is None else 0)
            self.batch_size = auto_batch_size(self.model, self.device, own + new_tokens)
        return self.batch_size

    def _shared_prefix(self, requests: Sequence[GenRequest]):
        """(P, KV of the first P tokens) shared by every prompt; every row keeps at least one suffix token,
        whose logits start generation."""
        P = 0
        if self.prefix_cache:
            P = min(common_prefix_length([r.prompt_ids for r in requests]),
                    min(len(r.prompt_ids) for r in requests) - 1)
            if P < self.min_prefix_tokens:
                P = 0
        if not P:
            return 0, None
        kv = self._encode_prefix(requests[0].prompt_ids[:P])
        if self.shared_prefix_fallback is not None:
            return P, kv  # copied into each row's cache
        self._prefix = split.SharedPrefix([(k[0], v[0]) for k, v in kv], self._layer_masks.windows)
        return P, None

    def _prefill(self, group: Sequence[_Row], P: int, prefix_kv):
        """Encode each new row's suffix after the shared prefix; returns its cache, mask, positions, logits.

        Samples of one request share its suffix encoding: the suffix is prefilled once and the row's
        cache copied for each sample (they diverge from their first sampled token on)."""
        import torch

        slot: dict[int, int] = {}  # id(request) -> row of the prefill batch
        unique: list[GenRequest] = []
        for row in group:
            if id(row.request) not in slot:
                slot[id(row.request)] = len(unique)
                unique.append(row.request)
        # Suffixes are padded to the longest of their forward pass: rows come longest first, so passes of
        # at most `prefill_rows` keep that padding small when many rows are admitted at once.
        cache = row_mask = next_pos = None
        parts = []
        for start in range(0, len(unique), self.prefill_rows):
            c, m, p, lg = self._prefill_unique(unique[start:start + self.prefill_rows], P, prefix_kv)
            cache, row_mask, next_pos = merge_rows(cache, row_mask, next_pos, c, m, p)
            parts.append(lg)
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(unique) == len(group):
            return cache, row_mask, next_pos, logits
        idx = torch.tensor([slot[id(row.request)] for row in group], dtype=torch.long, device=self.device)
        cache.batch_select_indices(idx)
        return cache, row_mask[idx], next_pos[idx], logits[idx]

    def _prefill_unique(self, requests: Sequence[GenRequest], P: int, prefix_kv):
        import torch

        n = len(requests)
        suffixes = [r.prompt_ids[P:] for r in requests]
        S = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, S), pad, dtype=torch.long)
        real = torch.zeros(n, S, dtype=torch.bool)
        pos = torch.full((n, S), P, dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, S - len(s):] = torch.tensor(s, dtype=torch.long)
            real[i, S - len(s):] = True
            pos[i, S - len(s):] = torch.arange(P, P + len(s))
        ids, real, pos = ids.to(self.device), real.to(self.device), pos.to(self.device)

        # Query q may see the whole prefix, and suffix slots j <= q that hold real tokens. Each query
        # also sees itself so padding queries never have an all-masked row (which would give NaN
        # that then leaks into real rows through 0 * NaN in the attention sum).
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        suffix_mask = causal[None] & real[:, None, :]
        suffix_mask |= torch.eye(S, dtype=torch.bool, device=self.device)[None]
        # The prefix's slots: in each row's cache when it was copied there, else read from self._prefix.
        C = P if prefix_kv is not None else 0
        full = torch.cat([torch.ones(n, S, C, dtype=torch.bool, device=self.device), suffix_mask], dim=2)

        cache = self._new_cache()
        if C:
            for layer, (k, v) in zip(cache.layers, prefix_kv, strict=True):
                layer.assign(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), reserve=S)
        index = prefill_index(self._hooks.steering, real) if self._hooks else None
        logits, cache = steered_forward(self._forward, self._hooks, index, cache, ids, pos, full)
        self.stats["prefill_tokens"] += sum(len(s) for s in suffixes)
        row_mask = torch.cat([torch.ones(n, C, dtype=torch.bool, device=self.device), real], dim=1)
        next_pos = torch.tensor([P + len(s) for s in suffixes], dtype=torch.long, device=self.device)
        return cache, row_mask, next_pos, logits
