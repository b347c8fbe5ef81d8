"""One notion of a reasoning section: where it starts and ends in a completion, for every prompt style.

In: a completion's text, the `Section` of its style and template (`section_for`), and whether the prompt
already opened it (a thinking template that writes `<think>` for the model: `opened_by_prompt`).
Out: `split_completion` -> `Split` (the reasoning, the answer text after the section, and whether the
completion ended inside its reasoning). Answer extraction for the metric, trace selection and the GRPO
rewards reads only `Split.answer`, so a number or a draft `#### n` inside the reasoning never scores.

Sections:
- thinking templates (Qwen3 and other chat templates with `<think>`): `<think>` ... `</think>`;
- the reasoning-tags style: `<start_working_out>` ... `<end_working_out>`;
- plain (and chat templates without thinking): none, and the whole completion is the answer text.
A completion whose section opened and never closed (cut by `--max-new-tokens` while thinking) has no
answer text: it "ended in reasoning", which the metrics count apart from wrong answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gsmkit.answers import (
    REASONING_END,
    REASONING_START,
    ExtractedAnswers,
    answers_equal,
    extract_flexible,
    primary_answer,
)
from gsmkit.errors import ConfigError


@dataclass(frozen=True)
class Section:
    """A reasoning section's delimiters, as they appear in the text."""

    name: str  # "think" | "tags"
    start: str
    end: str


THINK = Section("think", "<think>", "</think>")
TAGS = Section("tags", REASONING_START, REASONING_END)


def thinking_template(tokenizer: Any) -> bool:
    """The tokenizer's chat template writes a `<think>` section (Qwen3 and its kin)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = " ".join(str(t) for t in template.values())
    return THINK.start in str(template)


def takes_thinking_switch(tokenizer: Any) -> bool:
    """The chat template reads `enable_thinking` (so `--thinking on|off` can set it)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    return "enable_thinking" in str(template)


def section_for(style: str, tokenizer: Any) -> Section | None:
    """The reasoning section of a resolved prompt style with this tokenizer: TAGS for `tags`, THINK for
    `chat` through a thinking template, None otherwise."""
    if style == "tags":
        return TAGS
    if style == "chat" and thinking_template(tokenizer):
        return THINK
    return None


def opened_by_prompt(prompt: str, section: Section | None) -> bool:
    """The rendered prompt ends inside an open section (its last start tag has no end after it), so the
    completion begins in the reasoning."""
    if section is None:
        return False
    at = prompt.rfind(section.start)
    return at >= 0 and prompt.find(section.end, at) < 0


def opening_in_prompt(prompt: str, section: Section | None) -> str:
    """The tail of a prompt that opened the section (`<think>\n` at the end of a thinking template's
    generation prompt), else "": what a kept completion needs in front of it to hold its whole section."""
    if not opened_by_prompt(prompt, section):
        return ""
    return prompt[prompt.rfind(section.start):]


@dataclass(frozen=True)
class Split:
    """A completion cut at its reasoning section.

    reasoning: the text inside the section (None when the completion has no section)
    answer: the text after the section's end (the whole completion when there is no section; "" when the
        section never closed)
    ended_in_reasoning: the section opened and never closed
    """

    reasoning: str | None
    answer: str
    ended_in_reasoning: bool

    @property
    def has_reasoning(self) -> bool:
        """The completion had a reasoning section with some non-blank text in it, closed or not (an empty
        `<think></think>` is no reasoning)."""
        return holds_reasoning(self.reasoning)


def holds_reasoning(reasoning: str | None) -> bool:
    """A section's text (`Split.reasoning`, or a prediction's `reasoning` field) counts as reasoning: it
    exists and is not blank."""
    return bool(reasoning and reasoning.strip())


def split_completion(completion: str, section: Section | None, opened: bool = False) -> Split:
    """`completion` cut at the first section (already open when `opened`): reasoning, answer text after it,
    and whether it ended inside the reasoning."""
    if section is None:
        return Split(None, completion, False)
    if opened:
        body_start = 0
    else:
        at = completion.find(section.start)
        if at < 0:
            return Split(None, completion, False)
        body_start = at + len(section.start)
    end = completion.find(section.end, body_start)
    if end < 0:
        return Split(completion[body_start:], "", True)
    return Split(completion[body_start:end], completion[end + len(section.end):], False)


def has_reasoning_section(completion: str, section: Section | None = TAGS, opened: bool = False) -> bool:
    """The completion has a whole reasoning section: opened, non-blank, and closed (what the tags style's
    format rewards ask for; an empty section would let them be gamed)."""
    split = split_completion(completion, section, opened)
    return split.has_reasoning and not split.ended_in_reasoning


@dataclass(frozen=True)
class Scored:
    """A completion read as the metric, trace selection and the rewards read it: its split, both answers
    (taken from `split.answer` only) and whether each equals the gold."""

    split: Split
    answers: ExtractedAnswers
    correct_strict: bool
    correct_flexible: bool


def read_answer(completion: str, answer_format: str = "hash", section: Section | None = None,
                opened: bool = False) -> str | None:
    """The format's own answer (`answers.primary_answer`: `#### n` or `<SOLUTION>n</SOLUTION>`) read after
    the reasoning section; None when there is none or the completion ended inside its reasoning. The
    metric's strict column, trace selection and the correctness reward all use this one function."""
    return primary_answer(split_completion(completion, section, opened).answer, answer_format)


def score(completion: str, gold: str | None, answer_format: str = "hash", section: Section | None = None,
          opened: bool = False) -> Scored:
    """Both answers of a completion, read after its reasoning section (`read_answer` for strict, lm-eval's
    last number for flexible), and whether each equals `gold`. Without a section the whole completion is
    read, exactly as `answers.score_completion` reads it."""
    split = split_completion(completion, section, opened)
    answers = ExtractedAnswers(strict=primary_answer(split.answer, answer_format),
                               flexible=extract_flexible(split.answer))
    return Scored(split, answers, answers_equal(answers.strict, gold), answers_equal(answers.flexible, gold))


def check_budget(budget: int, max_new_tokens: int) -> None:
    """A reasoning budget (`--thinking-budget`) leaves room for the end tag and an answer: 0 <= budget <
    max_new_tokens."""
    if budget < 0:
        raise ConfigError(f"--thinking-budget must be >= 0, got {budget}")
    if budget >= max_new_tokens:
        raise ConfigError(f"--thinking-budget {budget} leaves no room for an answer within --max-new-tokens "
                          f"{max_new_tokens}", hint="give a budget below --max-new-tokens, or raise "
                          "--max-new-tokens")
