"""Answers read after the reasoning (issue 28, check 2): with scripted completions, a reasoning section that
holds other numbers and a draft `#### n` never scores; a completion cut inside its reasoning has no answer and
is counted as "ended in reasoning"; the same for the tags style; the shares carry n and a 95% interval in
metrics.json, `report` and `compare`; predictions written before these fields still read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gsmkit import generation
from gsmkit.cli import app
from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
from gsmkit.evaluation.stats import wilson_interval
from gsmkit.generation import GenResult
from gsmkit.modeling import ModelSpec
from gsmkit.reasoning import TAGS, THINK, read_answer, score
from gsmkit.records import Problem
from gsmkit.studies.predictions import load_evaluation
from gsmkit.traces import TraceSettings, generate_traces
from gsmkit.training.rewards import make_reward_funcs

runner = CliRunner()

# A chat template that writes <think> sections (the model opens them), and one that opens the section in
# the generation prompt itself (the completion begins inside it).
THINKING = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    "{# answers may start with <think> #}"
)
OPENING = THINKING.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")


def _problems(folder: Path, split: str = "test") -> list[Problem]:
    lines = (folder / f"{split}.jsonl").read_text().splitlines()
    return [Problem.from_dict(json.loads(x), "t") for x in lines]


def think_script(gold: str, opened: bool = False) -> list[tuple[str, str]]:
    """(completion, finish_reason) for problems 0-3 of a thinking model."""
    start = "" if opened else "<think>"
    return [
        # a reasoning full of other numbers and a wrong draft `#### n`, then the right answer
        ((f"{start}12 apples, 3 eaten: 9 left. Draft: #### 9. No, recount.</think>\nThe answer is {gold}.\n"
          f"#### {gold}"), "stop"),
        # cut by --max-new-tokens inside the reasoning, though its draft is right: no answer
        (f"{start}5 and 7 make 12, so #### {gold} and the last number is {gold}", "length"),
        # the gold only inside the reasoning; the answer says 3
        (f"{start}maybe {gold}?</think>\nSo it is 3.", "stop"),
        # an empty section is no reasoning; the answer is right
        (f"{start}   </think>#### {gold}", "stop"),
    ]


def tags_script(gold: str, opened: bool = False) -> list[tuple[str, str]]:
    del opened
    return [
        ((f"<start_working_out>12 - 3 = 9, <SOLUTION>9</SOLUTION> #### 9<end_working_out>\n"
          f"<SOLUTION>{gold}</SOLUTION>"), "stop"),
        (f"<start_working_out>5 + 7 = 12, so <SOLUTION>{gold}</SOLUTION> and {gold}", "length"),
        (f"<start_working_out>maybe {gold}<end_working_out><SOLUTION>3</SOLUTION>", "stop"),
        (f"<start_working_out>  <end_working_out><SOLUTION>{gold}</SOLUTION>", "stop"),
    ]


class ScriptedEngine:
    """Problem j's completion is script(gold)[j % 4]; sample s of a traces request is the same text."""

    def __init__(self, problems: list[Problem], script, opened: bool):
        self.texts = {p.id: script(p.gold, opened)[j % 4] for j, p in enumerate(problems)}
        self.stats = {"generated_tokens": 0}

    def generate(self, requests, _settings, on_result=None, cancelled=None):
        for r in requests:
            for s in range(r.num_samples):
                if cancelled is not None and cancelled(r.key, s):
                    continue
                text, finish = self.texts[r.key]
                result = GenResult(r.key, s, (1, 2, 3), text, finish, len(r.prompt_ids))
                if on_result is not None:
                    on_result(result)
                yield result

    def describe(self):
        return {"backend": "scripted", "device": "cpu", "dtype": "torch.float32"}


@pytest.fixture()
def scripted(monkeypatch, small_gsm8k):
    def install(script, template: str | None, split: str = "test"):
        real = generation.build_engine
        problems = _problems(small_gsm8k, split)

        def fake(spec, backend="hf", batch_size=16, prefix_cache=True, seed=0, steering=None):
            loaded, tok, _ = real(spec, backend, batch_size, prefix_cache, seed, steering)
            if template is not None:
                tok.chat_template = template
            return loaded, tok, ScriptedEngine(problems, script, template == OPENING)

        monkeypatch.setattr(generation, "build_engine", fake)

    return install


