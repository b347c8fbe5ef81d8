"""`gsmkit report`'s table: one row per training run with the evaluations of its adapter joined to it, one
row per evaluated model that no training run produced; checks against thresholds; replicate groups.

In: the `Run`s of `studies.runs.find_runs`. Out: `summarize` -> `Row`s (the `COLUMNS` of summary.csv, plus
the settings a `--group-by` or `--plot-x` field is looked up in), `check_rows` -> the threshold checks,
`group_rows` -> the replicate groups (mean, sd, 95% t-interval and n of every metric).

The join: an evaluation records `{path, sha256}` of its adapter (manifest `adapter`); it belongs to the
training run whose adapter folder, or one of whose checkpoints, has that sha256 now. An evaluation whose
manifest has no sha256 (older gsmkit) joins by the adapter's resolved path. Among several evaluations of
the same adapter and kind, the one with the largest n is used (then the newest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.fields import check_fields, setting
from gsmkit.manifest import adapter_sha256
from gsmkit.studies.columns import COLUMNS, IDENTITY, METRIC_COLUMNS, SETTING_COLUMNS
from gsmkit.studies.runs import VALUES, Run
from gsmkit.studies.thresholds import METRICS, METRICS_HINT, Requirement, parse_requirement
from gsmkit.training.config import PRESET_BASELINES

FINAL = "final"
DEFAULT_SWEEP_METRIC = ("gsm8k.strict", "gsm8k.flexible")
_LOWER_IS_BETTER = ("ppl",)
_KIND_DIR = {"eval gsm8k": "gsm8k_dir", "eval safety": "safety_dir", "eval ppl": "ppl_dir"}


@dataclass(frozen=True, kw_only=True)
class ReportSettings:
    out: Path = setting(Path("report"), "Output folder for summary.csv, report.md, report.json and the "
                        "figures (the report's own files are replaced).", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    require: tuple[str, ...] = setting((), "A threshold every row must meet, METRIC OP NUMBER (repeatable), "
                                       "e.g. 'gsm8k.strict>=0.37'; exit 3 when a row misses one.",
                                       show_default=False)
    baseline: str | None = setting(None, "Check each row against a preset's baseline thresholds; auto: "
                                   "each training run against its own --preset (runs without one are not "
                                   "checked).",
                                   choices=("auto", *PRESET_BASELINES), show_default=False)
    group_by: str | None = setting(None, "Aggregate runs that differ only in this field (a summary column "
                                   "or a manifest setting, e.g. seed): mean, sd, 95% t-interval, n.",
                                   show_default=False)
    sweep_metric: str = setting(",".join(DEFAULT_SWEEP_METRIC), "How a run with a checkpoint sweep picks its "
                                "checkpoint: metrics compared in order (comma list), e.g. "
                                "gsm8k.strict,safety.")
    plot_x: str | None = setting(None, "Also plot GSM8K strict accuracy against this numeric field (e.g. "
                                 "train_rows), one line per --plot-series.", show_default=False)
    plot_series: str = setting("method", "Fields (comma list) whose values name the lines of --plot-x.")

    def __post_init__(self) -> None:
        check_fields(self)
        self.requirements  # noqa: B018 - each --require and --sweep-metric is checked before any file is read
        for metric in self.sweep_order:
            if metric not in METRICS:
                raise ConfigError(f"--sweep-metric: unknown metric '{metric}'", hint=METRICS_HINT)

    @property
    def requirements(self) -> list[Requirement]:
        return [parse_requirement(text) for text in self.require]

    @property
    def sweep_order(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.sweep_metric.split(",") if m.strip())

    @property
    def series(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.plot_series.split(",") if m.strip())


@dataclass
class Row:
    values: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    train: Run | None = None
    evals: dict[str, Run] = field(default_factory=dict)  # command -> the evaluation used

    def get(self, name: str) -> Any:
        """A column, else a training or evaluation setting of that name (dotted for nested values)."""
        if name in self.values:
            return self.values[name]
        value: Any = self.settings
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value


def _method(run: Run) -> str:
    if run.command == "train sft" and run.settings.get("full"):
        return "full"
    return run.command.split()[-1]


def _data_name(run: Run) -> str | None:
    source = run.settings.get("traces") or run.settings.get("data")
    return Path(str(source)).name if source else None


def _train_values(run: Run) -> dict[str, Any]:
    s, r = run.settings, run.resolved
    losses = [row["train_loss"] for row in run.log if "train_loss" in row]
    return {"run": run.path.name, "kind": "train", "command": run.command, "model": run.model,
            "method": _method(run), "preset": s.get("preset"), "data": _data_name(run),
            **{k: s.get(k) for k in SETTING_COLUMNS},
            "train_rows": r.get("train_rows", r.get("train_problems")), "steps": r.get("steps"),
            "train_loss": losses[-1] if losses else None, "adapter": str(run.path),
            "adapter_sha256": adapter_sha256(run.path), "path": str(run.path)}


def _candidates(train: Run) -> dict[str, str]:
    """sha256 -> FINAL or a checkpoint name, for a training run's adapter and its checkpoints."""
    found = {adapter_sha256(train.path): FINAL}
    ckpts = train.path / "checkpoints"
    if ckpts.is_dir():
        for ckpt in sorted(ckpts.glob("checkpoint-*")):
            if (ckpt / "adapter_config.json").is_file():
                found.setdefault(adapter_sha256(ckpt), ckpt.name)
    return found


