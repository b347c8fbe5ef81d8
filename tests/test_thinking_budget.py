"""`--thinking-budget N` (issue 28, check 3): a reasoning section is closed after N tokens by forcing its end
tag, per row, inside the batch.

On a tiny random Qwen3 model whose template opens `<think>` in the generation prompt (as Qwen3-Thinking-2507's
and DeepSeek-R1's do), so every completion starts in its reasoning:
- greedy completions are identical at batch 1, the default batch and another, with and without the prefix
  cache, and under two processes (`accelerate launch`);
- the end tag's tokens stand exactly at the budget in every row that reached it, the text before them is what
  the model wrote without a budget, and what follows is what the model writes after prompt + reasoning + tag;
- sampled completions under a budget do not depend on the batch either;
- where the section opens in the completion (`<think>` written by the model, the tags style's
  `<start_working_out>`) N counts from the token after it, and a section the model closes itself is left
  alone;
- bad input (a budget not below --max-new-tokens, a style or template without a section, vLLM) is a one-line
  error with exit 2, before any model loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()

OPENING = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
BUDGET, MAX_NEW = 9, 28


@pytest.fixture(scope="module")
def opening_model(tmp_path_factory, family_model_dirs) -> Path:
    """The tiny Qwen3 model's folder, copied, with a template that opens the reasoning in the prompt."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("qwen3-opening") / "model"
    shutil.copytree(family_model_dirs("qwen3"), out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = OPENING
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(opening_model):
    from gsmkit.modeling import ModelSpec, load_model

    return load_model(ModelSpec(str(opening_model)))


@pytest.fixture(scope="module")
def requests(loaded, small_gsm8k, pool):
    """The chat prompts of six problems with two exemplars (a shared prefix for the prefix cache)."""
    from gsmkit.data.fewshot import pool_exemplars, read_pool
    from gsmkit.generation import GenRequest
    from gsmkit.prompts import encode_prompt

    exemplars = pool_exemplars(read_pool(pool), 2)
    questions = [json.loads(x)["question"] for x in (small_gsm8k / "test.jsonl").read_text().splitlines()]
    return [GenRequest(f"p{i}", tuple(encode_prompt("chat", q, exemplars, loaded.tokenizer)[1]))
            for i, q in enumerate(questions)]


def _generate(loaded, requests, batch_size=None, prefix_cache=True, budget=BUDGET, **sampling):
    import torch

    from gsmkit.generation import HFEngine, SamplingSettings
    from gsmkit.generation.budget import ThinkingBudget
    from gsmkit.reasoning import THINK

    settings = SamplingSettings(max_new_tokens=MAX_NEW, seed=3, **sampling,
                                thinking_budget=None if budget is None else ThinkingBudget(budget, THINK))
    engine = HFEngine(loaded.model, loaded.tokenizer, batch_size=batch_size, prefix_cache=prefix_cache,
                      stop_token_ids=[loaded.tokenizer.eos_token_id])
    with torch.inference_mode():
        return {r.key: r for r in engine.generate(requests, settings)}


def _end_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode("</think>", add_special_tokens=False))


def test_greedy_budget_is_the_same_at_every_batch_and_with_or_without_the_prefix_cache(loaded, requests):
    runs = {(bs, cache): _generate(loaded, requests, bs, cache)
            for bs in (1, None, 4) for cache in (True, False)}
    first = runs[(None, True)]
    for key, results in runs.items():
        assert {k: r.token_ids for k, r in results.items()} == {k: r.token_ids for k, r in first.items()}, key
        assert [r.budget_forced for r in results.values()] == [first[k].budget_forced for k in results]
    assert any(r.budget_forced for r in first.values())


def test_end_tag_stands_exactly_at_the_budget_and_the_rest_is_the_models(loaded, requests):
    from gsmkit.generation import GenRequest

    end = _end_ids(loaded.tokenizer)
    assert len(end) > 1  # a multi-token tag: forced one token per step
    free = _generate(loaded, requests, budget=None)
    budgeted = _generate(loaded, requests)
    forced = [k for k, r in budgeted.items() if r.budget_forced]
    assert forced
    for key, result in budgeted.items():  # a row the budget did not reach is the row without a budget
        if key not in forced:
            assert result.token_ids == free[key].token_ids, key
    for key in forced:
        tokens = budgeted[key].token_ids
        assert tokens[BUDGET:BUDGET + len(end)] == end
        assert tokens[:BUDGET] == free[key].token_ids[:BUDGET]  # nothing before the budget changes
        assert "</think>" not in loaded.tokenizer.decode(tokens[:BUDGET])
    # after the tag, the model answers as it would to prompt + reasoning + tag with no budget at all
    cont = [GenRequest(k, requests[int(k[1:])].prompt_ids + budgeted[k].token_ids[:BUDGET + len(end)])
            for k in forced]
    after = _generate(loaded, cont, budget=None)
    for key in forced:
        rest = budgeted[key].token_ids[BUDGET + len(end):]
        assert after[key].token_ids[:len(rest)] == rest


