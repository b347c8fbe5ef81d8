"""`gsmkit audit-svd`: singular-value audit of a LoRA adapter, and its compression to lower ranks."""

from __future__ import annotations

import json

import typer

from gsmkit.adapters.svd import AuditSettings
from gsmkit.cli.options import JsonOpt, command_from


@command_from(AuditSettings)
def audit_svd(settings: AuditSettings, json_out: JsonOpt = False) -> None:
    """Singular values of every LoRA update (scale * B @ A) from QR factors of B and A: no dense d x k matrix.

    Per module: effective rank at --energy, stable rank, spectral entropy, Frobenius norm and a suggested
    rank; tables by module type and by layer; a PEFT rank_pattern. Writes OUT/audit.json, OUT/audit.md,
    OUT/spectra.png and OUT/manifest.json. With --compress, writes instead a PEFT adapter whose modules are
    the best rank-k approximations of the original updates (gsmkit audit-svd --adapter runs/sft --compress
    --out runs/sft-compressed).

    Example: gsmkit audit-svd --adapter runs/sft --energy 0.9 --out runs/sft/audit
    """
    from gsmkit.adapters.audit_report import audit_tables
    from gsmkit.adapters.svd import audit_adapter
    from gsmkit.progress import ProgressTask, stderr_console

    console = stderr_console()
    with ProgressTask("audit-svd", "modules", console, disable=json_out) as bar:
        result = audit_adapter(settings, on_start=bar.start, on_progress=bar.advance)
    summary = {
        "out": str(settings.out_dir),
        "modules": len(result.modules),
        "energy": result.energy,
        "lora_parameters": result.lora_parameters,
        "lora_parameters_suggested": result.lora_parameters_suggested,
        "rank_pattern": result.rank_pattern,
        "notes": result.notes,
    }
    if result.compression is not None:
        summary["lora_parameters_before"] = result.compression["lora_parameters_before"]
        summary["lora_parameters_after"] = result.compression["lora_parameters_after"]
        summary["ranks"] = {row["module"]: row["r_after"] for row in result.compression["modules"]}
    if json_out:
        typer.echo(json.dumps(summary))
        return
    for table in audit_tables(result):
        console.print(table)
    for note in result.notes + (result.compression or {}).get("notes", []):
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if result.compression is not None:
        before = result.compression["lora_parameters_before"]
        after = result.compression["lora_parameters_after"]
        console.print(f"compressed adapter in {settings.out_dir}: {before:,} -> {after:,} LoRA parameters "
                      f"({after / before:.1%})", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"suggested ranks: {result.lora_parameters:,} -> {result.lora_parameters_suggested:,} "
                      f"LoRA parameters; audit in {settings.out_dir}", highlight=False, markup=False,
                      soft_wrap=True)