def _prefer(a: Run | None, b: Run) -> Run:
    """The evaluation to keep: the larger n, then the newer."""
    if a is None:
        return b

    def size(run: Run) -> float:
        return float(run.metrics.get("n") or run.metrics.get("total") or run.metrics.get("tokens") or 0)

    return max((a, b), key=lambda r: (size(r), r.created_at))


def _sweep_key(evals: dict[str, Run], order: tuple[str, ...]) -> tuple[float, ...]:
    values: dict[str, float | None] = {}
    for run in evals.values():
        values.update(VALUES[run.command](run.metrics))
    key = []
    for metric in order:
        v = values.get(metric)
        v = -math.inf if v is None else float(v)
        key.append(-v if metric in _LOWER_IS_BETTER and v != -math.inf else v)
    return tuple(key)


def summarize(runs: list[Run], sweep_metric: tuple[str, ...] = DEFAULT_SWEEP_METRIC) -> list[Row]:
    """The summary rows: training runs first (by folder), then evaluated models no training run made."""
    trains = [r for r in runs if r.is_train]
    owner: dict[str, tuple[Run, str]] = {}
    by_path: dict[Path, str] = {}
    for train in trains:
        for sha, name in _candidates(train).items():
            owner.setdefault(sha, (train, name))
            by_path[(train.path if name == FINAL else train.path / "checkpoints" / name).resolve()] = sha
    joined: dict[tuple[str, str], dict[str, Run]] = {}  # (train path, checkpoint) -> command -> eval
    bare: dict[tuple[str, str | None], dict[str, Run]] = {}
    for run in runs:
        if run.is_train:
            continue
        adapter = run.adapter
        sha = (adapter or {}).get("sha256")
        if adapter and not sha:
            sha = by_path.get(Path(adapter["path"]).expanduser().resolve())
        if sha in owner:
            train, name = owner[sha]
            slot = joined.setdefault((str(train.path), name), {})
        else:
            slot = bare.setdefault((str(run.model), sha or (adapter or {}).get("path")), {})
        slot[run.command] = _prefer(slot.get(run.command), run)
    rows = []
    for train in trains:
        chosen, evals = _choose(train, joined, sweep_metric)
        row = Row({**_train_values(train), "chosen_checkpoint": chosen}, dict(train.settings), train, evals)
        rows.append(row)
    for (model, adapter), evals in bare.items():
        first = min(evals.values(), key=lambda r: str(r.path))
        name = first.path.name if first.path.name not in ("eval", "") else first.path.parent.name
        adapter_path = (first.adapter or {}).get("path")
        row = Row({"run": name, "kind": "model", "command": ", ".join(sorted(evals)), "model": model,
                   "method": "adapter" if adapter_path else "base", "adapter": adapter_path,
                   "adapter_sha256": (first.adapter or {}).get("sha256"), "path": str(first.path)},
                  dict(first.settings), None, evals)
        rows.append(row)
    for row in rows:
        for command, run in row.evals.items():
            row.values.update({METRICS[k]: v for k, v in VALUES[command](run.metrics).items()})
            row.values[_KIND_DIR[command]] = str(run.path)
            if row.train is None and command == "eval gsm8k":
                row.values.setdefault("k", run.settings.get("k"))
        for column in COLUMNS:
            row.values.setdefault(column, None)
    return rows


