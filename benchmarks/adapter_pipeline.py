"""The adapter pipeline on a real model: `merge` -> `eval ppl`, and `audit-svd` -> `--compress` -> `eval ppl`.

On SmolLM2-135M-Instruct with a LoRA adapter from `gsmkit train sft` (pass its folder with --adapter):
1. `gsmkit merge` (float32, verification gate on GSM8K test problems) and a check that the merged
   folder loads with plain `transformers.AutoModelForCausalLM.from_pretrained`;
2. `gsmkit eval ppl` on `--rows` GSM8K test answers (`{prompt: "Question: q\\nAnswer:", response: " a"}`)
   for the base, base + adapter, and the merged model: merged and unmerged must agree within 1e-4
   relative;
3. `gsmkit audit-svd` on the adapter, `--compress` to the suggested ranks, and `eval ppl` of the
   compressed adapter next to the original, with parameter counts before and after.

Run from the project root:
    python benchmarks/adapter_pipeline.py --adapter bench-out/train_speed/gsmkit \\
        --out bench-out/adapter_pipeline
Writes `<out>/results.json` and prints it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _common import bench_parser, ensure_hf_model, gsmkit_command, machine_info, run_timed, tail


def gsmkit_json(args: list[str], log: Path) -> tuple[dict, float]:
    wall, code = run_timed(gsmkit_command() + args + ["--json"], log)
    if code != 0:
        raise SystemExit(f"gsmkit {' '.join(args[:2])} failed ({code}):\n{tail(log)}")
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line), wall
    raise SystemExit(f"no JSON summary in {log}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None,
                        help="HF folder of the base (default: converted demo)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--energy", type=float, default=0.90)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or (out.parent / "smollm2-hf")
    ensure_hf_model(model)
    adapter = args.adapter.resolve()

    from gsmkit.data.gsm8k import load_gsm8k

    data = out / "ppl_data.jsonl"
    problems = load_gsm8k(args.gsm8k_dir, "test")[: args.rows]
    data.write_text("".join(json.dumps({"prompt": f"Question: {p.question}\nAnswer:",
                                        "response": f" {p.answer}",
                                        "metadata": {"source": "gsm8k"}}) + "\n" for p in problems))
    logs = out / "logs"
    results: dict = {}
    merged = out / "merged"
    results["merge"], results["merge_wall_s"] = gsmkit_json(
        ["merge", "--model", str(model), "--adapter", str(adapter), "--data", str(args.gsm8k_dir),
         "--out", str(merged), "--overwrite"], logs / "merge.log")

    probe = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
             "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
             "AutoTokenizer.from_pretrained(sys.argv[1]); "
             "print(sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-c", probe, str(merged)], check=False, capture_output=True,
                            text=True)
    results["merged_loads_with_transformers"] = loaded.returncode == 0
    results["merged_parameters"] = (int(loaded.stdout.strip().splitlines()[-1]) if loaded.returncode == 0
                                    else None)

    def ppl(name: str, *extra: str) -> dict:
        summary, wall = gsmkit_json(["eval", "ppl", "--data", str(data), "--out", str(out / f"ppl_{name}"),
                                     "--overwrite", *extra], logs / f"ppl_{name}.log")
        return {"ppl": summary["overall"]["ppl"] if "overall" in summary else summary.get("ppl"),
                "loss": summary["overall"]["loss"] if "overall" in summary else summary.get("loss"),
                "tokens": summary["overall"]["tokens"] if "overall" in summary else summary.get("tokens"),
                "wall_s": round(wall, 1)}

    results["ppl_base"] = ppl("base", "--model", str(model))
    results["ppl_adapter"] = ppl("adapter", "--model", str(model), "--adapter", str(adapter))
    results["ppl_merged"] = ppl("merged", "--model", str(merged))
    results["merged_vs_adapter_rel_ppl_diff"] = abs(
        results["ppl_merged"]["ppl"] - results["ppl_adapter"]["ppl"]) / results["ppl_adapter"]["ppl"]

    audit_dir, compressed = out / "audit", out / "compressed"
    results["audit"], _ = gsmkit_json(["audit-svd", "--adapter", str(adapter), "--energy", str(args.energy),
                                       "--out", str(audit_dir)], logs / "audit.log")
    results["compress"], _ = gsmkit_json(["audit-svd", "--adapter", str(adapter),
                                          "--energy", str(args.energy),
                                          "--compress", "--out", str(compressed)], logs / "compress.log")
    results["ppl_compressed"] = ppl("compressed", "--model", str(model), "--adapter", str(compressed))
    record = {"benchmark": "adapter_pipeline", "adapter": str(adapter), "model": str(model),
              "machine": machine_info(), "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
