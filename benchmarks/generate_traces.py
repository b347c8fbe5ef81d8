"""generate-traces throughput: `gsmkit generate-traces` against a naive loop calling `model.generate`
once per attempt, same model, problems, prompts, K and sampling settings, in one run.

The naive loop is what a course script does: for each problem, for attempt 1..K, one
`model.generate(prompt, do_sample=True)` call (batch 1, the prompt re-encoded every time), stop at the
first correct attempt (`answers.primary_answer`, the same check gsmkit uses). Both sides count
attempts the same way (the number of the first correct attempt, else K) and both are timed by wall
clock from process start to exit, model loading included; gsmkit's own generation-only rate is
reported too. Success rates are compared with their 95% Wilson intervals and a two-proportion z-test.

Run from the project root:
    python benchmarks/generate_traces.py --out bench-out/generate_traces              # 16 problems, ~15 min
    python benchmarks/generate_traces.py --out bench-out/generate_traces --problems 2 # quick check
Writes `<out>/results.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from _common import bench_parser, ensure_hf_model, gsmkit_command, machine_info, run_timed, tail
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, model_dir=True)
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--k", type=int, default=3, help="few-shot exemplars in each prompt")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--naive-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def naive_worker(args: argparse.Namespace) -> None:
    """The baseline, run in its own process: one `model.generate` call per attempt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsmkit.answers import answers_equal, primary_answer
    from gsmkit.data.fewshot import pool_exemplars, pool_hashes, read_pool
    from gsmkit.data.gsm8k import load_gsm8k, select_problems
    from gsmkit.modeling import eos_token_ids
    from gsmkit.prompts import answer_format, render_prompt, resolve_style

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    pool = read_pool(args.out / "pool.jsonl")
    exemplars = pool_exemplars(pool, args.k)
    hashes = pool_hashes(pool[: args.k])
    problems = [p for p in select_problems(load_gsm8k(args.gsm8k_dir, "train"), 0, args.problems)
                if p.sha256 not in hashes]
    style = resolve_style("auto", tok)
    fmt = answer_format(style)
    eos = list(eos_token_ids(tok, model))
    rows = []
    t_gen = time.perf_counter()
    tokens = 0
    for i, p in enumerate(problems):
        ids = tok(render_prompt(style, p.question, exemplars, tok), return_tensors="pt",
                  add_special_tokens=False).input_ids
        attempts, source = args.max_attempts, "fallback"
        for a in range(args.max_attempts):
            torch.manual_seed(args.seed * 1_000_003 + i * 101 + a)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=args.temperature, top_p=args.top_p, top_k=0,
                                     max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:]
            tokens += len(new)
            text = tok.decode(new, skip_special_tokens=True)
            if answers_equal(primary_answer(text, fmt), p.gold):
                attempts, source = a + 1, "model"
                break
        rows.append({"id": p.id, "attempts": attempts, "source": source})
        print(f"naive {i + 1}/{len(problems)}", file=sys.stderr, flush=True)
    gen_s = time.perf_counter() - t_gen
    result = {"rows": rows, "generation_s": gen_s, "generated_tokens": tokens, "load_s": t_gen - t0}
    args.naive_worker.write_text(json.dumps(result))


def wilson(successes: int, n: int) -> tuple[float, float]:
    from gsmkit.evaluation.stats import wilson_interval

    return wilson_interval(successes, n)


