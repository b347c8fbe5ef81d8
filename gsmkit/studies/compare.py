"""`gsmkit compare A B`: two evaluations of the same GSM8K problems, compared problem by problem.

In: two finished `eval gsm8k` runs (folders or their predictions.jsonl) and `CompareSettings`. Out:
`compare` -> for the strict and the flexible column: n, each run's accuracy with its 95% Wilson interval,
the difference b - a with a paired bootstrap 95% interval, the exact McNemar p-value, the four cells (both
right, only a, only b, neither) and the problems that changed; `compare_evaluations` also writes it to
`--out` (one JSON file, atomically, with the manifest under "manifest"). Evaluations of different problems
(or of the same problems with different gold answers) are refused.

Why paired: both runs answered the same problems, so the per-problem differences (-1, 0, +1) carry the
comparison; the problems both runs get right (or wrong) say nothing about which is better. Resampling the
problems keeps that pairing, and is much narrower than two independent Wilson intervals would suggest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.evaluation.gsm8k import METRICS
from gsmkit.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval
from gsmkit.fields import Record, check_fields, setting
from gsmkit.manifest import recorded_adapter
from gsmkit.studies.predictions import Evaluation, check_same_problems, load_evaluation

METRIC_NAMES = ("strict", "flexible")
CONFIDENCE = 0.95  # every interval gsmkit reports is a 95% one


@dataclass(frozen=True, kw_only=True)
class PairedOptions:
    """How two evaluations of the same problems are compared (`compare`, `bench`)."""

    metric: str = setting("strict", "The correctness column compared: strict (the answer format's own "
                          "marker, `#### n` or <SOLUTION>) or flexible (the last number).",
                          choices=METRIC_NAMES)
    n_boot: int = setting(10000, "Bootstrap resamples of the problems for the paired 95% interval of the "
                          "difference.", min=100)
    seed: int = setting(0, "Seed of the bootstrap's random generator (numpy default_rng): the same inputs "
                        "and seed give the same interval.")

    @property
    def column(self) -> str:
        return f"correct_{self.metric}"


@dataclass(frozen=True, kw_only=True)
class CompareSettings(PairedOptions):
    out: Path | None = setting(None, "Also write the comparison (with its manifest) to this JSON file; an "
                               "existing file is replaced.", short="-o", show_default=False,
                               path={"file_okay": True, "dir_okay": False})
    show: int = setting(20, "Changed problems listed in the terminal (0: none; --out and --json hold all).",
                        min=0)
    ppl_tolerance: float | None = setting(
        None, "Two `eval ppl` runs: the largest allowed |ppl_B - ppl_A| / ppl_A, overall and per source; "
        "exit 3 beyond it (1e-4 checks a merge).", min=0.0, show_default=False)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class Changed(Record):
    """A problem one run got right and the other wrong.

    Attributes:
        id: problem id
        gold: the normalised gold answer
        a: the answer extracted from A's completion by the compared extractor (null: none found)
        b: the answer extracted from B's completion (null: none found)
        a_correct: A got it right (then B got it wrong)
        b_correct: B got it right (then A got it wrong)
    """

    id: str
    gold: str
    a: str | None
    b: str | None
    a_correct: bool
    b_correct: bool


@dataclass(frozen=True)
class MetricComparison(Record):
    """One correctness column (`strict` or `flexible`) of two evaluations, problem by problem.

    Attributes:
        metric: `strict` or `flexible`
        n: problems compared (both runs scored every one of them)
        a_correct: problems A got right
        b_correct: problems B got right
        a_accuracy: `a_correct / n`
        b_accuracy: `b_correct / n`
        a_ci95: 95% Wilson score interval of `a_accuracy`
        b_ci95: 95% Wilson score interval of `b_accuracy`
        difference: `b_accuracy - a_accuracy` (positive: B is better)
        difference_ci95: paired percentile bootstrap 95% interval of `difference`: `n_boot` resamples of the
            n problems with replacement (see [Statistics](#statistics))
        mcnemar_p: two-sided exact McNemar p-value: `only_a` against Binomial(`only_a + only_b`, 1/2); 1.0
            when no problem changed
        both: problems both got right
        only_a: problems only A got right
        only_b: problems only B got right
        neither: problems neither got right
        changed: the `only_a + only_b` problems that changed, in A's order
    """

    metric: str
    n: int
    a_correct: int
    b_correct: int
    a_accuracy: float
    b_accuracy: float
    a_ci95: tuple[float, float]
    b_ci95: tuple[float, float]
    difference: float
    difference_ci95: tuple[float, float]
    mcnemar_p: float
    both: int
    only_a: int
    only_b: int
    neither: int
    changed: list[Changed] = field(default_factory=list)


@dataclass(frozen=True)
class Share(Record):
    """A share of an evaluation's completions, with its sample and interval.

    Attributes:
        count: completions counted
        n: completions in the evaluation
        share: `count / n`
        ci95: 95% Wilson score interval of `share`
    """

    count: int
    n: int
    share: float
    ci95: tuple[float, float]

    @classmethod
    def of(cls, count: int, n: int) -> Share:
        return cls(count=count, n=n, share=count / n if n else 0.0, ci95=wilson_interval(count, n))


@dataclass(frozen=True)
class Compared(Record):
    """One of the two evaluations compared.

    Attributes:
        path: the folder or file as given
        predictions: the predictions.jsonl read
        model: `settings.model.model` of its manifest (null without a manifest)
        adapter: the adapter path its manifest records (null: the bare model, or no manifest)
        style: the prompt style of its metrics.json (null without one)
        n: problems in its predictions
        reasoning_section: the reasoning section its answers were read after (`think`, `tags`), from its
            metrics.json; null without one (or without a metrics.json)
        with_reasoning_section: completions with a non-blank reasoning section (the predictions' `reasoning`);
            null when the run has no reasoning section
        ended_in_reasoning: completions that ended inside their reasoning, so had no answer (the
            predictions' `ended_in_reasoning`); null when the run has no reasoning section
    """

    path: str
    predictions: str
    model: str | None
    adapter: str | None
    style: str | None
    n: int
    reasoning_section: str | None = None
    with_reasoning_section: Share | None = None
    ended_in_reasoning: Share | None = None


@dataclass(frozen=True)
class Comparison(Record):
    """What `gsmkit compare A B` finds (the `--out` file and `--json`).

    Attributes:
        a: the first evaluation (the reference)
        b: the second evaluation; differences are B - A
        metric: the column `--metric` chose for the terminal summary (both are always computed)
        n_boot: bootstrap resamples (`--n-boot`)
        seed: the bootstrap's seed (`--seed`)
        confidence: the level of every interval (0.95)
        strict: the comparison of `correct_strict`
        flexible: the comparison of `correct_flexible`
    """

    a: Compared
    b: Compared
    metric: str
    n_boot: int
    seed: int
    confidence: float
    strict: MetricComparison
    flexible: MetricComparison


def _described(ev: Evaluation) -> Compared:
    manifest, metrics = ev.manifest or {}, ev.metrics or {}
    model = (manifest.get("settings") or {}).get("model")
    section = metrics.get("reasoning_section")
    rows = list(ev.rows.values())
    # Rows read before schema 2 have no reasoning fields: they read as none (Prediction.OPTIONAL).
    sectioned = section is not None or any(r.get("reasoning") is not None for r in rows)
    had = sum(bool((r.get("reasoning") or "").strip()) for r in rows)  # reasoning.Split.has_reasoning
    ended = sum(bool(r.get("ended_in_reasoning")) for r in rows)
    return Compared(path=str(ev.path), predictions=str(ev.predictions),
                    model=model.get("model") if isinstance(model, dict) else model,
                    adapter=(recorded_adapter(manifest) or {}).get("path"), style=metrics.get("style"),
                    n=ev.n, reasoning_section=section,
                    with_reasoning_section=Share.of(had, len(rows)) if sectioned else None,
                    ended_in_reasoning=Share.of(ended, len(rows)) if sectioned else None)


def compare_metric(a: Evaluation, b: Evaluation, metric: str, *, n_boot: int = 10000,
                   seed: int = 0) -> MetricComparison:
    """One column of two evaluations of the same problems (checked by the caller)."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {', '.join(METRIC_NAMES)}, got {metric!r}")
    column = f"correct_{metric}"
    cells = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    diffs: list[int] = []
    changed: list[Changed] = []
    for pid, row_a in a.rows.items():
        row_b = b.rows[pid]
        ra, rb = bool(row_a[column]), bool(row_b[column])
        cells[(ra, rb)] += 1
        diffs.append(int(rb) - int(ra))
        if ra != rb:
            changed.append(Changed(id=pid, gold=row_a["gold"], a=row_a[metric], b=row_b[metric], a_correct=ra,
                                   b_correct=rb))
    n = len(diffs)
    if n == 0:
        raise ValueError("no problems to compare")
    a_right, b_right = cells[(True, True)] + cells[(True, False)], cells[(True, True)] + cells[(False, True)]
    only_a, only_b = cells[(True, False)], cells[(False, True)]
    return MetricComparison(
        metric=metric, n=n, a_correct=a_right, b_correct=b_right, a_accuracy=a_right / n,
        b_accuracy=b_right / n, a_ci95=wilson_interval(a_right, n), b_ci95=wilson_interval(b_right, n),
        difference=(b_right - a_right) / n,
        difference_ci95=paired_bootstrap(diffs, n_boot=n_boot, seed=seed, confidence=CONFIDENCE),
        mcnemar_p=mcnemar_exact(only_a, only_b), both=cells[(True, True)], only_a=only_a, only_b=only_b,
        neither=cells[(False, False)], changed=changed)


def compare(a: Evaluation, b: Evaluation, *, n_boot: int = 10000, seed: int = 0,
            metric: str = "strict") -> dict[str, Any]:
    """The `Comparison` of two evaluations as a JSON-ready dict; DataError when they scored different
    problems (or different gold answers). `metric` only names the column a summary leads with."""
    check_same_problems(a, b)
    found = Comparison(
        a=_described(a), b=_described(b), metric=metric, n_boot=n_boot, seed=seed, confidence=CONFIDENCE,
        **{name: compare_metric(a, b, name, n_boot=n_boot, seed=seed) for name in METRIC_NAMES})
    return plain(found.to_dict())


def plain(obj: Any) -> Any:
    """Tuples as lists, so the dict equals what its JSON file reads back as."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def compare_evaluations(settings: CompareSettings, a: str | Path, b: str | Path) -> dict[str, Any]:
    """Read A and B, compare them and, with `--out`, write the comparison with its manifest; returns the
    comparison plus `out` (the file written, or None). Nothing is written when the inputs are refused."""
    from gsmkit.run_folder import MANIFEST, check_output
    from gsmkit.studies.compare_ppl import ITEMS, compare_ppl, is_ppl_run, load_ppl_run

    if settings.out is not None:  # writable, and not A or B, before anything is read
        check_output(settings.out, folder=False, inputs=(a, b), what="comparison")
    if is_ppl_run(a) or is_ppl_run(b):
        if not (is_ppl_run(a) and is_ppl_run(b)):
            ppl, other = (a, b) if is_ppl_run(a) else (b, a)
            raise DataError(f"{ppl} is an `eval ppl` run but {other} is not",
                            hint="compare two eval ppl runs, or two eval gsm8k runs")
        runs = load_ppl_run(a), load_ppl_run(b)
        result = compare_ppl(*runs, tolerance=settings.ppl_tolerance, n_boot=settings.n_boot,
                             seed=settings.seed)
        read = tuple(r.path / name for r in runs for name in (ITEMS, METRICS, MANIFEST))
        _write_out(settings, result, read, {"a": runs[0].path / ITEMS, "b": runs[1].path / ITEMS}, a, b)
        return {**result, "out": None if settings.out is None else str(settings.out)}
    if settings.ppl_tolerance is not None:
        raise ConfigError("--ppl-tolerance applies to two `eval ppl` runs",
                          hint="for eval gsm8k runs the paired interval of the difference is the answer")
    first, second = load_evaluation(a), load_evaluation(b)
    result = compare(first, second, n_boot=settings.n_boot, seed=settings.seed, metric=settings.metric)
    read = []
    for ev in (first, second):
        read.append(ev.predictions)
        if ev.metrics is not None or ev.manifest is not None:  # read from the run folder too
            read += [ev.predictions.parent / METRICS, ev.predictions.parent / MANIFEST]
    _write_out(settings, result, tuple(read), {"a": first.predictions, "b": second.predictions}, a, b)
    return {**result, "out": None if settings.out is None else str(settings.out)}


def _write_out(settings: CompareSettings, result: dict[str, Any], read: tuple[Path, ...],
               inputs: dict[str, Path], a: str | Path, b: str | Path) -> None:
    """With --out: the comparison and its manifest, atomically, never over one of the files it read."""
    from gsmkit.manifest import build_manifest
    from gsmkit.run_folder import RunOutput, json_writer

    if settings.out is None:
        return
    # --out must never replace a file it compares (checked first in compare_evaluations, and again here)
    output = RunOutput.file(settings.out, sidecars=(), overwrite=True, what="comparison", keep_suffix=True,
                            inputs=read)
    manifest = build_manifest("compare", settings, inputs=inputs, seeds={"bootstrap": settings.seed},
                              extra={"compared": [str(a), str(b)]})
    output.publish({"main": json_writer({**result, "manifest": manifest})})
