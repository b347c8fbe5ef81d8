"""`gsmkit bench`: LoRA variants (compressed adapters, other ranks) certified against a probe adapter, for
one seed and across seeds.

In: `BenchSettings`: a probe `eval gsm8k` run and NAME=EVAL_DIR variants evaluated on the same problems
(one seed), or the folders of several such benches (`--aggregate`, one per seed). Out: per seed `bench.json`,
`bench.md` and `manifest.json` (`run_bench`); across seeds `bench_aggregate.json`, `bench_aggregate.md` and
`manifest.json` (`aggregate_benches`). Each file is written atomically; the bench's own files in --out are
replaced on every run, nothing else there is touched.

The verdict rule, in one place (`verdict`): a variant is `safe` when the lower bound of the 95% interval of
its delta (variant accuracy - probe accuracy, on --metric) is >= -margin (up to 1e-12 of floating-point
rounding), `unsafe` otherwise, and `gate failed`, whatever its numbers, when the probe missed --gate. For one
seed the interval is the paired percentile bootstrap over the problems (`compare.compare_metric`); across
seeds it is the hierarchical bootstrap over seeds, then problems within each drawn seed
(`stats.hierarchical_bootstrap`), and a seed whose probe missed its gate makes every variant `gate failed`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.evaluation.stats import hierarchical_bootstrap, t_interval
from gsmkit.fields import check_fields, setting
from gsmkit.manifest import sha256_file
from gsmkit.run_folder import MANIFEST
from gsmkit.settings import override
from gsmkit.studies.bench_files import (
    AGGREGATE_FORMAT,
    BENCH_JSON,
    FORMAT,
    read_bench,
    write_aggregate,
    write_bench,
)
from gsmkit.studies.bench_records import (
    AggregateBench,
    AggregateResult,
    AggregateVariant,
    Benched,
    BenchResult,
    BenchVariant,
    Gate,
    SeedDelta,
)
from gsmkit.studies.compare import CONFIDENCE, PairedOptions, compare_metric, plain
from gsmkit.studies.predictions import Evaluation, check_same_problems, load_evaluation
from gsmkit.studies.run_files import check_shape, kinds_of, read_object
from gsmkit.studies.runs import gsm8k_values
from gsmkit.studies.thresholds import Requirement, parse_requirement

VERSION = 1
SAFE, UNSAFE, GATE_FAILED = "safe", "unsafe", "gate failed"
TOLERANCE = 1e-12  # a lower bound that is -margin up to rounding is at the boundary, and the boundary is safe
RULE = ("safe when the lower bound of the 95% interval of delta (variant - probe) >= -margin; unsafe "
        "otherwise; gate failed for every variant when the probe missed the gate")
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True, kw_only=True)
class BenchSettings(PairedOptions):
    out: Path = setting(help="Output folder: bench.json, bench.md and manifest.json (with --aggregate: "
                        "bench_aggregate.json, bench_aggregate.md and manifest.json); the bench's own files "
                        "are replaced.", short="-o", show_default=False,
                        path={"file_okay": False, "dir_okay": True})
    probe: Path | None = setting(None, "The probe's `eval gsm8k` output folder: the reference every variant "
                                 "is compared with, problem by problem.", show_default=False,
                                 path={"exists": True})
    variant: tuple[str, ...] = setting((), "A variant to certify, NAME=EVAL_DIR: an `eval gsm8k` folder of "
                                       "the same problems as the probe (repeatable).", show_default=False)
    margin: float = setting(0.025, "The accuracy a variant may lose against the probe: it is safe when the "
                            "lower bound of the 95% interval of its delta is >= -margin.", min=0.0)
    gate: str | None = setting(None, "A requirement the probe must meet, METRIC OP NUMBER on its eval gsm8k "
                               "metrics, e.g. 'gsm8k.strict>=0.15'; when it misses, every verdict is 'gate "
                               "failed' and the exit code is 3.", show_default=False)
    aggregate: tuple[Path, ...] = setting(
        (), "Aggregate these bench folders (one per seed) instead: each bench.json and the predictions "
        "files it names (repeatable).", show_default=False,
        path={"exists": True, "file_okay": False, "dir_okay": True})
    n_boot: int = override(PairedOptions, "n_boot", help="Bootstrap resamples: of the problems for a seed's "
                           "paired 95% interval; of seeds, then problems, for the aggregate's.")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.aggregate:
            given = [flag for flag, value in (("--probe", self.probe), ("--variant", self.variant),
                                              ("--gate", self.gate)) if value]
            if given:
                raise ConfigError(f"--aggregate reads finished benches and takes no {given[0]}",
                                  hint="bench each seed with --probe/--variant/--gate, then aggregate their "
                                  "folders: gsmkit bench --aggregate DIR --aggregate DIR ... --out DIR")
            folders = [Path(p).resolve() for p in self.aggregate]
            if len(set(folders)) != len(folders):
                raise ConfigError("--aggregate names the same bench folder twice")
            inputs = folders
        else:
            if self.probe is None:
                raise ConfigError("give --probe EVAL_DIR and --variant NAME=EVAL_DIR",
                                  hint="or aggregate finished benches with --aggregate BENCH_DIR")
            if not self.variant and self.gate is None:
                raise ConfigError("nothing to bench: give --variant NAME=EVAL_DIR, or --gate to check the "
                                  "probe alone")
            self.requirement  # noqa: B018 - the gate's text is checked before any file is read
            inputs = [_folder_of(Path(self.probe))] + [_folder_of(p) for _, p in self.variants]
        if Path(self.out).resolve() in inputs:
            raise ConfigError(f"--out {self.out} is one of the inputs (its manifest.json would be replaced)",
                              hint="write the bench into a folder of its own")

    @property
    def variants(self) -> list[tuple[str, Path]]:
        """(name, eval folder) of each --variant NAME=EVAL_DIR, in the order given."""
        found: dict[str, Path] = {}
        for text in self.variant:
            name, sep, folder = text.partition("=")
            if not sep or not folder or not _NAME.fullmatch(name):
                raise ConfigError(f"--variant {text!r} is not NAME=EVAL_DIR",
                                  hint="for example --variant median=runs/s42/eval-median (NAME: letters, "
                                  "digits, _ . + -)")
            if name in found:
                raise ConfigError(f"--variant name '{name}' is given twice")
            found[name] = Path(folder)
        return list(found.items())

    @property
    def requirement(self) -> Requirement | None:
        if self.gate is None:
            return None
        requirement = parse_requirement(self.gate)
        if not requirement.metric.startswith("gsm8k."):
            raise ConfigError(f"--gate {self.gate!r}: the gate is checked on the probe's eval gsm8k metrics",
                              hint="use a gsm8k.* metric, e.g. --gate 'gsm8k.strict>=0.15'")
        return requirement


def _folder_of(path: Path) -> Path:
    return (path if path.is_dir() else path.parent).resolve()


def verdict(lower: float, margin: float, gate_passed: bool) -> str:
    """The bench's rule: `gate failed` without a passed gate, else `safe` when lower >= -margin."""
    if not gate_passed:
        return GATE_FAILED
    return SAFE if lower >= -margin - TOLERANCE else UNSAFE