def two_proportion_p(s1: int, n1: int, s2: int, n2: int) -> float:
    """Two-sided p-value of a two-proportion z-test (1.0 when both rates are 0 or 1)."""
    p = (s1 + s2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = abs(s1 / n1 - s2 / n2) / se
    return math.erfc(z / math.sqrt(2))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.naive_worker is not None:
        naive_worker(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve()
    ensure_hf_model(model_dir)
    logs = args.out / "logs"
    gsmkit = gsmkit_command()
    results: dict[str, Any] = {"benchmark": "generate_traces",
                               "settings": {k: str(v) for k, v in vars(args).items() if k != "naive_worker"},
                               "machine": machine_info(), "commands": {}}

    pool = args.out / "pool.jsonl"
    cmd = [*gsmkit, "fewshot", "--data", str(args.gsm8k_dir), "--out", str(pool)]
    _, rc = run_timed(cmd, logs / "fewshot.log")
    if rc:
        raise SystemExit(tail(logs / "fewshot.log"))

    traces = args.out / "traces.jsonl"
    cmd = [*gsmkit, "generate-traces", "--model", str(model_dir), "--data", str(args.gsm8k_dir),
           "--num-samples", str(args.problems), "--max-attempts", str(args.max_attempts), "--pool", str(pool),
           "--k", str(args.k), "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--out", str(traces), "--overwrite", "--json"]
    results["commands"]["gsmkit"] = cmd
    console.print("[bold]gsmkit generate-traces[/bold]")
    g_wall, rc = run_timed(cmd, logs / "gsmkit.log")
    if rc:
        raise SystemExit(tail(logs / "gsmkit.log"))
    stats = json.loads((args.out / "traces.stats.json").read_text())

    naive_json = args.out / "naive.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out),
           "--model-dir", str(model_dir), "--gsm8k-dir", str(args.gsm8k_dir),
           "--problems", str(args.problems), "--max-attempts", str(args.max_attempts), "--k", str(args.k),
           "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
           "--naive-worker", str(naive_json)]
    results["commands"]["naive"] = cmd
    console.print("[bold]naive model.generate loop[/bold]")
    n_wall, rc = run_timed(cmd, logs / "naive.log")
    if rc:
        raise SystemExit(tail(logs / "naive.log"))
    naive = json.loads(naive_json.read_text())

    n_rows = naive["rows"]
    n_attempts = sum(r["attempts"] for r in n_rows)
    n_succ = sum(r["source"] == "model" for r in n_rows)
    g_attempts, g_succ, g_n = stats["total_attempts"], stats["successes"], stats["total_samples"]
    results["gsmkit"] = {"wall_s": round(g_wall, 2), "generation_s": stats["generation_s"], "problems": g_n,
                         "attempts": g_attempts, "successes": g_succ, "success_rate": g_succ / g_n,
                         "success_ci95": wilson(g_succ, g_n), "attempts_per_s_wall": g_attempts / g_wall,
                         "attempts_per_s_generation": stats["attempts_per_s"],
                         "completions": stats["completions_this_run"],
                         "generated_tokens": stats["generated_tokens_this_run"],
                         "pass_at_k": stats["pass_at_k"], "engine": stats["engine"]}
    results["naive"] = {"wall_s": round(n_wall, 2), "generation_s": round(naive["generation_s"], 2),
                        "problems": len(n_rows), "attempts": n_attempts, "successes": n_succ,
                        "success_rate": n_succ / len(n_rows), "success_ci95": wilson(n_succ, len(n_rows)),
                        "attempts_per_s_wall": n_attempts / n_wall,
                        "attempts_per_s_generation": n_attempts / naive["generation_s"],
                        "generated_tokens": naive["generated_tokens"]}
    results["speedup_wall"] = (results["gsmkit"]["attempts_per_s_wall"]
                               / results["naive"]["attempts_per_s_wall"])
    results["speedup_generation"] = (results["gsmkit"]["attempts_per_s_generation"]
                                     / results["naive"]["attempts_per_s_generation"])
    results["success_rate_p_value"] = two_proportion_p(g_succ, g_n, n_succ, len(n_rows))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title=f"generate-traces: {g_n} problems, K={args.max_attempts}, T={args.temperature}, "
                        f"top-p {args.top_p}, {args.k}-shot, {args.max_new_tokens} tokens")
    for col in ("", "attempts", "wall s", "attempts/s (wall)", "attempts/s (gen)", "solved", "95% CI"):
        table.add_column(col, justify="right")
    for name in ("gsmkit", "naive"):
        r = results[name]
        table.add_row(name, str(r["attempts"]), f"{r['wall_s']:.1f}", f"{r['attempts_per_s_wall']:.3f}",
                      f"{r['attempts_per_s_generation']:.3f}", f"{r['successes']}/{r['problems']}",
                      "{:.1%}-{:.1%}".format(*r["success_ci95"]))
    console.print(table)
    console.print(f"speed-up {results['speedup_wall']:.2f}x wall clock, "
                  f"{results['speedup_generation']:.2f}x generation only; "
                  f"success rates differ with p = {results['success_rate_p_value']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