def test_sampled_completions_under_a_budget_do_not_depend_on_the_batch(loaded, requests):
    runs = [_generate(loaded, requests, bs, cache, do_sample=True, temperature=1.0)
            for bs, cache in ((1, False), (None, True))]
    assert {k: r.token_ids for k, r in runs[0].items()} == {k: r.token_ids for k, r in runs[1].items()}
    end = _end_ids(loaded.tokenizer)
    for r in runs[1].values():
        assert not r.budget_forced or r.token_ids[BUDGET:BUDGET + len(end)] == end


def test_a_budget_of_zero_closes_the_section_at_once(loaded, requests):
    results = _generate(loaded, requests[:2], budget=0)
    end = _end_ids(loaded.tokenizer)
    assert all(r.token_ids[:len(end)] == end and r.budget_forced for r in results.values())


# -- where the section opens in the completion: RowBudget fed token by token ---------------------------------


def _feed(tokenizer, section, text_before: str, steps: int, budget: int, closes_after: int | None = None):
    """Feed a row the ids of `text_before`, then `steps` filler tokens (the end tag after `closes_after` of
    them), taking each forced token in place of the filler: the row's tokens."""
    from gsmkit.generation.budget import Budgets, ThinkingBudget

    row = Budgets(ThinkingBudget(budget, section), tokenizer).row(tokenizer.encode("Q: 1+1?"))
    filler = tokenizer.encode(" a", add_special_tokens=False)[0]
    script = list(tokenizer.encode(text_before, add_special_tokens=False))
    tail = [filler] * steps
    if closes_after is not None:
        tail[closes_after:closes_after] = tokenizer.encode(section.end, add_special_tokens=False)
    script += tail
    tokens: list[int] = []
    for planned in script:
        forced = row.forced()
        tokens.append(planned if forced is None else forced)
        row.saw(tokens)
    return tokens, row


@pytest.mark.parametrize("section_name", ["think", "tags"])
def test_budget_counts_from_the_token_after_a_start_the_model_wrote(loaded, section_name):
    from gsmkit.reasoning import TAGS, THINK

    section = THINK if section_name == "think" else TAGS
    tok = loaded.tokenizer
    before = f"Let me see. {section.start}"
    tokens, row = _feed(tok, section, before, steps=20, budget=5)
    start = len(tok.encode(before, add_special_tokens=False))
    end = tuple(tok.encode(section.end, add_special_tokens=False))
    assert row.start == start and row.forced_at == start + 5
    assert tuple(tokens[start + 5:start + 5 + len(end)]) == end
    assert section.end not in tok.decode(tokens[:start + 5])


@pytest.mark.parametrize("section_name", ["think", "tags"])
def test_a_section_the_model_closes_itself_is_left_alone(loaded, section_name):
    from gsmkit.reasoning import TAGS, THINK

    section = THINK if section_name == "think" else TAGS
    tag = len(loaded.tokenizer.encode(section.end, add_special_tokens=False))
    tokens, row = _feed(loaded.tokenizer, section, section.start, steps=20, budget=3 + tag + 1,
                        closes_after=3)
    assert row.closed and row.forced_at is None
    assert loaded.tokenizer.decode(tokens).count(section.end) == 1


def test_no_start_no_budget(loaded):
    from gsmkit.reasoning import THINK

    _, row = _feed(loaded.tokenizer, THINK, "No reasoning here.", steps=30, budget=2)
    assert row.start is None and row.forced_at is None


# -- the commands --------------------------------------------------------------------------------------------


def _eval_args(model, data, out, *extra):
    return ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--limit", "4", "--style", "chat",
            "--max-new-tokens", str(MAX_NEW), "--thinking-budget", str(BUDGET), "--out", str(out), *extra]


