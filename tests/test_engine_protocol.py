"""The `Engine` protocol, checked the same way on every backend: greedy batches equal single requests,
sample i of a request is the sample (key, i) drawn alone, cancelled samples are never yielded, and
`describe()` names the real device and dtype. vLLM runs only where it is installed and a CUDA GPU is
visible; its request fan-out, seeds and cancellation are also checked on a stand-in `vllm.LLM`."""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from gsmkit.generation import (
    BACKENDS,
    Engine,
    GenRequest,
    SamplingSettings,
    VLLMEngine,
    build_engine,
    row_seed,
)
from gsmkit.modeling import ModelSpec

QUESTIONS = ["How many legs do 5 ducks have?", "What is 9 times 8?",
             "Sam had 40 dollars and spent 15. How much is left?",
             "A shop sells 12 pens a day. How many in a week?"]
SAMPLED = SamplingSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, seed=11)


def _skip_reason(backend: str) -> str | None:
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "vllm not installed"
        if not torch.cuda.is_available():
            return "no CUDA GPU"
    return None


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request, tiny_model_dir):
    """(engine, tokenizer, backend name, the model's real device and dtype) for each backend."""
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    spec = ModelSpec(str(tiny_model_dir), dtype="float32")
    loaded, tok, engine = build_engine(spec, request.param, batch_size=4)
    param = next(loaded.model.parameters()) if loaded else None
    device = str(param.device) if param is not None else "cuda:0"
    return SimpleNamespace(engine=engine, tok=tok, name=request.param, device=device, dtype="torch.float32")


def _requests(tok, num_samples: int = 1) -> list[GenRequest]:
    return [GenRequest(str(i), tuple(tok(f"Question: {q}\nAnswer:").input_ids), num_samples)
            for i, q in enumerate(QUESTIONS)]


def _run(engine, requests, settings, cancelled=None):
    with torch.inference_mode():
        return {(r.key, r.sample_index): r for r in engine.generate(requests, settings, cancelled=cancelled)}


def test_every_backend_is_an_engine(backend):
    assert isinstance(backend.engine, Engine)
    assert {"generated_tokens"} <= set(backend.engine.stats)


def test_greedy_batch_equals_one_request_at_a_time(backend):
    reqs = _requests(backend.tok)
    settings = SamplingSettings(max_new_tokens=8)
    together = _run(backend.engine, reqs, settings)
    assert set(together) == {(r.key, 0) for r in reqs}
    for r in reqs:
        alone = _run(backend.engine, [r], settings)
        assert alone == {(r.key, 0): together[(r.key, 0)]}


def test_sample_i_is_the_same_key_and_index_drawn_alone(backend):
    reqs = _requests(backend.tok, num_samples=3)
    together = _run(backend.engine, reqs, SAMPLED)
    assert len(together) == 3 * len(reqs)
    assert len({together[("0", i)].token_ids for i in range(3)}) > 1  # each sample has its own seed
    req = reqs[0]
    for i in range(3):
        # Sample i alone: the request's other samples are cancelled before they start.
        alone = _run(backend.engine, [req], SAMPLED, cancelled=lambda _key, s, i=i: s != i)
        assert alone == {(req.key, i): together[(req.key, i)]}


def test_cancelled_samples_are_never_yielded(backend):
    req = _requests(backend.tok, num_samples=6)[0]
    kept = _run(backend.engine, [req], SAMPLED, cancelled=lambda _key, s: s >= 2)
    assert sorted(s for _, s in kept) == [0, 1]

    done: set[str] = set()  # a caller that wants one sample per key, cancelling the rest once it has it
    yielded = []
    with torch.inference_mode():
        for res in backend.engine.generate([req], SAMPLED, cancelled=lambda key, _s: key in done):
            assert res.key not in done
            yielded.append(res)
            done.add(res.key)
    assert len(yielded) == 1


def test_describe_names_the_real_device_and_dtype(backend):
    d = backend.engine.describe()
    assert d["backend"] == backend.name
    assert d["device"] == backend.device and d["dtype"] == backend.dtype
    if d["device"].startswith("cuda"):
        assert d["gpu"] == torch.cuda.get_device_name(torch.device(d["device"]))
    else:
        assert "gpu" not in d