def _eval(tiny_model_dir, small_gsm8k, out: Path, style: str):
    settings = EvalSettings(model=ModelSpec(str(tiny_model_dir)), data=str(small_gsm8k), out=out, limit=4,
                            k=0, style=style, max_new_tokens=16, batch_size=4)
    metrics = evaluate_gsm8k(settings)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, preds


def _check_answers_after_the_section(metrics, preds, golds, section: str):
    first, cut, inside, empty = preds
    assert (first["strict"], first["flexible"], first["correct_strict"], first["correct_flexible"]) == \
        (golds[0], golds[0], True, True)
    assert (cut["strict"], cut["flexible"], cut["correct_strict"], cut["correct_flexible"]) == \
        (None, None, False, False)
    assert cut["ended_in_reasoning"] and cut["answer_tokens"] is None and cut["reasoning"]
    assert inside["flexible"] == "3" and not inside["correct_flexible"] and not inside["correct_strict"]
    assert empty["correct_strict"] and not empty["ended_in_reasoning"]
    assert not any(p["ended_in_reasoning"] for p in (first, inside, empty))
    assert metrics.reasoning_section == section
    assert metrics.n == 4 and metrics.accuracy_strict == pytest.approx(2 / 4)
    assert metrics.accuracy_flexible == pytest.approx(2 / 4)
    assert metrics.with_reasoning_section == pytest.approx(3 / 4)  # the empty section does not count
    assert metrics.ci95_reasoning_section == pytest.approx(wilson_interval(3, 4))
    assert metrics.ended_in_reasoning == pytest.approx(1 / 4)
    assert metrics.ci95_ended_in_reasoning == pytest.approx(wilson_interval(1, 4))
    # means of the per-prediction counts, rounded to 3 decimals: reasoning over the 4 with a section, answer
    # over the 3 that reached one
    assert metrics.mean_reasoning_tokens == round(sum(p["reasoning_tokens"] for p in preds) / 4, 3)
    assert metrics.mean_answer_tokens == round(sum(p["answer_tokens"] for p in (first, inside, empty)) / 3, 3)
    assert all(p["reasoning_tokens"] > 0 for p in (first, cut, inside))
    assert first["answer_tokens"] > 0 and empty["reasoning_tokens"] is not None  # blank, but a section


@pytest.mark.parametrize("template", [THINKING, OPENING], ids=["model-opens", "prompt-opens"])
def test_thinking_answers_are_read_after_the_reasoning(tmp_path, tiny_model_dir, small_gsm8k, scripted,
                                                       template):
    scripted(think_script, template)
    metrics, preds = _eval(tiny_model_dir, small_gsm8k, tmp_path / "eval", "chat")
    golds = [p.gold for p in _problems(small_gsm8k)[:4]]
    _check_answers_after_the_section(metrics, preds, golds, "think")
    assert preds[0]["reasoning"].startswith("12 apples") and preds[0]["reasoning"].endswith("recount.")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["ended_in_reasoning"] == 0.25 and written["ci95_ended_in_reasoning"] == \
        pytest.approx(list(wilson_interval(1, 4)))


def test_tags_style_follows_the_same_rules(tmp_path, tiny_model_dir, small_gsm8k, scripted):
    scripted(tags_script, None)
    metrics, preds = _eval(tiny_model_dir, small_gsm8k, tmp_path / "eval", "tags")
    golds = [p.gold for p in _problems(small_gsm8k)[:4]]
    _check_answers_after_the_section(metrics, preds, golds, "tags")
    assert metrics.answer_format == "tags"


def test_plain_style_reads_the_whole_completion(tmp_path, tiny_model_dir, small_gsm8k, scripted):
    scripted(think_script, None)
    metrics, preds = _eval(tiny_model_dir, small_gsm8k, tmp_path / "eval", "plain")
    # no section in the plain style: `<think>` is just text, and the first `#### n` is the draft
    assert preds[0]["strict"] == "9" and preds[0]["reasoning"] is None
    assert not any(p["ended_in_reasoning"] for p in preds)
    assert preds[1]["strict"] == _problems(small_gsm8k)[1].gold
    assert metrics.reasoning_section is None and metrics.with_reasoning_section is None
    assert metrics.ended_in_reasoning is None and metrics.ci95_ended_in_reasoning is None
    assert metrics.mean_reasoning_tokens is None and metrics.mean_answer_tokens is not None


