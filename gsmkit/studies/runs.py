"""Reading gsmkit output folders for `gsmkit report`: the runs they hold, finished or not, and their numbers.

In: paths and globs naming output folders (or folders above them). Out: `find_runs` -> the finished runs
(`Run`: its folder, command, manifest, metrics and training log) and what was skipped with the reason
(`Skipped`: unfinished, not a gsmkit output, a manifest that is not a JSON object, a command the report does
not read). `gsm8k_values`, `safety_values` and `ppl_values` turn an evaluation's `metrics.json` into the
`thresholds.METRICS` names.

A folder whose manifest names a command the report reads is a run; its files of the wrong shape (manifest
fields, metrics.json, trainer_log.jsonl: `studies.run_files`) are a DataError naming the file and the field,
not a skip: a report that quietly left a damaged run out would pass thresholds it never checked. A trainer
log whose last line was cut off (the run was stopped mid-write) is read up to it, with a note.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import DataError
from gsmkit.manifest import recorded_adapter
from gsmkit.run_folder import FINGERPRINT, MANIFEST
from gsmkit.studies.run_files import check_manifest, check_shape, read_metrics, read_object, read_training_log

TRAIN_COMMANDS = ("train sft", "train qlora", "train grpo")
EVAL_COMMANDS = ("eval gsm8k", "eval safety", "eval ppl")
METRICS_FILE = "metrics.json"
LOG_FILE = "trainer_log.jsonl"
_SKIP_DIRS = ("checkpoints",)  # a training run's checkpoints hold trainer state, never a run of their own


@dataclass
class Run:
    """One finished gsmkit output folder the report reads."""

    path: Path
    command: str
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json without its manifest ({} for train)
    log: list[dict[str, Any]] = field(default_factory=list)  # a training run's trainer_log.jsonl rows
    notes: list[str] = field(default_factory=list)  # what was read around (a torn last line of the log)

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest.get("settings") or {}

    @property
    def resolved(self) -> dict[str, Any]:
        return self.manifest.get("resolved") or {}

    @property
    def is_train(self) -> bool:
        return self.command in TRAIN_COMMANDS

    @property
    def model(self) -> str | None:
        """The base model: `--model` of a training run, `model.model` of an evaluation."""
        model = self.settings.get("model")
        return model.get("model") if isinstance(model, dict) else model

    @property
    def adapter(self) -> dict[str, Any] | None:
        """{path, sha256} of the adapter an evaluation used (its manifest's `adapter`; older manifests give
        only `settings.model.adapter`, with no sha256), or None for a bare model."""
        return recorded_adapter(self.manifest)

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at") or "")


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def _expand(arg: str) -> list[Path]:
    if any(c in arg for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
    return [Path(arg)]


def find_runs(args: list[str]) -> tuple[list[Run], list[Skipped]]:
    """Every finished run in the folders named (globs expanded, folders searched below), once each."""
    runs: dict[Path, Run] = {}
    skipped: dict[Path, Skipped] = {}
    for arg in args:
        paths = _expand(arg)
        if not paths:
            skipped[Path(arg)] = Skipped(Path(arg), "no such file or folder (the pattern matched nothing)")
        for path in paths:
            if path.is_file() and path.name in (MANIFEST, METRICS_FILE):
                path = path.parent
            if not path.is_dir():
                skipped[path] = Skipped(path, "no such folder" if not path.exists() else "not a folder")
                continue
            found = _walk(path, runs, skipped)
            if not found and path.resolve() not in {p.path.resolve() for p in skipped.values()}:
                skipped[path] = Skipped(path, f"not a gsmkit output folder (no {MANIFEST} in it or below)")
    return sorted(runs.values(), key=lambda r: str(r.path)), list(skipped.values())


def _walk(folder: Path, runs: dict[Path, Run], skipped: dict[Path, Skipped]) -> bool:
    """Read `folder` if it is an output, then the folders below it; True when anything was found."""
    found = False
    key = folder.resolve()
    if (folder / MANIFEST).is_file() or (folder / FINGERPRINT).is_file():
        found = True
        if key not in runs and folder not in skipped:
            read = _read(folder)
            if isinstance(read, Run):
                runs[key] = read
            else:
                skipped[folder] = read
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name.startswith(".") or sub.name in _SKIP_DIRS:
            continue
        found = _walk(sub, runs, skipped) or found
    return found


def _read(folder: Path) -> Run | Skipped:
    if (folder / FINGERPRINT).is_file():
        return Skipped(folder, f"unfinished (holds {FINGERPRINT}: rerun its command to finish it)")
    try:
        manifest = read_object(folder / MANIFEST)
    except DataError as err:  # not a JSON object: nothing says what made it
        return Skipped(folder, err.message.replace(str(folder / MANIFEST), MANIFEST, 1))
    try:
        check_shape(manifest, MANIFEST, {"command": str}, required=("command",))
    except DataError as err:
        return Skipped(folder, f"{err.message} (not a gsmkit output)")
    command = manifest["command"]
    if command not in TRAIN_COMMANDS + EVAL_COMMANDS:
        return Skipped(folder, f"`{command}` output: the report reads training runs and evaluations")
    check_manifest(manifest, folder / MANIFEST, command)
    if command in TRAIN_COMMANDS:
        if not ((folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()):
            return Skipped(folder, "unfinished training run (no adapter or model saved yet)")
        has_log = (folder / LOG_FILE).is_file()
        log, note = read_training_log(folder / LOG_FILE, command) if has_log else ([], None)
        return Run(folder, command, manifest, log=log, notes=[note] if note else [])
    if not (folder / METRICS_FILE).is_file():
        return Skipped(folder, f"no {METRICS_FILE} (unfinished)")
    return Run(folder, command, manifest, read_metrics(folder / METRICS_FILE, command))


# ---- an evaluation's numbers, by thresholds.METRICS name ---------------------------------------------------


def _bounds(ci: Any) -> tuple[float | None, float | None]:
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    return None, None


def gsm8k_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    """An `eval gsm8k` metrics.json as metric values: strict and flexible accuracy with their 95% Wilson
    bounds, n, the share of completions with an answer, with a reasoning section and that ended inside it
    (both null where the style has no reasoning section)."""
    values: dict[str, float | None] = {"gsm8k.n": metrics.get("n")}
    for name in ("strict", "flexible"):
        lo, hi = _bounds(metrics.get(f"ci95_{name}"))
        values.update({f"gsm8k.{name}": metrics.get(f"accuracy_{name}"), f"gsm8k.{name}.lo": lo,
                       f"gsm8k.{name}.hi": hi})
    values["gsm8k.answer_share"] = metrics.get("extractable")
    values["gsm8k.reasoning_share"] = metrics.get("with_reasoning_section")
    values["gsm8k.ended_in_reasoning"] = metrics.get("ended_in_reasoning")  # absent before schema 2: null
    return values


def safety_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    """An `eval safety` metrics.json: the safety rate with its 95% Wilson bounds, n and the unparsed share."""
    lo, hi = _bounds(metrics.get("ci95"))
    return {"safety": metrics.get("safety_rate"), "safety.lo": lo, "safety.hi": hi,
            "safety.n": metrics.get("total"), "safety.unparsed": metrics.get("unparsed_rate")}


def ppl_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    """An `eval ppl` metrics.json: token-weighted perplexity and the tokens scored."""
    return {"ppl": metrics.get("ppl"), "ppl.tokens": metrics.get("tokens")}


VALUES = {"eval gsm8k": gsm8k_values, "eval safety": safety_values, "eval ppl": ppl_values}
