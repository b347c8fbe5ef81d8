"""Activation steering on SmolLM2-135M-Instruct: CAA vectors, a tuned search, the best setting on test.

Steps, each a separate `gsmkit` process timed by wall clock (process start to exit, model loading
included), with a fresh activation cache in `<out>/cache`:
1. `steer vectors` from `--vector-problems` train problems (CAA, gold vs corrupted), cold cache;
2. the same command again into another folder: every activation is read from the cache, no model loads;
3. `steer search`: `--trials` trials over layers x alpha on `--val` validation problems (train split,
   disjoint from the vector problems), then the best setting and the unsteered model on `--test`
   test problems (accuracy with 95% Wilson intervals, the answers that changed);
4. `eval gsm8k --steer <out>/search/best.json --check-zero` on the same test problems: the pipeline's
   last step, which must reproduce the search's own test evaluation of the best setting.
Trial time with and without the activation cache: a research script that rebuilds its vectors in every
trial pays step 1's time per trial on top of the trial's generation; with the cache a trial pays step 2's.
Both are reported next to the measured mean trial time.

Run from the project root:
    python benchmarks/steer.py --out bench-out/steer                 # 64 / 20 trials x 16 / 32, ~30 min
    python benchmarks/steer.py --out bench-out/steer --quick         # 8 / 3 x 4 / 4, a smoke run
Writes `<out>/results.json` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

from _common import bench_parser, ensure_hf_model, gsmkit_command, machine_info, run_timed, tail
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, model_dir=True)
    p.add_argument("--vector-problems", type=int, default=64)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--test", type=int, default=32)
    p.add_argument("--layers", default="6-24", help="layers the search may choose")
    p.add_argument("--alpha-range", nargs=2, type=float, default=(-4.0, 4.0))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=8, help="validation problems per pruning step")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 vector problems, 3 trials x 4 / 4")
    args = p.parse_args(argv)
    if args.quick:
        args.vector_problems, args.trials, args.val, args.test, args.max_new_tokens = 8, 3, 4, 4, 64
        args.chunk_size = 2
    return args


def _run(name: str, cmd: list[str], logs: Path, results: dict[str, Any]) -> float:
    console.print(f"[bold]{name}[/bold]")
    seconds, rc = run_timed(cmd, logs / f"{name}.log")
    if rc:
        raise SystemExit(f"{name} failed (exit {rc}):\n" + tail(logs / f"{name}.log"))
    results["commands"][name] = {"argv": cmd, "wall_s": round(seconds, 2)}
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve()
    ensure_hf_model(model_dir)
    logs, cache = out / "logs", out / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # step 1 must start cold
    gsmkit = gsmkit_command()
    results: dict[str, Any] = {"benchmark": "steer", "settings": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "commands": {}}
    common = ["--model", str(model_dir), "--data", str(args.gsm8k_dir)]

    vectors = [*gsmkit, "steer", "vectors", *common, "--split", "train", "--limit", str(args.vector_problems),
               "--method", "caa", "--layers", "all", "--negatives", "corrupted", "--seed", str(args.seed),
               "--cache-dir", str(cache), "--overwrite", "--json"]
    cold = _run("vectors_cold", [*vectors, "--out", str(out / "vectors")], logs, results)
    warm = _run("vectors_cached", [*vectors, "--out", str(out / "vectors-again")], logs, results)
    meta_cold = json.loads((out / "vectors" / "steer.json").read_text())
    meta_warm = json.loads((out / "vectors-again" / "steer.json").read_text())
    same = (out / "vectors" / "vectors.safetensors").read_bytes() == \
        (out / "vectors-again" / "vectors.safetensors").read_bytes()
    results["vectors"] = {"cold_s": round(cold, 2), "cached_s": round(warm, 2),
                          "cached_over_cold": round(warm / cold, 4), "cache_cold": meta_cold.get("cache"),
                          "cache_second_run": meta_warm.get("cache"), "identical_vectors": same,
                          "norms": meta_cold.get("norms")}

    search_dir = out / "search"
    search = [*gsmkit, "steer", "search", "--vectors", str(out / "vectors"), *common,
              "--val-limit", str(args.val), "--test-limit", str(args.test), "--n-trials", str(args.trials),
              "--layers", args.layers, "--alpha-range", *(str(a) for a in args.alpha_range),
              "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
              "--chunk-size", str(args.chunk_size), "--seed", str(args.seed),
              "--storage", f"sqlite:///{out / 'study.db'}", "--out", str(search_dir),
              "--overwrite", "--json"]
    (out / "study.db").unlink(missing_ok=True)
    search_s = _run("search", search, logs, results)
    summary = json.loads((search_dir / "search.json").read_text())
    with (search_dir / "trials.csv").open() as fh:
        trials = list(csv.DictReader(fh))
    seconds = [float(t["seconds"]) for t in trials
               if t.get("seconds") and t["state"] in ("COMPLETE", "PRUNED")]
    complete = [float(t["seconds"]) for t in trials if t.get("seconds") and t["state"] == "COMPLETE"]
    mean_trial = sum(complete) / len(complete) if complete else None
    results["search"] = {"wall_s": round(search_s, 2), "summary": summary,
                         "states": {s: sum(t["state"] == s for t in trials)
                                    for s in {t["state"] for t in trials}},
                         "mean_complete_trial_s": round(mean_trial, 2) if mean_trial else None,
                         "mean_trial_s": round(sum(seconds) / len(seconds), 2) if seconds else None}
    if mean_trial:
        results["trial_time"] = {
            "with_cache_s": round(mean_trial + warm, 2), "without_cache_s": round(mean_trial + cold, 2),
            "note": "a complete trial's generation plus, per trial, the vectors' cost: read from the cache "
                    "(step 2) or rebuilt from the model (step 1)"}

    best = search_dir / "best.json"
    eval_dir = out / "eval-best"
    evaluate = [*gsmkit, "eval", "gsm8k", *common, "--split", "test", "--limit", str(args.test),
                "--steer", str(best), "--check-zero", "--max-new-tokens", str(args.max_new_tokens),
                "--batch-size", str(args.batch_size), "--out", str(eval_dir), "--overwrite", "--json"]
    _run("eval_best", evaluate, logs, results)
    ours = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    search_best = (search_dir / "test-best" / "predictions.jsonl").read_text().splitlines()
    theirs = [json.loads(line) for line in search_best]
    accuracy = json.loads((eval_dir / "metrics.json").read_text()).get("accuracy_strict")
    results["eval_best"] = {"accuracy_strict": accuracy,
                            "same_completions_as_search": [p["completion"] for p in ours]
                            == [p["completion"] for p in theirs]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title="gsmkit steer on SmolLM2-135M-Instruct")
    table.add_column("what")
    table.add_column("value", justify="right")
    v = results["vectors"]
    table.add_row(f"steer vectors, {args.vector_problems} problems, cold", f"{v['cold_s']:.1f} s")
    table.add_row("steer vectors, second run (cache)", f"{v['cached_s']:.1f} s ({v['cached_over_cold']:.1%})")
    table.add_row(f"steer search, {args.trials} trials", f"{search_s:.0f} s")
    if mean_trial:
        table.add_row("trial, with / without the cache",
                      "{with_cache_s:.1f} / {without_cache_s:.1f} s".format(**results["trial_time"]))
    test = summary.get("test", {})
    for name in ("best", "unsteered"):
        m = test.get(name) or {}
        if m:
            table.add_row(f"test accuracy, {name}", "{:.1%} (95% CI {:.1%}-{:.1%}, n={})".format(
                m["accuracy"], *m["ci95"], m["n"]))
    if "answers_changed" in test:
        table.add_row("test answers changed", str(test["answers_changed"]["n"]))
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
