"""gsmkit.training.data: training rows from GSM8K or a jsonl of one of three shapes, minus the few-shot
pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsmkit.data.fewshot import draw_pool, pool_hashes
from gsmkit.data.gsm8k import load_gsm8k
from gsmkit.errors import DataError
from gsmkit.records import FewshotExample, Problem, content_hash
from gsmkit.training.data import TrainExample, load_train_examples, remove_fewshot, resolve_pool


def write_rows(path: Path, rows: list) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def raises(path: Path, rows: list, match: str) -> DataError:
    write_rows(path, rows)
    with pytest.raises(DataError, match=match) as err:
        load_train_examples(str(path))
    return err.value


# --- GSM8K ---------------------------------------------------------------------------------------


def test_gsm8k_folder_gives_question_answer_examples(small_gsm8k):
    examples = load_train_examples(str(small_gsm8k))
    rows = [json.loads(line) for line in (small_gsm8k / "train.jsonl").read_text().splitlines()]
    assert len(examples) == len(rows) == 40
    assert [(e.question, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in rows]
    assert {e.kind for e in examples} == {"qa"}
    assert examples[0].key_text == rows[0]["question"]
    assert examples[0].where == f"{small_gsm8k}[train]:{Problem.from_dict(rows[0], 'x').id}"


def test_gsm8k_split_is_honoured(small_gsm8k):
    test = load_train_examples(str(small_gsm8k), split="test")
    assert [e.question for e in test] == [p.question for p in load_gsm8k(small_gsm8k, "test")]
    assert len(test) == 6


def test_gsm8k_jsonl_file_is_read_row_by_row(small_gsm8k):
    path = small_gsm8k / "train.jsonl"
    examples = load_train_examples(str(path))
    assert len(examples) == 40 and examples[0].where == f"{path}:1" and examples[-1].where == f"{path}:40"


def test_gsm8k_json_array_goes_through_the_gsm8k_loader(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]))
    (ex,) = load_train_examples(str(path))
    assert (ex.question, ex.kind) == ("What is 1 + 1?", "qa") and ex.where.startswith(f"{path}:gsm8k-")
    path.write_text(json.dumps([{"question": "What is 1 + 1?", "answer": "two"}]))
    with pytest.raises(DataError, match="####"):  # GSM8K files keep GSM8K's rules
        load_train_examples(str(path))


# --- jsonl of each shape -------------------------------------------------------------------------


def test_traces_jsonl_needs_no_final_answer_line(tmp_path):
    path = write_rows(tmp_path / "traces.jsonl", [
        {"id": "gsm8k-1", "question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4", "gold": "4",
         "model": "m"},
        "",
        {"question": "What is 3 + 3?", "answer": "It is six."},
    ])
    a, b = load_train_examples(str(path))
    assert (a.kind, a.question, a.answer) == ("qa", "What is 2 + 2?", "2 + 2 = 4\n#### 4")
    assert a.where == f"{path}:1"
    assert (b.answer, b.where, b.key_text) == ("It is six.", f"{path}:3", "What is 3 + 3?")
    assert a.prompt is None and a.messages is None


def test_prompt_response_jsonl(tmp_path):
    path = write_rows(tmp_path / "pr.jsonl", [{"prompt": "Q: 2 + 2?\nA:", "response": " 4", "note": 1},
                                              {"prompt": "Q: 3 + 3?\nA:", "response": " 6"}])
    examples = load_train_examples(str(path))
    assert [(e.kind, e.prompt, e.response) for e in examples] == [("pr", "Q: 2 + 2?\nA:", " 4"),
                                                                   ("pr", "Q: 3 + 3?\nA:", " 6")]
    assert examples[1].key_text == "Q: 3 + 3?\nA:" and examples[1].question is None


def test_messages_jsonl(tmp_path):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?", "name": "kim"},
                {"role": "assistant", "content": "6"}]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    (ex,) = load_train_examples(str(path))
    assert ex.kind == "messages" and ex.messages == tuple(messages) and isinstance(ex.messages, tuple)
    assert ex.key_text == "And 3 + 3?"  # the last user message identifies the example


# --- errors --------------------------------------------------------------------------------------


def test_bad_json_line_names_the_line(tmp_path):
    raises(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}, "{not json"],
           r"a\.jsonl:2: not valid JSON")


def test_missing_field_names_it_and_lists_the_shapes(tmp_path):
    err = raises(tmp_path / "a.jsonl", [{"question": "What?"}], r"a\.jsonl:1: field 'answer': missing$")
    assert '"question", "answer"' in err.hint and '"prompt", "response"' in err.hint
    assert '"messages"' in err.hint
    raises(tmp_path / "b.jsonl", [{"response": "x"}], r"b\.jsonl:1: field 'prompt': missing")
    err = raises(tmp_path / "c.jsonl", [{"text": "x", "label": 1}],
                 r"c\.jsonl:1: no 'question', 'prompt' or 'messages'")
    assert "'text'" in str(err) and '"messages"' in err.hint


@pytest.mark.parametrize(("row", "match"), [
    ({"question": "q", "answer": 5}, r"field 'answer': must be a string, got number"),
    ({"question": None, "answer": "a"}, r"field 'question': must be a string, got null"),
    ({"question": "q", "answer": "  \n"}, r"field 'answer': empty"),
    ({"prompt": "", "response": "r"}, r"field 'prompt': empty"),
    ({"messages": "hi"}, r"field 'messages': must be an array, got string"),
    ({"messages": []}, r"field 'messages': empty"),
    ({"messages": [{"role": "user", "content": "q"}, "a"]}, r"field 'messages\[1\]': must be an object"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     r"field 'messages\[0\]\.content': missing"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     r"field 'messages\[1\]\.content': must be a string, got array"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     r"field 'messages\[1\]\.role': the last message must be the assistant's, got 'user'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     r"field 'messages\[1\]\.content': empty"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     r"field 'messages': no user message"),
    ({"question": "q", "answer": "a", "prompt": "p", "response": "r"},
     r"row has the fields of more than one shape"),
])
def test_wrong_rows_name_line_and_field(tmp_path, row, match):
    rows = [{"question": "fine", "answer": "fine"}, row] if "question" in row else [row]
    raises(tmp_path / "x.jsonl", rows, r"x\.jsonl:\d: " + match)


def test_mixed_shapes_in_one_file_are_an_error(tmp_path):
    err = raises(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"},
                                        {"prompt": "p", "response": "r"}],
                 r"m\.jsonl:3: a prompt/response row, but .*m\.jsonl:1 is a question/answer row")
    assert "same shape" in err.hint


def test_empty_and_missing_files_are_data_errors(tmp_path):
    raises(tmp_path / "empty.jsonl", ["", "  "], r"empty\.jsonl: file is empty")
    with pytest.raises(DataError, match="file not found"):
        load_train_examples(str(tmp_path / "absent.jsonl"))


# --- few-shot removal ----------------------------------------------------------------------------


def _pool(*questions: str) -> set[str]:
    return pool_hashes(FewshotExample.from_problem(Problem.from_dict({"question": q, "answer": "#### 1"},
                                                                      "p"))
                       for q in questions)


def test_remove_fewshot_matches_content_hash_despite_whitespace():
    hashes = _pool("What is 2 + 2?", "How many clips did Natalia sell?")
    examples = [
        TrainExample(where="a:1", question="  What is\t2 +\n2?  ", answer="4"),
        TrainExample(where="a:2", question="What is 3 + 3?", answer="6"),
        TrainExample(where="b:1", prompt="How many clips did   Natalia sell?", response="72"),
        TrainExample(where="c:1", messages=({"role": "user", "content": "How many\nclips did Natalia sell?"},
                                            {"role": "assistant", "content": "72"})),
        TrainExample(where="c:2", messages=({"role": "user", "content": "What is 2 + 2?"},
                                            {"role": "assistant", "content": "4"},
                                            {"role": "user", "content": "Why?"},
                                            {"role": "assistant", "content": "Arithmetic."})),
        TrainExample(where="a:3", question="what is 2 + 2?", answer="4"),  # another case: another problem
    ]
    kept, removed = remove_fewshot(examples, hashes)
    assert [e.where for e in kept] == ["a:2", "c:2", "a:3"]
    clips = content_hash("How many clips did Natalia sell?")
    assert removed == [content_hash("What is 2 + 2?"), clips, clips]


def test_remove_real_pool_from_real_train(small_gsm8k):
    examples = load_train_examples(str(small_gsm8k))
    pool = draw_pool(load_gsm8k(small_gsm8k, "train"), 8, seed=42)
    kept, removed = remove_fewshot(examples, pool_hashes(pool))
    assert len(kept) == 32 and sorted(removed) == sorted(pool_hashes(pool))
    assert not {content_hash(e.key_text) for e in kept} & pool_hashes(pool)
    assert kept == [e for e in examples if content_hash(e.question) not in pool_hashes(pool)]


def test_train_example_needs_exactly_one_shape():
    with pytest.raises(ValueError):
        TrainExample(where="x", question="q", answer="a", prompt="p", response="r")
    with pytest.raises(ValueError):
        TrainExample(where="x", question="q")


def test_remove_fewshot_catches_pool_questions_wrapped_in_prompts():
    from gsmkit.records import content_hash
    from gsmkit.training.data import TrainExample, remove_fewshot

    q = "Tom has 3  apples and buys 4 more. How many?"
    rows = [
        TrainExample(where="a:1", prompt=f"Question: {q}\nAnswer:", response=" 7"),
        TrainExample(where="a:2", prompt="Question: something else\nAnswer:", response=" 1"),
        TrainExample(where="a:3", messages=({"role": "user", "content": "Solve: " + q.replace("  ", " ")},
                                            {"role": "assistant", "content": "7"})),
    ]
    kept, removed = remove_fewshot(rows, {content_hash(q)}, [q])
    assert [ex.where for ex in kept] == ["a:2"]
    assert removed == [content_hash(q), content_hash(q)]
    kept_by_hash_only, _ = remove_fewshot(rows, {content_hash(q)})
    assert len(kept_by_hash_only) == 3  # a wrapped question is only caught by containment


def test_the_pool_kept_out_is_the_given_file_then_the_local_default(tmp_path, monkeypatch, small_gsm8k):
    from gsmkit.data.fewshot import write_pool

    given, local = tmp_path / "given.jsonl", tmp_path / "fewshot_pool.jsonl"
    problems = load_gsm8k(small_gsm8k, "train")
    write_pool(given, draw_pool(problems, 2, 0))
    write_pool(local, draw_pool(problems, 3, 1))
    monkeypatch.chdir(tmp_path)
    pool = resolve_pool(given, str(small_gsm8k))
    assert (len(pool.examples), pool.origin, pool.path) == (2, str(given), given)
    pool = resolve_pool(None, str(small_gsm8k))  # ./fewshot_pool.jsonl, hashed as an input like a given one
    assert (len(pool.examples), pool.path) == (3, Path("fewshot_pool.jsonl"))
    local.unlink()
    import gsmkit.data.gsm8k as gsm8k_mod

    asked = []
    monkeypatch.setattr(gsm8k_mod, "load_gsm8k", lambda source, _split: asked.append(source) or problems)
    pool = resolve_pool(None, str(small_gsm8k), traces="traces.jsonl")  # traces: the pool is GSM8K train's
    assert asked == ["openai/gsm8k"] and pool.path is None and len(pool.examples) == 8
    assert pool.origin == "default pool of openai/gsm8k (n=8, seed=42)"
