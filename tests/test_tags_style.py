"""The reasoning-tags prompt style: one format for prompts, training targets, the metric and rewards."""

from __future__ import annotations

import pytest

from gsmkit.answers import primary_answer, score_completion, to_tags
from gsmkit.errors import ConfigError
from gsmkit.evaluation.gsm8k import summarize
from gsmkit.prompts import (
    TAGS_SYSTEM_PROMPT,
    Exemplar,
    answer_format,
    render_prompt,
    render_target,
    resolve_style,
)
from gsmkit.reasoning import TAGS, score
from gsmkit.records import Prediction
from gsmkit.tokenization import IGNORE_INDEX
from gsmkit.training.data import TrainExample
from gsmkit.training.masking import encode_example
from tests.test_masking import ANSWER, CORPUS, QUESTION, SYSTEM, build_tokenizer

TAGGED = ("<start_working_out>Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
          "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.<end_working_out>\n"
          "<SOLUTION>72</SOLUTION>")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("chatml-tags"), CORPUS + [TAGS_SYSTEM_PROMPT, TAGGED] * 5)


def test_to_tags_rewrites_a_gsm8k_solution():
    assert to_tags(ANSWER) == TAGGED
    assert to_tags("so 3 + 4 = 7\n#### 1,000") == \
        "<start_working_out>so 3 + 4 = 7<end_working_out>\n<SOLUTION>1000</SOLUTION>"


@pytest.mark.parametrize("text", [TAGGED, "no final answer here", ""])
def test_to_tags_leaves_tagged_or_markerless_text_alone(text):
    assert to_tags(text) == text


def test_primary_answer_follows_the_format():
    both = "#### 5\n<SOLUTION>7</SOLUTION>"
    assert primary_answer(both, "hash") == "5"
    assert primary_answer(both, "tags") == "7"
    assert primary_answer("the answer is 7", "tags") is None
    with pytest.raises(ValueError):
        primary_answer("x", "boxed")


def test_score_completion_in_tags_format_reads_the_solution_tag():
    answers, strict, flexible = score_completion(TAGGED, "72", "tags")
    assert (answers.strict, strict, flexible) == ("72", True, True)
    answers, strict, flexible = score_completion("I think 72 #### 72", "72", "tags")
    assert answers.strict is None and not strict and flexible  # `#### n` is not this format's marker


def test_tags_style_needs_a_chat_template(tmp_path):
    tok = build_tokenizer(tmp_path, CORPUS)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="tags"):
        resolve_style("tags", tok)
    assert answer_format("tags") == "tags"
    assert answer_format("chat") == "hash" and answer_format("plain") == "hash"


def test_tags_prompt_has_the_system_prompt_and_tagged_exemplars(chatml):
    prompt = render_prompt("tags", "What is 2+2?", [Exemplar(QUESTION, ANSWER)], chatml)
    assert TAGS_SYSTEM_PROMPT in prompt
    assert TAGGED in prompt and "#### 72" not in prompt
    own = render_prompt("tags", "What is 2+2?", (), chatml, SYSTEM)
    assert SYSTEM in own and TAGS_SYSTEM_PROMPT not in own
    assert render_target("tags", ANSWER) == TAGGED


def test_tags_training_trains_the_tagged_answer_and_end_of_turn(chatml):
    enc = encode_example(TrainExample(where="t.jsonl:1", question=QUESTION, answer=ANSWER), chatml, "tags",
                         2048)
    k = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert chatml.decode(enc.input_ids[k:]) == TAGGED + "<|im_end|>\n"
    # The masked part is exactly what eval sends in this style.
    assert chatml.decode(enc.input_ids[:k]) == render_prompt("tags", QUESTION, (), chatml)


def _pred(i: int, completion: str) -> Prediction:
    scored = score(completion, "72", "tags", TAGS)
    return Prediction(id=f"gsm8k-{i:016x}", prompt_sha256="0" * 64, completion=completion,
                      strict=scored.answers.strict, flexible=scored.answers.flexible, gold="72",
                      correct_strict=scored.correct_strict, correct_flexible=scored.correct_flexible,
                      num_prompt_tokens=10, num_tokens=5, finish_reason="stop",
                      reasoning=scored.split.reasoning, ended_in_reasoning=scored.split.ended_in_reasoning)


def test_eval_summary_reports_reasoning_and_extractable_shares():
    preds = [_pred(0, TAGGED), _pred(1, "<start_working_out>  <end_working_out><SOLUTION>9</SOLUTION>"),
             _pred(2, "just 72"), _pred(3, "<start_working_out>hmm<end_working_out> no tag")]
    m = summarize(preds, 0, "tags", {}, TAGS)
    assert m.answer_format == "tags" and m.reasoning_section == "tags"
    assert m.with_reasoning_section == pytest.approx(2 / 4)  # an empty section does not count
    assert m.extractable == pytest.approx(2 / 4)
    assert m.accuracy_strict == pytest.approx(1 / 4)
    assert summarize(preds, 0, "chat", {}).with_reasoning_section is None
