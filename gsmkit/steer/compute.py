"""The activation cache entries `steer vectors` has to compute: the model loads here, and only here.

In: the run's `VectorSettings`, layers, exemplars and the problems whose entries the cache lacks. Out:
(entry name, `activation_cache.Entry`) for each, yielded chunk by chunk (so the caller writes them as they
come). CAA entries hold `pos` and `neg` [layers, H] (the completions' h) and metadata (the resolved style
and dtype, token counts, the negative's source and, when sampled, its text); DAC entries hold `kshot` and
`zeroshot` [alive steps, layers, W] and the greedy texts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gsmkit.errors import DataError


def _load(settings: Any, mode: str) -> tuple[Any, Any, Any]:
    """(loaded model, tokenizer, engine or None): the HF engine only when negatives are sampled."""
    if mode == "sampled":
        from gsmkit.generation import build_engine

        loaded, tok, engine = build_engine(settings.model, "hf", settings.batch_size, True, settings.seed)
        return loaded, tok, engine
    from gsmkit.modeling import load_model

    loaded = load_model(settings.model)
    return loaded, loaded.tokenizer, None


def compute_entries(settings: Any, mode: str, layers: Sequence[int], exemplars: Sequence[Any],
                    missing: Sequence[Any], on_start: Callable[[int, int], None] | None = None,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """Load the model and compute the entries of `missing` (`vectors._Item`s: id, question, pair, name), a
    chunk at a time; `mode` is CAA's negatives mode ("" for DAC)."""
    from gsmkit.prompts import encode_prompt, resolve_style
    from gsmkit.steer.activation_cache import Entry

    loaded, tok, engine = _load(settings, mode)
    style = resolve_style(settings.style, tok, settings.thinking)
    if on_start is not None:
        on_start(len(missing), 0)  # the bar starts once the model has loaded
    meta = {"style": style, "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device)}

    def prompt(question: str, shots: Sequence[Any]) -> tuple[int, ...]:
        return tuple(encode_prompt(style, question, shots, tok, settings.system_prompt, settings.thinking)[1])

    per_chunk = max(1, settings.batch_size // 2)  # two sequences per problem
    for start in range(0, len(missing), per_chunk):
        chunk = missing[start:start + per_chunk]
        if settings.method == "caa":
            done = _caa_chunk(settings, loaded.model, tok, engine, style, layers, chunk,
                              [prompt(i.question, exemplars) for i in chunk])
        else:
            done = _dac_chunk(settings, loaded.model, tok, style, layers, chunk,
                              [prompt(i.question, exemplars) for i in chunk],
                              [prompt(i.question, ()) for i in chunk])
        for item, (arrays, extra) in zip(chunk, done, strict=True):
            yield item.name, Entry(arrays, {**meta, "id": item.id, **{k: str(v) for k, v in extra.items()}})
        if on_progress is not None:
            on_progress(len(chunk))


def _completion_ids(tok: Any, style: str, solution: str, where: str) -> tuple[int, ...]:
    """A solution as the completion that follows the prompt (rendered as training renders its target)."""
    from gsmkit.prompts import render_target

    ids = tuple(tok(render_target(style, solution), add_special_tokens=False).input_ids)
    if not ids:
        raise DataError(f"{where}: the completion renders to no token", hint="check the pair's texts")
    return ids


def _caa_chunk(settings: Any, model: Any, tok: Any, engine: Any, style: str, layers: Sequence[int],
               chunk: Sequence[Any], prompts: list[tuple[int, ...]]) -> list[tuple[dict, dict]]:
    from gsmkit.prompts import answer_format, stop_strings
    from gsmkit.reasoning import section_for
    from gsmkit.steer.activations import residual_means, sample_negatives
    from gsmkit.steer.pairs import corrupt_solution

    negatives: list[tuple[tuple[int, ...], str, str]] = []  # (token ids, source, sampled text)
    sampled: dict[str, Any] = {}
    if engine is not None:
        from gsmkit.generation import GenRequest

        requests = [GenRequest(str(n), ids) for n, ids in enumerate(prompts)]
        sampled = sample_negatives(engine, requests, [i.pair.gold for i in chunk], answer_format(style),
                                   settings.attempts, settings.max_new_tokens, settings.seed,
                                   stop_strings(style), section_for(style, tok))
    for n, item in enumerate(chunk):
        pair = item.pair
        if pair.negative is not None:
            negatives.append((_completion_ids(tok, style, pair.negative, item.id), pair.negatives, ""))
            continue
        found = sampled.get(str(n))
        if found is not None and found[1]:
            negatives.append((found[1], "sampled", found[0]))
        else:  # the model never erred (or said nothing): the corrupted solution stands in, and is counted
            text = corrupt_solution(pair.positive, settings.seed, pair.id)
            negatives.append((_completion_ids(tok, style, text, item.id), "corrupted", text))
    positives = [_completion_ids(tok, style, i.pair.positive, i.id) for i in chunk]
    sequences = []
    for ids, pos, (neg, _, _) in zip(prompts, positives, negatives, strict=True):
        sequences += [(ids + pos, len(pos)), (ids + neg, len(neg))]
    means = residual_means(model, layers, sequences, settings.position, settings.batch_size)
    done = []
    for n, (ids, pos, (neg, source, text)) in enumerate(zip(prompts, positives, negatives, strict=True)):
        extra = {"pos_tokens": len(pos), "neg_tokens": len(neg), "negative_source": source,
                 "prompt_tokens": len(ids), "prompt_ids_sha256": _ids_digest(ids)}
        if text:
            extra["negative"] = text
        done.append(({"pos": means[2 * n], "neg": means[2 * n + 1]}, extra))
    return done


def _dac_chunk(settings: Any, model: Any, tok: Any, style: str, layers: Sequence[int], chunk: Sequence[Any],
               kshot: list[tuple[int, ...]], zero: list[tuple[int, ...]]) -> list[tuple[dict, dict]]:
    from gsmkit.modeling import eos_token_ids
    from gsmkit.prompts import stop_strings
    from gsmkit.steer.activations import o_proj_steps

    prompts = [p for pair in zip(kshot, zero, strict=True) for p in pair]
    runs = o_proj_steps(model, tok, layers, prompts, settings.steps, eos_token_ids(tok, model),
                        stop_strings(style), settings.batch_size)
    done = []
    for n in range(len(chunk)):
        (k_steps, k_text), (z_steps, z_text) = runs[2 * n], runs[2 * n + 1]
        done.append(({"kshot": k_steps, "zeroshot": z_steps},
                     {"kshot_text": k_text, "zeroshot_text": z_text, "kshot_prompt_tokens": len(kshot[n]),
                      "zeroshot_prompt_tokens": len(zero[n])}))
    return done


def _ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
