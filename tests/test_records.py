"""gsmkit.records: field validation that names the field, content-derived ids, gold normalisation."""

from __future__ import annotations

import hashlib
import re
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsmkit.errors import DataError
from gsmkit.fields import field_help
from gsmkit.records import (
    FewshotExample,
    Prediction,
    Problem,
    content_hash,
    normalize_text,
    problem_id,
)

WHERE = "data.jsonl:7"
ROW = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}


def _error(obj, cls=Problem) -> str:
    with pytest.raises(DataError) as info:
        cls.from_dict(obj, WHERE)
    return str(info.value)


# --- Problem ------------------------------------------------------------------------------------


def test_problem_from_dict_fills_id_and_gold():
    p = Problem.from_dict(ROW, WHERE)
    assert p.question == ROW["question"] and p.answer == ROW["answer"]
    assert p.gold == "7"
    assert p.id == problem_id(ROW["question"])
    assert re.fullmatch(r"gsm8k-[0-9a-f]{16}", p.id)
    assert p.sha256 == content_hash(ROW["question"])


def test_problem_to_dict_round_trip():
    p = Problem.from_dict(ROW, WHERE)
    assert p.to_dict() == {"id": p.id, "question": p.question, "answer": p.answer, "gold": "7"}
    assert Problem.from_dict(p.to_dict(), WHERE) == p


@pytest.mark.parametrize("field", ["question", "answer"])
def test_missing_field_is_named(field):
    row = {k: v for k, v in ROW.items() if k != field}
    assert _error(row) == f"{WHERE}: missing field '{field}'"


@pytest.mark.parametrize(("value", "kind"), [(3, "int"), (None, "NoneType"), (["q"], "list"), (True, "bool")])
def test_wrong_type_is_named(value, kind):
    msg = _error({**ROW, "question": value})
    assert msg.startswith(f"{WHERE}: field 'question' must be str")
    assert msg.endswith(f"got {kind}")


@pytest.mark.parametrize("value", ["", "   \n\t"])
def test_empty_question_is_named(value):
    assert _error({**ROW, "question": value}) == f"{WHERE}: field 'question' is empty"


def test_empty_answer_is_named():
    assert _error({**ROW, "answer": " "}) == f"{WHERE}: field 'answer' is empty"


@pytest.mark.parametrize("answer", ["The answer is 7.", "#### ", "#### seven", "7 ####"])
def test_answer_without_final_number_and_no_gold(answer):
    msg = _error({**ROW, "answer": answer})
    assert msg.startswith(f"{WHERE}: field 'answer' has no final '#### <number>' line")


def test_explicit_gold_rescues_answer_without_marker():
    p = Problem.from_dict({**ROW, "answer": "It is seven.", "gold": "7"}, WHERE)
    assert p.gold == "7"


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("so #### 1,000", "1000"),
        ("#### $1,250.50", "1250.5"),
        ("#### -3", "-3"),
        ("#### 007", "7"),
        ("#### 5.00", "5"),
        ("a #### 2\nb #### 18", "18"),  # the LAST marker is the final answer
    ],
)
def test_gold_is_normalised_from_solution(answer, gold):
    assert Problem.from_dict({**ROW, "answer": answer}, WHERE).gold == gold


@pytest.mark.parametrize(("given", "gold"),
                         [("1,000", "1000"), (1000, "1000"), (2.5, "2.5"), (1000.0, "1000")])
def test_given_gold_is_normalised(given, gold):
    assert Problem.from_dict({**ROW, "gold": given}, WHERE).gold == gold


@pytest.mark.parametrize("given", ["", "  ", "seven", "1.2.3", float("nan")])
def test_given_gold_must_be_a_number(given):
    assert _error({**ROW, "gold": given}).startswith(f"{WHERE}: field 'gold' must be a number")


@pytest.mark.parametrize("given", [True, [7], {"v": 7}])
def test_given_gold_wrong_type(given):
    assert _error({**ROW, "gold": given}).startswith(f"{WHERE}: field 'gold' must be a string or number")


