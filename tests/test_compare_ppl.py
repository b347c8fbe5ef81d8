"""`gsmkit compare` of two `eval ppl` runs (the validate-merge-validate check): real runs on the tiny model,
then one changed by hand; tolerance exit codes and refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()
ROWS = [{"prompt": "Q: 1+1?\nA:", "response": " 2", "metadata": {"source": "gsm8k"}},
        {"prompt": "Q: 2+3?\nA:", "response": " 5", "metadata": {"source": "gsm8k"}},
        {"text": "seven apples and three pears make ten fruits", "metadata": {"source": "svamp"}}]


@pytest.fixture(scope="module")
def ppl_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ppl")
    data = root / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--data", str(data),
                              "--device", "cpu", "--dtype", "float32", "--out", str(root / "a")])
    assert res.exit_code == 0, res.output
    return root / "a"


def _copy(run, dest, edit=None):
    shutil.copytree(run, dest)
    if edit is not None:
        items = [json.loads(line) for line in (dest / "items.jsonl").read_text().splitlines()]
        edit(items)
        (dest / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return dest


def _compare(*args):
    res = runner.invoke(app, ["compare", *map(str, args), "--json"])
    return res.exit_code, (json.loads(res.stdout) if res.stdout.strip().startswith("{") else res.output)


def test_identical_runs_agree_within_the_tolerance(tmp_path, ppl_run):
    b = _copy(ppl_run, tmp_path / "b")
    code, out = _compare(ppl_run, b, "--ppl-tolerance", "1e-4", "--out", tmp_path / "cmp.json")
    assert code == 0, out
    assert out["passed"] is True and out["n"] == 3 and out["loss_diff_max_abs"] == 0.0
    groups = {g["group"]: g for g in out["groups"]}
    assert set(groups) == {"all", "source=gsm8k", "source=svamp"} and groups["source=gsm8k"]["n"] == 2
    metrics = json.loads((ppl_run / "metrics.json").read_text())
    assert groups["all"]["ppl_a"] == pytest.approx(metrics["ppl"], rel=1e-12)
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["manifest"]["command"] == "compare" and written["groups"] == out["groups"]


def test_a_row_scored_differently_misses_the_tolerance_with_exit_3(tmp_path, ppl_run):
    def shift(items):
        items[2]["loss"] += 1e-3  # the svamp row only

    b = _copy(ppl_run, tmp_path / "b", shift)
    code, out = _compare(ppl_run, b, "--ppl-tolerance", "1e-4")
    assert code == 3
    groups = {g["group"]: g for g in out["groups"]}
    assert groups["source=gsm8k"]["passed"] is True and groups["source=svamp"]["passed"] is False
    assert groups["source=svamp"]["rel_diff"] == pytest.approx(math.expm1(1e-3), rel=1e-6)
    assert out["loss_diff_max_abs"] == pytest.approx(1e-3) and out["loss_diff_max_line"] == 3
    code, out = _compare(ppl_run, b)  # without a tolerance: reported, not checked
    assert code == 0 and out["passed"] is None


def test_runs_of_different_rows_or_kinds_are_refused(tmp_path, ppl_run):
    b = _copy(ppl_run, tmp_path / "b", lambda items: items.pop())
    code, out = _compare(ppl_run, b)
    assert code == 1 and "different rows" in out
    c = _copy(ppl_run, tmp_path / "c", lambda items: items[0].update(tokens=items[0]["tokens"] + 1))
    code, out = _compare(ppl_run, c)
    assert code == 1 and "same tokenizer" in out
    code, out = _compare(ppl_run, tmp_path / "nothing")
    assert code == 1 and "is not" in out
    res = runner.invoke(app, ["compare", str(tmp_path / "x"), str(tmp_path / "y"), "--ppl-tolerance", "-1"])
    assert res.exit_code == 2


def test_ppl_tolerance_on_gsm8k_runs_is_a_usage_error(tmp_path, ppl_run):
    from study_fixtures import eval_gsm8k_run

    a = eval_gsm8k_run(tmp_path / "a", [True, False])
    b = eval_gsm8k_run(tmp_path / "b", [True, True])
    code, out = _compare(a, b, "--ppl-tolerance", "1e-4")
    assert code == 2 and "eval ppl" in out
    code, out = _compare(a, ppl_run)
    assert code == 1 and "is an `eval ppl` run but" in out
