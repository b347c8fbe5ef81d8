"""`gsmkit bench` on constructed evaluations with known deltas: the numbers of one seed, the verdict rule at
its boundary (lower bound exactly at -margin), the gate (exit 3), the aggregate across seeds equal to what the
predictions files give, and bad inputs (different problem sets, malformed options and bench folders)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from study_fixtures import eval_gsm8k_run, train_run
from typer.testing import CliRunner

from gsmkit.cli import app as gsmkit_app
from gsmkit.cli.bench import bench
from gsmkit.evaluation.stats import hierarchical_bootstrap, paired_bootstrap, wilson_interval
from gsmkit.studies.bench import GATE_FAILED, SAFE, UNSAFE, verdict

runner = CliRunner()


def _app() -> typer.Typer:
    """gsmkit's app when it registers `bench`; else one with gsmkit's error boundary and only `bench`."""
    if any(c.name == "bench" for c in gsmkit_app.registered_commands):
        return gsmkit_app
    local = typer.Typer(cls=gsmkit_app.info.cls, pretty_exceptions_enable=False)
    local.command("bench")(bench)
    local.command("noop")(lambda: None)  # two commands: `bench` stays a subcommand
    return local


APP = _app()


def _bench(*args: str):
    return runner.invoke(APP, ["bench", *args])


def _said(res) -> str:
    """The command's output as one line, without the box Typer draws around usage errors."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split())


def _outcomes(both: int, only_probe: int, only_variant: int, neither: int) -> tuple[list[bool], list[bool]]:
    probe = [True] * both + [True] * only_probe + [False] * only_variant + [False] * neither
    variant = [True] * both + [False] * only_probe + [True] * only_variant + [False] * neither
    return probe, variant


def _adapter(tmp_path: Path, name: str, seed: int, r: int) -> Path:
    """A training folder (manifest with its seed) whose adapter has LoRA factors A [r, 10], B [12, r]."""
    from safetensors.numpy import save_file

    out = train_run(tmp_path / name, seed=seed, lora_r=r)
    save_file({"base_model.model.x.q_proj.lora_A.weight": np.zeros((r, 10), np.float32),
               "base_model.model.x.q_proj.lora_B.weight": np.zeros((12, r), np.float32),
               "base_model.model.x.q_proj.bias": np.zeros(12, np.float32)},
              str(out / "adapter_model.safetensors"))
    return out


def test_one_seed_numbers_by_hand(tmp_path):
    probe, variant = _outcomes(both=8, only_probe=1, only_variant=6, neither=5)  # n = 20
    p = eval_gsm8k_run(tmp_path / "probe", probe, adapter=_adapter(tmp_path, "t-probe", 42, 4))
    v = eval_gsm8k_run(tmp_path / "variant", variant, adapter=_adapter(tmp_path, "t-variant", 42, 2))
    res = _bench("--probe", str(p), "--variant", f"half={v}", "--margin", "0.025", "--n-boot", "2000",
                 "--seed", "7", "--out", str(tmp_path / "bench"), "--json")
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    row = found["variants"][0]
    assert (row["n"], row["both"], row["only_probe"], row["only_variant"], row["neither"]) == (20, 8, 1, 6, 5)
    assert row["probe_accuracy"] == pytest.approx(9 / 20)
    assert row["variant_accuracy"] == pytest.approx(14 / 20)
    assert row["delta"] == pytest.approx(0.25)
    assert row["mcnemar_p"] == pytest.approx(0.125)  # 2 * (1 + 7) / 2^7
    assert row["probe_ci95"] == pytest.approx(list(wilson_interval(9, 20)))
    diffs = [int(b) - int(a) for a, b in zip(probe, variant, strict=True)]
    assert row["delta_ci95"] == pytest.approx(list(paired_bootstrap(diffs, n_boot=2000, seed=7)))
    assert row["delta_ci95"][0] <= 0.25 <= row["delta_ci95"][1]
    assert row["verdict"] == SAFE
    # the adapters behind the evaluations: training seed and LoRA parameters (4 * 22 against 2 * 22)
    assert found["probe"]["train_seed"] == 42 and found["probe"]["lora_parameters"] == 88
    assert row["evaluation"]["lora_parameters"] == 44 and row["lora_parameters_ratio"] == pytest.approx(0.5)
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {k: v for k, v in written.items() if k != "manifest"} == {k: v for k, v in found.items()
                                                                     if k != "out"}
    assert written["format"] == "gsmkit-bench" and written["manifest"]["command"] == "bench"
    assert json.loads((tmp_path / "bench" / "manifest.json").read_text())["command"] == "bench"
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "| half | 20 |" in md and "+0.250" in md and "safe" in md and "-margin" in md


