"""Finished `eval gsm8k` runs read back problem by problem, and paired with each other.

In: an `eval gsm8k` output folder (or its `predictions.jsonl`). Out: `load_evaluation` -> an `Evaluation`
(its predictions by problem id, validated as `gsmkit.records.Prediction` rows, plus its metrics.json and
manifest.json when they are there); `check_same_problems` refuses two evaluations of different problems
(or of the same problems with different gold answers); `paired` lines up one correctness column of two
evaluations, problem by problem, in the first one's order. Used by `gsmkit compare` and `gsmkit bench`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.evaluation.gsm8k import METRICS, PARTIAL, PREDICTIONS
from gsmkit.jsonl import read_jsonl
from gsmkit.records import Prediction
from gsmkit.run_folder import FINGERPRINT, MANIFEST
from gsmkit.studies.run_files import check_manifest, check_metrics, read_object, rerun_hint

COMMAND = "eval gsm8k"
COLUMNS = ("correct_strict", "correct_flexible")
_HINT = f"give a `gsmkit {COMMAND} --out` folder whose run finished, or its {PREDICTIONS}"


@dataclass(frozen=True)
class Evaluation:
    """One finished `eval gsm8k` run: `path` as given, `predictions` the file read, `rows` its prediction
    rows by problem id in file order, `metrics` its metrics.json without the embedded manifest, `manifest`
    its manifest.json (or the one inside metrics.json); None when the file is not there."""

    path: Path
    predictions: Path
    rows: dict[str, dict[str, Any]]
    metrics: dict[str, Any] | None
    manifest: dict[str, Any] | None

    @property
    def n(self) -> int:
        return len(self.rows)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(the predictions file, the run folder to read metrics and manifest from, if any)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder", hint=_HINT)
    if path.is_file():
        if path.name == PARTIAL:
            raise DataError(f"{path}: not a finished {COMMAND} run (this is its resume journal)",
                            hint=f"rerun its `gsmkit {COMMAND}` command to finish it, then give the folder")
        folder = path.parent if path.name == PREDICTIONS else None
        if folder is not None and (folder / FINGERPRINT).is_file():
            raise DataError(f"{folder}: not a finished {COMMAND} run (it still holds {FINGERPRINT})",
                            hint=f"rerun its `gsmkit {COMMAND}` command to finish it")
        return path, folder
    predictions = path / PREDICTIONS
    if (path / FINGERPRINT).is_file() or (path / PARTIAL).is_file():
        journal = PARTIAL if (path / PARTIAL).is_file() else FINGERPRINT
        raise DataError(f"{path}: not a finished {COMMAND} run (only its resume journal {journal} is there)",
                        hint=f"rerun its `gsmkit {COMMAND}` command to finish it")
    if not predictions.is_file():
        raise DataError(f"{path}: not a finished {COMMAND} run (no {PREDICTIONS} in it)", hint=_HINT)
    return predictions, path


def load_evaluation(path: str | Path) -> Evaluation:
    """Read a finished `eval gsm8k` run; DataError for a folder that is not one (unfinished, another
    command's output, nothing there) and for a bad row (file:line: field), or an id given twice."""
    path = Path(path)
    predictions, folder = _locate(path)
    manifest = metrics = source = None
    if folder is not None and (folder / MANIFEST).is_file():
        source = folder / MANIFEST
        manifest = read_object(source, rerun_hint(source, COMMAND))
    if folder is not None and (folder / METRICS).is_file():
        metrics = read_object(folder / METRICS, rerun_hint(folder / METRICS, COMMAND))
        embedded = metrics.pop("manifest", None)
        if manifest is None and isinstance(embedded, dict):
            manifest, source = embedded, folder / METRICS
    if manifest is not None and source is not None:
        command = manifest.get("command")
        if isinstance(command, str) and command != COMMAND:
            raise DataError(f"{path}: a `{command}` output, not an {COMMAND} run", hint=_HINT)
        check_manifest(manifest, source, COMMAND)  # a missing or non-string command is named here
    if metrics is not None:
        check_metrics(metrics, folder / METRICS, COMMAND)
    rows: dict[str, dict[str, Any]] = {}
    lines: dict[str, str] = {}

    def prediction(obj: dict[str, Any], where: str) -> tuple[str, Prediction]:
        try:
            return where, Prediction.from_dict(obj, where)
        except DataError as err:  # every refusal says how to get a good file back
            raise DataError(err.message, hint=err.hint or rerun_hint(predictions, COMMAND)) from None

    for where, pred in read_jsonl(predictions, prediction):
        if pred.id in rows:
            raise DataError(f"{where}: field 'id': {pred.id} appears twice (first at {lines[pred.id]})",
                            hint=f"{PREDICTIONS} has one row per problem; rerun `gsmkit {COMMAND}`")
        rows[pred.id] = pred.to_dict()
        lines[pred.id] = where
    return Evaluation(path=path, predictions=predictions, rows=rows, metrics=metrics, manifest=manifest)


def check_same_problems(a: Evaluation, b: Evaluation) -> None:
    """DataError unless `a` and `b` scored the same problem ids with the same gold answers."""
    only_a = [pid for pid in a.rows if pid not in b.rows]
    only_b = [pid for pid in b.rows if pid not in a.rows]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {a.path} (first: {only_a[0]})")
        if only_b:
            parts.append(f"{len(only_b)} only in {b.path} (first: {only_b[0]})")
        raise DataError(f"{a.path} and {b.path} are evaluations of different problems: problem ids "
                        + "; ".join(parts),
                        hint="compare evaluations of the same --data, --split, --offset/--limit and few-shot "
                             "pool (the pool's problems are never scored)")
    for pid, row in a.rows.items():
        if row["gold"] != b.rows[pid]["gold"]:
            raise DataError(f"problem {pid}: gold {row['gold']!r} in {a.predictions} but "
                            f"{b.rows[pid]['gold']!r} in {b.predictions}",
                            hint="the two runs read different versions of the data; evaluate both on one "
                                 "file")


def paired(a: Evaluation, b: Evaluation, column: str = "correct_strict") -> list[tuple[str, bool, bool]]:
    """(id, a's value, b's value) of a correctness column for every problem, in a's order (checked first:
    the same problems and gold answers)."""
    if column not in COLUMNS:
        raise ValueError(f"column must be one of {', '.join(COLUMNS)}, got {column!r}")
    check_same_problems(a, b)
    return [(pid, bool(row[column]), bool(b.rows[pid][column])) for pid, row in a.rows.items()]