def test_one_reader_for_metric_rewards_and_traces():
    text = "<think>12 - 3 = 9, #### 9</think>#### 7"
    assert read_answer(text, "hash", THINK) == "7" and read_answer(text, "hash") == "9"
    assert score(text, "7", "hash", THINK).correct_strict
    assert read_answer("12 - 3 = 9, #### 9</think>#### 7", "hash", THINK, opened=True) == "7"
    assert read_answer("<think>#### 7", "hash", THINK) is None
    tagged = "<start_working_out><SOLUTION>7</SOLUTION><end_working_out>"
    assert read_answer(tagged, "tags", TAGS) is None and read_answer(tagged, "tags") == "7"


def test_rewards_read_after_the_section():
    funcs = {f.__name__: f for f in make_reward_funcs("hash", ["correctness", "strict_format", "soft_format",
                                                                "integer"], THINK)}
    completions = ["<think>drafts: #### 5, then 12</think>\nSo 3 + 4 = 7.\n#### 7",  # right, well formed
                   "<think>#### 7 is it</think>\nIt is 5.\n#### 5",  # the gold only in the reasoning
                   "<think>3 + 4 = 7\n#### 7",  # never closed
                   "3 + 4 = 7</think>\nDone.\n#### 7"]  # the prompt opened the section
    columns = {"gold": ["7"] * 4, "opened": [False, False, False, True]}
    got = {name: f(prompts=[""] * 4, completions=completions, **columns) for name, f in funcs.items()}
    assert got["correctness"] == [1.0, 0.0, 0.0, 1.0]
    assert got["strict_format"] == [1.0, 1.0, 0.0, 1.0]
    assert got["soft_format"] == [1.0, 1.0, 0.0, 1.0]
    assert got["integer"] == [1.0, 1.0, 0.0, 1.0]
    tags = {f.__name__: f for f in make_reward_funcs("tags", ["correctness", "strict_format", "soft_format"],
                                                     TAGS)}
    texts = ["<start_working_out>so 7<end_working_out>\n<SOLUTION>7</SOLUTION>",
             "<start_working_out><SOLUTION>7</SOLUTION>"]
    got = {name: f(completions=texts, gold=["7", "7"]) for name, f in tags.items()}
    assert got == {"correctness": [1.0, 0.0], "strict_format": [1.0, 0.0], "soft_format": [1.0, 0.0]}


def test_traces_choose_by_the_answer_after_the_reasoning(tmp_path, tiny_model_dir, small_gsm8k, scripted):
    scripted(think_script, THINKING, split="train")
    out = tmp_path / "traces.jsonl"
    generate_traces(TraceSettings(model=ModelSpec(str(tiny_model_dir)), out=out, data=str(small_gsm8k),
                                  num_samples=4, max_attempts=2, max_new_tokens=8, batch_size=4, style="chat",
                                  keep_attempts=True))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    problems = _problems(small_gsm8k, "train")[:4]
    assert [r["source"] for r in rows] == ["model", "fallback", "fallback", "model"]
    # kept whole: the reasoning stays, cut after the answer's `#### n` (not after the draft inside it)
    assert rows[0]["answer"] == think_script(problems[0].gold)[0][0]
    assert rows[1]["attempt_texts"][0]["answer"] is None  # ended in its reasoning, whose draft was right


def test_a_trace_of_a_prompt_that_opened_the_section_keeps_its_opening_tag(tmp_path, tiny_model_dir,
                                                                           small_gsm8k, scripted):
    """The template wrote `<think>` into the prompt, so the completion starts inside the section: the kept
    trace gets the tag in front, a whole section SFT can learn from."""
    scripted(think_script, OPENING, split="train")
    out = tmp_path / "traces.jsonl"
    generate_traces(TraceSettings(model=ModelSpec(str(tiny_model_dir)), out=out, data=str(small_gsm8k),
                                  num_samples=4, max_attempts=2, max_new_tokens=8, batch_size=4,
                                  style="chat"))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    problems = _problems(small_gsm8k, "train")[:4]
    assert rows[0]["source"] == "model"
    assert rows[0]["answer"] == "<think>\n" + think_script(problems[0].gold, opened=True)[0][0]
    assert read_answer(rows[0]["answer"], "hash", THINK) == problems[0].gold  # read back as a whole section


