"""Packed SFT batches (`train sft|qlora --packing`): whether a model keeps each packed row to itself.

In: the model that trains (a PEFT model or a plain causal LM, 4-bit or not) and the run's --packing.
Out: `batch_layout` -> the manifest's `resolved.batches` (`layout` "packed" or "padded", `grouped_by_length`,
`packing_refused`); `packing_refusal(model)`: None when the model serves `collate.PackCollator`'s layout
exactly, else why not (the run then pads, and says so once on stderr).

How the layout is kept exact: the rows of a batch are one sequence whose position ids restart at 0 for each
row, with no attention mask and no cache; transformers 5 then builds the block-diagonal causal mask itself
(`masking_utils.find_packed_sequence_indices`; its causal and sliding-window rules are applied to the
positions within each row), the path TRL's `padding_free` relies on. On transformers 5.25 that holds for
every family the tests build (Llama, Qwen2/3, Mistral and Gemma-2/3 with windows, Phi-3, GPT-2, GPT-Neo,
GPT-NeoX; `tests/test_packed_sft.py`), with sdpa and eager attention. A model that builds its own mask,
ignores position ids or adds absolute positions by slot would let a row see, or be placed after, the row
before it; so, whatever the family, the run first asks the model itself (`probe`): two short rows packed
must give each row the logits it has alone, and changing the first row must not change the second's.

Speed: on a CPU the packed mask is dense (sdpa and eager compute every query against every key of the packed
sequence, then mask), so attention costs (the batch's tokens)² instead of the sum of its rows' squares, while
length-grouped padded batches (the default, `--no-packing`) pad little: on SmolLM2-135M the padded batches
were the faster.
"""

from __future__ import annotations

import sys
from typing import Any

# the probe's rows: a first row, the same length with other tokens, and a second row
PROBE_LENGTHS = (9, 7)


def batch_layout(model: Any, packing: bool, group_by_length: bool) -> dict[str, Any]:
    """How the run's batches are laid out (the manifest's `resolved.batches`): packed when asked and the
    model keeps packed rows apart, else padded, in batches grouped by length (packed batches are drawn at
    random: the attention of one costs the square of its tokens, which batches of long rows make larger)."""
    from gsmkit.processes import is_main_process

    refused = packing_refusal(model) if packing else None
    if refused and is_main_process():
        print(f"note: --packing is off for this model, batches are padded: {refused}", file=sys.stderr)
    packed = packing and refused is None
    return {"layout": "packed" if packed else "padded", "grouped_by_length": group_by_length and not packed,
            "packing_refused": refused}


def packing_refusal(model: Any) -> str | None:
    """Why packed rows would not be computed exactly as padded ones on `model` (None: they are)."""
    try:
        return probe(model)
    except (TypeError, ValueError, RuntimeError) as exc:  # a forward that takes no position_ids, ...
        return f"its forward refused a packed batch ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


def probe(model: Any) -> str | None:
    """Run two packed rows through `model` (in eval mode, restored after): None when each row's logits are
    those it has alone and the second row's do not depend on the first row's tokens.

    The rows go in as embeddings that require a gradient (never used): bitsandbytes' 4-bit layers on a CPU
    convert their weights for good to an inference layout, which training would then compute with, on any
    forward pass in eval mode whose input needs no gradient."""
    import torch

    was_training = model.training
    model.eval()
    try:
        first, other, second = _probe_rows(model)
        positions = torch.tensor([[*range(len(first)), *range(len(second))]], device=first.device)
        embed = model.get_input_embeddings()

        def logits(ids: list[Any], pos: Any = None) -> Any:
            kwargs = {"position_ids": pos} if pos is not None else {}
            with torch.enable_grad():
                embeds = embed(torch.cat(ids)[None]).detach().requires_grad_(True)
                return model(inputs_embeds=embeds, use_cache=False, **kwargs).logits[0].detach().float()

        packed = logits([first, second], positions)
        changed = logits([other, second], positions)
        alone_first, alone_second = logits([first]), logits([second])
    finally:
        model.train(was_training)
    n = len(first)
    tolerance = _tolerance(model) * (1.0 + float(alone_second.abs().max()))
    if (packed[n:] - changed[n:]).abs().max() > tolerance:
        return "a packed row's logits change with the row before it (its attention crosses the row boundary)"
    if max(float((packed[:n] - alone_first).abs().max()), float((packed[n:] - alone_second).abs().max())) \
            > tolerance:
        return "a packed row's logits differ from its logits alone (restarting position ids are not honoured)"
    return None


def _probe_rows(model: Any) -> tuple[Any, Any, Any]:
    """Three fixed token rows within the model's vocabulary, on its device."""
    import torch

    embeddings = model.get_input_embeddings()
    vocab = int(embeddings.num_embeddings)
    device = embeddings.weight.device

    def row(n: int, step: int) -> Any:
        return (torch.arange(1, n + 1, device=device) * step) % vocab

    first_n, second_n = PROBE_LENGTHS
    return row(first_n, 7919), row(first_n, 104729), row(second_n, 15485863)


def _tolerance(model: Any) -> float:
    """How far a row's logits may move between batch shapes: float32 matmul noise, or half precision's."""
    import torch

    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    return 1e-4 if dtype == torch.float32 else 3e-2
