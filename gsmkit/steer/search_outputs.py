"""What `steer search` writes about its study: trials.csv, best.json, the accuracy-against-alpha plot, and
the comparison of the two final test evaluations.

In: the study's trials (`search_study.trial_rows`), the chosen trial, the unsteered validation accuracy, the
two test folders (`eval gsm8k` outputs). Out: `publish` writers (`csv_writer`), `best_record` (best.json,
its `flags` ready to paste after `gsmkit eval gsm8k`), `pareto_rows`, `plot_accuracy` (a PNG written
atomically with matplotlib's Agg backend) and `compare_tests` (accuracies with 95% Wilson intervals, and
the problems whose answer changed, by id).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.evaluation.stats import wilson_interval
from gsmkit.run_folder import save_figure

BEST_VERSION = 1
TRIAL_COLUMNS = ("number", "state", "method", "layer", "alpha", "accuracy", "ci95_low", "ci95_high", "n",
                 "correct", "safety", "safety_ci95_low", "safety_ci95_high", "safety_n", "intermediate",
                 "seconds", "started", "worker")


def csv_writer(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    """A `publish` writer of trials.csv (one row per trial, by number)."""

    def write(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=TRIAL_COLUMNS, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow(row)

    return write


def rate(correct: int, n: int) -> dict[str, Any]:
    """A sampled proportion as every summary writes it: value, 95% Wilson interval, n."""
    return {"accuracy": correct / n if n else 0.0, "ci95": list(wilson_interval(correct, n)), "n": n,
            "correct": correct}


def trial_summary(trial: Any, folders: dict[str, str]) -> dict[str, Any]:
    """A finished trial: its setting and what it scored (with intervals)."""
    method = trial.user_attrs["method"]
    out = {"trial": trial.number, "method": method, "steer": folders[method],
           "layer": trial.user_attrs["layer"], "alpha": trial.params["alpha"],
           "validation": rate(trial.user_attrs["correct"], trial.user_attrs["n"])}
    if "safe" in trial.user_attrs:
        safe, total = trial.user_attrs["safe"], trial.user_attrs["safety_n"]
        out["safety"] = {"safety_rate": safe / total if total else 0.0,
                         "ci95": list(wilson_interval(safe, total)), "n": total, "safe": safe}
    return out


def best_record(trial: Any, folders: dict[str, str], positions: str, objective: str) -> dict[str, Any]:
    """best.json: the setting `--steer best.json` reads (gsmkit.settings.SteerOptions), and its flags."""
    from gsmkit.settings import BEST_FORMAT

    s = trial_summary(trial, folders)
    positions = "generated" if s["method"] == "dac" else positions
    layer, alpha = str(s["layer"]), float(s["alpha"])
    return {
        "format": BEST_FORMAT, "version": BEST_VERSION, "steer": s["steer"], "method": s["method"],
        "steer_layer": layer, "steer_alpha": alpha, "steer_positions": positions,
        "validation": {k: s["validation"][k] for k in ("accuracy", "ci95", "n")},
        **({"safety": s["safety"]} if "safety" in s else {}),
        "objective": objective, "trial": s["trial"],
        "flags": ["--steer", s["steer"], "--steer-layer", layer, "--steer-alpha", repr(alpha),
                  "--steer-positions", positions],
    }


def pick_best(study: Any, objective: str) -> tuple[Any, list[Any]]:
    """(the trial best.json holds, the Pareto front). One objective: the best COMPLETE trial (a pruned
    trial never evaluated every problem). Two: the front's trial with the highest accuracy, then safety."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise DataError(f"study '{study.study_name}' holds no COMPLETE trial to choose from",
                        hint="every trial was pruned or failed: run more trials (--n-trials)")
    if objective == "accuracy":
        best = max(complete, key=lambda t: (t.value, -t.number))
        return best, [best]
    front = sorted(study.best_trials, key=lambda t: t.number)
    best = max(front, key=lambda t: (t.values[0], t.values[1], -t.number))
    return best, front


def plot_accuracy(rows: list[dict[str, Any]], unsteered: float | None, png: Path) -> None:
    """Validation accuracy against alpha, one series per (method, layer); pruned trials hollow, at their
    last running accuracy; the unsteered accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {r["method"] for r in rows if r["method"]}
    series: dict[str, dict[str, list]] = {}
    for r in rows:
        if r["state"] not in ("COMPLETE", "PRUNED") or r["accuracy"] == "":
            continue
        label = f"{r['method']} layer {r['layer']}" if len(methods) > 1 else f"layer {r['layer']}"
        s = series.setdefault(label, {"COMPLETE": [], "PRUNED": []})
        s[r["state"]].append((float(r["alpha"]), float(r["accuracy"])))
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, s) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        done = sorted(s["COMPLETE"])
        if done:
            ax.plot([p[0] for p in done], [p[1] for p in done], marker="o", color=color, label=label)
        if s["PRUNED"]:
            ax.scatter([p[0] for p in s["PRUNED"]], [p[1] for p in s["PRUNED"]], facecolors="none",
                       edgecolors=color, label=f"{label} (pruned)")
    if unsteered is not None:
        ax.axhline(unsteered, linestyle="--", color="grey", label="unsteered")
    ax.set_xlabel("alpha")
    ax.set_ylabel("validation accuracy (strict)")
    ax.grid(alpha=0.3)
    if series or unsteered is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)


def _predictions(folder: Path) -> dict[str, dict[str, Any]]:
    from gsmkit.evaluation.gsm8k import PREDICTIONS
    from gsmkit.jsonl import iter_jsonl

    return {row["id"]: row for _, row in iter_jsonl(folder / PREDICTIONS)}


def compare_tests(best_dir: Path, unsteered_dir: Path) -> dict[str, Any]:
    """Both test accuracies (strict, with 95% intervals and n) and the problems whose answer changed."""
    best, plain = _predictions(best_dir), _predictions(unsteered_dir)
    if set(best) != set(plain):
        raise DataError(f"{best_dir} and {unsteered_dir} hold predictions for different problems",
                        hint="rerun the search with --overwrite")
    ids = list(plain)
    changed = [i for i in ids if best[i]["strict"] != plain[i]["strict"]]
    gained = [i for i in ids if best[i]["correct_strict"] and not plain[i]["correct_strict"]]
    lost = [i for i in ids if plain[i]["correct_strict"] and not best[i]["correct_strict"]]
    n = len(ids)

    def acc(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        flexible = sum(r["correct_flexible"] for r in rows.values())
        return {**rate(sum(r["correct_strict"] for r in rows.values()), n),
                "flexible": rate(flexible, n)}

    b, u = acc(best), acc(plain)
    return {"n": n, "best": b, "unsteered": u, "difference": b["accuracy"] - u["accuracy"],
            "answers_changed": {"n": len(changed), "ids": changed},
            "became_correct": {"n": len(gained), "ids": gained},
            "became_wrong": {"n": len(lost), "ids": lost},
            "completions_changed": sum(best[i]["completion"] != plain[i]["completion"] for i in ids)}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
