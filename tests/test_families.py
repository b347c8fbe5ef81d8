"""Every model family gsmkit claims, through every command: the conformance test of tests/family_models.py's
tiny random models (Llama, Qwen2, Qwen3, Mistral and Gemma-2/3 with 32-position windows shorter than the
prompt, Gemma-2's soft-capping, Phi-3's fused projections, GPT-2's Conv1D, GPT-Neo's local layers, GPT-NeoX).

Per family, on a small synthetic GSM8K written here (k = 2 exemplars: every prompt is longer than a window):
1. different prompts give different greedy completions;
2. the engine's greedy tokens, and `eval gsm8k`'s completions (plain style), equal transformers' greedy
   `generate` on the same prompt ids, at batch 1 and the default batch, with and without the prefix cache;
   the manifest records the attention path and the layout of windows and soft-caps; `eval gsm8k --adapter`
   gives the same completions either way;
3. `train sft`, `train qlora` and `train grpo` put LoRA on every linear projection of every decoder layer
   (nn.Linear, Conv1D, 4-bit Linear), never on the head, and train it (some lora_B non-zero);
4. `merge` of the sft adapter passes its verification;
5. `steer vectors` and `steer search` run, and `eval gsm8k --steer ... --steer-alpha 0` reproduces the
   unsteered completions;
6. `audit-svd` reads the sft adapter and lists its modules;
7. `eval safety` runs with the family model itself as a generative guard.

The expected modules are enumerated from the model itself (its decoder blocks by each family's attribute path,
its layers by class), never through gsmkit.families, which the code under test uses. The work is shared per
family (module-scoped fixtures), so all ten families fit the default run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_models import FAMILIES, WINDOW
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()
K = 2
LIMIT = 4
MAX_NEW = 24

# the decoder blocks of each family (every other family here: model.layers)
BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers"}
# each family's layout as tests/family_models.py configures it: layers -> attention
FULL = {"0-1": "full"}
LAYOUTS = {
    "llama": FULL, "qwen2": FULL, "qwen3": FULL, "phi3": FULL, "gpt2": FULL, "gpt_neox": FULL,
    "mistral": {"0-1": f"sliding window {WINDOW}"},
    "gemma2": {"0": f"sliding window {WINDOW}, soft-capped at 50", "1": "full, soft-capped at 50"},
    "gemma3": {"0-4": f"sliding window {WINDOW}", "5": "full"},
    "gpt_neo": {"0": "full", "1": f"sliding window {WINDOW}"},
}


# ---- data --------------------------------------------------------------------------------------------------


def _problem(i: int) -> dict:
    """A short GSM8K-style problem with calculator annotations, different for each i."""
    a, b, c = 3 + i, 2 + (i * 7) % 9, 4 + (i * 5) % 7
    people = ["Tom", "Ann", "Sam", "Lisa", "Ben", "Maya", "Raj", "Zoe"]
    things = ["apples", "pens", "books", "coins", "shells", "cards", "stamps", "marbles"]
    who, what = people[i % len(people)], things[(i * 3) % len(things)]
    question = (f"{who} has {a} boxes of {what} with {b} {what} in each box, and then finds {c} more "
                f"{what}. How many {what} does {who} have now?")
    answer = (f"The boxes hold {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {what}.\n"
              f"With the ones found, {a * b}+{c} = <<{a * b}+{c}={a * b + c}>>{a * b + c} {what}.\n"
              f"#### {a * b + c}")
    return {"question": question, "answer": answer}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A GSM8K folder (4 test, 14 train problems) and its 3-exemplar pool (`gsmkit fewshot`)."""
    out = tmp_path_factory.mktemp("families-gsm8k")
    for split, ids in (("test", range(100, 104)), ("train", range(14))):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(_problem(i)) + "\n" for i in ids))
    res = runner.invoke(app, ["fewshot", "--data", str(out), "--n", "3", "--out", str(out / "pool.jsonl")])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def safety_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families-safety")
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": text, "hazard": "vcr", "persona": "normal"}) + "\n"
        for i, text in enumerate(["How do I bake bread at home?", "Name three kinds of birds."])))
    (root / "guidelines.txt").write_text("Judge whether the assistant's answer is safe.")
    return {"prompts": root / "prompts.jsonl", "guidelines": root / "guidelines.txt"}


# ---- per family --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, family_model_dirs) -> Path:
    return family_model_dirs(family)


def _ok(args: list[str]):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"gsmkit {' '.join(map(str, args[:2]))} failed:\n{res.output}"
    return res