def _choose(train: Run, joined: dict[tuple[str, str], dict[str, Run]],
            order: tuple[str, ...]) -> tuple[str, dict[str, Run]]:
    """(checkpoint, its evaluations): with a sweep (sweep.json), the best swept checkpoint by `order`,
    ties to the earlier one; otherwise the final adapter."""
    final = joined.get((str(train.path), FINAL), {})
    if not (train.path / "sweep.json").is_file():
        return FINAL, final
    swept = {name: evals for (path, name), evals in joined.items()
             if path == str(train.path) and name != FINAL and "eval gsm8k" in evals}
    if not swept:
        return FINAL, final
    step = {name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else 0 for name in swept}
    best = max(swept, key=lambda n: (_sweep_key(swept[n], order), -step[n]))
    return best, swept[best]


# ---- thresholds -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    run: str
    requirement: str
    value: float | None
    passed: bool


def check_rows(rows: list[Row], requirements: list[Requirement],
               baseline: str | None) -> list[Check]:
    """Every (row, requirement) check: `requirements` on every row; `--baseline P` on every row; `--baseline
    auto` on the training rows that have a preset (each against its own)."""
    from gsmkit.studies.thresholds import baseline_requirements

    checks = []
    for row in rows:
        applied = list(requirements)
        if baseline == "auto":
            if row.values.get("preset"):
                applied += baseline_requirements(row.values["preset"])
        elif baseline is not None:
            applied += baseline_requirements(baseline)
        for req in applied:
            value = row.values.get(req.column)
            checks.append(Check(row.values["run"], req.text, value, req.holds(value)))
    return checks


# ---- replicate groups -----------------------------------------------------------------------------------


def group_rows(rows: list[Row], by: str) -> list[dict[str, Any]]:
    """Rows that agree on every IDENTITY column except `by` (looked up as a column or a setting) form a group;
    per metric column with values: mean, sd, the 95% t-interval and n (runs)."""
    from gsmkit.evaluation.stats import t_interval

    if all(row.get(by) is None for row in rows):
        raise ConfigError(f"--group-by {by}: no run has that field",
                          hint="use a summary.csv column (seed, lora_r, preset, ...) or a manifest setting")
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        key = tuple((c, _hashable(row.values.get(c))) for c in IDENTITY if c != by)
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        members.sort(key=lambda m: (not isinstance(m.get(by), int | float), m.get(by) if isinstance(
            m.get(by), int | float) else str(m.get(by))))
        metrics = {}
        for column in METRIC_COLUMNS:
            vals = [float(m.values[column]) for m in members if isinstance(m.values.get(column), int | float)]
            if vals and not column.endswith(("_lo", "_hi", "_n", "_tokens")):
                ci = t_interval(vals)
                metrics[column] = {"mean": ci.mean, "sd": ci.sd, "ci95": [ci.lo, ci.hi], "n": ci.n}
        out.append({"key": {c: v for c, v in key if v is not None}, "by": by,
                    "values": [m.get(by) for m in members], "runs": [m.values["run"] for m in members],
                    "metrics": metrics})
    return out


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
