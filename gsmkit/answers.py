"""GSM8K answer extraction and normalisation: the one place that decides what a model "answered".

In: free text, either a model completion or a GSM8K solution (worked steps ending in ``#### <n>``).
Out: a canonical answer string (``"1000"``, ``"-3"``, ``"0.5"``) or ``None`` when the text holds no
extractable answer.  The metric, the RL rewards and trace filtering all go through this module, so
their notion of "correct" cannot drift apart; they hand it the text after a completion's reasoning section
(`gsmkit.reasoning.read_answer` and `score`, which also own what a reasoning section is).

Extraction copies lm-evaluation-harness's ``gsm8k`` task filters exactly (same regexes, same choice of
match), because a benchmark compares our extracted answers with lm-eval's problem by problem:

* strict-match: first ``#### <number>`` in the text;
* flexible-extract: the LAST number-looking token anywhere in the text.

Normalisation applies lm-eval's ``regexes_to_ignore`` (drop ``,`` and ``$``, drop the sentence-final
period) and then canonicalises plain decimal numbers ("5.00" -> "5", ".50" -> "0.5", "-0" -> "0").
Comparison (:func:`answers_equal`) is numeric, so it is slightly more lenient than lm-eval's string
``exact_match`` ("5.0" counts as 5); the extracted spans themselves are identical.

Pure Python (``re`` and ``decimal``) so reward functions and data tools can import it cheaply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

__all__ = [
    "FLEXIBLE_PATTERN",
    "REASONING_END",
    "REASONING_START",
    "SOLUTION_END",
    "SOLUTION_START",
    "STRICT_PATTERN",
    "ExtractedAnswers",
    "answers_equal",
    "extract_all",
    "extract_answer",
    "extract_flexible",
    "extract_solution_tag",
    "extract_strict",
    "gold_from_solution",
    "normalize_number",
    "primary_answer",
    "score_completion",
    "to_tags",
]

# Verbatim from lm_eval/tasks/gsm8k/gsm8k.yaml (filter_list).  Do not "improve" these: any change makes
# our per-problem results disagree with lm-eval's.
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

# Reasoning-tags prompt style: <start_working_out>...<end_working_out><SOLUTION>n</SOLUTION>.
REASONING_START = "<start_working_out>"
REASONING_END = "<end_working_out>"
SOLUTION_START = "<SOLUTION>"
SOLUTION_END = "</SOLUTION>"

# A plain decimal number and nothing else: ASCII digits only (``\d`` would accept e.g. Arabic-Indic
# digits, which Decimal happily parses), optional minus, at most one point.  Exponents ("1e3"),
# "inf" and "nan" are deliberately not numbers: GSM8K answers never use them and Decimal would
# accept them.
_PLAIN_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")

# lm-eval strips one sentence-final period ("... is 42." -> "42").  We strip the run of periods
# that follows a digit: same result for real answers, and it keeps normalisation idempotent
# ("1.2.3.." must not shrink again on a second pass).  Periods not after a digit ("..") are not
# sentence punctuation after a number, so they stay and the junk answer stays visible.
_TRAILING_PERIODS = re.compile(r"(?<=[0-9])\.+\Z")

_SOLUTION_TAG = re.compile(re.escape(SOLUTION_START) + r"(.*?)" + re.escape(SOLUTION_END), re.DOTALL)

_GOLD_MARKER = "####"


def _canonical_number(text: str) -> str | None:
    """Canonical form of a plain decimal number, or None if ``text`` is not one."""
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    negative = text.startswith("-")
    int_part, _, frac_part = text.lstrip("-").partition(".")
    # String surgery rather than Decimal.normalize(), which turns "1000" into "1E+3".
    int_part = int_part.lstrip("0") or "0"
    frac_part = frac_part.rstrip("0")
    canonical = f"{int_part}.{frac_part}" if frac_part else int_part
    # "-0" and "-0.00" are zero; a signed zero would never equal the gold "0" as a string.
    return f"-{canonical}" if negative and canonical != "0" else canonical


def normalize_number(text: str) -> str | None:
    """Canonical form of an answer string.

    Drops ``,`` and ``$`` anywhere (so "$-5" and "-$5" are both "-5"), surrounding whitespace and
    the period after a final digit.  A plain decimal number comes back canonical ("1,000.00" ->
    "1000", ".50" -> "0.5", "007" -> "7", "-0" -> "0").  Anything else ("1.2.3", "..", "-") comes
    back cleaned but otherwise as is, so the answer exists yet never equals a numeric gold.
    None only when nothing is left.
    """
    cleaned = text.replace(",", "").replace("$", "").strip()
    cleaned = _TRAILING_PERIODS.sub("", cleaned)
    if not cleaned:
        return None
    canonical = _canonical_number(cleaned)
    return canonical if canonical is not None else cleaned


def extract_strict(text: str) -> str | None:
    """lm-eval strict-match: the FIRST ``#### <number>`` (later ones are usually hallucinated
    follow-up questions), normalised; None if there is none."""
    match = STRICT_PATTERN.search(text)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """lm-eval flexible-extract: the LAST number-looking token in the text, normalised; None if
    there is none."""
    last = None
    for last in FLEXIBLE_PATTERN.finditer(text):
        pass
    if last is None:
        return None
    # Exactly one of the two alternatives matched; lm-eval takes the non-empty group.
    return normalize_number(last.group(1) or last.group(2))


_EXTRACTORS = {"strict": extract_strict, "flexible": extract_flexible}


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """Extract with the named lm-eval filter: ``"strict"`` or ``"flexible"``."""
    try:
        extractor = _EXTRACTORS[mode]
    except KeyError:
        raise ValueError(f"unknown extraction mode {mode!r}; expected 'strict' or 'flexible'") from None
    return extractor(text)


@dataclass(frozen=True)
class ExtractedAnswers:
    """Both lm-eval extractions of one completion (None: nothing extractable)."""

    strict: str | None
    flexible: str | None


def extract_all(text: str) -> ExtractedAnswers:
    return ExtractedAnswers(strict=extract_strict(text), flexible=extract_flexible(text))


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """True when both answers exist and agree: numerically when both are plain numbers ("5.0" ==
    "5"), else as normalised strings.  A missing answer is never correct."""
    if pred is None or gold is None:
        return False
    pred_norm, gold_norm = normalize_number(pred), normalize_number(gold)
    if pred_norm is None or gold_norm is None:
        return False
    if _PLAIN_NUMBER.fullmatch(pred_norm) and _PLAIN_NUMBER.fullmatch(gold_norm):
        return Decimal(pred_norm) == Decimal(gold_norm)
    return pred_norm == gold_norm


def gold_from_solution(solution: str) -> str | None:
    """The gold answer of a GSM8K solution: the number after its LAST ``####`` (the dataset's
    final-answer marker, e.g. "#### 1,000" -> "1000"), normalised; None if there is no marker or
    no number after it."""
    _, marker, tail = solution.rpartition(_GOLD_MARKER)
    if not marker:
        return None
    # Only the marker's own line: anything after it is not part of the answer.
    lines = tail.strip().splitlines()
    return normalize_gold(lines[0]) if lines else None


def normalize_gold(text: str) -> str | None:
    """The canonical form of a gold answer, or None when it is not a plain number."""
    value = normalize_number(text)
    return value if value is not None and _PLAIN_NUMBER.fullmatch(value) else None


def score_completion(completion: str, gold: str,
                     answer_format: str = "hash") -> tuple[ExtractedAnswers, bool, bool]:
    """Extract both answers from ``completion``; return them with (correct_strict, correct_flexible).

    "strict" is the format's own marker (``primary_answer``): ``#### n``, or the ``<SOLUTION>`` tag for
    the reasoning-tags format; "flexible" is always lm-eval's last number."""
    if answer_format == "hash":
        answers = extract_all(completion)
    else:
        answers = ExtractedAnswers(strict=primary_answer(completion, answer_format),
                                   flexible=extract_flexible(completion))
    return answers, answers_equal(answers.strict, gold), answers_equal(answers.flexible, gold)


