"""`eval ppl`: the numbers equal a hand computation, response-only vs whole-text scoring, metadata
groups, sliding windows that score every token once, batching that changes nothing, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_clean_failure
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.evaluation.perplexity import EvalPplSettings, evaluate_ppl
from gsmkit.evaluation.ppl_items import sliding_windows
from gsmkit.modeling import ModelSpec
from gsmkit.tokenization import IGNORE_INDEX as IGNORE

runner = CliRunner()
PROMPT = "Question: How many apples are left?\nAnswer:"
RESPONSE = " She has 12 - 5 = 7 apples left.\n#### 7"
LONG = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? ") * 2


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(model_dir: Path, data: Path, out: Path, **kw):
    return evaluate_ppl(EvalPplSettings(model=ModelSpec(str(model_dir), device="cpu"), data=data, out=out,
                                        **kw))


def _items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _hand_nll(model, ids: list[int], targets, begin: int = 0) -> float:
    """Sum of -log p(ids[t] | ids[begin:t]) over `targets`, log-softmax written out, in float64."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids[begin:]])).logits[0].double()
    total = 0.0
    for t in targets:
        row = logits[t - 1 - begin]
        top = row.max()
        log_z = top + torch.log(torch.exp(row - top).sum())
        total -= float(row[ids[t]] - log_z)
    return total


def _split(tok, prompt: str, whole: str) -> tuple[list[int], int]:
    """Token ids of `whole` and the index of its first token starting at or after the prompt's end."""
    enc = tok(whole, add_special_tokens=False, return_offsets_mapping=True)
    cut = next(i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(prompt))
    return list(enc["input_ids"]), cut


def test_matches_hand_log_softmax_in_both_modes(tmp_path, tiny_model_dir, tiny):
    model, tok = tiny
    bare = tok("a", add_special_tokens=False)["input_ids"]
    assert tok("a", add_special_tokens=True)["input_ids"] == bare, \
        "the tiny tokenizer adds no BOS, so the first token is unscored"
    data = _write(tmp_path / "d.jsonl",
                  [{"prompt": PROMPT, "response": RESPONSE}, {"text": PROMPT + RESPONSE}])
    metrics = _run(tiny_model_dir, data, tmp_path / "out")
    pr, text = _items(tmp_path / "out")

    ids, cut = _split(tok, PROMPT, PROMPT + RESPONSE)
    response_nll = _hand_nll(model, ids, range(cut, len(ids)))
    text_nll = _hand_nll(model, ids, range(1, len(ids)))
    assert (pr["mode"], pr["tokens"], text["mode"], text["tokens"]) == \
        ("response", len(ids) - cut, "text", len(ids) - 1)
    assert pr["loss"] == pytest.approx(response_nll / pr["tokens"], rel=1e-5)
    assert text["loss"] == pytest.approx(text_nll / text["tokens"], rel=1e-5)
    assert pr["ppl"] == pytest.approx(math.exp(pr["loss"]), rel=1e-9)
    # Response-only scores a strict subset of the text's tokens; the overall mean is token-weighted.
    assert 0 < pr["tokens"] < text["tokens"]
    assert metrics.tokens == pr["tokens"] + text["tokens"]
    assert metrics.loss == pytest.approx((response_nll + text_nll) / metrics.tokens, rel=1e-5)
    assert metrics.ppl == pytest.approx(math.exp(metrics.loss), rel=1e-9)
    assert metrics.windows == 2 and metrics.items_over_window == 0 and metrics.max_length == 4096


def test_groups_items_and_files_through_the_cli(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": PROMPT, "response": RESPONSE,
         "metadata": {"source": "gsm8k", "difficulty": "easy", "id": 1}},
        {"prompt": "Q: 2+2?\nA:", "response": " 4", "metadata": {"source": "gsm8k", "difficulty": 3}},
        {"text": LONG, "metadata": {"source": "svamp", "domain": "arithmetic"}},
        {"text": "no metadata here at all"},
    ]
    data = _write(tmp_path / "bench.jsonl", rows)
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(data),
                              "--out", str(out), "--device", "cpu", "--batch-size", "3", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    items = _items(out)
    assert [it["index"] for it in items] == [0, 1, 2, 3] and [it["line"] for it in items] == [1, 2, 3, 4]
    assert items[0]["source"] == "gsm8k" and items[1]["difficulty"] == "3" and "source" not in items[3]
    assert set(items[0]) == {"index", "line", "mode", "source", "difficulty", "tokens", "loss", "ppl",
                             "windows"}

    groups = summary["groups"]
    assert sorted(groups) == ["difficulty", "domain", "source"]
    gsm = groups["source"]["gsm8k"]
    nll = sum(it["loss"] * it["tokens"] for it in items[:2])
    assert gsm["n"] == 2 and gsm["tokens"] == items[0]["tokens"] + items[1]["tokens"]
    assert gsm["loss"] == pytest.approx(nll / gsm["tokens"], rel=1e-9)  # token-weighted, not a mean of means
    assert gsm["ppl"] == pytest.approx(math.exp(gsm["loss"]), rel=1e-9)
    assert groups["source"]["svamp"]["n"] == 1
    assert groups["domain"] == {"arithmetic": groups["source"]["svamp"]}
    assert summary["n"] == 4 and summary["tokens"] == sum(it["tokens"] for it in items)

    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics["groups"] == groups and metrics["manifest"] == manifest
    assert manifest["command"] == "eval ppl" and manifest["inputs"]["data"]["sha256"]
    assert manifest["resolved"]["max_length"] == 4096 and manifest["resolved"]["stride"] == 2048
    assert "wall_s" in metrics and not list(out.glob(".*.tmp"))

    again = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(data),
                                "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    limited = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(data), "--out",
                                  str(out), "--limit", "2", "--overwrite", "--json"])
    assert limited.exit_code == 0 and json.loads(limited.stdout)["n"] == 2 and len(_items(out)) == 2


