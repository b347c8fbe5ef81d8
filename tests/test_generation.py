"""The generation engine: exact agreement with transformers' greedy `generate`, prefix sharing,
continuous refill, stop handling and batch-independent sampling, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from gsmkit.generation import (
    GenRequest,
    HFEngine,
    SamplingSettings,
    common_prefix_length,
    cut_at_stop,
)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


PREFIX = "Question: Tom has 3 apples and buys 4 more.\nAnswer: 3 + 4 = 7\n#### 7\n\n"
QUESTIONS = [
    "How many legs do 5 ducks have?",
    "A shop sells 12 pens a day. How many in a week?",
    "Sam had 40 dollars and spent 15. How much is left?",
    "What is 9 times 8?",
    "Lisa reads 20 pages each day for 6 days, then 3 more pages. How many pages did she read?",
]


def _requests(tok, n=None):
    return [GenRequest(str(i), tuple(tok(PREFIX + f"Question: {q}\nAnswer:").input_ids)) for i, q in
            enumerate(QUESTIONS[:n or len(QUESTIONS)])]


def _run(engine, reqs, settings):
    with torch.inference_mode():
        return {(r.key, r.sample_index): r for r in engine.generate(reqs, settings)}


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_greedy_matches_transformers_generate(fixture, request):
    model, tok = _load(request.getfixturevalue(fixture))
    reqs = _requests(tok)
    engine = HFEngine(model, tok, batch_size=2, prefix_cache=True)
    got = _run(engine, reqs, SamplingSettings(max_new_tokens=12))
    with torch.inference_mode():
        for r in reqs:
            ids = torch.tensor([r.prompt_ids])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
            assert got[(r.key, 0)].token_ids == tuple(ref[0, ids.shape[1]:].tolist())


def test_prefix_cache_and_batch_size_do_not_change_greedy_output(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    reqs = _requests(tok)
    settings = SamplingSettings(max_new_tokens=16)
    on = HFEngine(model, tok, batch_size=4, prefix_cache=True)
    base = _run(on, reqs, settings)
    assert on.stats["prefix_tokens"] >= len(tok(PREFIX).input_ids) - 1  # the prefix really was shared
    for engine in (HFEngine(model, tok, batch_size=4, prefix_cache=False), HFEngine(model, tok, batch_size=1),
                   HFEngine(model, tok, batch_size=3, refill_fraction=0.0)):
        other = _run(engine, reqs, settings)
        assert {k: v.token_ids for k, v in other.items()} == {k: v.token_ids for k, v in base.items()}
    assert HFEngine(model, tok, prefix_cache=False).stats["prefix_tokens"] == 0


def test_finished_rows_are_replaced_while_others_run(tiny_model_dir):
    """Continuous refill: with a batch of 2 and one row stopping early, total decode steps stay below
    what fixed batches would need."""
    model, tok = _load(tiny_model_dir)
    reqs = _requests(tok, 4)
    free = _run(HFEngine(model, tok, batch_size=2), reqs, SamplingSettings(max_new_tokens=10))
    first_token_of_0 = free[("0", 0)].token_ids[0]
    # Row "0" now stops at its first token (end-of-sequence); the others run 10 tokens.
    engine = HFEngine(model, tok, batch_size=2, stop_token_ids=[first_token_of_0], refill_fraction=0.5)
    res = _run(engine, reqs, SamplingSettings(max_new_tokens=10))
    lengths = {k[0]: len(v.token_ids) for k, v in res.items()}
    assert lengths["0"] == 0 and res[("0", 0)].finish_reason == "stop"
    for key in ("1", "2", "3"):
        if first_token_of_0 not in free[(key, 0)].token_ids:
            assert res[(key, 0)].token_ids == free[(key, 0)].token_ids
    # Fixed batches of 2 would need 2 x 9 decode steps; refill lets row 3 start as soon as row 0 ends.
    assert engine.stats["decode_steps"] < 18


def test_stop_string_cuts_completion(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    reqs = _requests(tok, 1)
    free = _run(HFEngine(model, tok), reqs, SamplingSettings(max_new_tokens=20))[("0", 0)]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    cut = _run(HFEngine(model, tok), reqs, SamplingSettings(max_new_tokens=20, stop=(stop,)))[("0", 0)]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert len(cut.token_ids) < 20


def test_sampling_is_seeded_per_row_not_per_batch(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    reqs = [GenRequest(r.key, r.prompt_ids, num_samples=3) for r in _requests(tok, 3)]
    s1 = SamplingSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, seed=7)
    a = _run(HFEngine(model, tok, batch_size=4), reqs, s1)
    b = _run(HFEngine(model, tok, batch_size=1, prefix_cache=False), reqs, s1)
    assert len(a) == 9
    assert {k: v.token_ids for k, v in a.items()} == {k: v.token_ids for k, v in b.items()}
    assert len({a[("0", s)].token_ids for s in range(3)}) > 1  # samples of one prompt differ
    sampled = SamplingSettings(max_new_tokens=8, do_sample=True, seed=8)
    c = _run(HFEngine(model, tok, batch_size=4), reqs, sampled)
    assert {k: v.token_ids for k, v in a.items()} != {k: v.token_ids for k, v in c.items()}


def _rescored(model, prompt_ids, completion, temperature):
    """log softmax(logits / temperature) of each completion token, from one plain forward pass."""
    ids = torch.tensor([list(prompt_ids) + list(completion)])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize(("do_sample", "temperature", "top_p"), [(False, 1.0, 1.0), (True, 0.7, 0.9)])
def test_logprobs_are_those_of_a_rescoring_pass(tiny_model_dir, do_sample, temperature, top_p):
    """The per-token log-probabilities the engine returns (GRPO's sampling log-probs) equal a re-scoring
    of prompt + completion by the same model, end-of-sequence token included, at any batch size."""
    model, tok = _load(tiny_model_dir)
    reqs = [GenRequest(r.key, r.prompt_ids, num_samples=3) for r in _requests(tok, 3)]
    # a token this model does generate stands in for end of sequence, so some rows end by it
    eos = _run(HFEngine(model, tok), reqs[:1], SamplingSettings(max_new_tokens=4))[("0", 0)].token_ids[3]
    settings = SamplingSettings(max_new_tokens=10, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                seed=5, logprobs=True)
    got = _run(HFEngine(model, tok, batch_size=4, stop_token_ids=[eos]), reqs, settings)
    alone = _run(HFEngine(model, tok, batch_size=1, prefix_cache=False, stop_token_ids=[eos]), reqs, settings)
    prompts = {r.key: r.prompt_ids for r in reqs}
    for key, res in got.items():
        completion = list(res.token_ids) + ([res.end_token] if res.end_token is not None else [])
        assert res.end_token in (None, eos) and (res.end_token is not None) == (res.finish_reason == "stop")
        assert len(res.logprobs) == len(completion)
        want = _rescored(model, prompts[key[0]], completion, temperature)
        assert torch.allclose(torch.tensor(res.logprobs), want, atol=1e-4), key
        assert alone[key].token_ids == res.token_ids
        assert torch.allclose(torch.tensor(alone[key].logprobs), torch.tensor(res.logprobs), atol=1e-5)
    assert any(r.end_token is not None for r in got.values())
    plain = _run(HFEngine(model, tok, stop_token_ids=[eos]), reqs, SamplingSettings(max_new_tokens=10))
    assert all(r.logprobs is None for r in plain.values())


def test_cancelled_requests_stop_consuming_samples(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    reqs = [GenRequest("a", _requests(tok, 1)[0].prompt_ids, num_samples=6)]
    done: set[str] = set()
    engine = HFEngine(model, tok, batch_size=2)
    out = []
    with torch.inference_mode():
        for res in engine.generate(reqs, SamplingSettings(max_new_tokens=4, do_sample=True, seed=1),
                                   cancelled=lambda key, _sample: key in done):
            out.append(res)
            done.add(res.key)
    assert 1 <= len(out) <= 2  # the second row may finish in the same step as the first


def test_samples_of_one_request_share_its_suffix_encoding(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    req = _requests(tok, 1)[0]
    settings = SamplingSettings(max_new_tokens=6, do_sample=True, seed=3)
    shared = HFEngine(model, tok, batch_size=4, prefix_cache=False)
    together = _run(shared, [GenRequest("a", req.prompt_ids, num_samples=4)], settings)
    assert shared.stats["prefill_tokens"] == len(req.prompt_ids)  # one prefill for four samples
    alone = HFEngine(model, tok, batch_size=1, prefix_cache=False)
    one_by_one = _run(alone, [GenRequest("a", req.prompt_ids, num_samples=4)], settings)
    assert alone.stats["prefill_tokens"] == 4 * len(req.prompt_ids)
    assert {k: v.token_ids for k, v in together.items()} == {k: v.token_ids for k, v in one_by_one.items()}


def test_cancelling_later_samples_keeps_earlier_ones(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    req = GenRequest("a", _requests(tok, 1)[0].prompt_ids, num_samples=6)
    with torch.inference_mode():
        out = list(HFEngine(model, tok, batch_size=2).generate(
            [req], SamplingSettings(max_new_tokens=4, do_sample=True, seed=1),
            cancelled=lambda _key, s: s >= 3))
    assert sorted(r.sample_index for r in out) == [0, 1, 2]


def test_common_prefix_and_cut_at_stop():
    assert common_prefix_length([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix_length([(5,), (6,)]) == 0
    assert common_prefix_length([]) == 0
    assert cut_at_stop("abc Question: x", ["Question:"]) == ("abc ", True)
    assert cut_at_stop("a</s>b<|im_end|>", ["<|im_end|>", "</s>"]) == ("a", True)
    assert cut_at_stop("plain", ["zz"]) == ("plain", False)