# ---- one seed ---------------------------------------------------------------------------------------------


def check_gate(requirement: Requirement | None, probe: Evaluation) -> Gate | None:
    """The probe's gate on its metrics.json (`runs.gsm8k_values`); None without --gate."""
    if requirement is None:
        return None
    if probe.metrics is None:
        raise DataError(f"{probe.path}: --gate needs the probe's metrics.json, and there is none",
                        hint="give the probe's `eval gsm8k` folder, not only its predictions file")
    value = gsm8k_values(probe.metrics).get(requirement.metric)
    return Gate(requirement=requirement.text, metric=requirement.metric, value=value,
                passed=requirement.holds(value))


def describe(name: str, ev: Evaluation, out: Path) -> Benched:
    """What the bench records of an evaluation: where its predictions are (relative to the bench folder, so
    a moved study tree still aggregates), their sha256, and the adapter behind it."""
    manifest = ev.manifest or {}
    model = (manifest.get("settings") or {}).get("model")
    adapter = adapter_path(manifest)
    return Benched(name=name, path=str(ev.path),
                   predictions=os.path.relpath(ev.predictions.resolve(), Path(out).resolve()),
                   predictions_sha256=sha256_file(ev.predictions),
                   model=model.get("model") if isinstance(model, dict) else model, adapter=adapter,
                   train_seed=train_seed(adapter), lora_parameters=lora_parameters(adapter), n=ev.n)


