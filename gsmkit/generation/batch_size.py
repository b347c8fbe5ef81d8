"""How many rows `HFEngine` generates together when `--batch-size` is not given ("auto").

In: the model (its KV-cache bytes per token), its device, and how many cache slots a row needs at most.
Out: `auto_batch_size`: as many rows as a share of free memory holds in KV cache, at most the device's cap.

Why these caps. On a CPU a decode step is bound by its matmuls once the batch is a few dozen rows, and a
larger batch only adds rows that wait for the longest one; on SmolLM2-135M (this project's 2-core CPU,
64 GSM8K problems, float32, `benchmarks/eval_gsm8k.py`) `eval gsm8k` took 45.5 s at 64 rows and 65.4 s
at `--batch-size 16` in the same run (docs/benchmarks.md). On a GPU a step costs about the same up to
hundreds of rows: 256, vLLM's own default `max_num_seqs`. With the shared prefix read from one copy
(prefix_attention), a row holds only its own tokens, so memory rarely binds on a CPU; it does for large
models on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gsmkit.settings import BATCH_CAPS as CAPS  # rows; other devices get the CPU's

KV_SHARE = 0.5  # of free memory for the rows' KV cache: the rest is left to activations and the prefill


def free_memory_bytes(device: Any) -> int:
    """Bytes free now on `device`: the GPU's free memory, or the system's MemAvailable."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token's keys and values take in the cache, over all layers (the shape from
    `families.model_family`, so GPT-2's n_layer / n_head count as Llama's fields do)."""
    from gsmkit.families import model_family

    family = model_family(model)
    param = next(model.parameters())
    element = param.element_size() if param.dtype.is_floating_point else 4
    return family.num_layers * 2 * family.num_kv_heads * family.head_dim * element


def auto_batch_size(model: Any, device: Any, slots_per_row: int) -> int:
    """Rows whose KV cache of `slots_per_row` tokens fits in `KV_SHARE` of free memory, capped per device."""
    cap = CAPS.get(getattr(device, "type", str(device)), CAPS["cpu"])
    per_row = max(1, kv_bytes_per_token(model) * max(1, slots_per_row))
    return max(1, min(cap, int(free_memory_bytes(device) * KV_SHARE) // per_row))