def test_given_id_is_kept_and_must_be_a_string():
    assert Problem.from_dict({**ROW, "id": "my-1"}, WHERE).id == "my-1"
    assert _error({**ROW, "id": 12}).startswith(f"{WHERE}: field 'id' must be a string")


def test_errors_carry_a_hint():
    with pytest.raises(DataError) as info:
        Problem.from_dict({"question": "q"}, WHERE)
    assert "####" in info.value.hint


# --- ids and hashes -----------------------------------------------------------------------------


def test_ids_are_whitespace_insensitive():
    assert problem_id("a  b\n") == problem_id("a b")
    assert problem_id("\t a\n\nb ") == problem_id("a b")
    assert content_hash("a  b\n") == content_hash("a b")


def test_ids_depend_on_content():
    assert problem_id("a b") != problem_id("a c")
    assert problem_id("ab") != problem_id("a b")
    assert problem_id("A b") != problem_id("a b")  # case is content


def test_content_hash_is_sha256_of_normalised_text():
    assert normalize_text("  x \n y\t") == "x y"
    assert content_hash(" x \n y ") == hashlib.sha256(b"x y").hexdigest()
    assert problem_id(" x \n y ") == "gsm8k-" + hashlib.sha256(b"x y").hexdigest()[:16]


@given(st.text(alphabet=st.sampled_from(list("ab 1\t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\u200b")),
               max_size=30))
def test_normalize_text_matches_regex_definition(text):
    """Whitespace is what regex `\\s` means (Unicode), so ids stay stable whatever the implementation."""
    assert normalize_text(text) == re.sub(r"\s+", " ", text).strip()


def test_same_question_same_id_whatever_the_whitespace():
    a = Problem.from_dict({**ROW, "question": "How  many\napples?"}, WHERE)
    b = Problem.from_dict({**ROW, "question": "How many apples?"}, WHERE)
    assert a.id == b.id and a.sha256 == b.sha256


# --- FewshotExample -----------------------------------------------------------------------------


def test_fewshot_round_trip_and_hash():
    ex = FewshotExample.from_problem(Problem.from_dict(ROW, WHERE))
    assert ex.sha256 == content_hash(ROW["question"])
    assert FewshotExample.from_dict(ex.to_dict(), WHERE) == ex
    assert ex.to_problem() == Problem.from_dict(ROW, WHERE)


def test_fewshot_hash_mismatch_is_an_error():
    ex = FewshotExample.from_problem(Problem.from_dict(ROW, WHERE)).to_dict()
    ex["question"] = ex["question"] + " Then he eats one."
    msg = _error(ex, FewshotExample)
    assert msg == f"{WHERE}: field 'sha256' does not match the question's content hash"


def test_fewshot_hash_survives_whitespace_edits():
    ex = FewshotExample.from_problem(Problem.from_dict(ROW, WHERE)).to_dict()
    ex["question"] = "  " + ex["question"].replace(" ", "  ") + "\n"
    assert FewshotExample.from_dict(ex, WHERE).sha256 == content_hash(ROW["question"])


def test_fewshot_without_hash_gets_one():
    assert FewshotExample.from_dict(ROW, WHERE).sha256 == content_hash(ROW["question"])


# --- Prediction ---------------------------------------------------------------------------------

PRED = {
    "id": "gsm8k-0123456789abcdef",
    "prompt_sha256": "ab" * 32,
    "completion": "3 + 4 = 7\n#### 7",
    "strict": "7",
    "flexible": "7",
    "gold": "7",
    "correct_strict": True,
    "correct_flexible": True,
    "num_prompt_tokens": 40,
    "num_tokens": 9,
    "finish_reason": "stop",
    "reasoning": None,
    "ended_in_reasoning": False,
    "reasoning_tokens": None,
    "answer_tokens": 8,
    "budget_forced": False,
}
# A row written before schema 2 (no reasoning fields): still read, with the documented defaults.
PRED_V1 = {k: v for k, v in PRED.items() if k not in Prediction.OPTIONAL}