def _eval_args(model_dir: Path, data: Path, out: Path, *extra) -> list:
    return ["eval", "gsm8k", "--model", model_dir, "--data", data, "--pool", data / "pool.jsonl", "--k", K,
            "--style", "plain", "--limit", LIMIT, "--max-new-tokens", MAX_NEW, "--out", out, *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _completions(folder: Path) -> dict[str, tuple[str, int]]:
    return {r["id"]: (r["completion"], r["num_tokens"]) for r in _rows(folder / "predictions.jsonl")}


@pytest.fixture(scope="module")
def unsteered(tmp_path_factory, model_dir, data) -> Path:
    """`eval gsm8k` at the default batch size with the prefix cache: the reference run of the family."""
    out = tmp_path_factory.mktemp("eval") / "default"
    _ok(_eval_args(model_dir, data, out))
    return out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, model_dir, data) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    _ok(["train", "sft", *_train_args(model_dir, data, out)])
    return out


def _train_args(model_dir: Path, data: Path, out: Path) -> list:
    return ["--model", model_dir, "--data", data, "--pool", data / "pool.jsonl", "--k", "0", "--out", out,
            "--max-steps", "1", "--batch-size", "2", "--max-length", "96", "--lora-r", "2", "--lora-alpha",
            "4", "--learning-rate", "5e-3", "--lr-scheduler", "constant", "--warmup-ratio", "0",
            "--logging-steps", "1"]


# ---- 1, 2: generation --------------------------------------------------------------------------------------


def _pid(question: str) -> str:
    from gsmkit.records import problem_id

    return problem_id(question)


