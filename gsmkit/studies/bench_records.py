"""What `gsmkit bench` writes, as records: `bench.json` (`BenchResult`: the probe's `Gate`, each evaluation
read as `Benched`, each `BenchVariant` against the probe) and `bench_aggregate.json` (`AggregateResult`: each
`AggregateBench` folder and each `AggregateVariant` across seeds, with its `SeedDelta`s).

In: the numbers `studies.bench` computes. Out: dataclasses whose `to_dict()` is the JSON written; the
`Attributes:` of each docstring say what a field holds (docs/formats.md's tables are generated from them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gsmkit.fields import Record


@dataclass(frozen=True)
class Gate(Record):
    """The probe's gate.

    Attributes:
        requirement: the `--gate` text, e.g. `gsm8k.strict>=0.15`
        metric: its metric name
        value: the probe's value of that metric (its metrics.json)
        passed: whether the value meets the requirement
    """

    requirement: str
    metric: str
    value: float | None
    passed: bool


@dataclass(frozen=True)
class Benched(Record):
    """One evaluation the bench read (the probe or a variant).

    Attributes:
        name: `probe`, or the variant's NAME
        path: the `eval gsm8k` folder (or predictions file) as given
        predictions: its predictions.jsonl, relative to the bench folder (how `--aggregate` finds it again)
        predictions_sha256: sha256 of that file when the bench read it (`--aggregate` refuses a changed file)
        model: `settings.model.model` of its manifest (null without one)
        adapter: the adapter its manifest names (null: the bare model, or no manifest)
        train_seed: `settings.seed` of that adapter's training manifest (null when not found)
        lora_parameters: elements of the adapter's LoRA factors, from its safetensors header (null when not
            found)
        n: problems in its predictions
    """

    name: str
    path: str
    predictions: str
    predictions_sha256: str
    model: str | None
    adapter: str | None
    train_seed: int | None
    lora_parameters: int | None
    n: int


@dataclass(frozen=True)
class BenchVariant(Record):
    """One variant against the probe, on --metric.

    Attributes:
        name: the variant's NAME
        evaluation: the variant's evaluation (as `probe`)
        n: problems compared
        probe_accuracy: the probe's accuracy on them
        probe_ci95: its 95% Wilson interval
        variant_accuracy: the variant's accuracy
        variant_ci95: its 95% Wilson interval
        delta: `variant_accuracy - probe_accuracy`
        delta_ci95: paired percentile bootstrap 95% interval of `delta` (`n_boot` resamples of the problems)
        mcnemar_p: two-sided exact McNemar p-value of `only_probe` against `only_probe + only_variant`
        both: problems both got right
        only_probe: problems only the probe got right
        only_variant: problems only the variant got right
        neither: problems neither got right
        lora_parameters_ratio: the variant's LoRA parameters over the probe's (null unless both are known)
        verdict: `safe`, `unsafe` or `gate failed` (the bench's rule)
    """

    name: str
    evaluation: Benched
    n: int
    probe_accuracy: float
    probe_ci95: tuple[float, float]
    variant_accuracy: float
    variant_ci95: tuple[float, float]
    delta: float
    delta_ci95: tuple[float, float]
    mcnemar_p: float
    both: int
    only_probe: int
    only_variant: int
    neither: int
    lora_parameters_ratio: float | None
    verdict: str


@dataclass(frozen=True)
class BenchHeader(Record):
    """The fields `bench.json` and `bench_aggregate.json` open with (documented by each)."""

    format: str
    version: int
    metric: str
    margin: float
    confidence: float
    n_boot: int
    seed: int
    rule: str


@dataclass(frozen=True)
class BenchResult(BenchHeader):
    """`bench.json` (and `--json`) of one seed's bench; the file adds its `manifest`.

    Attributes:
        format: `gsmkit-bench`
        version: 1
        metric: the compared column, `strict` or `flexible` (`--metric`)
        margin: `--margin`
        confidence: the level of every interval (0.95)
        n_boot: bootstrap resamples (`--n-boot`)
        seed: the bootstrap's seed (`--seed`)
        rule: the verdict rule, in words
        gate: the probe's gate (null without `--gate`)
        gate_passed: false when the probe missed the gate (then the exit code is 3), else true
        probe: the probe's evaluation
        variants: each variant against the probe, in the order given
    """

    gate: Gate | None
    gate_passed: bool
    probe: Benched
    variants: list[BenchVariant] = field(default_factory=list)


@dataclass(frozen=True)
class SeedDelta(Record):
    """One seed of a variant in the aggregate, recomputed from the predictions files.

    Attributes:
        bench: the bench folder
        seed: the probe adapter's training seed (null when not found)
        n: problems compared
        probe_accuracy: the probe's accuracy
        variant_accuracy: the variant's accuracy
        delta: `variant_accuracy - probe_accuracy`
        delta_ci95: that seed's paired bootstrap 95% interval (`--n-boot`, `--seed` of the aggregate)
        gate_passed: whether that seed's probe met its gate (true without a gate)
        verdict: that seed's verdict by the same rule
    """

    bench: str
    seed: int | None
    n: int
    probe_accuracy: float
    variant_accuracy: float
    delta: float
    delta_ci95: tuple[float, float]
    gate_passed: bool
    verdict: str


@dataclass(frozen=True)
class AggregateVariant(Record):
    """A variant across seeds.

    Attributes:
        name: the variant's NAME
        seeds: the training seed of each bench it was benched in (null when not found), in --aggregate order
        mean_delta: the mean over seeds of each seed's delta (every seed weighs the same)
        delta_ci95: hierarchical percentile bootstrap 95% interval of `mean_delta`: seeds resampled with
            replacement, then the problems of each drawn seed (`n_boot` replicates)
        t_interval: Student t 95% interval of the per-seed deltas (`mean`, `sd`, `lo`, `hi`, `n`; across
            seeds only, null bounds with one seed)
        per_seed: each seed's numbers
        gate_failed: the bench folders whose probe missed its gate
        verdict: `gate failed` when any seed's probe missed its gate, else the rule on `delta_ci95`
    """

    name: str
    seeds: list[int | None]
    mean_delta: float
    delta_ci95: tuple[float, float]
    t_interval: dict[str, Any]
    per_seed: list[SeedDelta]
    gate_failed: list[str]
    verdict: str


@dataclass(frozen=True)
class AggregateBench(Record):
    """One bench folder of the aggregate.

    Attributes:
        bench: the folder as given
        seed: the probe adapter's training seed (null when not found)
        n: the probe's problems
        probe_accuracy: the probe's accuracy on --metric, recomputed from its predictions
        gate: that bench's gate (null without one)
        gate_passed: whether its probe met the gate (true without a gate)
    """

    bench: str
    seed: int | None
    n: int
    probe_accuracy: float
    gate: Gate | None
    gate_passed: bool


@dataclass(frozen=True)
class AggregateResult(BenchHeader):
    """`bench_aggregate.json` (and `--json` with --aggregate); the file adds its `manifest`.

    Attributes:
        format: `gsmkit-bench-aggregate`
        version: 1
        metric: the compared column (`--metric` of the aggregate; every delta is recomputed on it)
        margin: `--margin` of the aggregate
        confidence: 0.95
        n_boot: bootstrap resamples (`--n-boot`)
        seed: the bootstraps' seed (`--seed`)
        rule: the verdict rule, in words
        benches: each bench folder, in --aggregate order
        variants: each variant across seeds, in the order first seen
        gate_passed: false when any bench's probe missed its gate (then the exit code is 3)
        notes: benches that used another metric or margin than the aggregate
    """

    benches: list[AggregateBench]
    variants: list[AggregateVariant]
    gate_passed: bool
    notes: list[str] = field(default_factory=list)
