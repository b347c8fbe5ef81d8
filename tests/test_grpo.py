"""GRPO rewards (the metric's extractor, format shapes, weights) and `gsmkit train grpo` on a tiny model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from gsmkit.answers import score_completion
from gsmkit.cli import app
from gsmkit.errors import ConfigError
from gsmkit.training import rewards
from gsmkit.training.grpo import GrpoSettings, train_grpo
from gsmkit.training.rewards import (
    DEFAULT_WEIGHTS,
    correctness,
    integer_answer,
    make_reward_funcs,
    parse_weights,
    soft_format,
    strict_format,
)

runner = CliRunner()
TAGGED = "<start_working_out>2 + 3 = 5<end_working_out>\n<SOLUTION>5</SOLUTION>"


@pytest.mark.parametrize(("text", "fmt", "expected"), [
    ("2 + 3 = 5\n#### 5", "hash", (1, 1, 1, 1)),
    ("2 + 3 = 5\n#### 5\nQuestion: more", "hash", (1, 0, 1, 1)),  # text after the answer line
    ("#### 5", "hash", (1, 0, 1, 1)),  # no working at all
    ("2 + 3 = 5\n#### 5\n#### 6", "hash", (1, 0, 1, 1)),  # two answers
    ("so 5.5\n#### 5.5", "hash", (0, 1, 1, 0)),
    ("the answer is 5", "hash", (0, 0, 0, 0)),
    (TAGGED, "tags", (1, 1, 1, 1)),
    ("  " + TAGGED + "\n", "tags", (1, 1, 1, 1)),
    (TAGGED + " and more", "tags", (1, 0, 1, 1)),
    ("<start_working_out> <end_working_out><SOLUTION>5</SOLUTION>", "tags", (1, 0, 0, 1)),  # empty reasoning
    ("<SOLUTION>5</SOLUTION>", "tags", (1, 0, 0, 1)),
    ("<start_working_out>x<end_working_out><SOLUTION>five</SOLUTION>", "tags", (0, 1, 1, 0)),
    ("2 + 3 = 5\n#### 5", "tags", (0, 0, 0, 0)),  # the other format's marker earns nothing
])
def test_rewards(text, fmt, expected):
    got = (correctness(text, "5", fmt), strict_format(text, fmt), soft_format(text, fmt),
           integer_answer(text, fmt))
    assert got == tuple(float(x) for x in expected)


@given(st.text(max_size=80), st.integers(-10**6, 10**6))
def test_correctness_reward_agrees_with_the_metric(noise, gold):
    """The reward and the metric's strict column are one extractor: they can never disagree."""
    for text in (noise, f"{noise}\n#### {gold}", f"#### {gold}{noise}",
                 f"<SOLUTION>{gold}</SOLUTION>{noise}"):
        for fmt in ("hash", "tags"):
            _, strict, _ = score_completion(text, str(gold), fmt)
            assert correctness(text, str(gold), fmt) == float(strict)


def test_reward_funcs_have_trl_signature_and_names():
    funcs = make_reward_funcs("hash", list(DEFAULT_WEIGHTS))
    assert [f.__name__ for f in funcs] == list(DEFAULT_WEIGHTS)
    chat = [[{"role": "assistant", "content": "1 + 1 = 2\n#### 2"}], [{"role": "assistant", "content": "no"}]]
    assert funcs[0](prompts=["p", "p"], completions=chat, gold=["2", "2"]) == [1.0, 0.0]
    assert funcs[1](prompts=["p"], completions=["1 + 1 = 2\n#### 2"], gold=["3"]) == [1.0]
    with pytest.raises(ConfigError):
        make_reward_funcs("hash", ["length"])


def test_parse_weights():
    assert parse_weights(None) == DEFAULT_WEIGHTS
    assert parse_weights("correctness=1, integer=0") == {**DEFAULT_WEIGHTS, "correctness": 1.0,
                                                         "integer": 0.0}
    for bad in ("correctness", "speed=1", "correctness=high",
                "correctness=0,strict_format=0,soft_format=0,integer=0"):
        with pytest.raises(ConfigError):
            parse_weights(bad)


