"""Tests for gsmkit.answers: lm-eval-identical extraction, normalisation, gold parsing, tags."""

from __future__ import annotations

import dataclasses
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import SHARED_GSM8K
from hypothesis import given
from hypothesis import strategies as st

from gsmkit.answers import (
    FLEXIBLE_PATTERN,
    STRICT_PATTERN,
    ExtractedAnswers,
    answers_equal,
    extract_all,
    extract_answer,
    extract_flexible,
    extract_solution_tag,
    extract_strict,
    gold_from_solution,
    normalize_number,
    score_completion,
)
from gsmkit.reasoning import has_reasoning_section

# --- an independent re-implementation of lm-eval's gsm8k pipeline, written from gsm8k.yaml --------------
# (RegexFilter: findall, pick group_select, take the non-empty group of a tuple, strip; then
# exact_match's regexes_to_ignore).  Our extraction must pick the same span as this.
LM_EVAL_STRICT = "#### (\\-?[0-9\\.\\,]+)"
LM_EVAL_FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_EVAL_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def lm_eval_extract(text: str, pattern: str, group_select: int) -> str | None:
    found = re.findall(pattern, text)
    if not found:
        return None  # lm-eval's "[invalid]"
    match = found[group_select]
    if isinstance(match, tuple):
        match = next(m for m in match if m)
    match = match.strip()
    for ignore in LM_EVAL_IGNORE:
        match = re.sub(ignore, "", match)
    return match


PLAIN_NUMBER = r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"


def assert_same_as_lm_eval(ours: str | None, ref: str | None) -> None:
    """Our answer agrees with lm-eval's: nothing where it found nothing, the same number where it got a
    number, and never a number where it got junk (our cleaning of junk like ".." may differ)."""
    if ref is None:
        assert ours is None
    elif re.fullmatch(PLAIN_NUMBER, ref):
        assert ours is not None and Decimal(ours) == Decimal(ref)
    else:
        assert ours is None or not re.fullmatch(PLAIN_NUMBER, ours)


# Text that can never form (part of) a number token: no digits, no "-", "$", ".", ",", and no "#".
SAFE_ALPHABET = st.characters(
    blacklist_categories=("Nd", "Cs"), blacklist_characters="-$.,#0123456789"
)
safe_text = st.text(alphabet=SAFE_ALPHABET, max_size=30)


# --- the patterns themselves ---------------------------------------------------------------------------


def test_patterns_are_lm_eval_verbatim():
    assert STRICT_PATTERN.pattern == LM_EVAL_STRICT
    assert FLEXIBLE_PATTERN.pattern == LM_EVAL_FLEXIBLE
    assert STRICT_PATTERN.flags == FLEXIBLE_PATTERN.flags == re.compile("").flags


# --- table-driven extraction ---------------------------------------------------------------------------

EXTRACTION_CASES = [
    # text, strict, flexible
    ("The answer is 18.", None, "18"),
    ("#### 1,234", "1234", "1234"),
    ("$18", None, "18"),
    ("-5", None, "-5"),
    ("#### -5", "-5", "-5"),
    ("#### 5.00", "5", "5"),
    ("no number here", None, None),
    ("", None, None),
    ("I think 12 apples, so 12 + 30 = 42", None, "42"),
    ("The total ends with 42.", None, "42"),
    ("#### 72\n\nQuestion: Tom has 3 cats and 4 dogs.", "72", "4"),
    ("#### 3 then later #### 9", "3", "9"),
    ("####72", None, "72"),  # strict needs the space, exactly like lm-eval
    ("It costs $1,000.00 in total.", None, "1000"),
    ("version 1.2.3", None, "1.2.3"),
    ("#### 1.2.3", "1.2.3", "1.2.3"),
    ("He paid $-5", None, "-5"),
    ("so -$5 was lost", None, "-5"),
    ("a lone $, here", None, None),  # "$," matches flexible but nothing is left after cleaning
    ("between .. and", None, ".."),
    ("half is .5", None, "0.5"),
    ("1e3 items", None, "3"),  # no exponent notation: "1" then "3" are separate tokens
    ("7 then 8 then 9", None, "9"),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), EXTRACTION_CASES)
