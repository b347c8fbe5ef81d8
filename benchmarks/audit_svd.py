"""SVD of LoRA updates: gsmkit's QR path against a dense `torch.linalg.svdvals(B @ A)`, one process.

What it measures, for random LoRA factors shaped like a 7B model's modules (d x k = 4096 x 4096, as
q_proj / o_proj, and 4096 x 14336, as down_proj; r = 16 and 64):
- qr_s: seconds of `gsmkit.adapters.spectra.lora_singular_values` (float64 QR of B [d, r] and A^T [k, r],
  then the singular values of the r x r core), best of `--repeats` after one warm-up call;
- dense_s: seconds of forming scale * B @ A in float32 and `torch.linalg.svdvals` of it, best of
  `--dense-repeats` (the peers' way; 9.7 s and 53 s for the r = 16 shapes in BASELINES.md);
- speedup = dense_s / qr_s, and the largest difference between the two sets of r singular values,
  relative to each value and relative to the largest one.

Run from the project root (the full shapes take a few minutes of dense SVDs on two CPU cores; run it
when nothing else is using the CPU):
    python benchmarks/audit_svd.py --out bench-out/audit_svd            # 7B shapes
    python benchmarks/audit_svd.py --out bench-out/audit_svd_quick --quick   # 512 x 512 / 512 x 1792, seconds
Writes `<out>/results.json` (all numbers and machine facts) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import machine_info

# (like which module of a 7B model, d, k); the quick shapes keep the 1 : 3.5 aspect of down_proj.
FULL_SHAPES = [("q_proj", 4096, 4096), ("down_proj", 4096, 14336)]
QUICK_SHAPES = [("q_proj", 512, 512), ("down_proj", 512, 1792)]
RANKS = (16, 64)


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def measure(name: str, d: int, k: int, r: int, repeats: int, dense_repeats: int, seed: int) -> dict:
    import torch

    from gsmkit.adapters.spectra import lora_singular_values

    gen = torch.Generator().manual_seed(seed)
    # Trained-looking factors: A kaiming-like (PEFT's init), B small but non-zero; alpha = 2r.
    a = torch.randn(r, k, generator=gen) / k**0.5  # [r, k]
    b = 0.02 * torch.randn(d, r, generator=gen)  # [d, r]
    scale = 2.0
    lora_singular_values(a, b, scale)  # warm-up: first-call allocations and LAPACK setup
    qr_s, qr = _best_time(lambda: lora_singular_values(a, b, scale), repeats)
    dense_s, dense = _best_time(lambda: torch.linalg.svdvals(scale * (b @ a)), dense_repeats)
    dense = dense[:r].to(torch.float64)  # the other min(d, k) - r values are rounding noise around 0
    diff = (qr - dense).abs()
    return {
        "module": name, "d": d, "k": k, "r": r,
        "qr_s": qr_s, "dense_s": dense_s, "speedup": dense_s / qr_s,
        "max_rel_diff": float((diff / dense.abs()).max()),
        "max_diff_rel_to_top": float(diff.max() / dense[0]),
        "dense_bytes": d * k * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true",
                        help="512 x 512 and 512 x 1792 instead of the 7B shapes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the QR path (best is kept)")
    parser.add_argument("--dense-repeats", type=int, default=None,
                        help="timed dense SVDs, best kept (default 1, or 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.dense_repeats is None:
        args.dense_repeats = 3 if args.quick else 1
    # Warm LAPACK's dense SVD once on a small matrix, so the first shape's dense time is not its setup.
    torch.linalg.svdvals(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    rows = []
    for i, (name, d, k) in enumerate(shapes):
        for j, r in enumerate(RANKS):
            rows.append(measure(name, d, k, r, args.repeats, args.dense_repeats, seed=args.seed + 10 * i + j))
            row = rows[-1]
            print(f"{name} {d}x{k} r={r}: qr {row['qr_s'] * 1e3:.2f} ms, dense {row['dense_s']:.3f} s",
                  file=sys.stderr, flush=True)
    record = {
        "benchmark": "audit_svd",
        "quick": args.quick,
        "repeats": args.repeats,
        "dense_repeats": args.dense_repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")

    table = Table(title=f"singular values of scale * B @ A ({torch.get_num_threads()} threads)")
    for col in ("like", "d x k", "r", "QR path", "dense", "speedup", "max rel diff"):
        table.add_column(col, justify="left" if col == "like" else "right")
    for row in rows:
        table.add_row(row["module"], f"{row['d']}x{row['k']}", str(row["r"]), f"{row['qr_s'] * 1e3:.2f} ms",
                      f"{row['dense_s']:.3f} s", f"{row['speedup']:.0f}x", f"{row['max_rel_diff']:.1e}")
    Console().print(table)
    print(f"results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
