"""`gsmkit compare A B`: two evaluations of the same problems, the paired difference and what changed."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from gsmkit.cli.options import JsonOpt, command_from, usage_errors
from gsmkit.errors import THRESHOLD_MISSED_EXIT
from gsmkit.studies.compare import CompareSettings

_EVAL_HELP = "An `eval gsm8k` output folder (or its predictions.jsonl), or an `eval ppl` folder"
ArgA = Annotated[str, typer.Argument(metavar="A", help=f"{_EVAL_HELP}: the reference.", show_default=False)]
ArgB = Annotated[str, typer.Argument(metavar="B", help=f"{_EVAL_HELP}: compared against A (B - A).",
                                     show_default=False)]


@command_from(CompareSettings)
def compare(settings: CompareSettings, a: ArgA, b: ArgB, json_out: JsonOpt = False) -> None:
    """Compare two `eval gsm8k` runs of the same problems, problem by problem: B - A.

    For the strict and the flexible column: each run's accuracy with its 95% Wilson interval, the
    difference with a paired bootstrap 95% interval (--n-boot resamples of the problems, --seed), the
    exact McNemar p-value, the four cells (both right, only A, only B, neither), and the problems whose
    result changed. Runs of different problems (or different gold answers) are refused (exit 1).

    Two `eval ppl` runs of the same rows (base + adapter against the merged model): the perplexity of each,
    overall and per source, their relative difference and the largest per-row loss difference; with
    --ppl-tolerance, exit 3 when a difference is beyond it.

    Example: gsmkit compare runs/eval-base runs/eval-sft --out runs/base-vs-sft.json
    """
    from gsmkit.progress import stderr_console
    from gsmkit.studies.compare import compare_evaluations

    with usage_errors():  # --ppl-tolerance with eval gsm8k runs, an --out that is a folder
        result = compare_evaluations(settings, a, b)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        console = stderr_console()
        ppl = result.get("kind") == "eval ppl"
        for table in _ppl_table(result) if ppl else _tables(result, settings.show):
            console.print(table)
        if result["out"]:
            console.print(f"comparison in {result['out']}", highlight=False, markup=False)
    if result.get("passed") is False:
        raise typer.Exit(THRESHOLD_MISSED_EXIT)


def _ppl_table(result: dict[str, Any]) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    tol = result["tolerance"]
    lo, hi = result["loss_diff_ci95"]
    title = f"perplexity of the same {result['n']} rows (A = {result['a']}, B = {result['b']})"
    table = Table(title=Text(title),
                  caption=f"largest per-row |loss B - loss A| {result['loss_diff_max_abs']:.2e} (line "
                          f"{result['loss_diff_max_line']}); mean {result['loss_diff_mean']:+.2e} "
                          f"[{lo:+.2e}, {hi:+.2e}] (95% bootstrap, n={result['n']})")
    within = (f"within {tol:g}",) if tol is not None else ()
    for col in ("rows", "n", "tokens", "ppl A", "ppl B", "|B - A| / A", *within):
        table.add_column(col, justify="right")
    for row in result["groups"]:
        cells = [row["group"], str(row["n"]), str(row["tokens"]), f"{row['ppl_a']:.6f}",
                 f"{row['ppl_b']:.6f}", f"{row['rel_diff']:.2e}"]
        if tol is not None:
            cells.append("yes" if row["passed"] else "NO")
        table.add_row(*map(Text, cells))
    return [table]


def _ci(ci: list[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _tables(result: dict[str, Any], show: int) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    a, b, chosen = result["a"], result["b"], result["metric"]
    # Text, not markup: paths, ids and answers come from the user's files
    table = Table(title=Text(f"B - A on {result[chosen]['n']} problems (A = {a['path']}, B = {b['path']})"),
                  caption=f"paired bootstrap: {result['n_boot']} resamples of the problems, "
                          f"seed {result['seed']}")
    names = (chosen, *(m for m in ("strict", "flexible") if m != chosen))
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right", style="bold" if name == chosen else None)
    ms = [result[name] for name in names]
    rows = [("A accuracy [95% Wilson]", [f"{m['a_accuracy']:.3f} {_ci(m['a_ci95'])}" for m in ms]),
            ("B accuracy [95% Wilson]", [f"{m['b_accuracy']:.3f} {_ci(m['b_ci95'])}" for m in ms]),
            ("B - A [95% bootstrap]",
             [f"{m['difference']:+.3f} {_ci(m['difference_ci95'], signed=True)}" for m in ms]),
            ("McNemar p (exact)", [f"{m['mcnemar_p']:.3g}" for m in ms])]
    cells = (("both right", "both"), ("only A right", "only_a"), ("only B right", "only_b"),
             ("neither", "neither"))
    rows += [(label, [str(m[cell]) for m in ms]) for label, cell in cells]
    for label, values in rows:
        table.add_row(label, *values)
    tables = [table]
    for side in ("a", "b"):  # a run with a reasoning section: how many had one, and ended inside it
        run = result[side]
        if run.get("ended_in_reasoning") is not None:
            had, ended = run["with_reasoning_section"], run["ended_in_reasoning"]
            tables.append(Text(f"{side.upper()} reasoning ({run['reasoning_section']}): "
                               f"{had['count']}/{had['n']} with a section {_ci(had['ci95'])}, "
                               f"{ended['count']}/{ended['n']} ended inside it {_ci(ended['ci95'])} "
                               "(95% Wilson)"))
    changed = result[chosen]["changed"]
    if show and changed:
        listed = Table(title=f"{len(changed)} problem{'' if len(changed) == 1 else 's'} changed ({chosen})"
                       + (f", the first {show}" if len(changed) > show else ""))
        for col in ("id", "gold", "A answer", "B answer", "change"):
            listed.add_column(col)
        for row in changed[:show]:
            shown = (row["id"], row["gold"], _answer(row["a"]), _answer(row["b"]))
            listed.add_row(*map(Text, shown), "B right" if row["b_correct"] else "A right")
        tables.append(listed)
    elif not changed:
        tables.append(Text(f"no problem changed ({chosen})"))
    return tables


def _answer(value: str | None) -> str:
    return "-" if value is None else value
