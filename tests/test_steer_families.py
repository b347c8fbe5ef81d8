"""Steering on every model family, not just Llama's layout: `gsmkit steer vectors` makes CAA and DAC vectors
for GPT-2, GPT-Neo, GPT-NeoX, Phi-3 and Gemma-2 (whose configs name their fields n_layer / n_embd / n_head /
num_layers / num_heads, and whose blocks and attention output projections sit under other names), a
config.json with GPT-2's field names has the right shape, and the steering hooks leave the logits bit for
bit as they were at alpha = 0 and change them otherwise on each family.

The expected shapes come from each model's own transformers config object (its attribute map), never from
gsmkit.families, so a wrong field read there shows here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ModelError
from gsmkit.generation.steer_files import model_shape, read_steer
from gsmkit.generation.steering import Steering, SteeringHooks
from gsmkit.prompts import encode_prompt, render_target
from gsmkit.steer.pairs import corrupt_solution

runner = CliRunner()
FAMILIES = ["gpt2", "gpt_neo", "gpt_neox", "phi3", "gemma2"]
PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "Tom has 3+4 = <<3+4=7>>7 apples.\n#### 7"),
    ("A box holds 6 pens. How many pens are in 2 boxes?", "2 boxes hold 2*6 = <<2*6=12>>12 pens.\n#### 12"),
]
SHOT = {"question": "Bo has 2 hats and gets 1 more. How many hats?", "answer": "2+1 = <<2+1=3>>3\n#### 3"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train.jsonl with two short problems, and pool.jsonl (a `gsmkit fewshot` file) with one more."""
    from gsmkit.records import FewshotExample, Problem

    out = tmp_path_factory.mktemp("steer-families-data")
    rows = [{"question": q, "answer": a} for q, a in PROBLEMS]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shot = FewshotExample.from_problem(Problem.from_dict(SHOT, "pool"))
    (out / "pool.jsonl").write_text(json.dumps(shot.to_dict()) + "\n")
    return out


def _shape(path: Path) -> tuple[int, int, int]:
    """(layers, hidden size, attention heads x head size) from the model's own config object."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, heads * head_dim


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def _vectors(model: Path, data: Path, out: Path, *extra: str) -> dict:
    res = runner.invoke(app, ["steer", "vectors", "--model", str(model), "--data", str(data), "--out",
                              str(out), "--json", "--no-cache", "--style", "chat", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_caa_vectors_on_each_family_are_the_first_layers_output_difference(family, family_model_dirs, data,
                                                                             tmp_path):
    path = family_model_dirs(family)
    layers, hidden, _ = _shape(path)
    _vectors(path, data, tmp_path / "v", "--limit", "1", "--position", "last", "--seed", "3")
    meta, vectors = read_steer(tmp_path / "v")
    assert (meta.num_layers, meta.hidden_size, meta.vector_size) == (layers, hidden, hidden)
    assert sorted(vectors) == list(range(layers))
    assert all(v.shape == (1, hidden) for v in vectors.values())
    # layer 0's vector is h(positive) - h(negative) at the completion's last token, h = the block's output
    # (hidden_states[1], which every family's model returns before its final norm)
    model, tok = _load(path)
    question, answer = PROBLEMS[0]
    pid = f"gsm8k-{hashlib.sha256(question.encode()).hexdigest()[:16]}"
    prompt = list(encode_prompt("chat", question, [], tok)[1])
    last = []
    for solution in (answer, corrupt_solution(answer, 3, pid)):
        completion = tok(render_target("chat", solution), add_special_tokens=False).input_ids
        with torch.no_grad():
            states = model(torch.tensor([prompt + completion]), output_hidden_states=True).hidden_states
        last.append(states[1][0, -1])
    torch.testing.assert_close(vectors[0][0], last[0] - last[1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_dac_vectors_on_each_family_have_one_row_per_step_of_the_attention_output_width(family,
                                                                                        family_model_dirs,
                                                                                        data, tmp_path):
    path = family_model_dirs(family)
    layers, hidden, width = _shape(path)
    summary = _vectors(path, data, tmp_path / "d", "--method", "dac", "--pool", str(data / "pool.jsonl"),
                       "--k", "1", "--steps", "2", "--layers", str(layers - 1), "--limit", "1")
    meta, vectors = read_steer(tmp_path / "d")
    assert (meta.method, meta.hook) == ("dac", "o_proj_input")
    assert (meta.num_layers, meta.hidden_size) == (layers, hidden)
    assert meta.vector_size == width and list(vectors) == [layers - 1]
    assert vectors[layers - 1].shape == (2, width) and len(summary["norms"][str(layers - 1)]) == 2
    assert bool(vectors[layers - 1].abs().sum() > 0) and bool(torch.isfinite(vectors[layers - 1]).all())


def test_model_shape_reads_gpt2_field_names_and_names_the_file_when_none_is_there(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3, "n_embd": 48,
                                                  "n_head": 4, "vocab_size": 100}))
    shape = model_shape(str(gpt2))
    assert (shape.num_layers, shape.hidden_size, shape.o_proj_in) == (3, 48, 48)
    nested = tmp_path / "nested"  # a multimodal config: the text config inside, heads x head_dim != hidden
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({"model_type": "x", "text_config": {
        "num_layers": 5, "hidden_size": 64, "num_heads": 4, "head_dim": 8}}))
    shape = model_shape(str(nested))
    assert (shape.num_layers, shape.hidden_size, shape.o_proj_in) == (5, 64, 32)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 48, "n_head": 4}))
    with pytest.raises(ModelError, match=r"config\.json: .*number of layers \(num_hidden_layers / n_layer"):
        model_shape(str(gpt2))


def _logits(model, ids, hooks=None, index=None, alpha=None):
    if hooks is not None:
        hooks.set(index, alpha)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_at_alpha_zero_leave_the_logits_exactly_and_change_them_otherwise(family, family_model_dirs):
    path = family_model_dirs(family)
    layers, hidden, width = _shape(path)
    model, tok = _load(path)
    ids = torch.tensor([tok("Question: What is 9 times 8?\nAnswer:").input_ids] * 2)
    plain = _logits(model, ids)
    g = torch.Generator().manual_seed(0)
    index = torch.zeros(ids.shape, dtype=torch.long)  # every position takes row 0
    for method, hook, size in (("caa", "residual", hidden), ("dac", "o_proj_input", width)):
        vectors = {layer: torch.randn(1, size, generator=g) for layer in range(layers)}
        with SteeringHooks(model, Steering(method, hook, vectors, 1.0)) as hooks:
            zero = _logits(model, ids, hooks, index, torch.zeros(2))
            steered = _logits(model, ids, hooks, index, torch.tensor([1.0, 0.0]))
        assert torch.equal(zero, plain), (family, method)
        assert not torch.allclose(steered[0], plain[0], atol=1e-3), (family, method)  # row 0 steered
        assert torch.equal(steered[1], plain[1]), (family, method)  # row 1 at alpha 0: untouched
    assert torch.equal(_logits(model, ids), plain)  # the hooks are gone
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
