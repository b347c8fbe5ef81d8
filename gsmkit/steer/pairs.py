"""CAA's contrast pairs: one question, a positive solution and a negative one.

In: GSM8K problems, or a `--pairs-from` file: a `generate-traces` file (its rows whose `source` is `model`,
i.e. correct traces, are the positives) or any JSONL of `{prompt, positive, negative}` (`prompt` is the
question, rendered in the run's prompt style). Out: `ContrastPair`s, whose texts are solutions as GSM8K
writes them; `gsmkit.prompts.render_target` turns them into the completion a style expects, as training
does.

Negatives: `corrupted` (`corrupt_solution`): the solution with every arithmetic result (`<<a*b=c>>c`,
`= c`) and the final answer (`#### n`, `<SOLUTION>n</SOLUTION>`) changed, seeded by (seed, problem id):
each changed number differs from the original and the final answer always changes (to the corrupted
last result when the last result was the answer, so the slip reads as one). `sampled`: an incorrect
completion of the model itself (drawn in `gsmkit.steer.activations`); `file`: the row's own negative.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError

CORRUPTION_VERSION = 1  # part of the activation cache's key: bump when corrupt_solution changes
NEGATIVES = ("corrupted", "sampled")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# one pass over the text; alternatives in the order a position is tried: a calculator annotation (and the
# copy of its result that follows it), a final answer, a result after "="
_PATTERN = re.compile(
    rf"<<(?P<expr>[^<>=]*)=(?P<res>{_NUMBER})>>(?P<copy>{_NUMBER})?"
    rf"|(?P<hash>####\s*\$?)(?P<final>{_NUMBER})"
    rf"|(?P<tag><SOLUTION>\s*)(?P<tagged>{_NUMBER})(?P<tagend>\s*</SOLUTION>)"
    rf"|(?P<eq>=\s*\$?)(?P<eqres>{_NUMBER})"
)
_ANY_NUMBER = re.compile(_NUMBER)


@dataclass(frozen=True)
class ContrastPair:
    """One problem's pair: `positive` and `negative` are solutions (None: to be sampled from the model)."""

    id: str
    question: str
    positive: str
    negative: str | None
    gold: str | None
    negatives: str  # "corrupted" | "sampled" | "file"

    def text_hash(self) -> str:
        """sha256 of the texts the pair is made of: a changed pair is another cache entry."""
        parts = (self.question, self.positive, self.negative or "", self.negatives)
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


# -- corruption ----------------------------------------------------------------------------------------


