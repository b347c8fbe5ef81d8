"""`gsmkit compare A B` of two `eval ppl` runs of the same rows: does B score them as A does?

In: two finished `eval ppl` output folders (items.jsonl, metrics.json, manifest.json) and a tolerance.
Out: `compare_ppl` -> overall and per-source perplexity of each, the relative difference |ppl_B - ppl_A| /
ppl_A, the largest per-row |loss_B - loss_A|, the mean per-row loss difference with a paired bootstrap 95%
interval, and `passed` against `--ppl-tolerance` (the validate-merge-validate check: a merged model must
score every benchmark as base + adapter did). Runs of different rows (another file, window or tokenizer)
are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.evaluation.perplexity import ITEMS, METRICS
from gsmkit.jsonl import read_jsonl
from gsmkit.run_folder import FINGERPRINT, MANIFEST
from gsmkit.studies.run_files import check_manifest, check_metrics, check_shape, read_object, rerun_hint

COMMAND = "eval ppl"
_ITEM_KINDS: dict[str, Any] = {"index": int, "line": int, "tokens": int, "loss": float}  # what is compared


@dataclass(frozen=True)
class PplRun:
    path: Path
    items: list[dict[str, Any]]
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def is_ppl_run(path: str | Path) -> bool:
    """Whether `path` is an `eval ppl` output folder (by its files; finished or not)."""
    folder = Path(path)
    return folder.is_dir() and ((folder / ITEMS).is_file() or _command(folder) == COMMAND)


def _command(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def load_ppl_run(path: str | Path) -> PplRun:
    folder = Path(path)
    finished = (folder / ITEMS).is_file() and (folder / METRICS).is_file()
    if (folder / FINGERPRINT).is_file() or not finished:
        raise DataError(f"{folder}: not a finished {COMMAND} run (no {ITEMS} and {METRICS}, or it still "
                        f"holds {FINGERPRINT})", hint=f"rerun its `gsmkit {COMMAND}` command to finish it")
    path = folder / METRICS
    metrics = read_object(path, rerun_hint(path, COMMAND))
    check_shape(metrics, path, {"manifest": dict | None}, hint=rerun_hint(path, COMMAND))
    manifest = metrics.pop("manifest", None) or {}
    check_metrics(metrics, path, COMMAND)
    if manifest:
        check_manifest(manifest, path, COMMAND, prefix="manifest.")

    def item(obj: dict[str, Any], where: str) -> dict[str, Any]:
        check_shape(obj, where, _ITEM_KINDS, required=_ITEM_KINDS, hint=rerun_hint(folder / ITEMS, COMMAND))
        return obj

    items = list(read_jsonl(folder / ITEMS, item))
    return PplRun(folder, items, metrics, manifest)


def _check_same_rows(a: PplRun, b: PplRun) -> None:
    if len(a.items) != len(b.items):
        raise DataError(f"{a.path} and {b.path} scored different rows ({len(a.items)} against "
                        f"{len(b.items)})",
                        hint="compare two `eval ppl` runs of the same --data and --max-length/--stride")
    for x, y in zip(a.items, b.items, strict=True):
        if (x["line"], x["tokens"]) != (y["line"], y["tokens"]):
            raise DataError(f"{b.path / ITEMS}: row {y['index']} is line {y['line']} with {y['tokens']} "
                            f"tokens, but line {x['line']} with {x['tokens']} tokens in {a.path / ITEMS}",
                            hint="both runs must read the same file with the same tokenizer")


def _ppl(items: list[dict[str, Any]]) -> tuple[float, int]:
    tokens = sum(i["tokens"] for i in items)
    loss = sum(i["loss"] * i["tokens"] for i in items) / tokens if tokens else 0.0
    return math.exp(loss), tokens


def compare_ppl(a: PplRun, b: PplRun, *, tolerance: float | None, n_boot: int = 10000,
                seed: int = 0) -> dict[str, Any]:
    """Overall and per-source perplexities of the same rows scored by A and B, and the check."""
    from gsmkit.evaluation.stats import paired_bootstrap

    _check_same_rows(a, b)
    groups: dict[str, list[int]] = {"all": list(range(len(a.items)))}
    for i, row in enumerate(a.items):
        if row.get("source") is not None:
            groups.setdefault(f"source={row['source']}", []).append(i)
    rows = []
    for name, idx in groups.items():
        ppl_a, tokens = _ppl([a.items[i] for i in idx])
        ppl_b, _ = _ppl([b.items[i] for i in idx])
        rel = abs(ppl_b - ppl_a) / ppl_a if ppl_a else math.inf
        rows.append({"group": name, "n": len(idx), "tokens": tokens, "ppl_a": ppl_a, "ppl_b": ppl_b,
                     "rel_diff": rel, "passed": None if tolerance is None else rel <= tolerance})
    diffs = [y["loss"] - x["loss"] for x, y in zip(a.items, b.items, strict=True)]
    worst = max(range(len(diffs)), key=lambda i: abs(diffs[i])) if diffs else None
    return {
        "kind": COMMAND, "a": str(a.path), "b": str(b.path), "n": len(diffs), "tolerance": tolerance,
        "groups": rows,
        "loss_diff_mean": sum(diffs) / len(diffs) if diffs else 0.0,
        "loss_diff_ci95": list(paired_bootstrap(diffs, n_boot=n_boot, seed=seed)) if diffs else [0.0, 0.0],
        "loss_diff_max_abs": abs(diffs[worst]) if worst is not None else 0.0,
        "loss_diff_max_line": a.items[worst]["line"] if worst is not None else None,
        "passed": None if tolerance is None else all(r["passed"] for r in rows),
    }
