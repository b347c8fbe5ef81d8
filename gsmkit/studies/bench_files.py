"""The files `gsmkit bench` reads and writes: bench.json (read back by `--aggregate`), bench.md,
bench_aggregate.json, bench_aggregate.md and manifest.json.

In: the JSON-ready results of `studies.bench` and their manifest; bench folders to read. Out: each file
written atomically into the output folder (its bench files replaced, nothing else there touched);
`read_bench` gives a checked bench.json (DataError naming the file and the field); `bench_rows` /
`aggregate_rows` are the tables of the Markdown files and of the terminal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer
from gsmkit.studies.bench_records import Benched, BenchResult, BenchVariant, Gate
from gsmkit.studies.run_files import check_shape, kinds_of, read_object

BENCH_JSON, BENCH_MD = "bench.json", "bench.md"
AGGREGATE_JSON, AGGREGATE_MD = "bench_aggregate.json", "bench_aggregate.md"
FORMAT, AGGREGATE_FORMAT = "gsmkit-bench", "gsmkit-bench-aggregate"
BENCH_HEADERS = ["variant", "n", "probe [95% CI]", "variant [95% CI]", "delta [95% CI]", "McNemar p",
                 "only probe / only variant", "LoRA params (ratio)", "verdict"]
AGGREGATE_HEADERS = ["variant", "seeds", "mean delta", "95% CI (seeds x problems)", "t 95% CI (per-seed)",
                     "per-seed deltas", "verdict"]


def _output(out: Path, finals: tuple[str, ...]) -> RunOutput:
    """The bench's files in `out`; a folder holding another command's output is refused (its manifest.json
    would be replaced)."""
    output = RunOutput.folder(Path(out), finals=finals, what="bench", overwrite=True)  # checks the path
    manifest = Path(out) / MANIFEST
    if manifest.is_file():
        try:
            command = json.loads(manifest.read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            command = None
        if command != "bench":
            what = f"`{command}`" if command else "another run"
            raise ConfigError(f"--out {out} holds the output of {what} (its {MANIFEST} would be replaced)",
                              hint="write the bench into a folder of its own")
    return output


def _publish(out: Path, name_json: str, name_md: str, result: dict[str, Any], markdown: str,
             manifest: dict[str, Any]) -> None:
    output = _output(out, (name_json, name_md))
    output.publish({name_json: json_writer({**result, "manifest": manifest}),
                    name_md: lambda fh: fh.write(markdown), MANIFEST: json_writer(manifest)})


def write_bench(out: Path, result: dict[str, Any], manifest: dict[str, Any]) -> None:
    _publish(out, BENCH_JSON, BENCH_MD, result, render_bench(result), manifest)


def write_aggregate(out: Path, result: dict[str, Any], manifest: dict[str, Any]) -> None:
    _publish(out, AGGREGATE_JSON, AGGREGATE_MD, result, render_aggregate(result), manifest)


# ---- reading bench.json back -------------------------------------------------------------------------------

_EVALUATION_KEYS = ("name", "predictions", "predictions_sha256", "train_seed")  # what --aggregate reads
_BENCH_KEYS = ("format", "version", "metric", "margin", "gate_passed", "probe", "variants")


def read_bench(folder: str | Path) -> dict[str, Any]:
    """A bench folder's bench.json, with the fields `--aggregate` uses checked (their types are those of
    `BenchResult`, `Gate`, `Benched` and `BenchVariant`): DataError naming the file and the field."""
    path = Path(folder) / BENCH_JSON
    hint = "give folders written by `gsmkit bench --probe ... --out DIR`"
    if not path.is_file():
        raise DataError(f"{folder}: no {BENCH_JSON} in it", hint=hint)
    bench = read_object(path, hint)
    if bench.get("format") != FORMAT:
        raise DataError(f"{path}: field 'format' is not '{FORMAT}'", hint=hint)
    check_shape(bench, path, kinds_of(BenchResult, (*_BENCH_KEYS, "gate")), required=_BENCH_KEYS, hint=hint)
    if bench["version"] != 1:
        raise DataError(f"{path}: version {bench['version']} is not one this gsmkit reads (1)")
    if bench["gate"] is not None:
        check_shape(bench["gate"], path, kinds_of(Gate), required=kinds_of(Gate), hint=hint, prefix="gate.")
    evaluation = kinds_of(Benched, _EVALUATION_KEYS)
    check_shape(bench["probe"], path, evaluation, required=evaluation, hint=hint, prefix="probe.")
    for i, row in enumerate(bench["variants"]):
        where = f"variants[{i}]."
        named = ("name", "evaluation")
        check_shape(row, path, kinds_of(BenchVariant, named), required=named, hint=hint, prefix=where)
        check_shape(row["evaluation"], path, evaluation, required=evaluation, hint=hint,
                    prefix=f"{where}evaluation.")
    return bench


# ---- Markdown (and the terminal's tables) ------------------------------------------------------------


def count(n: int, word: str) -> str:
    """"1 variant", "3 variants"."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _ci(ci: list[float] | None, signed: bool = False) -> str:
    if not ci or ci[0] is None:
        return "-"
    fmt = _signed if signed else _num
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bench_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in result["variants"]:
        params = v["evaluation"]["lora_parameters"]
        ratio = v["lora_parameters_ratio"]
        rows.append([v["name"], str(v["n"]), f"{_num(v['probe_accuracy'])} {_ci(v['probe_ci95'])}",
                     f"{_num(v['variant_accuracy'])} {_ci(v['variant_ci95'])}",
                     f"{_signed(v['delta'])} {_ci(v['delta_ci95'], signed=True)}", f"{v['mcnemar_p']:.3g}",
                     f"{v['only_probe']} / {v['only_variant']}",
                     "-" if params is None else f"{params:,}" + ("" if ratio is None else f" ({ratio:.1%})"),
                     v["verdict"]])
    return rows