def test_eval_gsm8k_records_forced_rows_and_refuses_a_resume_with_another_budget(tmp_path, opening_model,
                                                                                  small_gsm8k):
    from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
    from gsmkit.evaluation.stats import wilson_interval
    from gsmkit.modeling import ModelSpec

    out = tmp_path / "eval"
    res = runner.invoke(app, _eval_args(opening_model, small_gsm8k, out, "--json"))
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    forced = sum(r["budget_forced"] for r in rows)
    assert forced >= 1  # (a row may end before the budget)
    assert metrics["thinking_budget"] == BUDGET and metrics["budget_forced"] == forced / 4
    assert metrics["ci95_budget_forced"] == list(wilson_interval(forced, 4))
    assert all(not r["ended_in_reasoning"] and r["reasoning"] is not None for r in rows if r["budget_forced"])
    assert json.loads((out / "manifest.json").read_text())["settings"]["thinking_budget"] == BUDGET

    settings = EvalSettings(model=ModelSpec(str(opening_model)), out=tmp_path / "r", data=str(small_gsm8k),
                            style="chat", limit=3, max_new_tokens=MAX_NEW, thinking_budget=BUDGET)

    def stop(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_gsm8k(settings, on_progress=stop)
    res = runner.invoke(app, _eval_args(opening_model, small_gsm8k, tmp_path / "r", "--thinking-budget", "4"))
    assert res.exit_code == 1 and "different settings" in res.output, res.output


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_write_the_one_process_predictions(tmp_path, opening_model, small_gsm8k):
    from test_eval_processes import _launch, _single

    one, two = tmp_path / "one", tmp_path / "two"
    res = _single(_eval_args(opening_model, small_gsm8k, one))
    assert res.returncode == 0, res.stderr[-3000:]
    res = _launch(_eval_args(opening_model, small_gsm8k, two))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()
    assert json.loads((two / "manifest.json").read_text())["resolved"]["processes"]["count"] == 2
    assert any(json.loads(x)["budget_forced"] for x in (two / "predictions.jsonl").read_text().splitlines())


def test_without_a_budget_a_run_has_no_budget_fields(tmp_path, opening_model, small_gsm8k):
    out = tmp_path / "eval"
    args = [a for a in _eval_args(opening_model, small_gsm8k, out)
            if a not in ("--thinking-budget", str(BUDGET))]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["thinking_budget"] is None and metrics["budget_forced"] is None
    assert metrics["ended_in_reasoning"] > 0  # cut inside the reasoning: no answer, as the budget prevents
    assert "thinking_budget" not in json.loads((out / "manifest.json").read_text())["resolved"]


def test_generate_traces_takes_the_budget(tmp_path, opening_model, small_gsm8k):
    out = tmp_path / "traces.jsonl"
    res = runner.invoke(app, ["generate-traces", "--model", str(opening_model), "--data", str(small_gsm8k),
                              "--split", "test", "--style", "chat", "--num-samples", "2",
                              "--max-attempts", "1", "--max-new-tokens", "12", "--thinking-budget", "3",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_name("traces.manifest.json").read_text())["settings"]["thinking_budget"] == 3


@pytest.mark.parametrize(("extra", "says"), [
    (("--thinking-budget", str(MAX_NEW)), "no room for an answer"),
    (("--thinking-budget", "4", "--style", "plain"), "--style plain"),
    (("--thinking-budget", "4", "--backend", "vllm"), "hf backend"),
    (("--thinking-budget", "-1"), "greater than or equal to 0"),
])
@pytest.mark.parametrize("command", [("eval", "gsm8k"), ("generate-traces",)])
def test_misused_budget_is_exit_2(command, extra, says, tmp_path, opening_model, small_gsm8k):
    out = tmp_path / ("traces.jsonl" if command == ("generate-traces",) else "eval")
    res = runner.invoke(app, [*command, "--model", str(opening_model), "--data", str(small_gsm8k),
                              "--max-new-tokens", str(MAX_NEW), *extra, "--out", str(out)])
    said = " ".join(res.output.replace("│", " ").split())  # Typer's usage box, unwrapped
    assert res.exit_code == 2 and says in said, res.output
    assert not out.exists()


@pytest.mark.parametrize("command", [("eval", "gsm8k"), ("generate-traces",)])
def test_a_template_without_a_section_is_one_line_exit_2_before_the_model_loads(
        command, tmp_path, family_model_dirs, small_gsm8k, monkeypatch):
    import gsmkit.modeling

    def no_model(*_a, **_k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(gsmkit.modeling, "load_model", no_model)
    out = tmp_path / ("traces.jsonl" if command == ("generate-traces",) else "eval")
    model = family_model_dirs("qwen3")  # plain ChatML: no <think>
    res = runner.invoke(app, [*command, "--model", str(model), "--data", str(small_gsm8k), "--style", "chat",
                              "--thinking-budget", "4", "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no reasoning section" in lines[0], res.output
    assert not out.exists()


def test_the_engine_contract_refuses_a_budget_vllm_cannot_apply():
    from gsmkit.errors import ConfigError
    from gsmkit.generation import SamplingSettings
    from gsmkit.generation.budget import ThinkingBudget
    from gsmkit.generation.vllm import VLLMEngine
    from gsmkit.reasoning import THINK

    engine = VLLMEngine.__new__(VLLMEngine)  # refused before it would touch vLLM
    settings = SamplingSettings(max_new_tokens=8, thinking_budget=ThinkingBudget(4, THINK))
    with pytest.raises(ConfigError, match="thinking-budget"):
        list(engine.generate([], settings))
    with pytest.raises(ConfigError, match="no room"):
        SamplingSettings(max_new_tokens=4, thinking_budget=ThinkingBudget(4, THINK))
