"""Training examples for `gsmkit train sft|qlora`, read from GSM8K or from a JSONL file.

In: a source and a split. A GSM8K Hub id, a local GSM8K folder, or a `.json`/`.parquet` file goes
through `load_gsm8k` (rows must be GSM8K problems, solutions ending in `#### n`). A `.jsonl` file is
read row by row, and every row of it must have one of three shapes:
  - `{"question", "answer"}`: GSM8K rows or `generate-traces` output; extra fields are allowed and
    the answer need not end in `#### n` (a user's own solutions may not);
  - `{"prompt", "response"}`: an already rendered prompt, used as given, and the text to learn;
  - `{"messages": [{"role", "content"}, ...]}`: a chat whose last message, the assistant's, is the
    one trained on; earlier messages are context.
Out: `TrainExample`s in source order, each with `where` (its "path:line") and `key_text`, the text
whose content hash identifies it when the few-shot pool is removed (`remove_fewshot`).

Rows of a `.jsonl` file are not deduplicated: several traces of one question are legitimate data.
`resolve_pool` finds the few-shot pool a run keeps out (--pool, ./fewshot_pool.jsonl, or the default draw).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.data.gsm8k import load_gsm8k
from gsmkit.errors import DataError
from gsmkit.jsonl import iter_jsonl
from gsmkit.settings import DEFAULT_SOURCE

# The fields that make each shape, in the order a missing one is reported.
_SHAPES: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "pr": ("prompt", "response"),
    "messages": ("messages",),
}
_KIND_NAMES = {"qa": "question/answer", "pr": "prompt/response", "messages": "messages"}
SHAPES_HINT = (
    'each row needs one of: {"question", "answer"} (GSM8K or generate-traces rows), '
    '{"prompt", "response"} (a rendered prompt and the text to learn), or '
    '{"messages": [{"role", "content"}, ...]} ending with the assistant\'s message'
)


@dataclass(frozen=True)
class TrainExample:
    """One training example; exactly one of the three shapes is set (see the module docstring)."""

    where: str
    question: str | None = None
    answer: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict, ...] | None = None

    def __post_init__(self) -> None:
        # A programming error, not a user one: loaders only build complete examples.
        shapes = [self.question is not None and self.answer is not None,
                  self.prompt is not None and self.response is not None,
                  self.messages is not None]
        if sum(shapes) != 1:
            raise ValueError(f"{self.where}: a TrainExample needs exactly one of question/answer, "
                             "prompt/response or messages")

    @property
    def kind(self) -> str:
        """"qa", "pr" or "messages"."""
        if self.messages is not None:
            return "messages"
        return "qa" if self.question is not None else "pr"

    @property
    def key_text(self) -> str:
        """The text hashed for leakage checks: the question, the prompt, or the last user message."""
        if self.question is not None:
            return self.question
        if self.prompt is not None:
            return self.prompt
        return next(m["content"] for m in reversed(self.messages or ()) if m["role"] == "user")


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, as the user wrote it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _string(obj: dict[str, Any], key: str, name: str, where: str, *, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': must be a string, got {_json_type(value)}",
                        hint=SHAPES_HINT)
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}': empty", hint=SHAPES_HINT)
    return value


def _row_kind(obj: dict[str, Any], where: str) -> str:
    complete = [kind for kind, keys in _SHAPES.items() if all(k in obj for k in keys)]
    if len(complete) == 1:
        return complete[0]
    if complete:
        # Choosing one silently could train on the wrong text; the user knows which they meant.
        both = " and ".join(_KIND_NAMES[k] for k in complete)
        raise DataError(f"{where}: row has the fields of more than one shape ({both})",
                        hint="keep the fields of one shape only; " + SHAPES_HINT)
    for keys in _SHAPES.values():
        if any(k in obj for k in keys):
            missing = next(k for k in keys if k not in obj)
            raise DataError(f"{where}: field '{missing}': missing", hint=SHAPES_HINT)
    found = ", ".join(f"'{k}'" for k in list(obj)[:6]) or "none"
    raise DataError(f"{where}: no 'question', 'prompt' or 'messages' field (fields: {found})",
                    hint=SHAPES_HINT)


def _messages(value: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'messages': must be an array, got {_json_type(value)}",
                        hint=SHAPES_HINT)
    if not value:
        raise DataError(f"{where}: field 'messages': empty", hint=SHAPES_HINT)
    out: list[dict] = []
    for i, message in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}': must be an object with 'role' and 'content', "
                            f"got {_json_type(message)}", hint=SHAPES_HINT)
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: field '{name}.{key}': missing", hint=SHAPES_HINT)
        _string(message, "role", f"{name}.role", where)
        # Context turns may be empty (an empty system prompt); the trained one may not, checked below.
        _string(message, "content", f"{name}.content", where, allow_empty=True)
        out.append(dict(message))  # other keys (name, ...) are kept for templates that use them
    last = len(out) - 1
    if out[last]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages[{last}].role': the last message must be the assistant's, "
                        f"got '{out[last]['role']}'",
                        hint="the last message is the one trained on; earlier messages are its context")
    if not out[last]["content"].strip():
        raise DataError(f"{where}: field 'messages[{last}].content': empty",
                        hint="the last message is trained on")
    if not any(m["role"] == "user" for m in out[:-1]):
        # The last user message identifies the example for few-shot leakage removal.
        raise DataError(f"{where}: field 'messages': no user message before the assistant's",
                        hint="give the question as a user message before the assistant's answer")
    return tuple(out)


def _example_from_row(obj: dict[str, Any], kind: str, where: str) -> TrainExample:
    if kind == "qa":
        return TrainExample(where=where, question=_string(obj, "question", "question", where),
                            answer=_string(obj, "answer", "answer", where))
    if kind == "pr":
        return TrainExample(where=where, prompt=_string(obj, "prompt", "prompt", where),
                            response=_string(obj, "response", "response", where))
    return TrainExample(where=where, messages=_messages(obj["messages"], where))


def read_train_jsonl(path: str | Path) -> list[TrainExample]:
    """All rows of a `.jsonl` training file, validated; every row must have the first row's shape."""
    path = Path(path).expanduser()
    examples: list[TrainExample] = []
    first: TrainExample | None = None
    for lineno, obj in iter_jsonl(path):  # raises for a missing, empty or non-JSON file
        where = f"{path}:{lineno}"
        kind = _row_kind(obj, where)
        if first is not None and kind != first.kind:
            raise DataError(f"{where}: a {_KIND_NAMES[kind]} row, but {first.where} is a "
                            f"{_KIND_NAMES[first.kind]} row",
                            hint="all rows of one file must have the same shape; split the file by shape")
        ex = _example_from_row(obj, kind, where)
        first = first or ex
        examples.append(ex)
    return examples


