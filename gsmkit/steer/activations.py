"""What the model computes for `steer vectors`: activations read by hooks, and sampled negatives.

In: a loaded causal LM (PEFT-wrapped or not), the decoder layers to read, token ids. Out: float32 numpy
arrays, one row per layer:
- `residual_means`: CAA's h, the output of each decoder layer (a forward hook on the block; not
  `output_hidden_states`, whose last entry comes after the final norm) averaged over a sequence's
  completion tokens (`mean`) or taken at its last one (`last`). Sequences are right-padded into batches;
  only real completion tokens are weighted.
- `o_proj_steps`: DAC's activations, the input of each layer's attention output projection
  (`families.attention_output`: `self_attn.o_proj`, GPT-2's `attn.c_proj`, ...; a forward pre-hook) at
  the position that predicts generated token t, for the greedy steps t < T of each prompt (step 0 is the
  last prompt position of the prefill, step t > 0 the one new position); a prompt is alive at step t when
  it has not ended (end-of-sequence token or stop string) before t. Prompts are left-padded into batches
  and decoded with the KV cache.
- `sample_negatives`: for each pair, the first of a few seeded samples (the HF engine) that is wrong by
  both extractors, after the reasoning section (`reasoning.score`); None when every sample was right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gsmkit.generation.hf import cache_argument

SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # sampled negatives: as generate-traces samples


@contextlib.contextmanager
def _hooks(modules: Sequence[Any], make: Callable[[int], Any], pre: bool) -> Iterator[None]:
    handles = [(m.register_forward_pre_hook(make(i)) if pre else m.register_forward_hook(make(i)))
               for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def residual_means(model: Any, layers: Sequence[int], sequences: Sequence[tuple[Sequence[int], int]],
                   position: str, batch_size: int, on_batch: Callable[[int], None] | None = None
                   ) -> list[Any]:
    """For each (token ids, n completion tokens at the end): a float32 array [len(layers), H] of the decoder
    layers' outputs over the completion (`position` mean | last)."""
    import numpy as np
    import torch

    from gsmkit.families import decoder_layers

    every = decoder_layers(model)
    blocks = [every[layer] for layer in layers]
    device = _device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out: list[Any] = [None] * len(sequences)
    state: dict[str, Any] = {}

    def make(i: int):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            state["rows"][i] = torch.einsum("bs,bsh->bh", state["weights"], h.float())

        return hook

    with _hooks(blocks, make, pre=False), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(sequences[i][0]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            weights = torch.zeros(len(chunk), width, dtype=torch.float32)
            for b, i in enumerate(chunk):
                seq, n = sequences[i]
                ids[b, :len(seq)] = torch.tensor(list(seq))
                mask[b, :len(seq)] = 1
                if position == "last":
                    weights[b, len(seq) - 1] = 1.0
                else:
                    weights[b, len(seq) - n:len(seq)] = 1.0 / n
            state["weights"] = weights.to(device)
            state["rows"] = [None] * len(blocks)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
            stacked = torch.stack(state["rows"], dim=1).cpu().numpy().astype(np.float32)  # [B, L, H]
            for b, i in enumerate(chunk):
                out[i] = stacked[b]
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def o_proj_steps(model: Any, tokenizer: Any, layers: Sequence[int], prompts: Sequence[Sequence[int]],
                 steps: int, stop_ids: set[int], stop_strings: Sequence[str], batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> list[tuple[Any, str]]:
    """For each prompt: (float32 [alive steps, len(layers), W] of o_proj inputs, the greedy text)."""
    import numpy as np
    import torch

    from gsmkit.families import attention_output, decoder_layers

    blocks = decoder_layers(model)
    projections = [attention_output(blocks[layer]) for layer in layers]
    device = _device(model)
    cache_arg = cache_argument(model)
    out: list[Any] = [None] * len(prompts)
    state: dict[str, Any] = {}

    def make(i: int):
        def hook(_module, args):
            state["rows"][i] = args[0][:, -1, :].float()

        return hook

    with _hooks(projections, make, pre=True), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = list(range(start, min(start + batch_size, len(prompts))))
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, i in enumerate(chunk):
                ids[b, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
                mask[b, width - len(prompts[i]):] = 1
            mask, ids = mask.to(device), ids.to(device)
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            captured: list[Any] = []  # per step: [B, L, W]
            generated: list[list[int]] = [[] for _ in chunk]
            alive = [0] * len(chunk)
            ended = [False] * len(chunk)
            cache = None
            for t in range(steps):
                state["rows"] = [None] * len(projections)
                kwargs = {cache_arg: cache} if cache is not None else {}
                result = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                               logits_to_keep=1, **kwargs)
                cache = result[cache_arg] if cache_arg in result else result["past_key_values"]
                captured.append(torch.stack(state["rows"], dim=1).cpu())
                tokens = result.logits[:, -1, :].argmax(-1).tolist()
                for b, token in enumerate(tokens):
                    if ended[b]:
                        continue
                    alive[b] = t + 1
                    generated[b].append(int(token))
                    text = tokenizer.decode(generated[b], skip_special_tokens=True)
                    if int(token) in stop_ids or any(s in text for s in stop_strings):
                        ended[b] = True
                if all(ended):
                    break
                ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position[:, -1:] + 1
            steps_tensor = torch.stack(captured, dim=0).numpy().astype(np.float32)  # [T, B, L, W]
            for b, i in enumerate(chunk):
                out[i] = (np.ascontiguousarray(steps_tensor[:alive[b], b]),
                          tokenizer.decode(generated[b], skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def sample_negatives(engine: Any, requests: Sequence[Any], golds: Sequence[str | None], answer_format: str,
                     attempts: int, max_new_tokens: int, seed: int, stop: tuple[str, ...],
                     section: Any = None) -> dict[str, tuple[str, tuple[int, ...], int] | None]:
    """key -> (text, token ids, sample index) of the first wrong sample of that request, or None. Answers are
    read after the reasoning `section` (`reasoning.score`; one the prompt opened counts as open)."""
    import torch

    from gsmkit.generation import GenRequest, SamplingSettings
    from gsmkit.reasoning import opened_by_prompt, score

    settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=True, seed=seed, stop=stop,
                                **SAMPLING)
    gold = {r.key: g for r, g in zip(requests, golds, strict=True)}
    wrong: dict[str, dict[int, Any]] = {r.key: {} for r in requests}
    asked = [GenRequest(r.key, r.prompt_ids, num_samples=attempts) for r in requests]
    opened = {r.key: section is not None and opened_by_prompt(engine.tokenizer.decode(r.prompt_ids), section)
              for r in requests}
    with torch.inference_mode():
        for res in engine.generate(asked, settings):
            scored = score(res.text, gold[res.key] or "", answer_format, section, opened[res.key])
            if gold[res.key] is None or not (scored.correct_strict or scored.correct_flexible):
                wrong[res.key][res.sample_index] = res
    found: dict[str, tuple[str, tuple[int, ...], int] | None] = {}
    for key, by_index in wrong.items():
        if by_index:
            first = by_index[min(by_index)]
            found[key] = (first.text, tuple(first.token_ids), first.sample_index)
        else:
            found[key] = None
    return found
