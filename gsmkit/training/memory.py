"""Host memory of a training run on CPU: freed activations go back to the system.

In: the device the run trains on. Out: `return_freed_memory(device)`, called once before training, and
what it did (recorded in the manifest).

Why: on CPU every activation of the step is a malloc'd block. glibc serves blocks under its mmap
threshold from its heaps, and that threshold grows (up to 32 MB) each time a larger block is freed, so
after the first steps a step's activations come from the heap; freed there, they stay resident and
fragment it. Measured on SmolLM2-135M, batch 8 x 468 (`benchmarks/train_sft.py memory`): 6.4 GB kept for
the backward pass, 12.8 GB peak RSS by default, 8.7 GB with a fixed 4 MB threshold, where every block of
4 MB or more is mapped on its own and unmapped when freed. On CUDA the activations are not in host memory
and nothing is changed; nor where the user chose an allocator (`MALLOC_MMAP_THRESHOLD_`, or jemalloc /
tcmalloc in `LD_PRELOAD`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory(device: Any) -> int | None:
    """On CPU with glibc: fix malloc's mmap threshold at `MMAP_THRESHOLD` and return it; else None."""
    if getattr(device, "type", str(device)) != "cpu" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # not glibc (musl, macOS)
    return MMAP_THRESHOLD if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 else None