def load_train_examples(source: str | Path, split: str = "train") -> list[TrainExample]:
    """Training examples from a `.jsonl` file (any of the three shapes) or from GSM8K (hub or local)."""
    if str(source).lower().endswith(".jsonl"):
        return read_train_jsonl(source)
    problems = load_gsm8k(source, split)
    # load_gsm8k does not keep line numbers; the content-derived id names the row just as well.
    origin = str(source) if Path(source).expanduser().is_file() else f"{source}[{split}]"
    return [TrainExample(where=f"{origin}:{p.id}", question=p.question, answer=p.answer) for p in problems]


def remove_fewshot(
    examples: Iterable[TrainExample], pool_hashes: set[str], pool_questions: Iterable[str] = ()
) -> tuple[list[TrainExample], list[str]]:
    """Drop every example that is a few-shot pool problem; returns (kept, content hashes removed).

    An example matches when its `key_text` has a pool question's content hash (GSM8K and traces rows),
    or, given `pool_questions`, when a pool question appears inside its whitespace-normalised
    `key_text` (a `{prompt, response}` row whose prompt wraps the question, a chat turn quoting it).
    """
    from gsmkit.records import content_hash, normalize_text

    wrapped = {normalize_text(q): content_hash(q) for q in pool_questions}
    kept, removed = [], []
    for ex in examples:
        h = content_hash(ex.key_text)
        if h in pool_hashes:
            removed.append(h)
            continue
        text = normalize_text(ex.key_text)
        hit = next((qh for q, qh in wrapped.items() if q and q in text), None)
        if hit is not None:
            removed.append(hit)
        else:
            kept.append(ex)
    return kept, removed


DEFAULT_POOL = Path("fewshot_pool.jsonl")  # what `gsmkit fewshot` writes by default


@dataclass(frozen=True)
class KeptOutPool:
    """The few-shot pool a training run keeps out of its data: its examples, where it came from (for the
    manifest's `resolved.fewshot_pool`) and the file it was read from (hashed as an input), if any."""

    examples: list[Any]
    origin: str
    path: Path | None


def resolve_pool(pool: Path | None, data: str, traces: str | None = None) -> KeptOutPool:
    """The few-shot pool to keep out of training: `pool` (--pool), else ./fewshot_pool.jsonl, else the
    default pool drawn from GSM8K train exactly as `gsmkit fewshot` would (seed 42, 8 examples): from
    `data` when it is a GSM8K source (Hub id, folder, .json/.parquet) and no `traces` file replaces it,
    else from GSM8K on the Hub (`DEFAULT_SOURCE`)."""
    from gsmkit.data import gsm8k
    from gsmkit.data.fewshot import DEFAULT_POOL_SIZE, DEFAULT_SEED, draw_pool, read_pool

    if pool is not None:
        return KeptOutPool(read_pool(pool), str(pool), Path(pool))
    if DEFAULT_POOL.exists():
        return KeptOutPool(read_pool(DEFAULT_POOL), str(DEFAULT_POOL), DEFAULT_POOL)
    # A .jsonl training file is read as training rows (traces, prompt/response ...): drawing the pool from
    # it would make a pool no evaluation uses, and remove a quarter of a small traces file. The draw
    # depends only on content, so GSM8K train from the Hub gives the same pool as any local copy.
    jsonl = str(data).lower().endswith(".jsonl")
    source = data if (traces is None or traces == data) and not jsonl else DEFAULT_SOURCE
    try:
        problems = gsm8k.load_gsm8k(source, "train")
    except DataError as err:
        raise DataError(f"no few-shot pool to exclude from training ({err.message})",
                        hint="pass --pool FILE (made by `gsmkit fewshot`)") from None
    drawn = draw_pool(problems, DEFAULT_POOL_SIZE, DEFAULT_SEED)
    return KeptOutPool(drawn, f"default pool of {source} (n={DEFAULT_POOL_SIZE}, seed={DEFAULT_SEED})", None)
