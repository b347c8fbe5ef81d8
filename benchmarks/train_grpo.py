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

`speed` (issue "Training that does no work twice"): the step's cost at two shapes, 2-shot chat x 4
completions (`2shot-x4`, the shape of `rollouts`) and 5-shot chat x 8 completions (`5shot-x8`), 2 prompts a
step, 160 completion tokens, `--steps` steps per run. Three ways to run the same command: `gsmkit` (engine
rollouts, each group's prompt computed once in the update: the defaults), `trl` (TRL's own `model.generate`
and TRL's own unshared loss: `--rollouts trl --no-shared-prompt`, i.e. GRPOTrainer as TRL ships it, under
gsmkit's data, rewards and LoRA) and `unshared` (engine rollouts, TRL's unshared update). gsmkit and trl
alternate `--repeats` rounds (gsmkit, trl, unshared, gsmkit, trl: `--unshared-repeats` rounds of the
last); every run is reported and each ratio is the worse pairing (our slowest run against their fastest).
`--trl-gc` gives the trl runs gradient checkpointing, TRL's own default. A finished run is kept in
`<out>/<shape>/<variant>-<i>/bench_run.json` and reused by a rerun of the same command.
Per run: seconds per step, rollout and update seconds (means with 95% t-intervals over the steps), the
positions the update ran through the model (`logps_positions`), completion tokens, peak RSS and the reward
curve.

Run from the project root:
    python benchmarks/train_grpo.py --out bench-out/train_grpo --init-adapter bench-out/train_learning/sft
    python benchmarks/train_grpo.py --out bench-out/train_grpo --minutes 1 --eval-problems 4   # quick check
    python benchmarks/train_grpo.py rollouts --out bench-out/grpo_rollouts --steps 10
    python benchmarks/train_grpo.py speed --out bench-out/grpo_speed --steps 10 [--shapes 5shot-x8]