def extract_solution_tag(text: str) -> str | None:
    """Normalised content of the LAST ``<SOLUTION>...</SOLUTION>`` (the final one is the answer if
    the model restates it), or None if there is no closed tag.  The whole content is the answer, so
    "<SOLUTION>about 5</SOLUTION>" yields "about 5", which is not a number and never scores."""
    matches = _SOLUTION_TAG.findall(text)
    return normalize_number(matches[-1]) if matches else None


def to_tags(solution: str) -> str:
    """A GSM8K solution ("steps ... #### n") in the reasoning-tags format:
    ``<start_working_out>steps<end_working_out>`` then ``<SOLUTION>n</SOLUTION>``.

    Text that already has a ``<SOLUTION>`` tag, or has no ``#### n`` to convert, is returned as is.
    """
    if _SOLUTION_TAG.search(solution):
        return solution
    gold = gold_from_solution(solution)
    if gold is None:
        return solution
    steps = solution.rpartition(_GOLD_MARKER)[0].strip()
    return f"{REASONING_START}{steps}{REASONING_END}\n{SOLUTION_START}{gold}{SOLUTION_END}"


ANSWER_FORMATS = ("hash", "tags")


def primary_answer(text: str, answer_format: str = "hash") -> str | None:
    """The answer a completion states in its format's own marker: the first ``#### n`` ("hash", lm-eval's
    strict-match) or the last ``<SOLUTION>n</SOLUTION>`` ("tags"). The metric's strict column, the
    correctness reward and trace selection all use this one function."""
    if answer_format == "hash":
        return extract_strict(text)
    if answer_format == "tags":
        return extract_solution_tag(text)
    raise ValueError(f"unknown answer format {answer_format!r}; expected one of {ANSWER_FORMATS}")
