"""`gsmkit compare` and gsmkit.studies.predictions: finished `eval gsm8k` folders read back, paired by problem
id, compared with hand-computed numbers; refusals (different problems, unfinished runs, bad rows) and exit
codes through the CLI.

The evaluation folders are written by the real writers: `Prediction` rows, `evaluation.gsm8k.summarize`
for metrics.json, `build_manifest("eval gsm8k", ...)`, published by `RunOutput`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit import cli
from gsmkit.cli.compare import compare as compare_command
from gsmkit.errors import DataError
from gsmkit.evaluation.gsm8k import METRICS, PARTIAL, PREDICTIONS, run_output, summarize
from gsmkit.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval
from gsmkit.manifest import build_manifest
from gsmkit.records import Prediction
from gsmkit.run_folder import FINGERPRINT, MANIFEST, json_writer, jsonl_writer
from gsmkit.studies.compare import CompareSettings, compare, compare_evaluations
from gsmkit.studies.predictions import check_same_problems, load_evaluation, paired

runner = CliRunner()
N = 64


def _pid(i: int) -> str:
    return f"gsm8k-{i:016x}"


def _prediction(i: int, strict_ok: bool, flex_ok: bool, gold: str | None = None) -> Prediction:
    gold = gold or str(10 + i)
    strict = gold if strict_ok else (None if i % 2 else str(1000 + i))  # wrong answers: none, or a wrong one
    flexible = gold if flex_ok else str(2000 + i)
    return Prediction(id=_pid(i), prompt_sha256="0" * 64, completion=f"... #### {strict}", strict=strict,
                      flexible=flexible, gold=gold, correct_strict=strict_ok, correct_flexible=flex_ok,
                      num_prompt_tokens=10, num_tokens=5, finish_reason="stop")


@dataclass(frozen=True)
class _Model:
    model: str = "tiny-model"
    adapter: str | None = None


@dataclass(frozen=True)
class _Settings:
    """The part of `EvalSettings` that the output rules and the manifest read."""

    out: Path
    model: _Model = field(default_factory=_Model)
    k: int = 0
    overwrite: bool = False
    data: str = "openai/gsm8k"  # the inputs an output may not replace (evaluation.run.run_inputs)
    pool: Path | None = None
    steer: Path | None = None


def write_eval(out: Path, preds: list[Prediction], adapter: str | None = None) -> Path:
    """An eval gsm8k folder as `evaluate_gsm8k` publishes it."""
    settings = _Settings(out, _Model(adapter=adapter))
    metrics = summarize(preds, k=0, style="plain", timing={})
    manifest = build_manifest("eval gsm8k", settings)
    output = run_output(settings)  # type: ignore[arg-type]
    output.publish({PREDICTIONS: jsonl_writer(p.to_dict() for p in preds),
                    METRICS: json_writer({**metrics.to_dict(), "manifest": manifest}),
                    MANIFEST: json_writer(manifest)})
    return out


# 64 problems. strict: both right 20 (0-19), only A 4 (20-23), only B 12 (24-35), neither 28 (36-63).
# flexible: both right 30 (0-29), only A 2 (30, 31), only B 2 (32, 33), neither 30.
def _a_strict(i): return i < 24
def _b_strict(i): return i < 20 or 24 <= i < 36
def _a_flex(i): return i < 32
def _b_flex(i): return i < 30 or 32 <= i < 34


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    a = write_eval(tmp_path / "eval-a", [_prediction(i, _a_strict(i), _a_flex(i)) for i in range(N)])
    # B's rows are in another order: pairing is by problem id, never by line
    order = list(range(N))[::-1]
    b = write_eval(tmp_path / "eval-b", [_prediction(i, _b_strict(i), _b_flex(i)) for i in order],
                   adapter="runs/sft")
    return a, b


# ---- reading evaluations ----------------------------------------------------------------------------------


def test_load_evaluation_reads_rows_metrics_and_manifest(runs):
    a, b = runs
    ev = load_evaluation(b)
    assert ev.n == N and next(iter(ev.rows)) == _pid(N - 1)  # file order kept
    assert ev.rows[_pid(3)] == _prediction(3, True, True).to_dict()
    assert ev.metrics["n"] == N and ev.metrics["accuracy_strict"] == 32 / 64 and "manifest" not in ev.metrics
    assert ev.manifest["command"] == "eval gsm8k"
    from_file = load_evaluation(a / PREDICTIONS)  # the predictions file itself: its folder's files are read
    assert from_file.predictions == a / PREDICTIONS and from_file.manifest["command"] == "eval gsm8k"


def test_manifest_falls_back_to_the_one_inside_metrics(runs):
    a, _ = runs
    (a / MANIFEST).unlink()
    assert load_evaluation(a).manifest["command"] == "eval gsm8k"


def test_a_bare_predictions_file_has_no_metrics(tmp_path, runs):
    lone = tmp_path / "lone.jsonl"
    lone.write_bytes((runs[0] / PREDICTIONS).read_bytes())
    ev = load_evaluation(lone)
    assert ev.n == N and ev.metrics is None and ev.manifest is None


@pytest.mark.parametrize("state", ["journal", "fingerprint", "empty", "missing"])
def test_unfinished_or_empty_folders_are_not_evaluations(tmp_path, state):
    folder = tmp_path / "run"
    if state != "missing":
        folder.mkdir()
    if state == "journal":
        (folder / PARTIAL).write_text(json.dumps(_prediction(0, True, True).to_dict()) + "\n")
        (folder / FINGERPRINT).write_text("{}\n")
    elif state == "fingerprint":  # stopped mid-publish: predictions written, run.json not yet removed
        (folder / PREDICTIONS).write_text(json.dumps(_prediction(0, True, True).to_dict()) + "\n")
        (folder / FINGERPRINT).write_text("{}\n")
    with pytest.raises(DataError) as err:
        load_evaluation(folder)
    if state == "missing":
        assert "no such file or folder" in err.value.message
    else:
        assert "not a finished eval gsm8k run" in err.value.message
        assert err.value.hint


def test_the_resume_journal_itself_is_refused(tmp_path):
    journal = tmp_path / PARTIAL
    journal.write_text(json.dumps(_prediction(0, True, True).to_dict()) + "\n")
    with pytest.raises(DataError, match="not a finished eval gsm8k run"):
        load_evaluation(journal)


def test_another_commands_output_is_refused(runs):
    a, _ = runs
    manifest = json.loads((a / MANIFEST).read_text())
    (a / MANIFEST).write_text(json.dumps({**manifest, "command": "eval ppl"}))
    with pytest.raises(DataError, match="`eval ppl` output"):
        load_evaluation(a)


def test_a_bad_row_names_file_line_and_field(runs):
    a, _ = runs
    lines = (a / PREDICTIONS).read_text().splitlines()
    row = json.loads(lines[2])
    row["correct_strict"] = "yes"
    lines[2] = json.dumps(row)
    (a / PREDICTIONS).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{PREDICTIONS}:3: field 'correct_strict' must be bool"):
        load_evaluation(a)


def test_a_repeated_id_is_refused(runs):
    a, _ = runs
    lines = (a / PREDICTIONS).read_text().splitlines()
    (a / PREDICTIONS).write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DataError, match=rf":{N + 1}: field 'id': {_pid(1)} appears twice \(first at .*:2\)"):
        load_evaluation(a)


def test_paired_follows_the_first_runs_order(runs):
    a, b = (load_evaluation(p) for p in runs)
    pairs = paired(a, b)
    assert [pid for pid, *_ in pairs] == [_pid(i) for i in range(N)]
    assert pairs[22] == (_pid(22), True, False) and pairs[30] == (_pid(30), False, True)
    assert paired(b, a, "correct_flexible")[0] == (_pid(N - 1), False, False)
    with pytest.raises(ValueError, match="column"):
        paired(a, b, "strict")


# ---- different problems -----------------------------------------------------------------------------------


def test_different_problem_sets_are_refused_with_counts(tmp_path, runs):
    a = load_evaluation(runs[0])
    other = write_eval(tmp_path / "other", [_prediction(i, True, True) for i in range(3, N + 1)])
    with pytest.raises(DataError) as err:
        check_same_problems(a, load_evaluation(other))
    msg = err.value.message
    assert "different problems" in msg
    assert f"3 only in {runs[0]} (first: {_pid(0)})" in msg
    assert f"1 only in {other} (first: {_pid(N)})" in msg
    assert err.value.hint


def test_a_different_gold_is_refused(tmp_path, runs):
    a = load_evaluation(runs[0])
    preds = [_prediction(i, True, True, gold="999" if i == 5 else None) for i in range(N)]
    other = load_evaluation(write_eval(tmp_path / "other", preds))
    with pytest.raises(DataError, match=rf"problem {_pid(5)}: gold '15' in .* but '999' in"):
        check_same_problems(a, other)


# ---- the comparison ---------------------------------------------------------------------------------------


def test_compare_numbers(runs):
    a, b = (load_evaluation(p) for p in runs)
    result = compare(a, b, n_boot=2000, seed=1)
    s = result["strict"]
    assert (s["n"], s["both"], s["only_a"], s["only_b"], s["neither"]) == (64, 20, 4, 12, 28)
    assert (s["a_correct"], s["b_correct"]) == (24, 32)
    assert (s["a_accuracy"], s["b_accuracy"], s["difference"]) == (0.375, 0.5, 0.125)
    assert s["a_ci95"] == list(wilson_interval(24, 64)) and s["b_ci95"] == list(wilson_interval(32, 64))
    assert s["mcnemar_p"] == pytest.approx(5034 / 65536)  # 2 * sum_{k<=4} C(16, k) / 2^16
    diffs = [int(_b_strict(i)) - int(_a_strict(i)) for i in range(N)]
    assert s["difference_ci95"] == list(paired_bootstrap(diffs, n_boot=2000, seed=1))
    # 12 x +1, 4 x -1, 48 x 0: se = sqrt((16/64 - 0.125^2) / 64) = 0.0605, so about 0.125 -/+ 0.119
    lo, hi = s["difference_ci95"]
    assert lo == pytest.approx(0.0064, abs=0.02) and hi == pytest.approx(0.2436, abs=0.02)
    f = result["flexible"]
    assert (f["both"], f["only_a"], f["only_b"], f["neither"], f["difference"]) == (30, 2, 2, 30, 0.0)
    assert f["mcnemar_p"] == 1.0 and f["a_accuracy"] == 32 / 64


def test_changed_problems_with_their_answers(runs):
    a, b = (load_evaluation(p) for p in runs)
    result = compare(a, b, n_boot=200)
    changed = result["strict"]["changed"]
    assert [c["id"] for c in changed] == [_pid(i) for i in range(20, 36)]  # in A's order
    assert changed[0] == {"id": _pid(20), "gold": "30", "a": "30", "b": "1020", "a_correct": True,
                          "b_correct": False}
    assert changed[5] == {"id": _pid(25), "gold": "35", "a": None, "b": "35", "a_correct": False,
                          "b_correct": True}
    assert [c["id"] for c in result["flexible"]["changed"]] == [_pid(i) for i in (30, 31, 32, 33)]
    assert result["flexible"]["changed"][2]["a"] == "2032"  # the flexible answers, not the strict ones


def test_compare_describes_both_runs(runs):
    a, b = (load_evaluation(p) for p in runs)
    result = compare(a, b, n_boot=200, seed=0, metric="flexible")
    assert result["a"] == {"path": str(runs[0]), "predictions": str(runs[0] / PREDICTIONS),
                           "model": "tiny-model", "adapter": None, "style": "plain", "n": N,
                           # plain: no reasoning section, so no reasoning shares
                           "reasoning_section": None, "with_reasoning_section": None,
                           "ended_in_reasoning": None}
    assert result["b"]["adapter"] == "runs/sft"
    settings = (result["metric"], result["n_boot"], result["seed"], result["confidence"])
    assert settings == ("flexible", 200, 0, 0.95)


def test_a_run_compared_with_itself(runs):
    a = load_evaluation(runs[0])
    s = compare(a, a, n_boot=200)["strict"]
    assert (s["difference"], s["difference_ci95"], s["mcnemar_p"], s["changed"]) == (0.0, [0.0, 0.0], 1.0, [])


def test_out_file_holds_the_comparison_and_a_manifest(tmp_path, runs):
    out = tmp_path / "cmp" / "a-vs-b.json"
    settings = CompareSettings(n_boot=300, seed=2, out=out)
    result = compare_evaluations(settings, *runs)
    written = json.loads(out.read_text())
    manifest = written.pop("manifest")
    assert written == {k: v for k, v in result.items() if k != "out"} and result["out"] == str(out)
    assert manifest["command"] == "compare" and manifest["seeds"] == {"bootstrap": 2}
    assert manifest["settings"]["n_boot"] == 300
    assert set(manifest["inputs"]) == {"a", "b"} and len(manifest["inputs"]["a"]["sha256"]) == 64
    assert sorted(p.name for p in out.parent.iterdir()) == ["a-vs-b.json"]  # nothing else, no temporaries
    compare_evaluations(settings, *runs)  # a derived file: replaced on a rerun
    assert json.loads(out.read_text())["strict"] == written["strict"]


def test_out_never_replaces_an_input(runs):
    a, b = runs
    before = (a / PREDICTIONS).read_bytes()
    for target in (a / PREDICTIONS, b / METRICS):
        with pytest.raises(Exception, match="would replace the input"):
            compare_evaluations(CompareSettings(n_boot=200, out=target), a, b)
    assert (a / PREDICTIONS).read_bytes() == before


# ---- the command ------------------------------------------------------------------------------------------


@pytest.fixture
def app():
    """The compare command under gsmkit's own error boundary (as `gsmkit compare` once registered)."""
    local = typer.Typer(cls=cli._ErrorBoundaryGroup, pretty_exceptions_enable=False)
    local.callback()(cli.root)
    local.command("compare")(compare_command)
    return local