def test_prediction_round_trip():
    pred = Prediction.from_dict(PRED, WHERE)
    assert pred.to_dict() == PRED
    assert Prediction.from_dict({**PRED, "strict": None, "flexible": None}, WHERE).strict is None


def test_prediction_fixture_covers_every_field():
    assert set(PRED) == {f.name for f in fields(Prediction)}


def test_prediction_of_schema_1_reads_with_defaults():
    pred = Prediction.from_dict(PRED_V1, WHERE)
    assert pred.to_dict() == {**PRED_V1, "reasoning": None, "ended_in_reasoning": False,
                              "reasoning_tokens": None, "answer_tokens": None, "budget_forced": False}
    thinking = {**PRED, "reasoning": "3 + 4 = 7, #### 6", "ended_in_reasoning": True, "strict": None,
                "flexible": None, "reasoning_tokens": 11, "answer_tokens": None}
    assert Prediction.from_dict(thinking, WHERE).to_dict() == thinking
    schema_2 = {k: v for k, v in thinking.items() if k != "budget_forced"}
    assert Prediction.from_dict(schema_2, WHERE).to_dict() == {**schema_2, "budget_forced": False}
    forced = {**PRED, "reasoning": "3 + 4", "budget_forced": True, "reasoning_tokens": 4}
    assert Prediction.from_dict(forced, WHERE).to_dict() == forced


@pytest.mark.parametrize(("field", "value"), [("reasoning", 3), ("ended_in_reasoning", None),
                                              ("ended_in_reasoning", 1), ("reasoning_tokens", "4"),
                                              ("budget_forced", None), ("budget_forced", 0)])
def test_prediction_optional_fields_are_typed(field, value):
    assert _error({**PRED, field: value}, Prediction).startswith(f"{WHERE}: field '{field}' must be")


@pytest.mark.parametrize("field", sorted(PRED_V1))
def test_prediction_requires_every_field(field):
    row = {k: v for k, v in PRED.items() if k != field}
    assert _error(row, Prediction) == f"{WHERE}: missing field '{field}'"


@pytest.mark.parametrize(
    ("field", "value"),
    [("correct_strict", "yes"), ("num_tokens", "9"), ("num_tokens", True), ("gold", 7), ("strict", 7),
     ("id", None)],
)
def test_prediction_field_types(field, value):
    assert _error({**PRED, field: value}, Prediction).startswith(f"{WHERE}: field '{field}' must be")


def test_prediction_ignores_extra_fields():
    assert Prediction.from_dict({**PRED, "extra": 1}, WHERE).to_dict() == PRED


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("strict", 7, "str or null, got int"), ("num_tokens", "9", "int, got str"),
    ("correct_strict", 1, "bool, got int"),
])
def test_prediction_type_errors_name_the_annotated_types(field, value, expected):
    # the accepted types come from the field annotations, so the message names them as declared
    assert _error({**PRED, field: value}, Prediction) == f"{WHERE}: field '{field}' must be {expected}"


@pytest.mark.parametrize("cls", [Problem, FewshotExample, Prediction])
def test_every_record_field_has_help(cls):
    # docs/formats.md's field tables are generated from these meanings (scripts/gen_format_docs.py)
    assert set(field_help(cls)) == {f.name for f in fields(cls)}


def test_problem_required_fields_are_the_ones_from_dict_requires():
    assert Problem.REQUIRED == ("question", "answer")
    for name in {f.name for f in fields(Problem)} - set(Problem.REQUIRED):
        row = {**ROW, "gold": "7", "id": "x"}
        del row[name]
        Problem.from_dict(row, WHERE)  # id and gold may be left out


def test_records_stay_frozen():
    p = Problem.from_dict(ROW, WHERE)
    with pytest.raises(AttributeError):
        p.question = "other"  # type: ignore[misc]