def test_report_and_compare_show_the_shares(tmp_path, tiny_model_dir, small_gsm8k, scripted):
    scripted(think_script, THINKING)
    _eval(tiny_model_dir, small_gsm8k, tmp_path / "think", "chat")
    scripted(think_script, None)
    _eval(tiny_model_dir, small_gsm8k, tmp_path / "plain", "plain")

    res = runner.invoke(app, ["report", str(tmp_path / "think"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    with (tmp_path / "rep" / "summary.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["gsm8k_ended_in_reasoning"]) == 0.25 and float(row["gsm8k_reasoning_share"]) == 0.75
    assert row["gsm8k_n"] == "4"
    md = (tmp_path / "rep" / "report.md").read_text()
    lo, hi = wilson_interval(1, 4)
    assert "ended in reasoning" in md and f"0.250 [{lo:.3f}, {hi:.3f}]" in md
    res = runner.invoke(app, ["report", str(tmp_path / "think"), "--out", str(tmp_path / "rep-required"),
                              "--require", "gsm8k.ended_in_reasoning<=0.1"])
    assert res.exit_code == 3

    res = runner.invoke(app, ["compare", str(tmp_path / "plain"), str(tmp_path / "think"), "--json"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert found["a"]["ended_in_reasoning"] is None and found["a"]["reasoning_section"] is None
    assert found["b"]["reasoning_section"] == "think"
    assert found["b"]["ended_in_reasoning"] == {"count": 1, "n": 4, "share": 0.25,
                                                "ci95": pytest.approx(list(wilson_interval(1, 4)))}
    assert found["b"]["with_reasoning_section"]["count"] == 3
    shown = runner.invoke(app, ["compare", str(tmp_path / "plain"), str(tmp_path / "think")])
    assert "B reasoning (think): 3/4 with a section" in shown.output
    assert "1/4 ended inside it" in shown.output


def test_predictions_written_before_the_reasoning_fields_still_read(tmp_path, tiny_model_dir, small_gsm8k,
                                                                      scripted):
    scripted(think_script, None)
    _eval(tiny_model_dir, small_gsm8k, tmp_path / "old", "plain")
    path = tmp_path / "old" / "predictions.jsonl"
    new = ("reasoning", "ended_in_reasoning", "reasoning_tokens", "answer_tokens")
    rows = [{k: v for k, v in json.loads(x).items() if k not in new} for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = json.loads((tmp_path / "old" / "metrics.json").read_text())
    for key in ("reasoning_section", "ci95_reasoning_section", "ended_in_reasoning",
                "ci95_ended_in_reasoning", "mean_reasoning_tokens", "mean_answer_tokens"):
        metrics.pop(key)
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(metrics))
    ev = load_evaluation(tmp_path / "old")
    assert all(r["reasoning"] is None and r["ended_in_reasoning"] is False for r in ev.rows.values())
    res = runner.invoke(app, ["compare", str(tmp_path / "old"), str(tmp_path / "old"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["a"]["ended_in_reasoning"] is None
    res = runner.invoke(app, ["report", str(tmp_path / "old"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output


def test_steering_negatives_are_wrong_by_the_answer_after_the_reasoning():
    """`steer vectors`' sampled negatives read answers as the metric does: a sample whose reasoning holds the
    gold but whose answer is wrong is a negative; one that reasons wrongly and answers right is not."""
    import types

    from gsmkit.generation import GenRequest
    from gsmkit.steer.activations import sample_negatives

    texts = {"a": "<think>12, so #### 12</think>#### 3", "b": "<think>#### 3</think>#### 12"}

    class Engine:
        tokenizer = types.SimpleNamespace(decode=lambda _ids: "")

        def generate(self, requests, _settings):
            for r in requests:
                yield GenResult(r.key, 0, (1,), texts[r.key], "stop", 1)

    requests = [GenRequest("a", (1, 2)), GenRequest("b", (1, 2))]
    found = sample_negatives(Engine(), requests, ["12", "12"], "hash", 1, 8, 0, (), THINK)
    assert found["a"] is not None and found["a"][0] == texts["a"]
    assert found["b"] is None
    # without the section, both completions hold the gold somewhere: neither would be a negative
    unsectioned = sample_negatives(Engine(), requests, ["12", "12"], "hash", 1, 8, 0, (), None)
    assert unsectioned["a"] is None