# -- VLLMEngine's own logic on a stand-in vllm.LLM (runs everywhere) ---------------------------------------


class _StandInLLM:
    """Completions that depend only on (prompt, seed): a batch-invariant engine, as vLLM is meant to be."""

    eos = 7

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        assert lora_request is None and not use_tqdm
        self.calls.append((prompts, params))
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            seed = p.seed if p.seed is not None else sum(prompt["prompt_token_ids"])
            g = torch.Generator().manual_seed(seed)
            tokens = (torch.randint(20, 200, (p.max_tokens,), generator=g)).tolist()
            ends_with_eos = tokens[0] % 2 == 0
            if ends_with_eos:  # vLLM keeps the end-of-sequence token in token_ids
                tokens = tokens[:3] + [self.eos]
            comp = SimpleNamespace(token_ids=tokens, text="(vLLM's own detokenization)",
                                   finish_reason="stop" if ends_with_eos else "length", stop_reason=None)
            outputs.append(SimpleNamespace(outputs=[comp]))
        return outputs


@pytest.fixture()
def stand_in(monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    from gsmkit.generation import vllm as vllm_backend

    fake = types.ModuleType("vllm")
    fake.LLM = _StandInLLM
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_backend, "check_vllm_available", lambda: None)
    monkeypatch.setattr(vllm_backend, "describe_device",
                        lambda device: {"device": str(device), "gpu": "stand-in"})
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return VLLMEngine(str(tiny_model_dir), tok, dtype="auto", batch_size=4, seed=0,
                      stop_token_ids=[_StandInLLM.eos])


def test_vllm_sends_one_seeded_request_per_sample_and_drops_cancelled_ones(stand_in):
    assert isinstance(stand_in, Engine)
    reqs = _requests(stand_in.tokenizer, num_samples=3)
    got = _run(stand_in, reqs, SAMPLED, cancelled=lambda key, s: key == "1" and s == 2)
    prompts, params = stand_in.llm.calls[-1]
    sent = [(r.key, s) for r in reqs for s in range(3) if (r.key, s) != ("1", 2)]
    assert len(prompts) == len(params) == len(sent) and set(got) == set(sent)
    assert all(p.n == 1 for p in params) and [p.stop_token_ids for p in params[:1]] == [[_StandInLLM.eos]]
    assert [p.seed for p in params] == [row_seed(SAMPLED.seed, k, s) for k, s in sent]
    for res in got.values():
        assert _StandInLLM.eos not in res.token_ids  # as HFEngine reports it
        assert res.text == stand_in.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        assert res.finish_reason == ("stop" if len(res.token_ids) == 3 else "length")
    _run(stand_in, reqs[:1], SamplingSettings(max_new_tokens=4))
    greedy = stand_in.llm.calls[-1][1][0]
    assert greedy.temperature == 0.0 and greedy.seed is None
    assert stand_in.describe() == {"backend": "vllm", "device": "cuda:0", "gpu": "stand-in",
                                   "dtype": "torch.bfloat16"}


def test_vllm_never_yields_a_sample_cancelled_while_it_ran(stand_in):
    req = _requests(stand_in.tokenizer, num_samples=5)[0]
    done: set[str] = set()
    yielded = [res for res in stand_in.generate([req], SAMPLED, on_result=lambda r: done.add(r.key),
                                                cancelled=lambda key, _s: key in done)]
    assert len(yielded) == 1 and len(stand_in.llm.calls[-1][0]) == 5  # all ran, one came back


def test_vllm_cuts_text_at_the_first_stop_string(stand_in):
    ids = stand_in.tokenizer("12 #### 12\nQuestion: more").input_ids
    comp = SimpleNamespace(token_ids=ids, text="12 #### 12\n", finish_reason="stop", stop_reason="Question:")
    res = stand_in._result(GenRequest("k", (1, 2)), 0, comp, SamplingSettings(stop=("Question:",)))
    assert res.text == "12 #### 12\n" and res.finish_reason == "stop" and res.token_ids == tuple(ids)
    assert res.num_prompt_tokens == 2

