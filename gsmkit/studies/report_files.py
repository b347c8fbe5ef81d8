"""The files `gsmkit report` writes: summary.csv, groups.csv, report.md, report.json and its figures.

In: the summary `Row`s, threshold `Check`s, replicate groups and skipped folders of `studies.report`.
Out: in the output folder (made in a staging folder first, then renamed into place): `summary.csv` (the
`report.COLUMNS`), `groups.csv` (with `--group-by`), `report.md` (tables, checks, groups, skipped folders,
figures), `report.json` (all of it, with the manifest), `accuracy.png`, `safety.png`, `loss_curves.png`,
`ppl_by_source.png` (each only when some row has its numbers), `accuracy_by_<FIELD>.png` (with `--plot-x`)
and `manifest.json`. The report's files are replaced on every run; nothing else in the folder is touched.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.evaluation.stats import wilson_interval
from gsmkit.jsonl import write_json
from gsmkit.run_folder import MANIFEST, publish_folder, staging_folder, write_text
from gsmkit.studies.columns import COLUMNS, METRIC_COLUMNS
from gsmkit.studies.report import Check, Row
from gsmkit.studies.runs import Skipped

SUMMARY_CSV = "summary.csv"
GROUPS_CSV = "groups.csv"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def summary_csv(rows: list[Row]) -> str:
    return _csv(list(COLUMNS), [[row.values.get(c) for c in COLUMNS] for row in rows])


def groups_csv(groups: list[dict[str, Any]]) -> str:
    header = ["by", "values", "runs", "key"]
    metrics = [c for c in METRIC_COLUMNS if any(c in g["metrics"] for g in groups)]
    for c in metrics:
        header += [f"{c}_mean", f"{c}_sd", f"{c}_ci95_lo", f"{c}_ci95_hi", f"{c}_n"]
    lines = []
    for g in groups:
        line: list[Any] = [g["by"], " ".join(map(str, g["values"])), " ".join(g["runs"]),
                           " ".join(f"{k}={v}" for k, v in g["key"].items())]
        for c in metrics:
            m = g["metrics"].get(c)
            line += [m["mean"], m["sd"], *m["ci95"], m["n"]] if m else [None] * 5
        lines.append(line)
    return _csv(header, lines)


# ---- report.md --------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(row: Row, column: str, n_column: str) -> str:
    """`value [lo, hi] (n=N)` of a proportion column whose bounds are `<column>_lo/_hi`."""
    v = row.values.get(column)
    if v is None:
        return "-"
    lo, hi, n = row.values.get(f"{column}_lo"), row.values.get(f"{column}_hi"), row.values.get(n_column)
    return f"{v:.3f} [{_num(lo)}, {_num(hi)}] (n={_num(n)})"


def _share(row: Row, column: str, n_column: str) -> str:
    """A share of the sample with its 95% Wilson interval (recomputed from the share and n)."""
    v, n = row.values.get(column), row.values.get(n_column)
    if v is None or not n:
        return "-"
    lo, hi = wilson_interval(round(v * n), int(n))
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def render_markdown(rows: list[Row], checks: list[Check], groups: list[dict[str, Any]],
                    skipped: list[Skipped], figures: list[str], argv: list[str]) -> str:
    trained = sum(r.train is not None for r in rows)
    parts = ["# gsmkit report\n", f"`{' '.join(argv)}`\n",
             (f"{len(rows)} rows ({trained} training runs); intervals are 95% Wilson score intervals of the "
              "proportion, n is the number of problems (GSM8K) or prompts (safety).\n")]
    headers = ["run", "method", "data", "preset", "train rows", "steps", "checkpoint", "GSM8K strict",
               "GSM8K flexible", "answer share", "reasoning share", "ended in reasoning", "safety",
               "unparsed", "ppl"]
    lines = [[str(r.values["run"]), _num(r.values.get("method")), _num(r.values.get("data")),
              _num(r.values.get("preset")),
              _num(r.values.get("train_rows")), _num(r.values.get("steps")),
              _num(r.values.get("chosen_checkpoint")), _ci(r, "gsm8k_strict", "gsm8k_n"),
              _ci(r, "gsm8k_flexible", "gsm8k_n"), _share(r, "gsm8k_answer_share", "gsm8k_n"),
              _share(r, "gsm8k_reasoning_share", "gsm8k_n"), _share(r, "gsm8k_ended_in_reasoning", "gsm8k_n"),
              _ci(r, "safety", "safety_n"),
              _share(r, "safety_unparsed", "safety_n"), _num(r.values.get("ppl"), 4)] for r in rows]
    shown = [i for i in range(len(headers)) if i == 0 or any(line[i] != "-" for line in lines)]  # none empty
    parts += ["## Summary\n",
              _table([headers[i] for i in shown], [[line[i] for i in shown] for line in lines])]
    if checks:
        missed = [c for c in checks if not c.passed]
        parts += [f"## Thresholds: {len(checks) - len(missed)} of {len(checks)} checks passed\n",
                  _table(["run", "requirement", "value", "result"],
                         [[c.run, c.requirement, _num(c.value), "pass" if c.passed else "MISSED"]
                          for c in checks])]
    if groups:
        parts += [f"## Replicates grouped by `{groups[0]['by']}`\n",
                  "mean ± sd, 95% Student-t interval over the runs of each group (n = runs).\n"]
        for g in groups:
            key = ", ".join(f"{k}={v}" for k, v in g["key"].items() if k not in ("model",))
            parts.append(f"### {key or 'all runs'}\n\n{g['by']} = {', '.join(map(str, g['values']))}\n")
            parts.append(_table(["metric", "mean", "sd", "95% interval", "n"],
                                [[c, _num(m["mean"]), _num(m["sd"]),
                                  f"[{_num(m['ci95'][0])}, {_num(m['ci95'][1])}]", str(m["n"])]
                                 for c, m in g["metrics"].items()]))
    if skipped:
        parts += ["## Skipped\n", _table(["folder", "why"], [[str(s.path), s.reason] for s in skipped])]
    if figures:
        parts += ["## Figures\n", *[f"![{Path(f).stem}]({f})\n" for f in figures]]
    return "\n".join(parts)


# ---- figures ----------------------------------------------------------------------------------------------


def _bars(rows: list[Row], column: str, n_column: str, ylabel: str, png: Path) -> None:
    from gsmkit.training.plots import draw_png

    shown = [r for r in rows if r.values.get(column) is not None]

    def draw(ax: Any) -> None:
        xs = range(len(shown))
        ys = [r.values[column] for r in shown]
        lo = [y - (r.values.get(f"{column}_lo") or y) for y, r in zip(ys, shown, strict=True)]
        hi = [(r.values.get(f"{column}_hi") or y) - y for y, r in zip(ys, shown, strict=True)]
        ax.errorbar(list(xs), ys, yerr=[lo, hi], fmt="o", capsize=4)
        ax.set_xticks(list(xs), [f"{r.values['run']}\nn={r.values.get(n_column)}" for r in shown],
                      rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(ylabel + " (95% CI)")
        ax.set_ylim(0, 1)

    draw_png(png, (max(5.0, 0.8 * len(shown) + 2), 4), draw, xlabel="")


def _loss_curves(rows: list[Row], png: Path) -> bool:
    from gsmkit.training.plots import draw_png

    curves = []
    for r in rows:
        if r.train is not None:
            pts = [(x["step"], x["loss"]) for x in r.train.log if "loss" in x]
            if pts:
                curves.append((str(r.values["run"]), pts))
    if not curves:
        return False

    def draw(ax: Any) -> None:
        for name, pts in curves:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)

    draw_png(png, (6.5, 4), draw)
    return True


def _ppl_by_source(rows: list[Row], png: Path) -> bool:
    from gsmkit.training.plots import draw_png

    data = [(str(r.values["run"]), r.evals["eval ppl"].metrics.get("groups", {}).get("source") or {})
            for r in rows if "eval ppl" in r.evals]
    sources = sorted({s for _, groups in data for s in groups})
    if not sources:
        return False

    def draw(ax: Any) -> None:
        width = 0.8 / len(data)
        for i, (name, groups) in enumerate(data):
            ax.bar([j + i * width for j in range(len(sources))],
                   [groups.get(s, {}).get("ppl", 0.0) for s in sources], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources, rotation=30, ha="right")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=7)

    draw_png(png, (6.5, 4), draw, xlabel="source")
    return True


def _by_field(rows: list[Row], x: str, series: tuple[str, ...], png: Path) -> bool:
    from gsmkit.training.plots import draw_png

    lines: dict[str, list[tuple[float, Row]]] = {}
    for r in rows:
        xv, y = r.get(x), r.values.get("gsm8k_strict")
        if isinstance(xv, int | float) and y is not None:
            lines.setdefault(" ".join(str(r.get(s)) for s in series), []).append((float(xv), r))
    if not lines:
        return False

    log_x = all(p[0] > 0 for pts in lines.values() for p in pts)

    def draw(ax: Any) -> None:
        for i, (name, pts) in enumerate(sorted(lines.items())):
            pts.sort(key=lambda p: p[0])
            ys = [p[1].values["gsm8k_strict"] for p in pts]
            err = [[y - (p[1].values.get("gsm8k_strict_lo") or y) for y, p in zip(ys, pts, strict=True)],
                   [(p[1].values.get("gsm8k_strict_hi") or y) - y for y, p in zip(ys, pts, strict=True)]]
            # Lines a few percent apart along a log x axis, so equal points and their bars stay visible.
            dodge = 2 ** (0.04 * (i - (len(lines) - 1) / 2)) if log_x else 1.0
            ax.errorbar([p[0] * dodge for p in pts], ys, yerr=err, marker="o", capsize=3, label=name)
        if log_x:  # ticks at the values themselves (256, 512, ...), not at powers of two
            ax.set_xscale("log", base=2)
            xs = sorted({p[0] for pts in lines.values() for p in pts})
            ax.set_xticks(xs, labels=[f"{v:g}" for v in xs])
            ax.set_xticks([], minor=True)
        ax.set_ylabel("GSM8K strict accuracy (95% CI)")
        ax.legend(fontsize=7)

    draw_png(png, (6.5, 4), draw, xlabel=x)
    return True


def draw_figures(out: Path, rows: list[Row], plot_x: str | None, plot_series: tuple[str, ...]) -> list[str]:
    """The figures that have data, written into `out`; their file names."""
    made = []
    if any(r.values.get("gsm8k_strict") is not None for r in rows):
        _bars(rows, "gsm8k_strict", "gsm8k_n", "GSM8K strict accuracy", out / "accuracy.png")
        made.append("accuracy.png")
    if any(r.values.get("safety") is not None for r in rows):
        _bars(rows, "safety", "safety_n", "safety rate", out / "safety.png")
        made.append("safety.png")
    if _loss_curves(rows, out / "loss_curves.png"):
        made.append("loss_curves.png")
    if _ppl_by_source(rows, out / "ppl_by_source.png"):
        made.append("ppl_by_source.png")
    if plot_x and _by_field(rows, plot_x, plot_series, out / f"accuracy_by_{plot_x}.png"):
        made.append(f"accuracy_by_{plot_x}.png")
    return made


def write_report(out: Path, rows: list[Row], checks: list[Check], groups: list[dict[str, Any]],
                 skipped: list[Skipped], manifest: dict[str, Any], plot_x: str | None,
                 plot_series: tuple[str, ...], summary: dict[str, Any]) -> list[str]:
    """Every report file into `out` (created if needed): they are made in a hidden staging folder (beside
    `out`, or inside it when it exists), then renamed into place, so a failure while they are made leaves
    `out` as it was (and no `out` when there was none). Returns the figures' names."""
    out = Path(out)
    existed = out.is_dir()
    with staging_folder(out / "report" if existed else out) as tmp:
        figures = draw_figures(tmp, rows, plot_x, plot_series)
        write_text(tmp / SUMMARY_CSV, summary_csv(rows))
        if groups:
            write_text(tmp / GROUPS_CSV, groups_csv(groups))
        write_text(tmp / REPORT_MD, render_markdown(rows, checks, groups, skipped, figures, manifest["argv"]))
        write_json(tmp / REPORT_JSON, {**summary, "manifest": manifest})
        write_json(tmp / MANIFEST, manifest)
        if not existed:
            publish_folder(tmp, out)
            return figures
        made = sorted(tmp.iterdir())
        in_the_way = [out / f.name for f in made if (out / f.name).is_dir()]
        if in_the_way:
            raise ConfigError(f"{in_the_way[0]}: is a folder where the report writes a file",
                              hint="move it, or choose another --out")
        for f in made:
            os.replace(f, out / f.name)
        tmp.rmdir()
    return figures