@pytest.mark.parametrize("style", ["chat", "tags", "plain"])
def test_grpo_prompts_tokenize_to_the_eval_prompt(style, tiny_model_dir):
    """TRL tokenizes a conversational prompt with the chat template and a text prompt with special tokens;
    either way the ids must equal what `eval gsm8k` feeds the model."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from gsmkit.prompts import Exemplar, add_special_tokens_for, render_prompt
    from gsmkit.training.grpo import grpo_prompt
    from gsmkit.training.rollouts import prompt_token_ids

    # A Llama-3-like tokenizer: it adds a BOS when asked for special tokens, and its template writes one.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<s>"], special_tokens=True)
    tok.bos_token = "<s>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    ex = [Exemplar("How many legs do 2 ducks have?", "2 x 2 = 4\n#### 4")]
    prompt = grpo_prompt(style, "What is 9 times 8?", ex, tok, None)
    got = prompt_token_ids(prompt, tok)  # what TRL does with a conversational or a text prompt
    want = tok(render_prompt(style, "What is 9 times 8?", ex, tok),
               add_special_tokens=add_special_tokens_for(style)).input_ids
    assert list(got) == list(want)
    assert list(want).count(tok.bos_token_id) == 1


def _lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture()
def varied_reward(monkeypatch):
    """A random tiny model never answers right, so every reward is 0 and GRPO has no signal; this makes
    correctness depend on the completion's length parity so groups have reward variance."""
    monkeypatch.setattr(rewards, "correctness", lambda text, _gold, _fmt, _section=None, _opened=False:
                        float(len(text) % 2))


def _settings(model, data, out, **kw) -> GrpoSettings:
    base = {"model": str(model), "out": out, "data": str(data), "train_samples": 8, "max_steps": 2,
            "max_completion_length": 12, "num_generations": 4, "prompts_per_step": 2, "learning_rate": 5e-2,
            "lora_r": 4, "lora_alpha": 8, "seed": 0}
    base.update(kw)
    return GrpoSettings(**base)