def _value(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def perturb(number: str, rng: random.Random) -> str:
    """Another number written like `number` (same decimals, thousands commas, sign when possible), never
    equal to it: moved by 1 to a quarter of its size, in units of its last digit."""
    places = len(number.partition(".")[2])
    unit = Decimal(1).scaleb(-places)
    value = _value(number)
    steps = int(value.copy_abs() / unit)
    delta = rng.randint(1, max(1, steps // 4)) * rng.choice((-1, 1))
    new = value + delta * unit
    if new < 0 <= value:
        new = value - delta * unit  # delta < 0 here, so this moves up
    text = f"{new:,.{places}f}" if "," in number else f"{new:.{places}f}"
    return text


def corrupt_solution(solution: str, seed: int, key: str, where: str = "") -> str:
    """`solution` with its arithmetic results and its final answer changed (see the module docstring),
    the same for the same (seed, key)."""
    rng = random.Random(f"gsmkit-corrupt\0{seed}\0{key}")
    state: dict[str, Any] = {"last": None, "changed": False}

    def result(original: str) -> str:
        new = perturb(original, rng)
        state["last"] = (original, new)
        state["changed"] = True
        return new

    def final(original: str) -> str:
        last = state["last"]
        state["changed"] = True
        if last is not None and _value(last[0]) == _value(original):
            return last[1]
        return perturb(original, rng)

    def replace(m: re.Match) -> str:
        if m.group("res") is not None:
            res, copy = m.group("res"), m.group("copy")
            new = result(res)
            after = ("" if copy is None else new if _value(copy) == _value(res) else copy)
            return f"<<{m.group('expr')}={new}>>{after}"
        if m.group("final") is not None:
            return m.group("hash") + final(m.group("final"))
        if m.group("tagged") is not None:
            return m.group("tag") + final(m.group("tagged")) + m.group("tagend")
        return m.group("eq") + result(m.group("eqres"))

    finals = [m for m in _PATTERN.finditer(solution) if m.group("final") or m.group("tagged")]
    out = _PATTERN.sub(replace, solution)
    if not finals:
        # No final-answer marker: the answer is the last number (lm-eval's flexible rule); change it.
        numbers = list(_ANY_NUMBER.finditer(out))
        if not numbers:
            raise DataError(f"{where or key}: the solution has no number to corrupt",
                            hint="give such rows a negative, or use --negatives sampled")
        m = numbers[-1]
        out = out[: m.start()] + perturb(m.group(), rng) + out[m.end():]
    return out


# -- pairs ---------------------------------------------------------------------------------------------


def pairs_from_problems(problems: Sequence[Any], negatives: str, seed: int) -> list[ContrastPair]:
    """Pairs of GSM8K problems: the gold solution against a corrupted one (or one sampled later)."""
    return [ContrastPair(p.id, p.question, p.answer,
                         corrupt_solution(p.answer, seed, p.id) if negatives == "corrupted" else None,
                         p.gold, negatives) for p in problems]


@dataclass(frozen=True)
class PairsFile:
    """What a `--pairs-from` file held: `kind` "traces" or "pairs", the pairs, and the rows skipped."""

    kind: str
    pairs: list[ContrastPair]
    skipped: int  # trace rows whose source is not the model (a fallback to the gold solution)


_PAIR_FIELDS = ("prompt", "positive", "negative")
_TRACE_FIELDS = ("question", "answer", "source")


def _text(obj: dict[str, Any], name: str, where: str, hint: str) -> str:
    if name not in obj:
        raise DataError(f"{where}: missing field '{name}'", hint=hint)
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}", hint=hint)
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty", hint=hint)
    return value


def read_pairs_file(path: Path, negatives: str | None, seed: int) -> PairsFile:
    """The pairs in `path` (see the module docstring), every line checked (DataError `path:line: field`).
    A traces file's negatives follow `negatives` (corrupted when None); a pairs file has its own."""
    from gsmkit.answers import gold_from_solution, normalize_gold
    from gsmkit.jsonl import iter_jsonl
    from gsmkit.records import problem_id

    kind = None
    pairs: list[ContrastPair] = []
    skipped = 0
    hint = ("--pairs-from takes a `gsmkit generate-traces` file ({question, answer, source, ...} rows) or "
            "JSONL of {prompt, positive, negative}")
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if kind is None:
            kind = "pairs" if any(k in obj for k in _PAIR_FIELDS) else "traces"
            if kind == "pairs" and negatives is not None:
                raise ConfigError(f"--negatives {negatives} does not apply to {path}: its rows have their "
                                  "own negatives", hint="drop --negatives")
        pid = obj.get("id")
        if pid is not None and not isinstance(pid, str):
            raise DataError(f"{where}: field 'id' must be a string, got {type(pid).__name__}", hint=hint)
        if kind == "pairs":
            prompt, positive, negative = (_text(obj, name, where, hint) for name in _PAIR_FIELDS)
            pairs.append(ContrastPair(pid or problem_id(prompt), prompt, positive, negative, None, "file"))
            continue
        question, answer, source = (_text(obj, name, where, hint) for name in _TRACE_FIELDS)
        if source not in ("model", "fallback"):
            raise DataError(f"{where}: field 'source' is '{source}', expected 'model' or 'fallback'",
                            hint=hint)
        if source != "model":
            skipped += 1
            continue
        gold = obj.get("gold")
        gold = normalize_gold(str(gold)) if isinstance(gold, str | int | float) and not isinstance(
            gold, bool) else gold_from_solution(answer)
        if gold is None and (negatives or "corrupted") == "sampled":
            raise DataError(f"{where}: no 'gold' field and no '#### n' in the answer, so a sampled negative "
                            "cannot be scored", hint="add the gold answer, or use --negatives corrupted")
        pid = pid or problem_id(question)
        mode = negatives or "corrupted"
        negative = corrupt_solution(answer, seed, pid, where) if mode == "corrupted" else None
        pairs.append(ContrastPair(pid, question, answer, negative, gold, mode))
    if not pairs:
        raise DataError(f"{path}: no usable pair (all {skipped} rows fell back to the gold solution)",
                        hint="pass traces with correct model answers, or build pairs from --data")
    return PairsFile(kind or "pairs", pairs, skipped)


def drop_pool_questions(pairs: Sequence[ContrastPair], pool_hashes: set[str]
                        ) -> tuple[list[ContrastPair], int]:
    """The pairs whose question is not one of the prompts' exemplars, and how many were dropped."""
    from gsmkit.records import content_hash

    kept = [p for p in pairs if content_hash(p.question) not in pool_hashes]
    return kept, len(pairs) - len(kept)