def bench_variant(name: str, probe: Evaluation, ev: Evaluation, settings: BenchSettings, gate_passed: bool,
                  described: Benched, probe_parameters: int | None) -> BenchVariant:
    """One variant against the probe on --metric (same problems, checked by the caller)."""
    m = compare_metric(probe, ev, settings.metric, n_boot=settings.n_boot, seed=settings.seed)
    ratio = (described.lora_parameters / probe_parameters
             if described.lora_parameters is not None and probe_parameters else None)
    return BenchVariant(
        name=name, evaluation=described, n=m.n, probe_accuracy=m.a_accuracy, probe_ci95=m.a_ci95,
        variant_accuracy=m.b_accuracy, variant_ci95=m.b_ci95, delta=m.difference,
        delta_ci95=m.difference_ci95, mcnemar_p=m.mcnemar_p, both=m.both, only_probe=m.only_a,
        only_variant=m.only_b, neither=m.neither,
        lora_parameters_ratio=ratio, verdict=verdict(m.difference_ci95[0], settings.margin, gate_passed))


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """One seed: read the probe and every variant (all refused before anything is written: different
    problems, unfinished runs), check the gate, compare, write bench.json, bench.md and manifest.json."""
    from gsmkit.manifest import build_manifest

    probe = load_evaluation(settings.probe)
    variants = [(name, load_evaluation(folder)) for name, folder in settings.variants]
    for _, ev in variants:
        check_same_problems(probe, ev)
    gate = check_gate(settings.requirement, probe)
    passed = gate is None or gate.passed
    probe_described = describe("probe", probe, settings.out)
    rows = [bench_variant(name, probe, ev, settings, passed, describe(name, ev, settings.out),
                          probe_described.lora_parameters) for name, ev in variants]
    result = BenchResult(format=FORMAT, version=VERSION, metric=settings.metric, margin=settings.margin,
                         confidence=CONFIDENCE, n_boot=settings.n_boot, seed=settings.seed, rule=RULE,
                         gate=gate, gate_passed=passed, probe=probe_described, variants=rows)
    inputs = {"probe": probe.predictions, **{f"variant {name}": ev.predictions for name, ev in variants}}
    manifest = build_manifest("bench", settings, inputs=inputs, seeds={"bootstrap": settings.seed})
    found = plain(result.to_dict())
    write_bench(settings.out, found, manifest)
    return found


# ---- across seeds -----------------------------------------------------------------------------------------


def aggregate_benches(settings: BenchSettings) -> dict[str, Any]:
    """Several seeds' benches: every delta recomputed from the predictions files each bench.json names
    (refused when one changed since), the mean over seeds with its hierarchical bootstrap interval and the
    t interval of the per-seed deltas, the verdict by the same rule; bench_aggregate.json / .md written."""
    from gsmkit.manifest import build_manifest

    benches, notes, per_variant = [], [], {}
    for folder in settings.aggregate:
        bench = read_bench(folder)
        for key, mine in (("metric", settings.metric), ("margin", settings.margin)):
            if bench[key] != mine:
                notes.append(f"{folder} used {key} {bench[key]}; the aggregate uses {mine}")
        probe = _evaluation_of(folder, bench["probe"])
        gate = Gate(**{k: bench["gate"][k] for k in kinds_of(Gate)}) if bench["gate"] else None
        passed = bool(bench["gate_passed"])
        right = sum(bool(row[settings.column]) for row in probe.rows.values())
        benches.append(AggregateBench(bench=str(folder), seed=bench["probe"]["train_seed"], n=probe.n,
                                      probe_accuracy=right / probe.n, gate=gate, gate_passed=passed))
        for row in bench["variants"]:
            ev = _evaluation_of(folder, row["evaluation"])
            check_same_problems(probe, ev)
            per_variant.setdefault(row["name"], []).append((benches[-1], probe, ev))
    for name, seeds in per_variant.items():
        missing = [b.bench for b in benches if b.gate_passed and b not in [s[0] for s in seeds]]
        if missing:
            raise DataError(f"{missing[0]}/{BENCH_JSON}: no variant '{name}', which other benches have",
                            hint="every seed must bench the same variants (a seed whose gate failed may have "
                            "none)")
    failed = [b.bench for b in benches if not b.gate_passed]
    variants = [_aggregate_variant(name, seeds, failed, settings) for name, seeds in per_variant.items()]
    result = AggregateResult(format=AGGREGATE_FORMAT, version=VERSION, metric=settings.metric,
                             margin=settings.margin, confidence=CONFIDENCE, n_boot=settings.n_boot,
                             seed=settings.seed, rule=RULE, benches=benches, variants=variants,
                             gate_passed=not failed, notes=notes)
    inputs = {f"bench {i}": Path(folder) / BENCH_JSON for i, folder in enumerate(settings.aggregate)}
    manifest = build_manifest("bench", settings, inputs=inputs, seeds={"bootstrap": settings.seed})
    found = plain(result.to_dict())
    write_aggregate(settings.out, found, manifest)
    return found


