"""`convert-benchmarks`: benchmark folders in, one `{prompt, response, metadata}` JSONL for `eval ppl` out.

In: `ConvertSettings` (a folder with one subfolder per benchmark, which benchmarks, how many examples
each, a seed, training files to decontaminate against). Out: `<out>` (the rows, benchmark by benchmark),
`<out>.manifest.json`, and a summary. Each benchmark is read (`readers`), decontaminated
(`decontamination`), then sampled (`sampling`). A missing or empty benchmark folder is reported in the
summary (status "missing" / "empty") and skipped. The output is replaced, atomically; the same files and
seed give a byte-identical `<out>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gsmkit.data.benchmarks.decontamination import decontaminate, load_exclusions
from gsmkit.data.benchmarks.readers import BENCHMARKS, read_benchmark
from gsmkit.data.benchmarks.sampling import sample_examples
from gsmkit.errors import ConfigError, DataError
from gsmkit.fields import setting
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer

_CHOOSE = f"choose from {','.join(BENCHMARKS)}"


def split_benchmarks(values: str | Iterable[str]) -> tuple[str, ...]:
    """`--benchmarks mmlu,gpqa` and `--benchmarks mmlu --benchmarks gpqa` alike: names, lower case."""
    if isinstance(values, str):
        values = (values,)
    return tuple(b.strip().lower() for v in values for b in v.split(",") if b.strip())


@dataclass(frozen=True)
class ConvertSettings:
    input_dir: Path = setting(help="Folder with one subfolder per benchmark (DIR/mmlu, DIR/humaneval, ...).",
                              show_default=False, path={"exists": True, "file_okay": False, "dir_okay": True})
    out: Path = setting(help="JSONL file to write ({prompt, response, metadata} rows).", short="-o",
                        show_default=False, path={"dir_okay": False})
    benchmarks: tuple[str, ...] = setting(BENCHMARKS, "Benchmarks to convert, comma-separated (or repeat "
                                          "the option).", parse=split_benchmarks,
                                          show_default=",".join(BENCHMARKS))
    samples_per_benchmark: int = setting(100, "Examples per benchmark, stratified by difficulty; "
                                         "-1 for all.")
    seed: int = setting(42, "Random seed.")
    exclude: tuple[Path, ...] = setting((), "Training JSONL (question / prompt / messages); matching "
                                        "examples are dropped before sampling. Repeatable.",
                                        show_default=False, path={"exists": True, "dir_okay": False})

    def __post_init__(self) -> None:
        names = split_benchmarks(self.benchmarks)
        unknown = [b for b in names if b not in BENCHMARKS]
        if unknown:
            raise ConfigError(f"unknown benchmark(s): {', '.join(unknown)}", hint=_CHOOSE)
        if not names:
            raise ConfigError("no benchmarks selected", hint=_CHOOSE)
        if len(set(names)) != len(names):
            raise ConfigError("a benchmark is listed twice in --benchmarks")
        if self.samples_per_benchmark == 0 or self.samples_per_benchmark < -1:
            raise ConfigError("--samples-per-benchmark must be >= 1 or -1 (all), "
                              f"got {self.samples_per_benchmark}")

    def resolved(self) -> ConvertSettings:
        """The settings as the run (and its manifest) holds them: library callers may pass strings and lists;
        this gives paths, and the benchmark names split and lower case. Idempotent."""
        return replace(self, input_dir=Path(self.input_dir), out=Path(self.out),
                       benchmarks=split_benchmarks(self.benchmarks),
                       exclude=tuple(Path(p) for p in self.exclude))


def run_output(settings: ConvertSettings) -> RunOutput:
    """`<out>` and `<out>.manifest.json`, replaced whenever the command runs (it is not resumable), never
    over the files it reads."""
    return RunOutput.file(settings.out, sidecars=(), overwrite=True, what="benchmark file", keep_suffix=True,
                          inputs=(settings.input_dir, *settings.exclude))


def convert_benchmarks(settings: ConvertSettings,
                       on_progress: Callable[[str, str, int], None] | None = None) -> dict[str, Any]:
    """Read, decontaminate, sample and write `<out>` and its manifest; returns the summary.

    `on_progress(benchmark, stage, count)` after each stage ("missing", "read", "decontaminated", "sampled").
    """
    from gsmkit.manifest import build_manifest

    settings = settings.resolved()
    output = run_output(settings)
    notify = on_progress or (lambda *_: None)
    excluded_texts = load_exclusions(settings.exclude)
    rows: list[dict[str, Any]] = []
    per: dict[str, dict[str, Any]] = {}
    inputs: dict[str, Path] = {}
    warnings: list[str] = []
    for name in settings.benchmarks:
        folder = settings.input_dir / name
        info: dict[str, Any] = {"status": "ok", "available": 0, "excluded": 0, "written": 0, "files": []}
        per[name] = info
        if not folder.is_dir():
            info["status"] = "missing"
            warnings.append(f"{name}: no folder {folder}; skipped")
            notify(name, "missing", 0)
            continue
        examples, files = read_benchmark(name, folder, settings.seed)
        info["files"] = [str(f) for f in files]
        for f in files:
            inputs[f"{name}/{Path(f).relative_to(folder)}"] = Path(f)
        notify(name, "read", len(examples))
        if not examples:
            info["status"] = "empty"
            warnings.append(f"{name}: no examples found in {folder}; skipped")
            continue
        kept = decontaminate(examples, excluded_texts)
        info["available"] = len(examples)
        info["excluded"] = len(examples) - len(kept)
        notify(name, "decontaminated", len(kept))
        picked = sample_examples(kept, settings.samples_per_benchmark, settings.seed)
        info["written"] = len(picked)
        by_diff: dict[str, int] = {}
        for ex in picked:
            by_diff[ex.difficulty] = by_diff.get(ex.difficulty, 0) + 1
        info["by_difficulty"] = by_diff
        if settings.samples_per_benchmark != -1 and len(picked) < settings.samples_per_benchmark:
            warnings.append(f"{name}: only {len(picked)} examples available, "
                            f"fewer than {settings.samples_per_benchmark}")
        rows.extend(ex.to_dict() for ex in picked)
        notify(name, "sampled", len(picked))
    if not rows:
        raise DataError(f"{settings.input_dir}: none of the benchmarks {','.join(settings.benchmarks)} has "
                        "examples", hint="expected one subfolder per benchmark, e.g. DIR/mmlu/test/*.csv")
    summary = _summary(settings, rows, per, warnings)
    inputs.update({f"exclude[{i}]": p for i, p in enumerate(settings.exclude)})
    manifest = build_manifest("convert-benchmarks", settings, inputs=inputs, seeds={"seed": settings.seed},
                              extra={"summary": summary})
    output.publish({"main": jsonl_writer(rows), MANIFEST: json_writer(manifest)})
    return summary


def _summary(settings: ConvertSettings, rows: list[dict[str, Any]], per: dict[str, dict[str, Any]],
             warnings: list[str]) -> dict[str, Any]:
    table: dict[tuple[str, str, str], int] = {}
    for r in rows:
        m = r["metadata"]
        key = (m["source"], m["difficulty"], m["domain"])
        table[key] = table.get(key, 0) + 1
    return {
        "out": str(settings.out), "seed": settings.seed,
        "samples_per_benchmark": settings.samples_per_benchmark, "written": len(rows), "benchmarks": per,
        "missing": [n for n, i in per.items() if i["status"] != "ok"],
        "excluded": {n: i["excluded"] for n, i in per.items()},
        "table": [{"source": s, "difficulty": d, "domain": dm, "n": c}
                  for (s, d, dm), c in sorted(table.items())],
        "warnings": warnings,
    }
