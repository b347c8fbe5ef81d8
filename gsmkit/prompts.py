"""Prompt styles shared by `eval gsm8k`, `train` and `generate-traces`, so train and eval cannot drift.

In: a question, optional worked exemplars (few-shot), a tokenizer (for chat templates).
Out: the prompt text the model continues, and for training the target text it should produce.

Styles (PROMPT_VERSION is recorded in every manifest; bump it when a rendering changes):
- `plain`: lm-evaluation-harness's gsm8k task format, `Question: ...\nAnswer: ...`, exemplars joined
  by a blank line, generation stopped at `Question:`.
- `chat`: exemplars as earlier user/assistant turns of the tokenizer's chat template.
- `tags`: the reasoning-tags format of GRPO recipes, through the chat template: a system prompt asks
  for `<start_working_out>...<end_working_out>` then `<SOLUTION>n</SOLUTION>`, and exemplars and
  training targets are GSM8K solutions rewritten that way (`to_tags`). Its answer is the content of
  the last `<SOLUTION>` tag (`answers.primary_answer`), not `#### n`.
- `auto`: `chat` when the tokenizer has a chat template, else `plain`.

Thinking (`--thinking on|off|auto`): chat templates with a thinking switch (Qwen3's `enable_thinking`) get
`enable_thinking=True|False` wherever they are applied (`chat_template_kwargs`); `auto` passes nothing, so
the template's own default applies. `on`/`off` with a template without the switch, or with `plain`, is a
misused option (`check_thinking`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gsmkit.answers import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, to_tags
from gsmkit.errors import ConfigError, UsageError
from gsmkit.reasoning import takes_thinking_switch

PROMPT_VERSION = 2  # 2: the `tags` style
STYLES = ("auto", "chat", "plain", "tags")
THINKING = ("auto", "on", "off")

# The reasoning-tags style's default system prompt (the wording of the GRPO recipes our users follow).
TAGS_SYSTEM_PROMPT = (
    "You are given a problem. Think about the problem and provide your working out. "
    f"Place it between {REASONING_START} and {REASONING_END}. "
    f"Then, provide your solution between {SOLUTION_START}{SOLUTION_END}"
)

# lm-eval's gsm8k `until` list; the end-of-sequence token is a stop in every style besides these.
PLAIN_STOP = ("Question:", "</s>", "<|im_end|>")


@dataclass(frozen=True)
class Exemplar:
    question: str
    answer: str


def chat_template_kwargs(thinking: str) -> dict[str, Any]:
    """The extra variables a chat template is rendered with: `enable_thinking` for `--thinking on|off`,
    nothing for `auto` (the template's default)."""
    if thinking not in THINKING:
        raise ConfigError(f"unknown --thinking '{thinking}'", hint=f"choose one of {', '.join(THINKING)}")
    return {} if thinking == "auto" else {"enable_thinking": thinking == "on"}


def check_thinking(thinking: str, style: str, tokenizer: Any) -> None:
    """`--thinking on|off` needs a resolved `chat`/`tags` style whose template reads `enable_thinking`:
    otherwise the flag would change nothing, which is a misused option (exit 2), said in one line."""
    chat_template_kwargs(thinking)
    if thinking == "auto":
        return
    if style not in ("chat", "tags"):
        raise UsageError(f"--thinking {thinking} has no effect with the {style} prompt style (no chat "
                         "template renders it); drop it or use --thinking auto")
    if not takes_thinking_switch(tokenizer):
        raise UsageError(f"--thinking {thinking}: this tokenizer's chat template has no thinking switch "
                         "(it never reads enable_thinking); drop it or use --thinking auto")


def resolve_style(style: str, tokenizer: Any, thinking: str = "auto") -> str:
    """Turn `auto` into `chat` or `plain`; reject `chat` for a tokenizer without a template, and
    `--thinking on|off` where the rendered prompt cannot take it (`check_thinking`)."""
    if style not in STYLES:
        raise ConfigError(f"unknown prompt style '{style}'", hint=f"choose one of {', '.join(STYLES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat" if has_template else "plain"
    if style in ("chat", "tags") and not has_template:
        raise ConfigError(
            f"prompt style '{style}' needs a tokenizer with a chat template, and this one has none",
            hint="use --style plain",
        )
    check_thinking(thinking, style, tokenizer)
    return style


def answer_format(style: str) -> str:
    """How a completion in this style states its answer: "tags" (`<SOLUTION>n</SOLUTION>`) or "hash"
    (`#### n`)."""
    return "tags" if style == "tags" else "hash"


def style_system_prompt(style: str, system_prompt: str | None) -> str | None:
    """The system prompt a style uses: the user's, else the style's own (only `tags` has one)."""
    if system_prompt:
        return system_prompt
    return TAGS_SYSTEM_PROMPT if style == "tags" else None


def _plain_prefix(exemplars: Sequence[Exemplar]) -> str:
    return "".join(f"Question: {ex.question}\nAnswer: {ex.answer}\n\n" for ex in exemplars)


def build_messages(question: str, exemplars: Sequence[Exemplar],
                   system_prompt: str | None = None) -> list[dict]:
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for ex in exemplars:
        messages.append({"role": "user", "content": ex.question})
        messages.append({"role": "assistant", "content": ex.answer})
    messages.append({"role": "user", "content": question})
    return messages


def prompt_messages(style: str, question: str, exemplars: Sequence[Exemplar] = (),
                    system_prompt: str | None = None) -> list[dict]:
    """The conversation a `chat` or `tags` prompt renders through the chat template (for tools, like TRL,
    that apply the template themselves)."""
    if style not in ("chat", "tags"):
        raise ConfigError(f"prompt style '{style}' has no chat messages", hint="only chat and tags do")
    if style == "tags":
        exemplars = [Exemplar(ex.question, to_tags(ex.answer)) for ex in exemplars]
    return build_messages(question, exemplars, style_system_prompt(style, system_prompt))


def render_prompt(
    style: str,
    question: str,
    exemplars: Sequence[Exemplar] = (),
    tokenizer: Any = None,
    system_prompt: str | None = None,
    thinking: str = "auto",
) -> str:
    """The text the model continues. `style` must already be resolved (`chat` or `plain`); `thinking`
    reaches the chat template as `enable_thinking` (`chat_template_kwargs`)."""
    if style == "plain":
        prefix = f"{system_prompt}\n\n" if system_prompt else ""
        return prefix + _plain_prefix(exemplars) + f"Question: {question}\nAnswer:"
    if style in ("chat", "tags"):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"prompt style '{style}' needs a tokenizer with a chat template, "
                              "and this one has none",
                              hint="use --style plain")
        return tokenizer.apply_chat_template(prompt_messages(style, question, exemplars, system_prompt),
                                             tokenize=False, add_generation_prompt=True,
                                             **chat_template_kwargs(thinking))
    raise ConfigError(f"prompt style '{style}' is not resolved", hint="call resolve_style first")


def encode_prompt(style: str, question: str, exemplars: Sequence[Exemplar], tokenizer: Any,
                  system_prompt: str | None = None, thinking: str = "auto") -> tuple[str, tuple[int, ...]]:
    """The prompt text and the token ids the model is fed, tokenized as every generating command does
    (special tokens added for `plain` only: chat templates write their own)."""
    text = render_prompt(style, question, exemplars, tokenizer, system_prompt, thinking)
    return text, tuple(tokenizer(text, add_special_tokens=add_special_tokens_for(style)).input_ids)


def render_target(style: str, answer: str) -> str:
    """The text a training example teaches after `render_prompt` (lm-eval's target delimiter is a space)."""
    if style == "plain":
        return f" {answer}"
    if style == "tags":
        return to_tags(answer)
    return answer


def stop_strings(style: str) -> tuple[str, ...]:
    """Strings that end a completion; the completion is cut before the first one."""
    return PLAIN_STOP if style == "plain" else ()


def add_special_tokens_for(style: str) -> bool:
    """Chat templates already contain their special tokens; plain text gets the tokenizer's BOS if it has
    one."""
    return style == "plain"
