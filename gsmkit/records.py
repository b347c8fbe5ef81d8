"""The JSONL record types gsmkit reads and writes, with their schema versions.

Each record is a frozen dataclass with `from_dict(obj, where)`, which validates fields and raises
`DataError("path:line: field 'x': reason")`, and `to_dict()`, which gives the documented JSON shape
(docs/formats.md). Problem ids are derived from content, so the same question has the same id
whether it came from the Hub, a local jsonl or a parquet export.
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_args

from gsmkit.answers import gold_from_solution, normalize_gold
from gsmkit.errors import DataError
from gsmkit.fields import Record, field_types

# 2: predictions gained `reasoning`, `ended_in_reasoning`, `reasoning_tokens` and `answer_tokens`.
# 3: predictions gained `budget_forced` (`--thinking-budget`).
SCHEMA_VERSION = 3


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace and strip: the form hashed for ids and leakage checks."""
    # str.split() splits on exactly the characters regex `\s` matches (both use str.isspace), so this
    # equals `re.sub(r"\s+", " ", text).strip()` and is several times faster on 7k-question splits.
    return " ".join(text.split())


def content_hash(question: str) -> str:
    """sha256 (hex) of the whitespace-normalised question: a problem's identity for leakage checks."""
    return hashlib.sha256(normalize_text(question).encode("utf-8")).hexdigest()


def problem_id(question: str) -> str:
    """Stable id of a GSM8K problem: `gsm8k-` plus the first 16 hex digits of its content hash."""
    return "gsm8k-" + content_hash(question)[:16]


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
             hint: str | None = None):
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'", hint=hint)
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{key}' must be {name}, got {type(value).__name__}", hint=hint)
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty", hint=hint)
    return value