def test_verdict_at_the_boundary(tmp_path):
    assert verdict(-0.025, 0.025, True) == SAFE
    assert verdict(-0.025 - 1e-9, 0.025, True) == UNSAFE
    assert verdict(0.3, 0.025, False) == GATE_FAILED
    probe, variant = _outcomes(both=36, only_probe=3, only_variant=1, neither=0)
    p, v = eval_gsm8k_run(tmp_path / "p", probe), eval_gsm8k_run(tmp_path / "v", variant)
    diffs = [int(b) - int(a) for a, b in zip(probe, variant, strict=True)]
    lo, _ = paired_bootstrap(diffs, n_boot=1000, seed=0)
    assert lo < 0
    for margin, expected in ((-lo, SAFE), (-lo - 1e-6, UNSAFE)):  # the lower bound exactly at -margin is safe
        res = _bench("--probe", str(p), "--variant", f"v={v}", "--margin", repr(margin), "--n-boot", "1000",
                     "--out", str(tmp_path / "b"), "--json")
        assert res.exit_code == 0, res.output
        row = json.loads(res.stdout)["variants"][0]
        assert row["delta_ci95"][0] == lo and row["verdict"] == expected, margin
    # margin 0: a variant that answers exactly like the probe ([0, 0]) is safe, one problem lost is not
    same = eval_gsm8k_run(tmp_path / "same", probe)
    one_worse = eval_gsm8k_run(tmp_path / "worse", [False] + probe[1:])
    res = _bench("--probe", str(p), "--variant", f"same={same}", "--variant", f"worse={one_worse}",
                 "--margin", "0", "--out", str(tmp_path / "b0"), "--json")
    rows = json.loads(res.stdout)["variants"]
    assert rows[0]["delta_ci95"] == [0.0, 0.0] and rows[0]["verdict"] == SAFE
    assert rows[1]["verdict"] == UNSAFE and [r["name"] for r in rows] == ["same", "worse"]