def test_cli_prints_the_table_and_the_changed_problems(app, runs):
    res = runner.invoke(app, ["compare", *map(str, runs), "--n-boot", "500", "--show", "3"])
    assert res.exit_code == 0, res.output
    assert "+0.125" in res.output and "0.0768" in res.output  # the difference and McNemar's p
    assert "16 problems changed (strict), the first 3" in res.output
    assert _pid(22) in res.output and _pid(23) not in res.output


def test_cli_json_is_one_object_on_stdout(app, runs, tmp_path):
    out = tmp_path / "c.json"
    res = runner.invoke(app, ["compare", *map(str, runs), "--json", "--metric", "flexible", "--n-boot", "500",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["metric"] == "flexible" and summary["out"] == str(out)
    assert summary["strict"]["difference"] == 0.125
    written = json.loads(out.read_text())
    assert written["strict"] == summary["strict"] and written["manifest"]["command"] == "compare"


def test_cli_refuses_different_problems_with_one_line(app, runs, tmp_path):
    other = write_eval(tmp_path / "other", [_prediction(i, True, True) for i in range(N // 2)])
    out = tmp_path / "c.json"
    res = runner.invoke(app, ["compare", str(runs[0]), str(other), "--out", str(out)])
    assert_clean_failure(res, out, 1)
    error = next(ln for ln in res.output.splitlines() if ln.startswith("error:"))
    assert "different problems" in error and "32 only in" in error


def test_cli_refuses_an_unfinished_run(app, runs, tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / FINGERPRINT).write_text("{}\n")
    res = runner.invoke(app, ["compare", str(runs[0]), str(tmp_path / "partial")])
    assert res.exit_code == 1 and "not a finished eval gsm8k run" in res.output


@pytest.mark.parametrize("args", [["--metric", "exact"], ["--n-boot", "5"], ["--show", "-1"], []])
def test_cli_misused_options_exit_2(app, runs, args):
    positional = [str(runs[0])] if not args else [*map(str, runs)]  # []: B is missing
    res = runner.invoke(app, ["compare", *positional, *args])
    assert res.exit_code == 2, res.output


def test_mcnemar_in_the_cli_matches_the_library(app, runs):
    res = runner.invoke(app, ["compare", *map(str, runs), "--json", "--n-boot", "200"])
    assert json.loads(res.stdout)["strict"]["mcnemar_p"] == mcnemar_exact(4, 12)


def test_cli_show_0_lists_no_problems_and_an_unchanged_pair_says_so(app, runs):
    res = runner.invoke(app, ["compare", *map(str, runs), "--show", "0", "--n-boot", "200"])
    assert res.exit_code == 0 and "problems changed" not in res.output and _pid(20) not in res.output
    res = runner.invoke(app, ["compare", str(runs[0]), str(runs[0]), "--n-boot", "200"])
    assert res.exit_code == 0 and "no problem changed (strict)" in res.output
