"""The audit's reports: audit.md, spectra.png and the terminal tables, from an `AuditResult`.

In: the `AuditResult` of `gsmkit.adapters.svd.audit_adapter` and its manifest. Out: `write_audit` writes
`audit.json` (the result with the manifest inside), `audit.md` (tables by module type, by layer and per
module, notes, the suggested `rank_pattern`), `spectra.png` (normalised singular values per module type,
coloured by layer) and `manifest.json` into the output folder, each file atomically; `audit_tables`
gives the same tables for the terminal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gsmkit.jsonl import atomic_open, write_json
from gsmkit.run_folder import MANIFEST, RunOutput

if TYPE_CHECKING:
    from gsmkit.adapters.audit_results import AuditResult, ModuleAudit

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
SPECTRA_PNG = "spectra.png"


def audit_output(out: Path, inputs: tuple[Path, ...] = ()) -> RunOutput:
    """The audit folder: the files it owns (replaced on every run; nothing else in the folder is touched),
    checked by the output path rule (never the adapter folder itself: its manifest.json is the adapter's)."""
    return RunOutput.folder(out, finals=(AUDIT_JSON, AUDIT_MD, SPECTRA_PNG), what="audit", inputs=inputs)


def write_audit(out: Path, result: AuditResult, manifest: dict[str, Any]) -> None:
    """Write the four audit files, each under a temporary name renamed into place."""
    output = audit_output(out)
    audit = {k: v for k, v in result.to_dict().items() if k != "compression"}  # None: no adapter written
    write_json(output.path(AUDIT_JSON), {**audit, "manifest": manifest})
    with atomic_open(output.path(AUDIT_MD)) as fh:
        fh.write(render_markdown(result))
    with atomic_open(output.path(SPECTRA_PNG), "wb") as fh:
        plot_spectra(result.modules, fh)
    write_json(output.path(MANIFEST), manifest)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _layer_label(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def type_rows(result: AuditResult) -> list[list[str]]:
    """Rows of the per-module-type table (shared by audit.md and the printed table)."""
    return [[kind, str(s["modules"]), "/".join(map(str, s["r"])),
             f"{s['effective_rank_mean']:.2f} / {s['effective_rank_max']}", f"{s['stable_rank_mean']:.2f}",
             f"{s['spectral_entropy_mean']:.3f}", f"{s['frobenius_norm_mean']:.4g}"]
            for kind, s in result.by_type.items()]


TYPE_HEADERS = ["type", "modules", "r", "eff. rank mean / max", "stable rank", "entropy (nats)", "Frobenius"]


def layer_rows(result: AuditResult) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the per-layer table: effective rank / r for each module type, then the norm."""
    kinds = list(result.by_type)

    def cell(entry: dict[str, Any], kind: str) -> str:
        ranks = entry["effective_rank"]
        return f"{ranks[kind]}/{entry['r'][kind]}" if kind in ranks else ""

    rows = [[_layer_label(entry["layer"]), *(cell(entry, k) for k in kinds), f"{entry['frobenius_norm']:.4g}"]
            for entry in result.by_layer]
    return ["layer", *kinds, "Frobenius"], rows


def _leading(singular_values: list[float], n: int = 4) -> str:
    return ", ".join(f"{s:.3g}" for s in singular_values[:n]) + (", ..." if len(singular_values) > n else "")


def render_markdown(result: AuditResult) -> str:
    saved = result.lora_parameters - result.lora_parameters_suggested
    parts = [
        f"# SVD audit of `{result.adapter}`\n",
        (f"{len(result.modules)} LoRA modules, {result.lora_parameters:,} parameters. Effective rank: the "
         f"fewest singular directions holding {result.energy:g} of each update's squared Frobenius norm. The "
         f"suggested ranks need {result.lora_parameters_suggested:,} parameters ({saved:,} fewer).\n"),
        "## By module type\n",
        _md_table(TYPE_HEADERS, type_rows(result)),
        "## By layer (effective rank / r)\n",
        _md_table(*layer_rows(result)),
        "## Modules\n",
        _md_table(
            ["module", "shape", "r", "scale", "eff. rank", "suggested", "stable rank", "entropy", "Frobenius",
             "largest singular values"],
            [[f"`{m.module}`", "x".join(map(str, m.shape)), m.r, f"{m.scale:g}", m.effective_rank,
              m.suggested_rank, f"{m.stable_rank:.2f}", f"{m.spectral_entropy:.3f}",
              f"{m.frobenius_norm:.4g}", _leading(m.singular_values)]
             for m in result.modules],
        ),
    ]
    if result.notes:
        parts += ["## Notes\n", "".join(f"- {note}\n" for note in result.notes)]
    parts += ["## Suggested `rank_pattern`\n",
              "For `peft.LoraConfig(rank_pattern=...)`, or `gsmkit audit-svd --compress`:\n",
              "```json\n" + json.dumps(result.rank_pattern, indent=2) + "\n```\n"]
    return "\n".join(parts)


def plot_spectra(audits: list[ModuleAudit], fh) -> None:
    """One panel per module type: sigma_i / sigma_1 against i, one line per module, coloured by layer."""
    # Figure without pyplot: no global backend state, no display needed.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    kinds = sorted({m.type for m in audits})
    ncols = min(3, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    layers = [m.layer for m in audits if m.layer is not None]
    top_layer = max(layers) if layers else 0
    cmap = colormaps["viridis"]
    for ax, kind in zip(axes, kinds, strict=False):
        group = [m for m in audits if m.type == kind]
        plotted = 0
        for m in group:
            if not m.singular_values or m.singular_values[0] == 0:
                continue  # a zero update has no shape to normalise
            xs = range(1, len(m.singular_values) + 1)
            ys = [s / m.singular_values[0] for s in m.singular_values]
            colour = cmap((m.layer or 0) / top_layer if top_layer else 0.5)
            ax.plot(xs, ys, color=colour, alpha=0.7, linewidth=1.0, marker="." if len(ys) <= 16 else None)
            plotted += 1
        zero = len(group) - plotted
        ax.set_title(f"{kind} ({len(group)} modules" + (f", {zero} zero" if zero else "") + ")", fontsize=10)
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    if top_layer:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(norm=Normalize(0, top_layer), cmap=cmap), ax=list(axes[:len(kinds)]),
                     label="layer")
    fig.suptitle("Normalised singular values of scale * B @ A (colour: layer)", fontsize=11)
    fig.savefig(fh, format="png", dpi=110)


def audit_tables(result: AuditResult) -> list[Any]:
    """Rich tables for the terminal: by module type, then by layer."""
    from rich.table import Table

    by_type = Table(title=f"LoRA spectra by module type (energy {result.energy:g})")
    for i, header in enumerate(TYPE_HEADERS):
        by_type.add_column(header, justify="left" if i == 0 else "right")
    for row in type_rows(result):
        by_type.add_row(*row)
    headers, rows = layer_rows(result)
    by_layer = Table(title="Effective rank / r by layer")
    for i, header in enumerate(headers):
        by_layer.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        by_layer.add_row(*row)
    return [by_type, by_layer]