def test_extraction_table(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible
    assert extract_answer(text) == strict
    assert extract_answer(text, mode="strict") == strict
    assert extract_answer(text, mode="flexible") == flexible
    assert extract_all(text) == ExtractedAnswers(strict=strict, flexible=flexible)


@pytest.mark.parametrize(("text", "strict", "flexible"), EXTRACTION_CASES)
def test_extraction_table_agrees_with_lm_eval_reference(text, strict, flexible):
    # Where lm-eval's string is a number, ours must be the same number; where lm-eval finds nothing,
    # so must we.  (Guards the table itself against encoding non-lm-eval behaviour.)
    assert_same_as_lm_eval(strict, lm_eval_extract(text, LM_EVAL_STRICT, 0))
    assert_same_as_lm_eval(flexible, lm_eval_extract(text, LM_EVAL_FLEXIBLE, -1))


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        extract_answer("#### 5", mode="lenient")


def test_extracted_answers_is_frozen():
    answers = extract_all("#### 5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        answers.strict = "6"  # type: ignore[misc]


# --- normalisation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("5.00", "5"),
        ("5", "5"),
        ("007", "7"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("-.5", "-0.5"),
        ("5.", "5"),
        ("42.", "42"),
        ("1,000", "1000"),
        ("$1,000.00", "1000"),
        ("-3", "-3"),
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("  18 \n", "18"),
        ("100.10", "100.1"),
        ("1e3", "1e3"),
        ("1.2.3", "1.2.3"),
        ("..", ".."),
        ("-", "-"),
        ("--5", "--5"),
        ("+5", "+5"),
        ("", None),
        ("   ", None),
        ("$", None),
        (",,$", None),
    ],
)
def test_normalize_number_table(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("5.0", "5", True),
        ("5.00", "5", True),
        ("0.5", ".50", True),
        ("$1,000", "1000", True),
        ("-3", "-3", True),
        ("-0", "0", True),
        ("3", "-3", False),
        ("18", "19", False),
        ("1.2.3", "123", False),
        ("1e3", "1000", False),  # exponent notation is not a GSM8K number
        ("Infinity", "Infinity", True),  # junk equals only identical junk, never via Decimal("inf")
        ("NaN", "NaN", True),
        ("1.2.3", "1.2.3", True),
        (None, "5", False),
        ("5", None, False),
        (None, None, False),
        ("", "", False),
        ("$", "$", False),
    ],
)
def test_answers_equal_table(pred, gold, equal):
    assert answers_equal(pred, gold) is equal
    assert answers_equal(gold, pred) is equal


# --- properties -------------------------------------------------------------------------------------------


@given(prefix=safe_text, n=st.integers())
def test_strict_reads_formatted_int(prefix, n):
    assert extract_strict(f"{prefix} #### {n:,}") == str(n)


@given(prefix=safe_text, n=st.integers(), follow_up=st.integers())
def test_strict_takes_first_marker(prefix, n, follow_up):
    assert extract_strict(f"{prefix} #### {n:,}\n\nQuestion: #### {follow_up}") == str(n)


@given(parts=st.lists(st.tuples(safe_text, st.integers()), min_size=1, max_size=6), tail=safe_text)
def test_flexible_takes_last_formatted_int(parts, tail):
    text = "".join(f"{words} {n:,} " for words, n in parts) + tail
    assert extract_flexible(text) == str(parts[-1][1])
    assert extract_strict(text) is None


@given(n=st.integers(), dollar=st.booleans(), sign_first=st.booleans())
def test_normalize_formatted_int(n, dollar, sign_first):
    body = f"{abs(n):,}"
    sign = "-" if n < 0 else ""
    money = "$" if dollar else ""
    raw = f"{sign}{money}{body}" if sign_first else f"{money}{sign}{body}"
    assert normalize_number(raw) == str(n)


@given(n=st.integers(), zeros=st.integers(min_value=0, max_value=5),
       pad=st.integers(min_value=0, max_value=5))
def test_normalize_strips_padding_zeros(n, zeros, pad):
    sign = "-" if n < 0 else ""
    raw = f"{sign}{'0' * pad}{abs(n)}" + (f".{'0' * zeros}" if zeros else "")
    assert normalize_number(raw) == str(n)


numeric_like = st.from_regex(r"\A[ $+-]{0,2}[0-9,]{0,6}\.?[0-9,.]{0,6}[ .$]{0,3}\Z")


@given(raw=st.one_of(st.text(max_size=20), numeric_like))
def test_normalize_is_idempotent(raw):
    once = normalize_number(raw)
    assert normalize_number(once or "") == once  # a second pass changes nothing; None stays None