def test_sliding_window_scores_each_token_once_with_its_window_context(tmp_path, tiny_model_dir, tiny):
    model, tok = tiny
    ids = tok(LONG, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    data = _write(tmp_path / "long.jsonl", [{"text": LONG}])
    windowed = _run(tiny_model_dir, data, tmp_path / "w", max_length=16, stride=6)
    (item,) = _items(tmp_path / "w")
    assert item["tokens"] == len(ids) - 1 and item["windows"] == windowed.windows > 1
    assert windowed.items_over_window == 1

    # The same number by hand: window k covers [6k, 6k+16) and scores what the previous window did not.
    labels = [IGNORE] + ids[1:]
    expected = 0.0
    for w in sliding_windows(ids, labels, 16, 6):
        targets = [w.begin + j for j, lb in enumerate(w.labels) if lb != IGNORE]
        assert targets[0] - w.begin >= 16 - 6 or w.begin == 0  # at least window - stride tokens of context
        expected += _hand_nll(model, ids[:w.end], targets, begin=w.begin)
    assert item["loss"] == pytest.approx(expected / item["tokens"], rel=1e-5)

    # A window covering the whole text is the plain full-context computation.
    full = _run(tiny_model_dir, data, tmp_path / "f", max_length=len(ids), stride=4)
    assert full.windows == 1
    assert full.loss == pytest.approx(_hand_nll(model, ids, range(1, len(ids))) / (len(ids) - 1), rel=1e-5)
    assert full.tokens == windowed.tokens


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 80), window=st.integers(2, 20), data=st.data())
def test_windows_partition_the_scored_tokens(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    first = data.draw(st.integers(1, n))  # tokens before `first` are prompt (not scored)
    ids = list(range(100, 100 + n))
    labels = [IGNORE if t < max(first, 1) else ids[t] for t in range(n)]
    seen = []
    for w in sliding_windows(ids, labels, window, stride):
        assert w.end - w.begin <= window and w.input_ids == ids[w.begin:w.end]
        assert w.labels[0] == IGNORE  # a window's first token has no context inside it
        seen += [w.begin + j for j, lb in enumerate(w.labels) if lb != IGNORE]
    assert seen == [t for t in range(n) if labels[t] != IGNORE]


def test_length_sorted_batches_equal_batch_size_one(tmp_path, tiny_model_dir):
    rows = [{"text": LONG[: 20 + 37 * i]} if i % 2
            else {"prompt": PROMPT * (1 + i % 3), "response": RESPONSE[: 8 + 5 * i]}
            for i in range(7)]
    data = _write(tmp_path / "mixed.jsonl", rows)
    one = _run(tiny_model_dir, data, tmp_path / "one", batch_size=1)
    many = _run(tiny_model_dir, data, tmp_path / "many", batch_size=4, max_length=24)
    batched = _run(tiny_model_dir, data, tmp_path / "batched", batch_size=4)
    assert one.tokens == many.tokens == batched.tokens
    for a, b in zip(_items(tmp_path / "one"), _items(tmp_path / "batched"), strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert one.loss == pytest.approx(batched.loss, rel=1e-5)
    assert many.windows > len(rows)  # a shorter window splits the long items


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("", ["file is empty"]),
        ('{"text": "fine"}\n{"metadata": {"source": "x"}}\n',
         [":2:", "neither 'prompt'/'response' nor 'text'"]),
        ('{"prompt": "p"}\n', [":1:", "missing field 'response'"]),
        ('{"text": "x", "prompt": "p", "response": "r"}\n', [":1:", "more than one shape"]),
        ('{"text": 3}\n', [":1:", "'text'", "string"]),
        ('{"text": "a"}\n', [":1:", "nothing to score"]),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir, content, needles):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(data),
                              "--out", str(out)])
    assert_clean_failure(res, out, 1, str(data), *needles)


def test_missing_file_and_misused_options(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    base = ["eval", "ppl", "--model", str(tiny_model_dir), "--out", str(out)]
    res = runner.invoke(app, [*base, "--data", str(tmp_path / "nope.jsonl")])
    assert_clean_failure(res, out, 1, "nope.jsonl", "file not found")
    data = _write(tmp_path / "d.jsonl", [{"text": LONG}])
    res = runner.invoke(app, [*base, "--data", str(data), "--max-length", "8", "--stride", "8"])
    assert_clean_failure(res, out, 2, "--stride")
    res = runner.invoke(app, [*base, "--data", str(data), "--max-length", "5000"])
    assert_clean_failure(res, out, 1, "4096")