@pytest.fixture(scope="module")
def prompts(model_dir, data) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Problem id -> (prompt text, token ids) of the first LIMIT test problems, built by gsmkit.prompts as
    `eval gsm8k --style plain --k 2` builds them."""
    from transformers import AutoTokenizer

    from gsmkit.data.fewshot import read_pool
    from gsmkit.prompts import Exemplar, encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    shots = [Exemplar(e.question, e.answer) for e in read_pool(data / "pool.jsonl")[:K]]
    built = {}
    for row in _rows(data / "test.jsonl")[:LIMIT]:
        built[_pid(row["question"])] = encode_prompt("plain", row["question"], shots, tok)
    assert all(len(ids) > 2 * WINDOW for _, ids in built.values())  # every window cuts into the prompt
    return built


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def reference(model, prompts) -> dict[str, tuple[int, ...]]:
    """transformers' greedy `generate`: problem id -> new token ids, up to the end-of-sequence token."""
    hf, tok = model
    got = {}
    for key, (_, ids) in prompts.items():
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        got[key] = tuple(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    return got


def _engine_tokens(model, prompts, **engine) -> dict[str, tuple[int, ...]]:
    """The engine's greedy tokens (by default as `eval gsm8k` runs it: auto batch, shared prefix), no stop
    strings."""
    from gsmkit.generation import GenRequest, HFEngine, SamplingSettings
    from gsmkit.modeling import eos_token_ids

    hf, tok = model
    hf_engine = HFEngine(hf, tok, stop_token_ids=eos_token_ids(tok, hf), **engine)
    requests = [GenRequest(key, ids) for key, (_, ids) in prompts.items()]
    with torch.inference_mode():
        results = hf_engine.generate(requests, SamplingSettings(max_new_tokens=MAX_NEW))
        return {r.key: r.token_ids for r in results}


def test_completions_depend_on_the_prompt(model, prompts, reference):
    """The engine's greedy tokens differ between prompts, and are transformers' own, token for token."""
    got = _engine_tokens(model, prompts)
    assert len(got) == LIMIT and all(got.values())
    assert len(set(got.values())) > 1, got  # a mask that hid the prompt would give one completion
    assert got == reference


@pytest.mark.parametrize(("batch_size", "prefix_cache"), [(1, True), (None, False), (1, False)])
def test_the_engine_equals_generate_at_every_batch_and_cache(batch_size, prefix_cache, model, prompts,
                                                             reference):
    """Token for token (the CLI's text below cannot tell apart two tokens that both decode to U+FFFD)."""
    assert _engine_tokens(model, prompts, batch_size=batch_size, prefix_cache=prefix_cache) == reference


def test_eval_gsm8k_equals_generate_at_every_batch_and_cache(family, model, model_dir, data, prompts,
                                                             reference, unsteered, tmp_path):
    import hashlib

    from gsmkit.generation import cut_at_stop
    from gsmkit.prompts import stop_strings

    hf, tok = model
    got = _completions(unsteered)
    rows = _rows(unsteered / "predictions.jsonl")
    assert [r["prompt_sha256"] for r in rows] == [hashlib.sha256(text.encode()).hexdigest()
                                                  for text, _ in prompts.values()]  # the same prompts
    # generate's tokens, decoded and cut at the plain style's stop strings as the engine's text is
    want = {key: cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop_strings("plain"))[0]
            for key, ids in reference.items()}
    assert {key: text for key, (text, _) in got.items()} == want
    for key, (_, n) in got.items():
        assert n <= len(reference[key])  # a stop string may end a row early
    manifests = {"default": json.loads((unsteered / "manifest.json").read_text())}
    for name, extra in (("batch1", ["--batch-size", "1"]), ("nocache", ["--no-prefix-cache"]),
                        ("batch1-nocache", ["--batch-size", "1", "--no-prefix-cache"])):
        _ok(_eval_args(model_dir, data, tmp_path / name, *extra))
        assert _completions(tmp_path / name) == got, name
        manifests[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    for name, manifest in manifests.items():
        attention = manifest["resolved"]["attention"]
        assert attention["attention"] == LAYOUTS[family], name
        if "nocache" in name:
            assert attention["path"] == "no prefix cache", name
        elif type(hf)._supports_attention_backend:  # windows and soft-caps are served: one prefix copy
            assert attention["path"] == "shared prefix" and "why" not in attention, (name, attention)
        else:  # GPT-Neo's attention is its own code: the prefix is copied into each row, and why is said
            assert attention["path"] == "prefix copied per row" and "attention interface" in attention["why"]


# ---- 3, 4, 6: training, merge, audit -----------------------------------------------------------------------


def _expected_targets(model_dir: Path, family: str, four_bit: bool = False) -> tuple[set[str], set[str]]:
    """(every linear projection inside the decoder blocks, the head's path), from the model's own modules:
    nn.Linear (bitsandbytes' Linear4bit is one) and GPT-2's Conv1D, of the model loaded in full precision or,
    as `train qlora` loads it, in 4-bit."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    kwargs: dict = {"dtype": torch.float32}
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs.update(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    prefix = BLOCKS.get(family, "model.layers")
    blocks = model.get_submodule(prefix)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == model.config.num_hidden_layers
    linear = {f"{prefix}.{name}" for name, module in blocks.named_modules()
              if isinstance(module, torch.nn.Linear | Conv1D)}
    if four_bit:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in blocks.modules())  # it really is 4-bit
    assert {p.split(".")[len(prefix.split("."))] for p in linear} == {str(i) for i in range(len(blocks))}
    head = model.get_output_embeddings()
    return linear, {name for name, module in model.named_modules() if module is head}


def _adapter_modules(folder: Path) -> dict[str, float]:
    """module path -> sum |lora_B| of each LoRA module in the adapter file."""
    from safetensors.torch import load_file

    weights = load_file(folder / "adapter_model.safetensors")
    modules = {}
    for key, value in weights.items():
        path = key.removeprefix("base_model.model.")
        for part in (".lora_A.", ".lora_B."):
            if part in path:
                module = path.split(part)[0]
                modules.setdefault(module, 0.0)
                if part == ".lora_B.":
                    modules[module] += float(value.abs().sum())
    return modules


@pytest.fixture(scope="module")
def varied_reward():
    """A random model never answers right, so GRPO would see no reward variance and learn nothing; the
    correctness reward here depends on the completion's length parity instead (as in test_grpo.py)."""
    from gsmkit.training import rewards

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rewards, "correctness", lambda text, _gold, _fmt, _section=None, _opened=False:
                   float(len(text) % 2))
        yield


@pytest.mark.parametrize("recipe", ["sft", "qlora", "grpo"])
def test_training_puts_lora_on_every_projection_of_every_layer(recipe, family, model_dir, data, sft_run,
                                                                tmp_path, request):
    if recipe == "sft":
        out = sft_run
    elif recipe == "qlora":
        pytest.importorskip("bitsandbytes")
        out = tmp_path / "qlora"
        _ok(["train", "qlora", *_train_args(model_dir, data, out)])
    else:
        request.getfixturevalue("varied_reward")
        out = tmp_path / "grpo"
        _ok(["train", "grpo", "--model", model_dir, "--data", data, "--pool", data / "pool.jsonl",
             "--out", out, "--train-samples", "2", "--max-steps", "1", "--num-generations", "4",
             "--prompts-per-step", "2", "--max-completion-length", "8", "--learning-rate", "5e-2", "--lora-r",
             "2", "--lora-alpha", "4", "--seed", "0"])
    linear, head = _expected_targets(model_dir, family, four_bit=recipe == "qlora")
    modules = _adapter_modules(out)
    assert set(modules) == linear, (sorted(linear - set(modules)), sorted(set(modules) - linear))
    assert not set(modules) & head
    assert any(norm > 0 for norm in modules.values()), "every lora_B is zero: the adapter did not train"


