"""`manifest.json`: what produced an artifact, so any result can be traced and rerun.

In: the command name, resolved settings, named input paths, seeds. Out: a JSON-ready dict with the
command line, gsmkit version and git commit, package versions, device, and sha256 of each input file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1
_MAX_DIR_FILES = 64
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # sha1 or sha256 object names
_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "safetensors",
             "vllm")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# What identifies a PEFT adapter: its config and weights (a training folder's checkpoints/ are not in it).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_sha256(adapter: str | Path | None) -> str | None:
    """sha256 over an adapter folder's adapter_config.json and weights file (None: no adapter). Evaluations
    record it, and `gsmkit report` joins them to the training run by it."""
    if adapter is None:
        return None
    path = Path(adapter).expanduser()
    h = hashlib.sha256(b"gsmkit-adapter-v1\0")
    for name in ADAPTER_FILES:
        if (path / name).is_file():
            h.update(f"{name}\0{sha256_file(path / name)}\0".encode())
    return h.hexdigest()


def _adapter_record(settings: Any) -> dict[str, Any] | None:
    """{path, sha256} of the adapter a run's model carries (`settings.model.adapter`), else None."""
    adapter = getattr(getattr(settings, "model", None), "adapter", None)
    if adapter is None:
        return None
    return {"path": str(adapter), "sha256": adapter_sha256(adapter)}


def recorded_adapter(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """{path, sha256} of the adapter a manifest's run used: its `adapter` record, or for a manifest written
    before gsmkit recorded one, `settings.model.adapter` with sha256 None; None for a bare model."""
    record = manifest.get("adapter")
    if isinstance(record, dict) and record.get("path"):
        return {"path": str(record["path"]), "sha256": record.get("sha256")}
    model = (manifest.get("settings") or {}).get("model")
    path = model.get("adapter") if isinstance(model, dict) else None
    return {"path": str(path), "sha256": None} if path else None


def _input_digest(path: str | Path | None) -> Any:
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    if p.is_dir():
        every = sorted(f for f in p.rglob("*") if f.is_file())
        # Hashing is capped (64 files under 2 GiB) so a model folder cannot stall every run; what
        # was skipped is listed, so a reader never mistakes a partial digest for a complete one.
        small = [f for f in every if f.stat().st_size < (1 << 31)]
        hashed = small[:_MAX_DIR_FILES]
        digest: dict[str, Any] = {"path": str(p),
                                  "files": {str(f.relative_to(p)): sha256_file(f) for f in hashed}}
        skipped = sorted(set(every) - set(hashed))
        if skipped:
            digest["not_hashed"] = [str(f.relative_to(p)) for f in skipped]
        return digest
    return {"path": str(path), "sha256": None}  # a Hub id: recorded by name


def git_commit() -> str | None:
    """The commit of the gsmkit source tree when it runs from a git checkout, else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    # In a repository with no commits yet, `rev-parse HEAD` fails but still echoes "HEAD" on stdout.
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and _COMMIT.fullmatch(commit) else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_device() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_fingerprint(settings: Any, ignore: tuple[str, ...]) -> dict[str, Any]:
    """The settings a partial run must match to be resumed (all fields but `ignore`), as the JSON values
    they read back as from run.json (tuples become lists, Paths strings)."""
    return {k: v for k, v in to_jsonable(settings).items() if k not in ignore}


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: dataclasses and dicts recursively, Paths and unknown objects as str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, set | frozenset):
        # Set iteration order varies between runs (string hashing is salted): sort for a stable file.
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # json.dumps would write NaN / Infinity, which strict JSON readers reject
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def build_manifest(
    command: str,
    settings: Any,
    inputs: dict[str, str | Path | None] | None = None,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from gsmkit import __version__
    from gsmkit.prompts import PROMPT_VERSION
    from gsmkit.records import SCHEMA_VERSION

    return {
        "manifest_version": MANIFEST_VERSION,
        "command": command,
        "argv": list(sys.argv),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "gsmkit_version": __version__,
        "git_commit": git_commit(),
        "schema_version": SCHEMA_VERSION,
        "prompt_version": PROMPT_VERSION,
        "settings": to_jsonable(settings),
        "seeds": seeds or {},
        "inputs": {k: _input_digest(v) for k, v in (inputs or {}).items()},
        "adapter": _adapter_record(settings),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "device": describe_device(),
        **(extra or {}),
    }
