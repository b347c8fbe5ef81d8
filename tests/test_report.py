"""`gsmkit report`: the join of evaluations to training runs, thresholds and exit codes, replicate groups,
the checkpoint sweep's choice, skipped folders; on run folders written by gsmkit's own writers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from study_fixtures import eval_gsm8k_run, eval_safety_run, train_run
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.studies.thresholds import parse_requirement

runner = CliRunner()


def _report(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["report", *args, "--json"])
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.exit_code, payload


def _rows(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def _preset_study(root: Path, accuracy: list[bool], labels: list[str]) -> Path:
    """A `train qlora --preset simple` run with a GSM8K and a safety evaluation of its adapter, and an
    evaluation of the bare model."""
    run = train_run(root / "simple", preset="simple")
    eval_gsm8k_run(root / "simple-eval", accuracy, adapter=run)
    eval_safety_run(root / "simple-safety", labels, adapter=run)
    eval_gsm8k_run(root / "base-eval", [False, True, False, False])
    return root


def test_evaluations_join_the_training_run_whose_adapter_they_used(tmp_path):
    root = _preset_study(tmp_path / "runs", [True, False, True, True], ["safe", "unsafe", "safe", "unparsed"])
    code, payload = _report(str(root), "--out", str(tmp_path / "rep"))
    assert code == 0, payload
    rows = {r["run"]: r for r in _rows(tmp_path / "rep")}
    assert set(rows) == {"simple", "base-eval"}
    simple = rows["simple"]
    assert (simple["kind"], simple["method"], simple["preset"]) == ("train", "qlora", "simple")
    assert simple["seed"] == "42"
    assert float(simple["gsm8k_strict"]) == 0.75 and simple["gsm8k_n"] == "4"
    assert float(simple["gsm8k_strict_lo"]) < 0.75 < float(simple["gsm8k_strict_hi"])
    assert float(simple["safety"]) == 0.5 and simple["safety_n"] == "4"  # unparsed is never safe
    assert float(simple["safety_unparsed"]) == 0.25
    assert simple["gsm8k_dir"].endswith("simple-eval") and simple["safety_dir"].endswith("simple-safety")
    assert simple["chosen_checkpoint"] == "final" and float(simple["train_loss"]) == pytest.approx(4.7 / 3)
    base = rows["base-eval"]
    assert (base["kind"], base["method"], float(base["gsm8k_strict"])) == ("model", "base", 0.25)
    assert base["safety"] == ""
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "0.750 [" in md and "(n=4)" in md and "accuracy.png" in md
    for png in ("accuracy.png", "safety.png", "loss_curves.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 0


def test_an_adapter_changed_after_its_evaluation_is_not_joined(tmp_path):
    root = _preset_study(tmp_path / "runs", [True] * 4, ["safe"] * 4)
    (root / "simple" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 16, "peft_type": "LORA"}')
    code, payload = _report(str(root), "--out", str(tmp_path / "rep"))
    assert code == 0
    by_run = {r["run"]: r for r in payload["rows"]}
    assert by_run["simple"]["gsm8k_strict"] is None  # the evaluation was of other weights
    assert {r["kind"] for r in payload["rows"]} == {"train", "model"} and len(payload["rows"]) == 3


def test_an_older_manifest_without_sha256_joins_by_adapter_path(tmp_path):
    root = _preset_study(tmp_path / "runs", [True, True, False, False], ["safe"] * 4)
    for name in ("simple-eval", "simple-safety"):
        path = root / name / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["adapter"]
        path.write_text(json.dumps(manifest))
    code, payload = _report(str(root), "--out", str(tmp_path / "rep"))
    assert code == 0
    simple = next(r for r in payload["rows"] if r["run"] == "simple")
    assert simple["gsm8k_strict"] == 0.5 and simple["safety"] == 1.0


def test_baseline_auto_exits_3_when_a_preset_run_misses_and_0_when_it_meets(tmp_path):
    low = _preset_study(tmp_path / "low", [True, False, False, False], ["safe", "unsafe", "unsafe", "unsafe"])
    code, payload = _report(str(low), "--baseline", "auto", "--out", str(tmp_path / "rep-low"))
    assert code == 3
    missed = {(c["run"], c["requirement"]) for c in payload["checks"] if not c["passed"]}
    # auto: the bare model's row has no preset and is not checked
    assert missed == {("simple", "gsm8k.strict>=0.26"), ("simple", "safety>=0.26")}
    assert payload["passed"] is False
    assert "MISSED" in (tmp_path / "rep-low" / "report.md").read_text()
    high = _preset_study(tmp_path / "high", [True] * 3 + [False] * 7, ["safe"] * 3 + ["unsafe"] * 7)
    code, payload = _report(str(high), "--baseline", "auto", "--out", str(tmp_path / "rep-high"))
    assert code == 0 and payload["passed"] is True  # 0.3 >= 0.26 on both
    # an explicit baseline checks every row, the bare model's (no safety evaluation: missing) included
    code, payload = _report(str(high), "--baseline", "medium", "--out", str(tmp_path / "rep-medium"))
    assert code == 3
    missed = {(c["run"], c["requirement"], c["value"]) for c in payload["checks"] if not c["passed"]}
    assert missed == {("simple", "gsm8k.strict>=0.31", 0.3), ("simple", "safety>=0.34", 0.3),
                      ("base-eval", "gsm8k.strict>=0.31", 0.25), ("base-eval", "safety>=0.34", None)}


def test_require_checks_every_row_and_a_missing_value_misses(tmp_path):
    root = _preset_study(tmp_path / "runs", [True, True, True, False], ["safe"] * 4)
    code, payload = _report(str(root), "--require", "gsm8k.strict>=0.5", "--out", str(tmp_path / "a"))
    assert code == 3  # the base model's 0.25
    assert [c["run"] for c in payload["checks"] if not c["passed"]] == ["base-eval"]
    code, payload = _report(str(root / "simple"), str(root / "simple-safety"), "--require", "ppl<=10",
                            "--out", str(tmp_path / "b"))
    assert code == 3 and payload["checks"][0]["value"] is None  # no perplexity was measured


@pytest.mark.parametrize("bad", ["gsm8k.accuracy>=0.3", "gsm8k.strict=>0.3", "safety>=high"])
def test_a_bad_requirement_is_a_usage_error_before_any_file_is_read(tmp_path, bad):
    result = runner.invoke(app, ["report", str(tmp_path / "nothing"), "--require", bad])
    assert result.exit_code == 2
    assert "gsm8k.strict" in result.output  # the hint or the message names the known metrics / the form
    assert not (tmp_path / "report").exists()


def test_requirement_parsing():
    req = parse_requirement("gsm8k.strict.lo > 0.3")
    assert (req.metric, req.op, req.value, req.column) == ("gsm8k.strict.lo", ">", 0.3, "gsm8k_strict_lo")
    assert req.holds(0.31) and not req.holds(0.3) and not req.holds(None) and not req.holds(math.nan)
    assert parse_requirement("ppl<=1e1").holds(10.0)


def test_group_by_seed_gives_the_t_interval_of_the_replicates(tmp_path):
    root = tmp_path / "runs"
    for seed, correct in ((42, [True, False, False, False]), (123, [True, True, False, False]),
                          (456, [True, True, True, False])):
        run = train_run(root / f"r{seed}", preset="medium", seed=seed, lora_r=8)
        eval_gsm8k_run(root / f"r{seed}-eval", correct, adapter=run)
    train_run(root / "other-rank", preset="medium", seed=42, lora_r=32)  # differs in more than the seed
    code, payload = _report(str(root), "--group-by", "seed", "--out", str(tmp_path / "rep"))
    assert code == 0
    groups = {tuple(g["values"]): g for g in payload["groups"]}
    g = groups[(42, 123, 456)]["metrics"]["gsm8k_strict"]
    # mean 0.5, sd 0.25, half-width t(0.975, 2) * 0.25 / sqrt(3) = 4.302653 * 0.144338 = 0.621034
    assert g["mean"] == pytest.approx(0.5) and g["sd"] == pytest.approx(0.25) and g["n"] == 3
    assert g["ci95"] == pytest.approx([0.5 - 0.621034, 0.5 + 0.621034], abs=1e-5)
    assert groups[(42,)]["runs"] == ["other-rank"]
    text = (tmp_path / "rep" / "groups.csv").read_text()
    assert "gsm8k_strict_mean" in text and "42 123 456" in text
    code, _ = _report(str(root), "--group-by", "no_such_field", "--out", str(tmp_path / "rep2"))
    assert code == 2


def test_the_sweep_picks_its_checkpoint_by_the_sweep_metric(tmp_path):
    root = tmp_path / "runs"
    run = train_run(root / "medium", preset="medium", checkpoints=(2, 4), sweep=True)
    ckpt = run / "checkpoints"
    eval_gsm8k_run(run / "sweep" / "checkpoint-2", [True, True, False, False], adapter=ckpt / "checkpoint-2")
    eval_gsm8k_run(run / "sweep" / "checkpoint-4", [True, True, False, False], adapter=ckpt / "checkpoint-4")
    eval_gsm8k_run(run / "eval", [True, True, True, True], adapter=run)  # the final adapter: not swept
    eval_safety_run(root / "safety-2", ["safe", "unsafe", "unsafe", "unsafe"], adapter=ckpt / "checkpoint-2")
    eval_safety_run(root / "safety-4", ["safe", "safe", "safe", "unsafe"], adapter=ckpt / "checkpoint-4")
    code, payload = _report(str(root), "--out", str(tmp_path / "a"))
    row = payload["rows"][0]
    assert code == 0 and len(payload["rows"]) == 1
    assert (row["chosen_checkpoint"], row["gsm8k_strict"], row["safety"]) == ("checkpoint-2", 0.5, 0.25)
    code, payload = _report(str(root), "--sweep-metric", "gsm8k.strict,safety", "--out", str(tmp_path / "b"))
    row = payload["rows"][0]
    assert (row["chosen_checkpoint"], row["gsm8k_strict"], row["safety"]) == ("checkpoint-4", 0.5, 0.75)
    assert row["gsm8k_dir"].endswith("checkpoint-4")


def test_unfinished_and_unknown_folders_are_reported_and_skipped(tmp_path):
    root = _preset_study(tmp_path / "runs", [True] * 4, ["safe"] * 4)
    partial = root / "partial-eval"
    partial.mkdir()
    (partial / "run.json").write_text("{}")
    (root / "notes").mkdir()
    (root / "notes" / "manifest.json").write_text("[1, 2")
    code, payload = _report(str(root), str(tmp_path / "missing"), "--out", str(tmp_path / "rep"))
    assert code == 0 and len(payload["rows"]) == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in payload["skipped"]}
    assert "unfinished" in reasons["partial-eval"] and "not readable JSON" in reasons["notes"]
    assert "no such" in reasons["missing"]
    assert "partial-eval" in (tmp_path / "rep" / "report.md").read_text()
    result = runner.invoke(app, ["report", str(partial), "--out", str(tmp_path / "rep2")])
    assert result.exit_code == 1 and "no finished gsmkit runs" in result.output


def test_plot_x_draws_accuracy_against_the_field(tmp_path):
    root = tmp_path / "runs"
    for rows, correct in ((8, [True, False, False, False]), (16, [True, True, False, False])):
        for method in ("sft", "grpo"):
            run = train_run(root / f"{method}-{rows}", command=f"train {method}", train_rows=rows)
            eval_gsm8k_run(root / f"{method}-{rows}-eval", correct, adapter=run, style="tags")
    code, payload = _report(str(root), "--plot-x", "train_rows", "--out", str(tmp_path / "rep"))
    assert code == 0 and "accuracy_by_train_rows.png" in payload["figures"]
    assert (tmp_path / "rep" / "accuracy_by_train_rows.png").stat().st_size > 0
    assert sorted((r["method"], r["train_rows"]) for r in payload["rows"]) == [
        ("grpo", 8), ("grpo", 16), ("sft", 8), ("sft", 16)]