Writes `<out>/results.json` and `<out>/grpo/reward_curve.png` (learning), `<out>/results.json`,
`<out>/reward_curves.png` and `<out>/<path>/trainer_log.jsonl` (rollouts), `<out>/results.json` and
`<out>/<shape>_rewards.png` (speed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import (
    alternating,
    bench_parser,
    ensure_hf_model,
    gsmkit_command,
    machine_info,
    run_peak,
    run_timed,
    tail,
    worse_ratio,
)
from rich.console import Console

from gsmkit.prompts import answer_format
from gsmkit.training import rewards

console = Console(stderr=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, model_dir=True)
    p.add_argument("mode", nargs="?", choices=("learning", "rollouts", "speed"), default="learning")
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
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES),
                   help="speed: the shapes to run, in order")
    p.add_argument("--repeats", type=int, default=2, help="speed: runs of gsmkit and of trl per shape")
    p.add_argument("--unshared-repeats", type=int, default=1,
                   help="speed: runs of gsmkit with --no-shared-prompt per shape (0: none)")
    p.add_argument("--trl-gc", action="store_true",
                   help="speed: the trl runs with gradient checkpointing (TRL's GRPOConfig default; without "
                        "it TRL's 5shot-x8 update needs more than 24 GB)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="speed: every variant with gradient checkpointing (a like-for-like update where the "
                        "unshared one needs it to fit)")
    p.add_argument("--variants", nargs="+", choices=("gsmkit", "trl", "unshared"),
                   default=["gsmkit", "trl", "unshared"],
                   help="speed: the variants, in the order they alternate")
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


SHAPES = {"2shot-x4": {"k": 2, "num_generations": 4}, "5shot-x8": {"k": 5, "num_generations": 8}}
VARIANTS = {"gsmkit": ["--rollouts", "engine", "--shared-prompt"],
            "trl": ["--rollouts", "trl", "--no-shared-prompt"],
            "unshared": ["--rollouts", "engine", "--no-shared-prompt"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    return {"rollouts": rollouts, "speed": speed, "learning": learning}[args.mode](args)


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
                     "completion_tokens": r["completions/mean_length"] * per_step,
                     "update_positions": r.get("logps_positions")})
    return rows


def summarise(rows: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    n = len(rows)
    total = {k: sum(r[k] for r in rows) for k in ("step_s", "rollout_s", "update_s", "completion_tokens")}
    return {"steps": n, "wall_s": round(wall_s, 1), "s_per_step": total["step_s"] / n,
            "rollout_s_per_step": total["rollout_s"] / n, "update_s_per_step": total["update_s"] / n,
            "completion_tokens_per_s": total["completion_tokens"] / total["rollout_s"],
            "mean_reward": sum(r["reward"] for r in rows) / n, "curve": rows}


def interval(values: list[float]) -> dict[str, Any]:
    from gsmkit.evaluation.stats import t_interval

    t = t_interval(values)
    return {"mean": t.mean, "ci95": [t.lo, t.hi], "n": t.n}


def grpo_command(args: argparse.Namespace, gsmkit: list[str], model_dir: Path, pool: Path, out: Path, k: int,
                 num_generations: int, steps: int, extra: list[str]) -> list[str]:
    """`gsmkit train grpo` as both the `rollouts` and the `speed` benchmarks run it."""
    return [*gsmkit, "train", "grpo", "--model", str(model_dir), "--data", str(args.gsm8k_dir),
            "--pool", str(pool), "--k", str(k), "--style", args.style,
            "--train-samples", str(args.train_samples), "--num-generations", str(num_generations),
            "--prompts-per-step", str(args.prompts_per_step),
            "--max-completion-length", str(args.max_completion_length),
            "--temperature", str(args.temperature),
            "--learning-rate", str(args.learning_rate), "--max-steps", str(steps),
            "--seed", str(args.seed), "--out", str(out), "--overwrite", "--json", *extra]


def make_pool(args: argparse.Namespace, gsmkit: list[str], out: Path) -> Path:
    pool = out / "pool.jsonl"
    if not pool.exists():
        _seconds, rc = run_timed([*gsmkit, "fewshot", "--data", str(args.gsm8k_dir), "--out", str(pool)],
                                 out / "logs" / "fewshot.log")
        if rc:
            raise SystemExit(tail(out / "logs" / "fewshot.log"))
    return pool


def speed(args: argparse.Namespace) -> int:
    """Each shape: gsmkit, trl and unshared runs alternating; every run reported, ratios of the worse
    pairing."""
    out, model_dir, gsmkit = prepare(args)
    pool = make_pool(args, gsmkit, out)
    results: dict[str, Any] = {"benchmark": "train_grpo speed",
                               "settings": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "shapes": {}}
    repeats = {"gsmkit": args.repeats, "trl": args.repeats, "unshared": args.unshared_repeats}
    for shape in args.shapes:
        def run(name: str, i: int, shape: str = shape) -> dict[str, Any]:
            folder = out / shape / f"{name}-{i + 1}"
            gc = args.gradient_checkpointing or (name == "trl" and args.trl_gc)
            extra = VARIANTS[name] + (["--gradient-checkpointing"] if gc else [])
            cmd = grpo_command(args, gsmkit, model_dir, pool, folder, SHAPES[shape]["k"],
                               SHAPES[shape]["num_generations"], args.steps, extra)
            record = folder / "bench_run.json"  # a finished run of the same command is reused, not rerun
            if record.exists() and json.loads(record.read_text())["command"] == cmd:
                console.print(f"[bold]{shape}[/bold] {name} run {i + 1}: reused {record}")
                return json.loads(record.read_text())
            console.print(f"[bold]{shape}[/bold] {name} run {i + 1}: {args.steps} steps")
            seconds, rc, peak_mb = run_peak(cmd, out / "logs" / f"{shape}-{name}-{i + 1}.log")
            if rc:
                raise SystemExit(f"exit {rc}\n" + tail(out / "logs" / f"{shape}-{name}-{i + 1}.log"))
            rows = step_rows(folder / "trainer_log.jsonl")
            summary = {"command": cmd, "wall_s": round(seconds, 1), "peak_rss_mb": round(peak_mb),
                       "steps": len(rows), "curve": rows}
            for key in ("step_s", "rollout_s", "update_s", "reward", "completion_tokens", "update_positions"):
                summary[key] = interval([r[key] for r in rows if r[key] is not None])
            mean = {k: summary[k]["mean"] for k in ("step_s", "rollout_s", "update_s")}
            console.print(f"  {mean['step_s']:.1f} s/step (rollout {mean['rollout_s']:.1f}"
                          f" s, update {mean['update_s']:.1f} s, "
                          f"{summary['update_positions']['mean']:.0f} update positions), "
                          f"reward {summary['reward']['mean']:.3f}, peak RSS {peak_mb / 1024:.1f} GB")
            record.write_text(json.dumps(summary, indent=2) + "\n")
            return summary

        runs = alternating([n for n in args.variants if repeats[n]], repeats, run)
        results["shapes"][shape] = {"runs": runs, **compare(runs)}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # after each shape
        plot_speed_rewards(runs, out / f"{shape}_rewards.png")
    for shape, r in results["shapes"].items():
        console.print(f"[bold]{shape}[/bold]: gsmkit / trl {r['steps_per_s_ratio']:.2f}x steps/s "
                      "(worse pairing); "
                      + (f"update unshared / shared {r['update_ratio']:.2f}x; rewards within each other's "
                         f"interval: {r['rewards_agree']}" if "update_ratio" in r else ""))
    console.print(f"results in {out / 'results.json'}")
    return 0


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The claims of one shape: steps/s gsmkit against trl and the update's seconds shared against unshared
    (both the worse pairing), and whether every shared run's mean reward lies in every unshared run's 95%
    interval and the other way round."""
    def means(name: str, key: str) -> list[float]:
        return [r[key]["mean"] for r in runs.get(name, [])]

    out = {"steps_per_s_ratio": worse_ratio(means("gsmkit", "step_s"), means("trl", "step_s"), False)}
    if runs.get("unshared"):
        out["update_ratio"] = worse_ratio(means("gsmkit", "update_s"), means("unshared", "update_s"), False)

        def inside(a: dict[str, Any], b: dict[str, Any]) -> bool:
            lo, hi = b["reward"]["ci95"]
            return lo is not None and lo <= a["reward"]["mean"] <= hi

        out["rewards_agree"] = all(inside(a, b) and inside(b, a)
                                   for a in runs["gsmkit"] for b in runs["unshared"])
    return out


def plot_speed_rewards(runs: dict[str, list[dict[str, Any]]], png: Path) -> None:
    """Every run's mean reward per step, on one axes."""
    from gsmkit.training.plots import draw_png

    def draw(ax: Any) -> None:
        for name, rs in runs.items():
            for i, r in enumerate(rs):
                ax.plot([c["step"] for c in r["curve"]], [c["reward"] for c in r["curve"]], marker=".",
                        label=f"{name} {i + 1} (mean {r['reward']['mean']:.2f})")
        ax.set_ylabel("mean reward of the step's completions")
        ax.legend(fontsize=7)

    draw_png(png, (6.5, 3.8), draw)


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
    pool = make_pool(args, gsmkit, out)
    results: dict[str, Any] = {"benchmark": "train_grpo rollouts",
                               "settings": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "commands": {}, "paths": {}}
    for path in ("engine", "trl"):
        cmd = grpo_command(args, gsmkit, model_dir, pool, out / path, args.k, args.num_generations,
                           args.steps, ["--rollouts", path])
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