def test_gate_failure_is_exit_3_and_every_verdict(tmp_path):
    probe = [True] * 2 + [False] * 18  # strict accuracy 0.1
    p = eval_gsm8k_run(tmp_path / "p", probe)
    better = eval_gsm8k_run(tmp_path / "v", [True] * 20)
    res = _bench("--probe", str(p), "--variant", f"better={better}", "--gate", "gsm8k.strict>=0.15",
                 "--out", str(tmp_path / "b"), "--json")
    assert res.exit_code == 3, res.output
    found = json.loads(res.stdout)
    assert found["gate"] == {"requirement": "gsm8k.strict>=0.15", "metric": "gsm8k.strict", "value": 0.1,
                             "passed": False}
    assert found["gate_passed"] is False and found["variants"][0]["verdict"] == GATE_FAILED
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["variants"][0]["verdict"] == GATE_FAILED
    assert "gate failed" in (tmp_path / "b" / "bench.md").read_text()
    # the probe alone as a pipeline gate: 3 when it misses, 0 when it passes
    res = _bench("--probe", str(p), "--gate", "gsm8k.strict>=0.15", "--out", str(tmp_path / "g1"))
    assert res.exit_code == 3 and "missed the gate" in res.output
    res = _bench("--probe", str(p), "--gate", "gsm8k.flexible>=0.1", "--out", str(tmp_path / "g2"), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["gate"]["passed"] is True
    assert json.loads(res.stdout)["variants"] == []


def _seed_bench(tmp_path: Path, seed: int, probe: list[bool], variants: dict[str, list[bool]],
                gate: str | None = None) -> tuple[Path, int]:
    root = tmp_path / f"s{seed}"
    p = eval_gsm8k_run(root / "eval-probe", probe, adapter=_adapter(root, "probe", seed, 8))
    args = ["--probe", str(p), "--out", str(root / "bench"), "--n-boot", "500"]
    for name, outcomes in variants.items():
        args += ["--variant", f"{name}={eval_gsm8k_run(root / f'eval-{name}', outcomes)}"]
    if gate:
        args += ["--gate", gate]
    res = _bench(*args)
    return root / "bench", res.exit_code


def _read_correct(path: Path) -> list[bool]:
    return [json.loads(line)["correct_strict"] for line in path.read_text().splitlines()]


def test_aggregate_numbers_equal_those_of_the_predictions(tmp_path):
    n = 40
    probe = [i % 4 != 0 for i in range(n)]  # 30 right
    benches = []
    for seed, lost in ((42, 0), (123, 2), (456, 4)):  # deltas 0, -0.05, -0.1
        worse = [ok and not (i < 4 * lost and i % 4 == 1) for i, ok in enumerate(probe)]
        folder, code = _seed_bench(tmp_path, seed, probe, {"same": probe, "worse": worse},
                                   "gsm8k.strict>=0.5")
        assert code == 0
        benches.append(folder)
    out = tmp_path / "agg"
    args = [a for b in benches for a in ("--aggregate", str(b))]
    res = _bench(*args, "--n-boot", "3000", "--seed", "5", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert [b["seed"] for b in found["benches"]] == [42, 123, 456] and found["gate_passed"] is True
    by_name = {v["name"]: v for v in found["variants"]}
    assert list(by_name) == ["same", "worse"]
    # recomputed here from the predictions files each bench names
    groups, deltas = [], []
    for folder in benches:
        bench_json = json.loads((folder / "bench.json").read_text())
        row = next(v for v in bench_json["variants"] if v["name"] == "worse")
        a = _read_correct(folder / bench_json["probe"]["predictions"])
        b = _read_correct(folder / row["evaluation"]["predictions"])
        groups.append([int(y) - int(x) for x, y in zip(a, b, strict=True)])
        deltas.append((sum(b) - sum(a)) / len(a))
    assert deltas == pytest.approx([0.0, -0.05, -0.1])
    worse = by_name["worse"]
    assert worse["seeds"] == [42, 123, 456]
    assert [s["delta"] for s in worse["per_seed"]] == pytest.approx(deltas)
    assert worse["mean_delta"] == pytest.approx(-0.05)
    assert worse["delta_ci95"] == pytest.approx(list(hierarchical_bootstrap(groups, n_boot=3000, seed=5)))
    # t interval of the per-seed deltas by hand: sd 0.05, t(0.975, 2) = 4.302653
    half = 4.302652729911275 * 0.05 / math.sqrt(3)
    t = worse["t_interval"]
    assert (t["mean"], t["sd"], t["n"]) == (pytest.approx(-0.05), pytest.approx(0.05), 3)
    assert (t["lo"], t["hi"]) == (pytest.approx(-0.05 - half), pytest.approx(-0.05 + half))
    assert worse["verdict"] == UNSAFE and worse["delta_ci95"][0] < -0.025
    same = by_name["same"]
    assert same["delta_ci95"] == [0.0, 0.0] and same["mean_delta"] == 0.0 and same["verdict"] == SAFE
    written = json.loads((out / "bench_aggregate.json").read_text())
    assert written["format"] == "gsmkit-bench-aggregate" and written["variants"] == found["variants"]
    md = (out / "bench_aggregate.md").read_text()
    assert "| worse | 42, 123, 456 | -0.050 |" in md and "hierarchical" in md
    assert (out / "manifest.json").is_file()


def test_a_seed_that_missed_its_gate_fails_the_aggregate(tmp_path):
    probe = [True] * 10 + [False] * 10
    ok, code = _seed_bench(tmp_path, 42, probe, {"v": probe}, "gsm8k.strict>=0.4")
    assert code == 0
    low = [True] * 4 + [False] * 16
    failed, code = _seed_bench(tmp_path, 123, low, {}, "gsm8k.strict>=0.4")  # the script stops this seed
    assert code == 3
    res = _bench("--aggregate", str(ok), "--aggregate", str(failed), "--out", str(tmp_path / "agg"), "--json")
    assert res.exit_code == 3, res.output
    found = json.loads(res.stdout)
    assert found["gate_passed"] is False and [b["gate_passed"] for b in found["benches"]] == [True, False]
    (row,) = found["variants"]
    assert row["verdict"] == GATE_FAILED and row["gate_failed"] == [str(failed)] and row["seeds"] == [42]
    assert row["per_seed"][0]["verdict"] == SAFE  # that seed on its own was fine


def test_aggregate_refuses_changed_predictions_and_missing_variants(tmp_path):
    probe = [True] * 10 + [False] * 10
    first, _ = _seed_bench(tmp_path, 42, probe, {"a": probe, "b": probe})
    second, _ = _seed_bench(tmp_path, 123, probe, {"a": probe})
    res = _bench("--aggregate", str(first), "--aggregate", str(second), "--out", str(tmp_path / "agg"))
    assert res.exit_code == 1 and "no variant 'b'" in res.output and str(second) in res.output
    predictions = tmp_path / "s42" / "eval-a" / "predictions.jsonl"
    text = predictions.read_text()
    predictions.write_text(text.replace('"correct_strict": true', '"correct_strict": false', 1))
    res = _bench("--aggregate", str(first), "--out", str(tmp_path / "agg"))
    assert res.exit_code == 1 and "changed since" in res.output
    (tmp_path / "notbench").mkdir()
    res = _bench("--aggregate", str(tmp_path / "notbench"), "--out", str(tmp_path / "agg"))
    assert res.exit_code == 1 and "no bench.json" in res.output
    (tmp_path / "notbench" / "bench.json").write_text('{"format": "gsmkit-bench", "version": 1}')
    res = _bench("--aggregate", str(tmp_path / "notbench"), "--out", str(tmp_path / "agg"))
    assert res.exit_code == 1 and "field 'metric'" in res.output
    assert not (tmp_path / "agg").exists()


def test_bad_inputs(tmp_path):
    p = eval_gsm8k_run(tmp_path / "p", [True, False, True, False])
    other = eval_gsm8k_run(tmp_path / "o", [True, False, True, False],
                           ids=["gsm8k-0000", "gsm8k-0001", "gsm8k-0002", "other"])
    out = str(tmp_path / "b")
    res = _bench("--probe", str(p), "--variant", f"o={other}", "--out", out)
    assert res.exit_code == 1 and "different problems" in res.output and "other" in res.output
    assert not Path(out).exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "predictions.partial.jsonl").write_text("")
    res = _bench("--probe", str(p), "--variant", f"u={unfinished}", "--out", out)
    assert res.exit_code == 1 and "not a finished eval gsm8k run" in res.output
    for args, message in (
        (["--variant", f"no-equals-{p}"], "is not NAME=EVAL_DIR"),
        (["--variant", f"a={p}", "--variant", f"a={p}"], "given twice"),
        (["--gate", "gsm8k.nope>=1"], "unknown metric"),
        (["--gate", "safety>=0.5"], "gsm8k.* metric"),
        ([], "nothing to bench"),
        (["--variant", f"a={p}", "--aggregate", str(tmp_path)], "--aggregate"),
        (["--variant", f"a={p}", "--margin", "-0.1"], "--margin"),
    ):
        res = _bench("--probe", str(p), *args, "--out", out)
        assert res.exit_code == 2 and message in _said(res), (args, res.output)
    res = _bench("--variant", f"a={p}", "--out", out)
    assert res.exit_code == 2 and "--probe" in _said(res)
    res = _bench("--probe", str(p), "--variant", f"a={p}", "--out", str(p))
    assert res.exit_code == 2 and "one of the inputs" in _said(res)
    res = _bench("--probe", str(p), "--variant", f"a={p}", "--out", str(other))  # another run's folder
    assert res.exit_code == 1 and "eval gsm8k" in res.output
    assert not Path(out).exists()
