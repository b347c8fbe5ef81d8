"""The activation cache of `gsmkit steer vectors`: one safetensors file per problem, read back instead of
running the model again.

In: a root folder (`--cache-dir`, default `$XDG_CACHE_HOME/gsmkit/steer`, else `~/.cache/gsmkit/steer`)
and a key: everything that changes what an entry holds (model and tokenizer fingerprints, adapter sha256,
layer set, prompt style as given and PROMPT_VERSION, system prompt, k and the exemplars' contents, the
method and its settings: position rule, negatives, seed, steps, sampling; dtype, device and 4-bit as
given). Out: `ActivationCache` over `<root>/<sha256 of the key>/`: `key.json` (the key, for people) and
`<problem id>-<hash of the exact texts>.safetensors` entries (float32 numpy arrays plus string metadata:
the resolved style and dtype, a sampled negative's text), with hit and miss counts.

A changed key is another folder and a changed pair another entry name, so nothing stale is ever read.
Entries are written to a temporary name in the same folder and renamed into place; an entry that cannot
be read is a miss and is written again. Reading needs numpy and safetensors only, not torch, so a run
whose every entry hits starts no model and imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE_VERSION = 1  # bump when what an entry holds changes


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/gsmkit/steer`, else `~/.cache/gsmkit/steer`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "gsmkit" / "steer"


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class Entry:
    """What the cache holds for one problem: named float32 arrays and string metadata."""

    arrays: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


class ActivationCache:
    """Entries of one key under `root`; `enabled=False` (`--no-cache`) reads and writes nothing."""

    def __init__(self, root: Path | None, key: dict[str, Any], enabled: bool = True):
        self.enabled = enabled and root is not None
        self.key = {"cache_version": CACHE_VERSION, **key}
        self.digest = key_digest(self.key)
        self.folder = (Path(root).expanduser() / self.digest[:24]) if self.enabled else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def entry_name(problem_id: str, text_hash: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in problem_id)[:80]
        return f"{safe}-{text_hash[:16]}.safetensors"

    def get(self, name: str, fits: Callable[[Entry], bool] | None = None) -> Entry | None:
        """The entry, counted as a hit, or None: a miss (absent, disabled, unreadable, or not what `fits`
        expects of an entry under this key, so damaged)."""
        entry = self._read(name) if self.enabled else None
        if entry is not None and fits is not None and not fits(entry):
            entry = None
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def _read(self, name: str) -> Entry | None:
        path = self.folder / name
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as fh:
                metadata = dict(fh.metadata() or {})
                arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            return None
        return Entry(arrays, metadata)

    def put(self, name: str, entry: Entry) -> None:
        """Write an entry atomically (temporary name in the same folder, then rename)."""
        if not self.enabled:
            return
        import numpy as np
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            self._write_atomically(key_file, lambda tmp: tmp.write_text(
                json.dumps(self.key, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"))
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in entry.arrays.items()}
        self._write_atomically(self.folder / name,
                               lambda tmp: save_file(arrays, str(tmp), metadata=dict(entry.metadata)))

    @staticmethod
    def _write_atomically(path: Path, write: Any) -> None:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def describe(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "dir": str(self.folder) if self.enabled else None}
