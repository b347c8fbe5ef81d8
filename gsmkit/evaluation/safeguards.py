"""Safeguard models that judge a (prompt, response) pair: their input, and the run that gets their verdicts.

In: a loaded safeguard (a `save_pretrained` model, never modified), its output format, the Safety
Guidelines text, and (prompt, response) pairs. Out: one `GuardResult` per pair: its `Verdict` (see
`gsmkit.evaluation.guard_formats` for the formats and how each output is read) and the raw guard output.

The guard's input is the Safety Guidelines text, used verbatim:
- with both `{prompt}` and `{response}` in it, those are replaced (in one pass, so braces inside a
  prompt or response are never substituted) and the result is the guard's whole input, tokenised as is
  (the tokenizer's BOS is added unless the text already starts with it), as the model cards of
  WildGuard and ShieldGemma build it;
- with neither, it is prepended to the conversation as a system message, `[system: guidelines,
  user: prompt, assistant: response]`, rendered by the guard's chat template (a generation prompt is
  added for generative guards), or without a template as `guidelines\\n\\nUser: ...\\n\\nAssistant: ...\\n`.

An input longer than the guard's context is never truncated (that would drop the guidelines or the
response): its verdict is `unparsed`, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.evaluation.guard_formats import (
    TEXT_FORMATS,
    UNPARSED,
    UNSAFE,
    Verdict,
    classifier_verdict,
    parse_guard_output,
    shieldgemma_verdict,
    unparsed,
)
from gsmkit.jsonl import input_file

# ---- the guard's input ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


@dataclass(frozen=True)
class SafetyTemplate:
    """The Safety Guidelines text, verbatim, and how a (prompt, response) pair goes into it."""

    text: str
    source: str = "--safety-prompt"

    @property
    def has_placeholders(self) -> bool:
        return "{prompt}" in self.text and "{response}" in self.text

    @classmethod
    def read(cls, path: str | Path) -> SafetyTemplate:
        path = input_file(path, "the Safety Guidelines text file",
                          hint="--safety-prompt names the Safety Guidelines text file")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8", hint="save the file as UTF-8") from None
        if not text.strip():
            raise DataError(f"{path}: file is empty", hint="the file holds the Safety Guidelines text")
        has = [name for name in ("prompt", "response") if "{" + name + "}" in text]
        if len(has) == 1:
            other = "response" if has[0] == "prompt" else "prompt"
            raise DataError(f"{path}: has a {{{has[0]}}} placeholder but no {{{other}}}",
                            hint="use both {prompt} and {response}, or neither to prepend the text to the "
                                 "conversation")
        return cls(text, str(path))

    def fill(self, prompt: str, response: str) -> str:
        values = {"prompt": prompt, "response": response}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)

    def render(self, prompt: str, response: str, tokenizer: Any, generation_prompt: bool) -> tuple[str, bool]:
        """(guard input text, whether the tokenizer should add its special tokens)."""
        if self.has_placeholders:
            text = self.fill(prompt, response)
            bos = getattr(tokenizer, "bos_token", None)
            return text, not (bos and text.startswith(bos))
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.text}, {"role": "user", "content": prompt},
                        {"role": "assistant", "content": response}]
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
            return text, False
        return f"{self.text}\n\nUser: {prompt}\n\nAssistant: {response}\n", True

    def check(self, tokenizer: Any, generation_prompt: bool, guard: str) -> None:
        """Render a dummy pair once, so a template that rejects the conversation fails before any model
        loads."""
        try:
            self.render("p", "r", tokenizer, generation_prompt)
        except Exception as err:  # noqa: BLE001 - a chat template's own error (jinja), shown as one line
            raise ConfigError(
                f"{guard}: the guard's chat template rejects the Safety Guidelines as a system message "
                f"({type(err).__name__}: {str(err)[:200]})",
                hint="put {prompt} and {response} placeholders in the --safety-prompt file to give the guard "
                     "its exact input",
            ) from None


def encode_guard_input(template: SafetyTemplate, prompt: str, response: str, tokenizer: Any,
                       generation_prompt: bool) -> list[int]:
    text, add_special = template.render(prompt, response, tokenizer, generation_prompt)
    return list(tokenizer(text, add_special_tokens=add_special).input_ids)


def guard_context(model_config: Any, tokenizer: Any) -> int | None:
    """Tokens the guard can read: max_position_embeddings, or the tokenizer's limit when smaller and real."""
    limits = [getattr(model_config, "max_position_embeddings", None),
              getattr(model_config, "n_positions", None)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 10**7:  # transformers' "no limit" is a huge sentinel
        limits.append(tok_limit)
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def single_token_id(tokenizer: Any, word: str, guard: str) -> int:
    """The id of `word` as one token (ShieldGemma's "Yes" / "No")."""
    vocab = tokenizer.get_vocab()
    if word in vocab:
        return int(vocab[word])
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(f"{guard}: '{word}' is not a single token of the guard's tokenizer",
                          hint="ShieldGemma scoring reads the next-token probabilities of 'Yes' and 'No'; "
                               "check --guard-format")
    return int(ids[0])


# ---- scoring ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardItem:
    key: str
    prompt: str
    response: str


@dataclass(frozen=True)
class GuardResult:
    key: str
    verdict: Verdict
    output: str  # raw guard output: generated text, the top class name, or "Yes"/"No"


def _too_long(n: int, context: int | None, reserve: int = 0) -> str | None:
    if context is not None and n + reserve > context:
        extra = f" + {reserve} to generate" if reserve else ""
        return f"the guard input has {n} tokens{extra}, more than the guard's {context}-token context"
    return None


def score_items(
    fmt: str,
    model: Any,
    tokenizer: Any,
    template: SafetyTemplate,
    items: Sequence[GuardItem],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    threshold: float = 0.5,
    controversial: str = UNSAFE,
    id2label: dict[int, str] | None = None,
    unsafe_ids: set[int] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[GuardResult]:
    """Judge each item with a loaded guard; results come as they finish, in no particular order.

    An input longer than the guard's context is not truncated (that would drop the guidelines or the
    response): its verdict is `unparsed`, with the reason.
    """
    generative = fmt in TEXT_FORMATS
    context = guard_context(model.config, tokenizer)
    reserve = max_new_tokens if generative else 0
    encoded: list[tuple[GuardItem, list[int]]] = []
    for item in items:
        ids = encode_guard_input(template, item.prompt, item.response, tokenizer,
                                 generation_prompt=fmt != "classifier")
        reason = _too_long(len(ids), context, reserve)
        if reason is not None:
            if on_progress is not None:
                on_progress(1)
            yield GuardResult(item.key, unparsed(reason), "")
            continue
        encoded.append((item, ids))
    if not encoded:
        return
    if fmt == "classifier":
        yield from _score_classifier(model, encoded, batch_size, threshold, id2label or {},
                                     unsafe_ids or set(), on_progress)
        return

    from gsmkit.generation import GenRequest, HFEngine, SamplingSettings
    from gsmkit.modeling import eos_token_ids

    engine = HFEngine(model, tokenizer, batch_size=batch_size, prefix_cache=True,
                      stop_token_ids=eos_token_ids(tokenizer, model))
    requests = [GenRequest(item.key, tuple(ids)) for item, ids in encoded]
    if fmt == "shieldgemma":
        yes, no = single_token_id(tokenizer, "Yes", "guard"), single_token_id(tokenizer, "No", "guard")
        for key, (lp_yes, lp_no) in engine.next_token_logprobs(requests, (yes, no), on_batch=on_progress):
            verdict = shieldgemma_verdict(lp_yes, lp_no, threshold)
            output = "" if verdict.label == UNPARSED else ("Yes" if lp_yes > lp_no else "No")
            yield GuardResult(key, verdict, output)
        return
    for res in engine.generate(requests, SamplingSettings(max_new_tokens=max_new_tokens)):
        if on_progress is not None:
            on_progress(1)
        yield GuardResult(res.key, parse_guard_output(fmt, res.text, controversial), res.text)


def _score_classifier(model, encoded, batch_size, threshold, id2label, unsafe_ids, on_progress):
    import torch

    device = next(model.parameters()).device
    pad_id = getattr(model.config, "pad_token_id", None)
    if pad_id is None:
        # Decoder classifiers pool the last non-pad token, which needs a pad id to find: without one,
        # score rows one at a time, unpadded.
        batch_size, pad_id = 1, 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][1]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i][1]) for i in idx)
        ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i][1])
            ids[row, :n] = torch.tensor(encoded[i][1])
            attn[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        probs = torch.softmax(logits, dim=-1).tolist()
        for row, i in enumerate(idx):
            p = probs[row]
            top = max(range(len(p)), key=p.__getitem__)
            yield GuardResult(encoded[i][0].key, classifier_verdict(p, id2label, unsafe_ids, threshold),
                              id2label.get(top, str(top)))
        if on_progress is not None:
            on_progress(len(idx))