@given(raw=numeric_like)
def test_normalized_number_keeps_its_value(raw):
    cleaned = raw.replace(",", "").replace("$", "").strip().rstrip(".")
    out = normalize_number(raw)
    if re.fullmatch(PLAIN_NUMBER, cleaned):
        assert out is not None
        assert Decimal(out) == Decimal(cleaned)
        # canonical: no leading zeros, no trailing fraction zeros or point, no "-0"
        assert re.fullmatch(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?", out), out
        assert out != "-0"
    else:
        assert out is None or not re.fullmatch(PLAIN_NUMBER, out)


@given(d=st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-10**9, max_value=10**9))
def test_answers_equal_ignores_trailing_zero(d):
    plain = f"{d:f}"  # places=3 keeps a decimal point, so appending "0" does not change the value
    assert answers_equal(plain, f"{plain}0")
    assert not answers_equal(plain, f"{plain}1")


@given(text=st.text(max_size=60), numbers=st.lists(st.integers(), max_size=3))
def test_flexible_matches_lm_eval_reference(text, numbers):
    text = text + " ".join(f"{n:,}" for n in numbers)
    assert_same_as_lm_eval(extract_flexible(text), lm_eval_extract(text, LM_EVAL_FLEXIBLE, -1))


# --- gold answers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "gold"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("So the total is 1,000.\n#### 1,000", "1000"),
        ("He lost 3.\n#### -3", "-3"),
        ("first #### 5 then\n#### 6", "6"),
        ("#### 72\n", "72"),
        ("#### 72\nextra line 9", "72"),
        ("no marker, the answer is 5", None),
        ("#### ", None),
        ("#### seventy", None),
    ],
)
def test_gold_from_solution_table(solution, gold):
    assert gold_from_solution(solution) == gold


def _train_rows(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # The first rows, plus rows whose answer has thousands separators or a sign: the cases that break
    # naive parsing.
    plain = rows[: limit // 2]
    tricky = [r for r in rows if re.search(r"#### .*[,-]", r["answer"])][: limit - len(plain)]
    return plain + tricky


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=pytest.mark.shared_data("gsm8k"))],
                         ids=["synthetic", "real"])
def test_gold_from_solution_on_train_rows(real, gsm8k_dir):
    rows = _train_rows((SHARED_GSM8K if real else gsm8k_dir) / "train.jsonl", 20)
    assert len(rows) == 20
    assert any("," in r["answer"].rsplit("####", 1)[1] for r in rows)
    for row in rows:
        gold = gold_from_solution(row["answer"])
        assert gold is not None, row["answer"]
        assert re.fullmatch(r"-?[0-9]+", gold), gold
        final = row["answer"].rsplit("####", 1)[1].strip()
        assert int(gold) == int(final.replace(",", ""))
        # and it is what lm-eval's reference side becomes after its ignore regexes
        assert gold == lm_eval_extract(row["answer"], r"(?s)(.*)", 0)


# --- scoring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold", "strict_ok", "flex_ok"),
    [
        ("6 + 12 = 18\n#### 18", "18", True, True),
        ("6 + 12 = 18\n#### 18.00", "18", True, True),
        ("The answer is 18.", "18", False, True),
        ("#### 18\n\nQuestion: what is 3 + 4? Answer: 7", "18", True, False),
        ("The answer is 19.", "18", False, False),
        ("I don't know.", "18", False, False),
        ("#### $1,000", "1,000", False, True),  # lm-eval's strict pattern has no "$"
        ("#### 1,000", "$1,000", True, True),
    ],
)
def test_score_completion(completion, gold, strict_ok, flex_ok):
    answers, correct_strict, correct_flexible = score_completion(completion, gold)
    assert answers == extract_all(completion)
    assert (correct_strict, correct_flexible) == (strict_ok, flex_ok)


# --- reasoning tags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<start_working_out>3*6<end_working_out><SOLUTION>18</SOLUTION>", "18"),
        ("<SOLUTION> $1,000. </SOLUTION>", "1000"),
        ("<SOLUTION>5</SOLUTION> wait, <SOLUTION>\n6.0\n</SOLUTION>", "6"),
        ("<SOLUTION>about 5</SOLUTION>", "about 5"),
        ("<SOLUTION></SOLUTION>", None),
        ("<SOLUTION>18", None),
        ("the answer is 18", None),
    ],
)
def test_extract_solution_tag(text, expected):
    assert extract_solution_tag(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<start_working_out>6+12=18<end_working_out><SOLUTION>18</SOLUTION>", True),
        ("<start_working_out>\nmulti\nline\n<end_working_out>", True),
        ("<start_working_out>   <end_working_out><SOLUTION>18</SOLUTION>", False),
        ("<end_working_out>backwards<start_working_out>", False),
        ("<start_working_out>never closed", False),
        ("<SOLUTION>18</SOLUTION>", False),
    ],
)
def test_has_reasoning_section(text, expected):
    assert has_reasoning_section(text) is expected
