"""Response-only loss masking: one training example in, token ids and labels out.

In: a `TrainExample`, a fast tokenizer, a resolved prompt style (`chat`, `tags` or `plain`), a length limit
and an optional system prompt.
Out: `Encoded(input_ids, labels, where, truncated)`; labels are IGNORE_INDEX (-100) on every prompt
token and equal input_ids on the response, so the loss (and so the gradient) sees the response only.
`masking_preview` shows one encoded row, `packed_preview` rows as `--packing` lays them out (--show-masking).

Where the response starts: the prompt and the whole example are rendered as text, the same way
`eval gsm8k` renders prompts (`gsmkit.prompts`), and the whole text must start with the prompt text.
The whole text is tokenised once with character offsets, and a token is trained iff it starts at or
after the end of the prompt text. A token merged across the boundary therefore counts as prompt.
Because the boundary comes from the rendered template, this needs no `{% generation %}` markers
and works for ChatML (Qwen, SmolLM), Llama 3, Mistral and other templates. What is trained:
- chat: the reply and the template's end of turn (`<|im_end|>\n` for ChatML, `<|eot_id|>` for Llama 3),
  so the model learns to stop the way generation stops;
- plain: the ` answer` of `Question: ...\nAnswer: answer` (or a row's response) and then the
  tokenizer's EOS token; the prompt gets the tokenizer's BOS when it adds one, as at evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from rich.text import Text

from gsmkit.errors import ConfigError, DataError, ModelError
from gsmkit.prompts import (
    add_special_tokens_for,
    build_messages,
    chat_template_kwargs,
    render_prompt,
    render_target,
    style_system_prompt,
)
from gsmkit.reasoning import THINK
from gsmkit.tokenization import IGNORE_INDEX, Encoded, special_prefix, tokenize_split
from gsmkit.training.data import TrainExample

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"
BOUNDARY = "┃"  # where a row starts in --packing's view
BOUNDARY_STYLE = "bold magenta"


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_texts(ex: TrainExample, tokenizer: Any, system_prompt: str | None,
                style: str = "chat", thinking: str = "auto") -> tuple[str, str]:
    """(prompt text, whole text) through the chat template (`chat` or `tags` style), both rendered with
    the same `--thinking` (`enable_thinking`), as at evaluation."""
    switch = chat_template_kwargs(thinking)
    if not _has_template(tokenizer):
        raise ConfigError(f"prompt style '{style}' needs a tokenizer with a chat template, "
                          "and this one has none", hint="use --style plain")
    if ex.kind == "messages":
        context = list(ex.messages[:-1])  # type: ignore[index]
        reply = ex.messages[-1]  # type: ignore[index]
        if not system_prompt and not (context and context[0]["role"] == "system"):
            system_prompt = style_system_prompt(style, None)  # the style's own, unless the row has one
        if system_prompt:
            if context and context[0]["role"] == "system":
                # Replacing or keeping the row's own system message silently would both surprise someone.
                raise ConfigError(f"{ex.where}: the row has its own system message, "
                                  "and a system prompt was also given",
                                  hint="drop --system-prompt, or the rows' system messages")
            context.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True, **switch)
        whole = tokenizer.apply_chat_template([*context, reply], tokenize=False, **switch)
        hint = ("this chat template renders earlier turns differently once a reply follows (some drop "
                "reasoning from past turns); use a template that does not, "
                "or question/answer rows with --style plain")
    else:
        # A prompt/response row in chat style is one user turn and one assistant turn.
        system_prompt = style_system_prompt(style, system_prompt)
        question = ex.question if ex.kind == "qa" else ex.prompt
        answer = ex.answer if ex.kind == "qa" else ex.response
        # render_prompt is what `eval gsm8k` sends, so training and evaluation prompts cannot drift.
        prompt = render_prompt(style, question, (), tokenizer, system_prompt, thinking)
        reply = {"role": "assistant", "content": render_target(style, answer)}
        whole = tokenizer.apply_chat_template([*build_messages(question, (), system_prompt), reply],
                                              tokenize=False, **switch)
        hint = "use --style plain"
    if not whole.startswith(prompt):
        if thinking == "off" and THINK.start in str(reply["content"]):
            raise ConfigError(f"{ex.where}: the reply has its own {THINK.start} reasoning, and --thinking "
                              f"off writes an empty {THINK.start}{THINK.end} before every reply",
                              hint="train with --thinking on (or auto), or drop the reasoning from the rows")
        raise ConfigError(f"{ex.where}: the chat template's generation prompt is not a prefix of the "
                          "rendered conversation, so the reply cannot be located", hint=hint)
    return prompt, whole


def _plain_texts(ex: TrainExample, system_prompt: str | None) -> tuple[str, str]:
    if ex.kind == "messages":
        raise ConfigError(f"{ex.where}: messages rows need the chat style, and the style is plain",
                          hint="use --style chat (or auto) with a tokenizer that has a chat template")
    if ex.kind == "pr":
        if system_prompt:
            # The prompt is used exactly as given; quietly dropping the system prompt would mislead.
            raise ConfigError(f"{ex.where}: a system prompt cannot be added to prompt/response rows "
                              "in plain style", hint="put it into the rows' prompts, or use --style chat")
        return ex.prompt, ex.prompt + ex.response  # type: ignore[operator]
    prompt = render_prompt("plain", ex.question, (), None, system_prompt)  # type: ignore[arg-type]
    return prompt, prompt + render_target("plain", ex.answer)  # type: ignore[arg-type]


def encode_example(
    ex: TrainExample,
    tokenizer: Any,
    style: str,
    max_length: int,
    system_prompt: str | None = None,
    thinking: str = "auto",
) -> Encoded:
    """Tokenise one example with labels on its response only, cut to at most `max_length` tokens.

    Truncation cuts prompt tokens from the left first, so the response stays whole; a response longer
    than `max_length` keeps its first `max_length` tokens. `truncated` says whether anything was cut.
    `thinking` (`--thinking`) reaches a chat template as `enable_thinking`; plain ignores it.
    """
    if max_length < 1:
        raise ConfigError(f"maximum sequence length must be at least 1, got {max_length}")
    if style in ("chat", "tags"):
        prompt, whole = _chat_texts(ex, tokenizer, system_prompt, style, thinking)
        # The template writes its own special tokens, as at evaluation (add_special_tokens_for("chat")).
        prompt_ids, response_ids = tokenize_split(tokenizer, prompt, whole)
    elif style == "plain":
        prompt, whole = _plain_texts(ex, system_prompt)
        prompt_ids, response_ids = tokenize_split(tokenizer, prompt, whole)
        if add_special_tokens_for("plain"):
            prompt_ids = special_prefix(tokenizer) + prompt_ids
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has no EOS token, so plain-style training cannot teach "
                             "the model to stop",
                             hint="use --style chat, or a tokenizer that defines eos_token")
        response_ids.append(int(tokenizer.eos_token_id))
    else:
        raise ConfigError(f"prompt style '{style}' is not resolved", hint="call resolve_style first")

    if not response_ids:
        raise DataError(f"{ex.where}: no trainable token: the response renders to nothing after the prompt",
                        hint="check that the row's answer is not empty and that the chat template renders "
                             "the assistant's message")
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        if len(response_ids) >= max_length:
            prompt_ids, response_ids = [], response_ids[:max_length]
        else:
            # Left side: the question's end and the template's turn header stay next to the response.
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    return Encoded(input_ids=prompt_ids + response_ids,
                   labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
                   where=ex.where, truncated=truncated)


def masking_preview(encoded: Encoded, tokenizer: Any) -> Text:
    """A header line, then the decoded example: trained tokens bold green, masked ones dim.

    Special tokens are shown as written (`<|im_end|>`); runs of tokens are decoded together so that a
    character split over several byte-level tokens still prints.
    """
    header = f"{encoded.where}: {len(encoded.input_ids)} tokens, {encoded.num_trainable} trained"
    text = Text(header + (" (truncated)" if encoded.truncated else "") + "\n", style="bold")
    _append_tokens(text, encoded.input_ids, encoded.labels, tokenizer)
    return text


def packed_preview(rows: Sequence[Encoded], tokenizer: Any, batch_size: int) -> Text:
    """`rows` as `train sft --packing` lays them out (`collate.PackCollator`, `batch_size` rows to a packed
    sequence): each sequence's header, then each row after a boundary line (its place in the sequence, its
    positions, which restart at 0) with its tokens as `masking_preview` shows them. A row's first token is
    masked: in the packed sequence the row before it would predict it."""
    from gsmkit.training.collate import PackCollator

    text = Text()
    for first in range(0, len(rows), batch_size):
        group = rows[first:first + batch_size]
        batch = PackCollator()([{"input_ids": e.input_ids, "labels": e.labels} for e in group])
        ids, positions, labels = (batch[key][0].tolist() for key in ("input_ids", "position_ids", "labels"))
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        text.append(f"packed sequence {first // batch_size + 1}: rows {first + 1}-{first + len(group)}, "
                    f"{len(ids)} tokens, positions restart at each {BOUNDARY}\n", style="bold")
        for i, (a, b) in enumerate(itertools.pairwise(starts)):
            trained = sum(label != IGNORE_INDEX for label in labels[a:b])
            text.append(f"{BOUNDARY} row {first + i + 1} ({group[i].where}): tokens {a}-{b - 1}, positions "
                        f"0-{b - a - 1}, {trained} trained\n", style=BOUNDARY_STYLE)
            _append_tokens(text, ids[a:b], labels[a:b], tokenizer)
            text.append("\n")
    return text


def _append_tokens(text: Text, ids: Sequence[int], labels: Sequence[int], tokenizer: Any) -> None:
    """The decoded tokens, each run of trained or masked ones decoded together and styled as such."""
    pairs = zip(ids, labels, strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        tokens = [token for token, _ in run]
        text.append(tokenizer.decode(tokens, skip_special_tokens=False),
                    style=TRAINED_STYLE if trained else MASKED_STYLE)
