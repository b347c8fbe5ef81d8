"""Attention over the shared prefix read from one copy (Hydragen): the split attention equals attention over
the whole sequence, the engine uses it where the model allows and keeps greedy outputs token-identical to
a copied prefix, no prefix cache and transformers' `generate`, at any batch size; auto batch size."""

from __future__ import annotations

import types

import pytest
import torch
from test_generation import _load, _requests, _run

from gsmkit.generation import HFEngine, SamplingSettings, batch_size, prefix_attention
from gsmkit.generation.prefix_attention import (
    SharedPrefix,
    fused_attend,
    shared_prefix_attention,
    written_attend,
)


@pytest.mark.parametrize("attend", [fused_attend, written_attend])
@pytest.mark.parametrize(("queries", "groups"), [(1, 1), (1, 3), (5, 3)])
def test_split_attention_equals_attention_over_the_whole_sequence(monkeypatch, attend, queries, groups):
    monkeypatch.setattr(prefix_attention, "_attend", attend)
    g = torch.Generator().manual_seed(0)
    B, kv, D, P, T = 3, 2, 16, 11, 7
    H = kv * groups
    q = torch.randn(B, H, queries, D, generator=g)
    kp, vp = torch.randn(kv, P, D, generator=g), torch.randn(kv, P, D, generator=g)
    k, v = torch.randn(B, kv, T, D, generator=g), torch.randn(B, kv, T, D, generator=g)
    allowed = torch.rand(B, 1, queries, T, generator=g) > 0.4
    allowed[..., -1] = True  # every query sees at least itself
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    prefix = SharedPrefix([(kp, vp)])

    got, _ = shared_prefix_attention(types.SimpleNamespace(layer_idx=0), q, k, v, mask, scaling=0.3,
                                     shared_prefix=prefix)

    whole_k = torch.cat([kp.expand(B, -1, -1, -1), k], 2).repeat_interleave(groups, 1)
    whole_v = torch.cat([vp.expand(B, -1, -1, -1), v], 2).repeat_interleave(groups, 1)
    whole_mask = torch.cat([torch.zeros(B, 1, queries, P), mask], -1)
    want = torch.nn.functional.scaled_dot_product_attention(q, whole_k, whole_v, attn_mask=whole_mask,
                                                            scale=0.3)
    assert got.shape == (B, queries, H, D)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert prefix.take_calls() == 1


