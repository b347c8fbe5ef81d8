"""gsmkit/reasoning.py: where a completion's reasoning section starts and ends, for every style."""

from __future__ import annotations

import types

from gsmkit.reasoning import TAGS, THINK, opened_by_prompt, section_for, split_completion


def test_the_answer_is_the_text_after_the_section():
    split = split_completion("<think>3 + 4 = 7, so #### 7? no: 8</think>\nThe answer is 9.\n#### 9", THINK)
    assert split.reasoning == "3 + 4 = 7, so #### 7? no: 8"
    assert split.answer == "\nThe answer is 9.\n#### 9"
    assert not split.ended_in_reasoning


def test_a_section_that_never_closed_has_no_answer_text():
    split = split_completion("<think>12 apples, minus 5 is 7 so #### 7", THINK)
    assert split == type(split)("12 apples, minus 5 is 7 so #### 7", "", True)


def test_a_section_opened_by_the_prompt():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert opened_by_prompt(prompt, THINK)
    assert not opened_by_prompt(prompt + "</think>\n\n", THINK)  # thinking off: an empty, closed section
    assert not opened_by_prompt(prompt, None)
    split = split_completion("6 x 7 = 42</think>#### 42", THINK, opened=True)
    assert (split.reasoning, split.answer, split.ended_in_reasoning) == ("6 x 7 = 42", "#### 42", False)
    assert split_completion("still thinking 5", THINK, opened=True).ended_in_reasoning


def test_no_section_leaves_the_completion_whole():
    for text, section in (("5 + 5 = 10\n#### 10", None), ("no tags here #### 3", TAGS)):
        split = split_completion(text, section)
        assert (split.reasoning, split.answer, split.ended_in_reasoning) == (None, text, False)


def test_the_section_of_each_style():
    qwen3 = types.SimpleNamespace(chat_template="{% if enable_thinking %}<think>{% endif %}")
    chatml = types.SimpleNamespace(chat_template="{{ '<|im_start|>' }}")
    assert section_for("tags", chatml) is TAGS
    assert section_for("chat", qwen3) is THINK
    assert section_for("chat", chatml) is None
    assert section_for("plain", qwen3) is None
