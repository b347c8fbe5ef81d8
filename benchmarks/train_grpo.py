"""GRPO on SmolLM2-135M-Instruct, two benchmarks.

`learning` (the default): a short GRPO run, the reward curve, and the format and correctness rewards
on held-out GSM8K test problems before and after.

Steps (all through the gsmkit CLI, so the numbers are what a user gets):
1. `gsmkit eval gsm8k` (greedy) on the first `--eval-problems` test problems with the starting policy
   (the base model, or `--init-adapter`, e.g. the SFT adapter of `train_sft.py learning`);
2. `gsmkit train grpo --time-limit M` from that policy on GSM8K train (as many steps as M minutes allow);
3. the same evaluation with the GRPO adapter.
Each evaluation's completions are scored with the very reward functions GRPO trains on
(`gsmkit.training.rewards`), so "before" and "after" are in the units of the reward curve.

`rollouts`: the same GRPO run twice in one benchmark, once with completions sampled by gsmkit's engine
(`--rollouts engine`) and once by TRL's default `model.generate` (`--rollouts trl`): same model, prompts,
group size, lengths, learning rate and seed, `--steps` optimizer steps each, run one after the other
(never at the same time). Per path: seconds per step, split into rollout (`rollout_time` in the log) and
update (the rest of TRL's `step_time`), completion tokens per second of the rollouts, and the reward
curve; then the speed ratio.

Run from the project root:
    python benchmarks/train_grpo.py --out bench-out/train_grpo --init-adapter bench-out/train_learning/sft
    python benchmarks/train_grpo.py --out bench-out/train_grpo --minutes 1 --eval-problems 4   # quick check
    python benchmarks/train_grpo.py rollouts --out bench-out/grpo_rollouts --steps 10
Writes `<out>/results.json` and `<out>/grpo/reward_curve.png` (learning), `<out>/results.json`,
`<out>/reward_curves.png` and `<out>/<path>/trainer_log.jsonl` (rollouts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import bench_parser, ensure_hf_model, gsmkit_command, machine_info, run_timed, tail
from rich.console import Console

from gsmkit.prompts import answer_format
from gsmkit.training import rewards

console = Console(stderr=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, model_dir=True)
    p.add_argument("mode", nargs="?", choices=("learning", "rollouts"), default="learning")
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="starting adapter (default: the base model)")
    p.add_argument("--style", default="chat")
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=160)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--eval-problems", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=10, help="rollouts: optimizer steps of each run")
    p.add_argument("--k", type=int, default=2, help="rollouts: few-shot exemplars in each prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    return p.parse_args(argv)


def reward_means(predictions: Path, style: str) -> dict[str, float]:
    """Mean of each reward over the completions of an `eval gsm8k` predictions file."""
    fmt = answer_format(style)
    rows = [json.loads(x) for x in predictions.read_text().splitlines() if x.strip()]
    scores = {
        "correctness": [rewards.correctness(r["completion"], r["gold"], fmt) for r in rows],
        "strict_format": [rewards.strict_format(r["completion"], fmt) for r in rows],
        "soft_format": [rewards.soft_format(r["completion"], fmt) for r in rows],
        "integer": [rewards.integer_answer(r["completion"], fmt) for r in rows],
    }
    means = {k: sum(v) / len(v) for k, v in scores.items()}
    means["weighted_total"] = sum(rewards.DEFAULT_WEIGHTS[k] * means[k] for k in rewards.DEFAULT_WEIGHTS)
    means["n"] = len(rows)
    return means


def main(argv=None) -> int:
    args = parse_args(argv)
    return rollouts(args) if args.mode == "rollouts" else learning(args)


def step_rows(trainer_log: Path) -> list[dict[str, float]]:
    """Per optimizer step of a `train grpo` log: step, reward, step / rollout / update seconds, completion
    tokens (mean length x completions of the step, read from the manifest's resolved settings)."""
    log = [json.loads(x) for x in trainer_log.read_text().splitlines() if x.strip()]
    manifest = json.loads((trainer_log.parent / "manifest.json").read_text())
    per_step = manifest["resolved"]["completions_per_step"]
    rows = []
    for r in log:
        if "reward" not in r:
            continue
        rows.append({"step": r["step"], "reward": r["reward"], "step_s": r["step_time"],
                     "rollout_s": r["rollout_time"], "update_s": r["step_time"] - r["rollout_time"],
                     "completion_tokens": r["completions/mean_length"] * per_step})
    return rows


def summarise(rows: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    n = len(rows)
    total = {k: sum(r[k] for r in rows) for k in ("step_s", "rollout_s", "update_s", "completion_tokens")}
    return {"steps": n, "wall_s": round(wall_s, 1), "s_per_step": total["step_s"] / n,
            "rollout_s_per_step": total["rollout_s"] / n, "update_s_per_step": total["update_s"] / n,
            "completion_tokens_per_s": total["completion_tokens"] / total["rollout_s"],
            "mean_reward": sum(r["reward"] for r in rows) / n, "curve": rows}


def prepare(args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """Both benchmarks' start: the output folder, the float32 model folder (made once), the gsmkit command."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve()
    ensure_hf_model(model_dir)
    return out, model_dir, gsmkit_command()


def rollouts(args: argparse.Namespace) -> int:
    """Engine rollouts against TRL's default generation: the same run, one after the other."""
    out, model_dir, gsmkit = prepare(args)
    pool = out / "pool.jsonl"
    if not pool.exists():
        seconds, rc = run_timed([*gsmkit, "fewshot", "--data", str(args.gsm8k_dir), "--out", str(pool)],
                                out / "logs" / "fewshot.log")
        if rc:
            raise SystemExit(tail(out / "logs" / "fewshot.log"))
    results: dict[str, Any] = {"benchmark": "train_grpo rollouts",
                               "settings": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "commands": {}, "paths": {}}
    for path in ("engine", "trl"):
        cmd = [*gsmkit, "train", "grpo", "--model", str(model_dir), "--data", str(args.gsm8k_dir),
               "--pool", str(pool), "--k", str(args.k), "--style", args.style,
               "--train-samples", str(args.train_samples), "--num-generations", str(args.num_generations),
               "--prompts-per-step", str(args.prompts_per_step),
               "--max-completion-length", str(args.max_completion_length),
               "--temperature", str(args.temperature),
               "--learning-rate", str(args.learning_rate), "--max-steps", str(args.steps),
               "--seed", str(args.seed), "--rollouts", path, "--out", str(out / path),
               "--overwrite", "--json"]
        results["commands"][path] = cmd
        console.print(f"[bold]train grpo --rollouts {path}[/bold]: {args.steps} steps")
        seconds, rc = run_timed(cmd, out / "logs" / f"{path}.log")
        if rc:
            raise SystemExit(tail(out / "logs" / f"{path}.log"))
        results["paths"][path] = summarise(step_rows(out / path / "trainer_log.jsonl"), seconds)
    e, t = results["paths"]["engine"], results["paths"]["trl"]
    results["speedup_steps_per_s"] = t["s_per_step"] / e["s_per_step"]
    results["speedup_rollout"] = t["rollout_s_per_step"] / e["rollout_s_per_step"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_reward_curves(results, out / "reward_curves.png")
    for name, r in results["paths"].items():
        console.print(f"{name:>6}: {r['s_per_step']:.1f} s/step (rollout {r['rollout_s_per_step']:.1f} s, "
                      f"update {r['update_s_per_step']:.1f} s), "
                      f"{r['completion_tokens_per_s']:.0f} completion tokens/s, "
                      f"mean reward {r['mean_reward']:.3f}")
    console.print(f"engine / trl: {results['speedup_steps_per_s']:.2f}x steps per second, "
                  f"{results['speedup_rollout']:.2f}x rollouts; results in {out / 'results.json'}")
    return 0


def plot_reward_curves(results: dict[str, Any], png: Path) -> None:
    """Both paths' mean reward per step, on one axes."""
    from gsmkit.training.plots import draw_png

    def draw(ax: Any) -> None:
        for name, r in results["paths"].items():
            ax.plot([c["step"] for c in r["curve"]], [c["reward"] for c in r["curve"]], marker=".",
                    label=f"--rollouts {name} (mean {r['mean_reward']:.2f})")
        ax.set_ylabel("mean reward of the step's completions")
        ax.legend(fontsize=8)

    draw_png(png, (6.5, 3.8), draw)


def learning(args: argparse.Namespace) -> int:
    out, model_dir, gsmkit = prepare(args)
    logs = out / "logs"
    results: dict[str, Any] = {"benchmark": "train_grpo",
                               "settings": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "commands": {}}

    def evaluate(name: str, adapter: Path | None) -> dict[str, Any]:
        cmd = [*gsmkit, "eval", "gsm8k", "--model", str(model_dir), "--data", str(args.gsm8k_dir),
               "--limit", str(args.eval_problems), "--style", args.style,
               "--max-new-tokens", str(args.max_completion_length),
               "--out", str(out / name), "--overwrite", "--json"]
        if adapter is not None:
            cmd += ["--adapter", str(adapter)]
        results["commands"][name] = cmd
        console.print(f"[bold]{name}[/bold]: eval gsm8k on {args.eval_problems} test problems")
        seconds, rc = run_timed(cmd, logs / f"{name}.log")
        if rc:
            raise SystemExit(tail(logs / f"{name}.log"))
        metrics = json.loads((out / name / "metrics.json").read_text())
        return {"rewards": reward_means(out / name / "predictions.jsonl", args.style),
                "accuracy_strict": metrics["accuracy_strict"],
                "accuracy_flexible": metrics["accuracy_flexible"],
                "wall_s": round(seconds, 1)}

    results["before"] = evaluate("eval_before", args.init_adapter.resolve() if args.init_adapter else None)

    grpo_dir = out / "grpo"
    cmd = [*gsmkit, "train", "grpo", "--model", str(model_dir), "--data", str(args.gsm8k_dir),
           "--style", args.style,
           "--train-samples", str(args.train_samples), "--num-generations", str(args.num_generations),
           "--prompts-per-step", str(args.prompts_per_step),
           "--max-completion-length", str(args.max_completion_length),
           "--learning-rate", str(args.learning_rate), "--max-steps", "10000",
           "--time-limit", str(args.minutes), "--seed", str(args.seed),
           "--out", str(grpo_dir), "--overwrite", "--json"]
    if args.init_adapter:
        cmd += ["--init-adapter", str(args.init_adapter.resolve())]
    results["commands"]["grpo"] = cmd
    console.print(f"[bold]train grpo[/bold] for {args.minutes} minutes")
    seconds, rc = run_timed(cmd, logs / "grpo.log")
    if rc:
        raise SystemExit(tail(logs / "grpo.log"))
    log = [json.loads(x) for x in (grpo_dir / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    curve = [{"step": r["step"], "reward": r["reward"],
              **{k.split("/")[1]: r[k] for k in r if k.startswith("rewards/") and k.endswith("/mean")}}
             for r in log if "reward" in r]
    results["grpo"] = {"wall_s": round(seconds, 1), "steps": curve[-1]["step"] if curve else 0,
                       "curve": curve,
                       "step_time_s": [r.get("step_time") for r in log if "reward" in r]}

    results["after"] = evaluate("eval_after", grpo_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    b, a = results["before"]["rewards"], results["after"]["rewards"]
    for key in ("correctness", "strict_format", "soft_format", "integer", "weighted_total"):
        console.print(f"{key:>15}: {b[key]:.3f} -> {a[key]:.3f}")
    console.print(f"{results['grpo']['steps']} GRPO steps in {seconds:.0f}s; "
                  f"reward curve in {grpo_dir / 'reward_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