@dataclass(frozen=True)
class Problem(Record):
    """A GSM8K problem: `answer` is the worked solution ending in `#### n`, `gold` its normalised n.

    The field help describes a GSM8K input row (docs/formats.md, "GSM8K problems").

    Attributes:
        id: used as given. If missing, it is derived from the question (see [Conventions](#conventions))
        question: the problem text, not blank
        answer: the worked solution, not blank. Unless `gold` is given, it must contain `#### <number>`; the
            number after the **last** `####` (on its line) is the gold answer
        gold: the final answer, if the solution doesn't end in `#### n`: a string or a number, normalised (see
            [Conventions](#conventions))
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("question", "answer")  # in an input row; id and gold are filled in

    id: str
    question: str
    answer: str
    gold: str

    @property
    def sha256(self) -> str:
        return content_hash(self.question)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> Problem:
        hint = "a GSM8K row needs 'question' and 'answer' (the solution ending in '#### <number>')"
        question, answer = (_require(obj, key, str, where, hint) for key in cls.REQUIRED)
        gold = obj.get("gold")
        if gold is None:
            gold = gold_from_solution(answer)
            if gold is None:
                raise DataError(
                    f"{where}: field 'answer' has no final '#### <number>' line",
                    hint="GSM8K solutions end with '#### <number>'; add it or give a 'gold' field",
                )
        elif not isinstance(gold, str | int | float) or isinstance(gold, bool):
            raise DataError(f"{where}: field 'gold' must be a string or number, got {type(gold).__name__}")
        else:
            given = gold
            gold = normalize_gold(str(given))
            if gold is None:
                # An empty or non-numeric gold can never be matched: every answer would score wrong.
                raise DataError(f"{where}: field 'gold' must be a number, got {given!r}",
                                hint="give the final answer as a plain number, e.g. \"1000\" or \"-3.5\"")
        pid = obj.get("id")
        if pid is not None and not isinstance(pid, str):
            raise DataError(f"{where}: field 'id' must be a string, got {type(pid).__name__}")

        return cls(id=pid or problem_id(question), question=question, answer=answer, gold=gold)


@dataclass(frozen=True)
class FewshotExample(Record):
    """A row of a few-shot pool file: a problem plus the content hash used to keep it out of training.

    Attributes:
        id: the problem id (see [Conventions](#conventions))
        question: the problem text
        answer: the worked solution, shown to the model as the exemplar's answer
        gold: the normalised final answer
        sha256: SHA-256 (hex) of the whitespace-normalised question
    """

    id: str
    question: str
    answer: str
    gold: str
    sha256: str

    @classmethod
    def from_problem(cls, p: Problem) -> FewshotExample:
        return cls(id=p.id, question=p.question, answer=p.answer, gold=p.gold, sha256=p.sha256)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> FewshotExample:
        p = Problem.from_dict(obj, where)
        digest = obj.get("sha256")
        if digest is not None and digest != p.sha256:
            raise DataError(
                f"{where}: field 'sha256' does not match the question's content hash",
                hint="the pool was edited by hand; regenerate it with `gsmkit fewshot`",
            )
        return cls.from_problem(p)

    def to_problem(self) -> Problem:
        return Problem(id=self.id, question=self.question, answer=self.answer, gold=self.gold)


@dataclass(frozen=True)
class Prediction(Record):
    """One model answer to one problem, as written to `predictions.jsonl` by `eval gsm8k`.

    Attributes:
        id: problem id
        prompt_sha256: SHA-256 (hex) of the exact prompt text given to the model (UTF-8)
        completion: the generated text, special tokens removed, cut before the first stop string (the whole
            text, reasoning section included)
        strict: the answer found by strict-match, the first `#### <number>`, normalised (for the `tags` style,
            the last `<SOLUTION>n</SOLUTION>`), read only after the reasoning section. null if there is none
            or the completion ended in its reasoning
        flexible: the answer found by flexible-extract, the last number in the text after the reasoning
            section, normalised. null if there is none or the completion ended in its reasoning
        gold: the normalised gold answer
        correct_strict: `strict` equals `gold` numerically
        correct_flexible: `flexible` equals `gold` numerically
        num_prompt_tokens: tokens in the prompt
        num_tokens: tokens generated (with the `hf` backend, an end-of-sequence token that ended the
            completion isn't counted)
        finish_reason: `"stop"` (a stop string or end of sequence) or `"length"` (hit `--max-new-tokens`)
        reasoning: the text inside the completion's reasoning section (`<think>...</think>` of a thinking
            template, `<start_working_out>...<end_working_out>` of the `tags` style), tags left out; null when
            the completion has none. Optional on read: null
        ended_in_reasoning: the section opened (in the completion, or already in the prompt) and never
            closed, so the completion has no answer. Optional on read: false
        reasoning_tokens: tokens of `reasoning`, counted by the model's tokenizer on that text (no special
            tokens); null without a section. Optional on read: null
        answer_tokens: tokens of the answer text (after the section; the whole completion without one),
            counted the same way; null when the completion ended in its reasoning. Optional on read: null
        budget_forced: the reasoning section reached `--thinking-budget` tokens and its end tag was written
            for the model, which then answered. Optional on read: false
    """

    id: str
    prompt_sha256: str
    completion: str
    strict: str | None
    flexible: str | None
    gold: str
    correct_strict: bool
    correct_flexible: bool
    num_prompt_tokens: int
    num_tokens: int
    finish_reason: str
    reasoning: str | None = None
    ended_in_reasoning: bool = False
    reasoning_tokens: int | None = None
    answer_tokens: int | None = None
    budget_forced: bool = False

    # Added in schemas 2 and 3: files written before them still read, with these defaults.
    OPTIONAL: ClassVar[dict[str, Any]] = {"reasoning": None, "ended_in_reasoning": False,
                                          "reasoning_tokens": None, "answer_tokens": None,
                                          "budget_forced": False}

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> Prediction:
        names = [f.name for f in fields(cls)]
        obj = {**cls.OPTIONAL, **obj}
        missing = [n for n in names if n not in obj]
        if missing:
            raise DataError(f"{where}: missing field '{missing[0]}'",
                            hint="predictions.jsonl rows are written by `gsmkit eval gsm8k`; rerun it")
        for name in names:
            value, kinds = obj[name], _PREDICTION_TYPES[name]
            # bool is an int subclass: a count given as true/false is as wrong as one given as text.
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise DataError(f"{where}: field '{name}' must be {expected}, got {type(value).__name__}")
        return cls(**{n: obj[n] for n in names})


def _json_kinds(annotation: Any) -> tuple[type, ...]:
    """The Python types a JSON value of a field may have: `str | None` -> (str, NoneType)."""
    return get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


# From the annotations, so that a field's type is declared once.
_PREDICTION_TYPES: dict[str, tuple[type, ...]] = {
    name: _json_kinds(kind) for name, kind in field_types(Prediction).items()
}