@pytest.mark.parametrize("attend", [fused_attend, written_attend])
@pytest.mark.parametrize(("window", "softcap"), [(6, None), (14, None), (6, 2.0), (None, 2.0), (3, None)])
def test_windowed_and_soft_capped_split_equals_the_whole_sequence(monkeypatch, attend, window, softcap):
    """Queries at positions past the prefix: a window that shows each query part of the prefix (6, 14), none
    of it (3: the prefix part is skipped), and soft-capped logits, against attention written out over the
    whole sequence with the window applied by position."""
    monkeypatch.setattr(prefix_attention, "_attend", attend)
    g = torch.Generator().manual_seed(1)
    B, kv, groups, D, P, T, Q = 3, 2, 2, 16, 11, 7, 2
    H = kv * groups
    q = torch.randn(B, H, Q, D, generator=g) * 3
    kp, vp = torch.randn(kv, P, D, generator=g), torch.randn(kv, P, D, generator=g)
    k, v = torch.randn(B, kv, T, D, generator=g), torch.randn(B, kv, T, D, generator=g)
    # row b holds its own tokens at positions P + b .. (the rest of its slots are padding, on the left)
    key_pos = torch.stack([torch.arange(P + b - (T - 1), P + b + 1) for b in range(B)])  # [B, T]
    real = key_pos >= P
    query_pos = key_pos[:, -Q:]  # the newest Q slots are the queries
    causal = key_pos[:, None, :] <= query_pos[:, :, None]
    near = key_pos[:, None, :] > query_pos[:, :, None] - (window or 10**6)
    allowed = (real[:, None, :] & causal & near)[:, None]  # [B, 1, Q, T]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    prefix = SharedPrefix([(kp, vp)], [window])
    prefix.set_queries(query_pos)

    got, _ = shared_prefix_attention(types.SimpleNamespace(layer_idx=0), q, k, v, mask, scaling=0.3,
                                     shared_prefix=prefix, softcap=softcap)

    whole_k = torch.cat([kp.expand(B, -1, -1, -1), k], 2).repeat_interleave(groups, 1)
    whole_v = torch.cat([vp.expand(B, -1, -1, -1), v], 2).repeat_interleave(groups, 1)
    prefix_seen = torch.arange(P)[None, None, :] > query_pos[:, :, None] - (window or 10**6)  # [B, Q, P]
    whole_allowed = torch.cat([prefix_seen[:, None], allowed], -1)
    scores = torch.matmul(q, whole_k.transpose(-1, -2)) * 0.3
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~whole_allowed, float("-inf"))
    want = torch.matmul(torch.softmax(scores, -1), whole_v)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def _counting(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return shared_prefix_attention(*args, **kwargs)

    monkeypatch.setattr(prefix_attention, "shared_prefix_attention", counted)
    prefix_attention.register()  # what transformers calls from now on, whichever engine registered before
    return calls


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_one_copy_of_the_prefix_keeps_greedy_outputs_at_any_batch_size(fixture, request, monkeypatch):
    model, tok = _load(request.getfixturevalue(fixture))
    reqs = _requests(tok)
    settings = SamplingSettings(max_new_tokens=16)
    with torch.inference_mode():
        want = {}
        for r in reqs:
            ids = torch.tensor([r.prompt_ids])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
            want[(r.key, 0)] = tuple(ref[0, ids.shape[1]:].tolist())
    calls = _counting(monkeypatch)
    for size in (1, 16, None):
        shared = HFEngine(model, tok, batch_size=size)
        assert shared.shared_prefix_fallback is None
        assert {k: v.token_ids for k, v in _run(shared, reqs, settings).items()} == want, size
        assert shared.batch_size >= 1 and shared.describe()["batch_size"] == shared.batch_size
        copied = HFEngine(model, tok, batch_size=size)
        copied.shared_prefix_fallback = "copied, for comparison"
        assert {k: v.token_ids for k, v in _run(copied, reqs, settings).items()} == want, size
        plain = HFEngine(model, tok, batch_size=size, prefix_cache=False)
        assert {k: v.token_ids for k, v in _run(plain, reqs, settings).items()} == want, size
    # the prefix was read through the split attention, by every layer of each pass that read it
    assert len(calls) > 0 and len(calls) % model.config.num_hidden_layers == 0


def test_a_model_the_split_cannot_serve_copies_the_prefix(tiny_model_dir, monkeypatch):
    model, tok = _load(tiny_model_dir)
    reqs = _requests(tok)
    settings = SamplingSettings(max_new_tokens=12)
    want = {k: v.token_ids for k, v in _run(HFEngine(model, tok), reqs, settings).items()}
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)  # as GPT-Neo's
    engine = HFEngine(model, tok)
    assert "attention interface" in engine.shared_prefix_fallback
    assert engine.describe()["attention"]["path"] == "prefix copied per row"
    calls = _counting(monkeypatch)
    assert {k: v.token_ids for k, v in _run(engine, reqs, settings).items()} == want
    assert calls == [] and engine.stats["prefix_tokens"] > 0  # the prefix was still encoded once


def test_auto_batch_size_fills_half_the_free_memory_up_to_the_cap(tiny_model_dir, monkeypatch):
    model, _ = _load(tiny_model_dir)
    # 2 layers x (key + value) x 2 KV heads x 16 dims x 4 bytes
    assert batch_size.kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4
    monkeypatch.setattr(batch_size, "free_memory_bytes", lambda _device: 512 * 100 * 10)
    assert batch_size.auto_batch_size(model, torch.device("cpu"), 100) == 5
    monkeypatch.setattr(batch_size, "free_memory_bytes", lambda _device: 1 << 40)
    assert batch_size.auto_batch_size(model, torch.device("cpu"), 100) == batch_size.CAPS["cpu"]
    monkeypatch.setattr(batch_size, "free_memory_bytes", lambda _device: 0)
    assert batch_size.auto_batch_size(model, torch.device("cpu"), 100) == 1