def _evaluation_of(folder: Path, entry: dict[str, Any]) -> Evaluation:
    """The evaluation a bench.json entry names, as it was when the bench read it."""
    predictions = Path(folder) / entry["predictions"]
    if not predictions.is_file():
        raise DataError(f"{Path(folder) / BENCH_JSON}: {entry['name']}'s predictions {predictions} are gone",
                        hint="aggregate benches whose evaluations are still where the bench read them")
    if sha256_file(predictions) != entry["predictions_sha256"]:
        raise DataError(f"{predictions}: changed since {Path(folder) / BENCH_JSON} was written",
                        hint="run that seed's `gsmkit bench` again, then aggregate")
    return load_evaluation(predictions)


def _aggregate_variant(name: str, seeds: list[tuple[AggregateBench, Evaluation, Evaluation]],
                       failed: list[str], settings: BenchSettings) -> AggregateVariant:
    column = settings.column
    groups, rows = [], []
    for bench, probe, ev in seeds:
        m = compare_metric(probe, ev, settings.metric, n_boot=settings.n_boot, seed=settings.seed)
        groups.append([int(ev.rows[pid][column]) - int(row[column]) for pid, row in probe.rows.items()])
        rows.append(SeedDelta(bench=bench.bench, seed=bench.seed, n=m.n, probe_accuracy=m.a_accuracy,
                              variant_accuracy=m.b_accuracy, delta=m.difference, delta_ci95=m.difference_ci95,
                              gate_passed=bench.gate_passed,
                              verdict=verdict(m.difference_ci95[0], settings.margin, bench.gate_passed)))
    deltas = [r.delta for r in rows]
    ci = hierarchical_bootstrap(groups, n_boot=settings.n_boot, seed=settings.seed, confidence=CONFIDENCE)
    spread = t_interval(deltas, confidence=CONFIDENCE)
    return AggregateVariant(name=name, seeds=[r.seed for r in rows], mean_delta=sum(deltas) / len(deltas),
                            delta_ci95=ci, t_interval=dict(spread.__dict__), per_seed=rows,
                            gate_failed=failed, verdict=verdict(ci[0], settings.margin, not failed))


# ---- what an evaluation's manifest says about its adapter ---------------------------------------------


def adapter_path(manifest: dict[str, Any]) -> str | None:
    """The adapter an evaluation used (`manifest.recorded_adapter`), or None."""
    from gsmkit.manifest import recorded_adapter

    return (recorded_adapter(manifest) or {}).get("path")


def train_seed(adapter: str | None) -> int | None:
    """`settings.seed` of the training run that wrote the adapter (its manifest.json), when it is there; a
    manifest of the wrong shape is a DataError naming it and the field."""
    path = Path(adapter) / MANIFEST if adapter else None
    if path is None or not path.is_file():
        return None
    hint = "the adapter's manifest.json is written by the `gsmkit train` run that made it"
    manifest = read_object(path, hint)
    check_shape(manifest, path, {"settings": dict, "settings.seed": int | None}, hint=hint)
    return (manifest.get("settings") or {}).get("seed")


_LORA_KEY = re.compile(r"\.lora_(A|B)\.weight$|\.lora_embedding_(A|B)$")  # as PEFT saves LoRA factors


def lora_parameters(adapter: str | None) -> int | None:
    """Elements of an adapter's LoRA factors, read from its safetensors header (no tensor is loaded)."""
    path = Path(adapter) / "adapter_model.safetensors" if adapter else None
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            total = 0
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                if _LORA_KEY.search(key):
                    count = 1
                    for size in handle.get_slice(key).get_shape():
                        count *= int(size)
                    total += count
    except Exception:  # noqa: BLE001 - an unreadable adapter only loses this optional count
        return None
    return total