@pytest.mark.usefixtures("varied_reward")
def test_grpo_changes_lora_weights_and_writes_a_loadable_adapter(tmp_path, tiny_model_dir, small_gsm8k):
    out = tmp_path / "grpo"
    result = train_grpo(_settings(tiny_model_dir, small_gsm8k, out))
    assert result.steps == 2 and result.train_problems == 8
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "trainer_log.jsonl",
                 "reward_curve.png", "fewshot_pool.jsonl", "tokenizer.json"):
        assert (out / name).exists(), name
    weights = _lora_weights(out)
    # LoRA B starts at zero: a non-zero B means the policy gradient reached the adapter.
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "reward" in r] == [1, 2]
    assert all("rewards/correctness/mean" in r for r in log if "reward" in r)
    # generation is part of the step
    assert all(0 < r["rollout_time"] < r["step_time"] for r in log if "reward" in r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "train grpo" and manifest["resolved"]["reward_weights"] == DEFAULT_WEIGHTS
    assert manifest["resolved"]["removed_fewshot"] > 0
    assert manifest["resolved"]["lora_module_count"] == 2 * 7  # every projection of the 2 layers
    # the adapter loads in `eval gsm8k`
    res = runner.invoke(app, ["eval", "gsm8k", "--model", str(tiny_model_dir), "--adapter", str(out),
                              "--data", str(small_gsm8k), "--limit", "2", "--max-new-tokens", "4",
                              "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["n"] == 2


@pytest.mark.usefixtures("varied_reward")
def test_grpo_continues_an_sft_adapter(tmp_path, tiny_model_dir, small_gsm8k):
    first = tmp_path / "first"
    train_grpo(_settings(tiny_model_dir, small_gsm8k, first, max_steps=1))
    before = _lora_weights(first)
    second = tmp_path / "second"
    train_grpo(_settings(tiny_model_dir, small_gsm8k, second, init_adapter=str(first), max_steps=1, seed=1))
    after = _lora_weights(second)
    assert set(after) == set(before)  # the same adapter, trained further
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.usefixtures("varied_reward")
def test_time_limit_stops_after_the_step_that_crosses_it(tmp_path, tiny_model_dir, small_gsm8k):
    out = tmp_path / "t"
    result = train_grpo(_settings(tiny_model_dir, small_gsm8k, out, max_steps=50, time_limit=1e-8))  # minutes
    assert result.steps == 1 and (out / "adapter_model.safetensors").exists()


@pytest.mark.usefixtures("varied_reward")
def test_grpo_resume_reaches_the_same_step_count(tmp_path, tiny_model_dir, small_gsm8k):
    out = tmp_path / "res"

    def crash(step, _total):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_grpo(_settings(tiny_model_dir, small_gsm8k, out, max_steps=3, save_steps=1), on_step=crash)
    assert (out / "checkpoints" / "checkpoint-1").exists() and not (out / "adapter_config.json").exists()
    # an interrupted run is never silently restarted
    with pytest.raises(ConfigError, match="interrupted run"):
        train_grpo(_settings(tiny_model_dir, small_gsm8k, out, max_steps=3, save_steps=1))
    result = train_grpo(_settings(tiny_model_dir, small_gsm8k, out, max_steps=3, save_steps=1, resume=True))
    assert result.steps == 3 and (out / "adapter_model.safetensors").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["resumed_from"].endswith("checkpoint-1")
    log = (out / "trainer_log.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, log) if "reward" in r]
    assert steps == [1, 2, 3]  # step 2 ran twice (before the crash, after the resume) and is logged once


@pytest.mark.usefixtures("varied_reward")
def test_grpo_qlora_runs_fresh_and_from_an_adapter(tmp_path, tiny_model_dir, small_gsm8k):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    result = train_grpo(_settings(tiny_model_dir, small_gsm8k, out, load_in_4bit=True, max_steps=1))
    assert result.steps == 1 and result.trainable_params > 0 and (out / "adapter_model.safetensors").exists()
    # continuing that adapter on the 4-bit base trains it further (k-bit preparation must not freeze it)
    again = tmp_path / "q2"
    result = train_grpo(_settings(tiny_model_dir, small_gsm8k, again, load_in_4bit=True, max_steps=1,
                                  init_adapter=str(out), seed=1))
    assert result.trainable_params == sum(v.numel() for v in _lora_weights(out).values())
    before, after = _lora_weights(out), _lora_weights(again)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _cli(*args):
    return runner.invoke(app, ["train", "grpo", *args])


def test_grpo_bad_inputs(tmp_path, tiny_model_dir, small_gsm8k):
    base = ["--model", str(tiny_model_dir), "--data", str(small_gsm8k), "--out", str(tmp_path / "o")]
    r = _cli(*base, "--reward-weights", "speed=2")
    assert r.exit_code == 2 and "speed" in r.output
    r = _cli(*base, "--num-generations", "1")
    assert r.exit_code == 2
    r = _cli(*base, "--time-limit", "0")
    assert r.exit_code == 2 and "--time-limit must be > 0" in r.output
    r = _cli(*base, "--temperature", "0")
    assert r.exit_code == 2 and "--temperature" in r.output
    r = _cli(*base, "--lr", "0")
    assert r.exit_code == 2 and "--learning-rate must be > 0" in r.output
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    r = _cli(*base, "--init-adapter", str(not_adapter))
    assert_clean_failure(r, tmp_path / "o", 1, str(not_adapter))
    prs = tmp_path / "pr.jsonl"
    prs.write_text('{"prompt": "a", "response": "b"}\n')
    r = _cli("--model", str(tiny_model_dir), "--data", str(prs), "--out", str(tmp_path / "o2"))
    assert r.exit_code == 1 and "question/answer" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()



def test_unset_reward_weights_are_recorded_as_the_defaults_they_mean(record_settings):
    from typer.testing import CliRunner

    from gsmkit.cli import app
    from gsmkit.training.rewards import DEFAULT_WEIGHTS

    seen = record_settings("gsmkit.training.grpo.train_grpo")
    CliRunner().invoke(app, ["train", "grpo", "--model", "m"])
    assert dict(seen["settings"].reward_weights) == DEFAULT_WEIGHTS  # the manifest says what ran
    CliRunner().invoke(app, ["train", "grpo", "--model", "m", "--reward-weights", "correctness=1"])
    assert dict(seen["settings"].reward_weights) == {**DEFAULT_WEIGHTS, "correctness": 1.0}


@pytest.fixture()
def recorded_rollouts(monkeypatch):
    """Every engine rollout round of a run: (step, prompt_ids, completion_ids, logprobs, the logprobs a plain
    forward pass of the policy gives the same tokens at that moment)."""
    from gsmkit.training.rollouts import EngineRollouts

    rounds: list[dict] = []
    call = EngineRollouts.__call__

    def recording(self, prompts, trainer):
        out = call(self, prompts, trainer)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        was_training = policy.training
        policy.eval()
        rescored = []
        with torch.no_grad():
            for p, c in zip(out["prompt_ids"], out["completion_ids"], strict=True):
                logits = policy(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
                logp = torch.log_softmax(logits / trainer.temperature, -1)
                rescored.append(logp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist())
        policy.train(was_training)
        rounds.append({"step": trainer.state.global_step, **out, "rescored": rescored})
        return out

    monkeypatch.setattr(EngineRollouts, "__call__", recording)
    return rounds


@pytest.mark.usefixtures("varied_reward")
def test_engine_rollouts_are_the_policys_own_samples(tmp_path, tiny_model_dir, small_gsm8k,
                                                     recorded_rollouts):
    """TRL gets, per step, num_generations completions of each prompt with the log-probabilities of the
    policy of that step (a re-scoring pass agrees), ending on the end-of-sequence token where they stop."""
    out = tmp_path / "eng"
    train_grpo(_settings(tiny_model_dir, small_gsm8k, out, max_steps=2, k=1, temperature=0.8))
    assert [r["step"] for r in recorded_rollouts] == [0, 1]
    for r in recorded_rollouts:
        prompts = r["prompt_ids"]
        assert len(prompts) == 8 and len({tuple(p) for p in prompts}) == 2  # 2 prompts x 4 completions
        assert all(prompts[i] == prompts[i // 4 * 4] for i in range(8))
        assert len({tuple(c) for c in r["completion_ids"]}) > 1  # the samples of a group differ
        for c, lp, want in zip(r["completion_ids"], r["logprobs"], r["rescored"], strict=True):
            assert 1 <= len(c) <= 12 and len(lp) == len(c)
            assert torch.allclose(torch.tensor(lp), torch.tensor(want), atol=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["rollouts"] == "engine"
    stats = manifest["resolved"]["rollout_engine_stats"]
    assert stats["generated_tokens"] == sum(len(c) for r in recorded_rollouts for c in r["completion_ids"])
    assert stats["prefix_tokens"] > 0  # the few-shot prefix was encoded once per round, not per row


@pytest.mark.usefixtures("varied_reward")
def test_resumed_grpo_reproduces_the_rollouts_of_an_uninterrupted_run(tmp_path, tiny_model_dir, small_gsm8k,
                                                                      recorded_rollouts):
    whole = _settings(tiny_model_dir, small_gsm8k, tmp_path / "whole", max_steps=3, save_steps=1)
    train_grpo(whole)
    uninterrupted = {r["step"]: r["completion_ids"] for r in recorded_rollouts}
    recorded_rollouts.clear()

    def crash(step, _total):
        if step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_grpo(dataclasses.replace(whole, out=out), on_step=crash)
    before = {r["step"]: r["completion_ids"] for r in recorded_rollouts}
    recorded_rollouts.clear()
    train_grpo(dataclasses.replace(whole, out=out, resume=True))  # from checkpoint-1
    after = {r["step"]: r["completion_ids"] for r in recorded_rollouts}
    assert sorted(before) == [0, 1] and sorted(after) == [1, 2]
    assert before == {s: uninterrupted[s] for s in before}
    assert after == {s: uninterrupted[s] for s in after}  # same completions for the same steps
    steps = [r["step"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
             if "reward" in r]
    assert steps == [1, 2, 3]


@pytest.mark.usefixtures("varied_reward")
def test_trl_rollouts_still_train(tmp_path, tiny_model_dir, small_gsm8k, recorded_rollouts):
    out = tmp_path / "trl"
    result = train_grpo(_settings(tiny_model_dir, small_gsm8k, out, max_steps=1, rollouts="trl"))
    assert result.steps == 1 and recorded_rollouts == []  # TRL's own generate sampled
    assert json.loads((out / "manifest.json").read_text())["resolved"]["rollouts"] == "trl"


def test_rollout_path_resolution():
    from gsmkit.training.rollouts import resolve_rollouts

    assert resolve_rollouts("auto", False, "cpu") == "engine"
    assert resolve_rollouts("trl", False, "cuda") == "trl"
    assert resolve_rollouts("auto", True, "cpu") == "vllm"  # --use-vllm is the old spelling
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_rollouts("engine", True, "cpu")
    r = _cli("--model", "m", "--rollouts", "engine", "--use-vllm")
    assert r.exit_code == 2 and "contradicts" in r.output