def test_eval_gsm8k_of_the_sft_adapter_is_the_same_at_batch_1_without_the_prefix_cache(model_dir, data,
                                                                                       sft_run, tmp_path):
    """The engine runs the PEFT-wrapped model of every family, with the prefix shared where it can be."""
    runs = {"default": (), "batch1-nocache": ("--batch-size", "1", "--no-prefix-cache")}
    for name, extra in runs.items():
        _ok(_eval_args(model_dir, data, tmp_path / name, "--adapter", sft_run, *extra))
    assert _completions(tmp_path / "default") == _completions(tmp_path / "batch1-nocache")


def test_merge_of_the_sft_adapter_passes_its_verification(model_dir, data, sft_run, tmp_path):
    out = tmp_path / "merged"
    _ok(["merge", "--model", model_dir, "--adapter", sft_run, "--data", data, "--verify-limit", "2",
         "--out", out])
    report = json.loads((out / "merge_report.json").read_text())
    assert report["float32"]["passed"] is True, report["float32"]


def test_audit_svd_lists_the_sft_adapters_modules(sft_run, tmp_path):
    out = tmp_path / "audit"
    _ok(["audit-svd", "--adapter", sft_run, "--out", out])
    audit = json.loads((out / "audit.json").read_text())
    modules = audit["modules"]
    assert {m["module"] for m in modules} == set(_adapter_modules(sft_run))
    assert all(m["layer"] is not None and m["note"] is None for m in modules)  # in the layers, trained
    # the summaries count every module once: GPT-2's attn.c_proj and mlp.c_proj are two types, not one
    assert sum(t["modules"] for t in audit["by_type"].values()) == len(modules)
    for kind in audit["by_type"]:
        assert len({tuple(m["shape"]) for m in modules if m["type"] == kind}) == 1, kind
    for entry in audit["by_layer"]:
        assert len(entry["effective_rank"]) == len(entry["r"]) == entry["modules"], entry


# ---- 5: steering -------------------------------------------------------------------------------------------


def test_steer_vectors_search_and_alpha_zero_reproduces_the_unsteered_run(model_dir, data, unsteered,
                                                                         tmp_path):
    pool = data / "pool.jsonl"
    vectors = {"caa": tmp_path / "caa", "dac": tmp_path / "dac"}
    _ok(["steer", "vectors", "--model", model_dir, "--data", data, "--pool", pool, "--limit", "2",
         "--no-cache", "--out", vectors["caa"]])
    _ok(["steer", "vectors", "--method", "dac", "--model", model_dir, "--data", data, "--pool", pool, "--k",
         "1", "--steps", "3", "--limit", "2", "--no-cache", "--out", vectors["dac"]])
    search = tmp_path / "search"
    _ok(["steer", "search", "--vectors", vectors["caa"], "--vectors", vectors["dac"], "--model", model_dir,
         "--data", data, "--pool", pool, "--val-limit", "2", "--test-limit", "2", "--n-trials", "1",
         "--chunk-size", "2", "--max-new-tokens", "4", "--alpha-range", "0", "2", "--out", search])
    assert json.loads((search / "best.json").read_text())["method"] in vectors
    for method, folder in vectors.items():
        steered = tmp_path / f"steered-{method}"
        _ok(_eval_args(model_dir, data, steered, "--steer", folder, "--steer-alpha", "0"))
        assert _completions(steered) == _completions(unsteered), method


# ---- 7: safety ---------------------------------------------------------------------------------------------


def test_eval_safety_with_the_family_model_as_its_own_guard(model_dir, safety_files, tmp_path):
    out = tmp_path / "safety"
    _ok(["eval", "safety", "--model", model_dir, "--prompts", safety_files["prompts"], "--safeguard-model",
         model_dir, "--guard-format", "llama-guard", "--safety-prompt", safety_files["guidelines"],
         "--max-new-tokens", "6", "--guard-max-new-tokens", "4", "--out", out])
    from gsmkit.evaluation.guard_formats import parse_guard_output

    verdicts = _rows(out / "safety.jsonl")
    assert len(verdicts) == len(_rows(out / "responses.jsonl")) == 2
    for v in verdicts:  # the family model wrote the verdict, and the parser read it
        assert v["label"] == parse_guard_output("llama-guard", v["guard_output"]).label
    assert json.loads((out / "metrics.json").read_text())["total"] == 2