def _gate_line(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return "Gate: none."
    status = "passed" if gate["passed"] else "MISSED: every verdict is `gate failed`"
    return f"Gate: `{gate['requirement']}` on the probe: {_num(gate['value'], 4)}, {status}."


def _rule_lines(result: dict[str, Any]) -> list[str]:
    return [f"Rule: {result['rule']} (margin {result['margin']:g}, metric {result['metric']}).", ""]


def render_bench(result: dict[str, Any]) -> str:
    probe = result["probe"]
    seed = "" if probe["train_seed"] is None else f", training seed {probe['train_seed']}"
    adapter = "the bare model" if probe["adapter"] is None else f"adapter `{probe['adapter']}`"
    parts = [f"# Bench: {count(len(result['variants']), 'variant')} against the probe\n",
             f"Probe: `{probe['path']}` ({adapter}{seed}), {probe['n']} problems, metric {result['metric']}.",
             "", _gate_line(result["gate"]), "", *_rule_lines(result)]
    if result["variants"]:
        parts.append(_table(BENCH_HEADERS, bench_rows(result)))
    parts.append(f"Accuracy intervals: Wilson 95%. Delta interval: paired percentile bootstrap over the "
                 f"problems, {result['n_boot']} resamples, seed {result['seed']}. McNemar: exact, "
                 "two-sided.\n")
    return "\n".join(parts)


def aggregate_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in result["variants"]:
        t = v["t_interval"]
        rows.append([v["name"], ", ".join("?" if s is None else str(s) for s in v["seeds"]),
                     _signed(v["mean_delta"]), _ci(v["delta_ci95"], signed=True),
                     "-" if t["lo"] is None else _ci([t["lo"], t["hi"]], signed=True),
                     ", ".join(_signed(s["delta"]) for s in v["per_seed"]), v["verdict"]])
    return rows


def render_aggregate(result: dict[str, Any]) -> str:
    benches = [[b["bench"], "?" if b["seed"] is None else str(b["seed"]), str(b["n"]),
                _num(b["probe_accuracy"]),
                "-" if b["gate"] is None else f"{b['gate']['requirement']}: {_num(b['gate']['value'], 4)}",
                "passed" if b["gate_passed"] else "MISSED"] for b in result["benches"]]
    title = f"{count(len(result['variants']), 'variant')} over {count(len(result['benches']), 'seed')}"
    parts = [f"# Bench aggregate: {title}\n",
             *_rule_lines(result), "## Seeds\n",
             _table(["bench", "seed", "n", "probe accuracy", "gate", "gate status"], benches),
             "## Variants\n"]
    if result["variants"]:
        parts.append(_table(AGGREGATE_HEADERS, aggregate_rows(result)))
    parts.append(f"Mean delta: the mean over seeds of each seed's delta. Its 95% interval: hierarchical "
                 f"percentile bootstrap (seeds resampled with replacement, then the problems of each drawn "
                 f"seed), {result['n_boot']} replicates, seed {result['seed']}; the verdict uses it. The t "
                 f"interval is Student's over the per-seed deltas alone.\n")
    if result["notes"]:
        parts += ["## Notes\n", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(parts)
