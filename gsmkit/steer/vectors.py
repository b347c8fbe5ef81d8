"""`gsmkit steer vectors`: steering vectors from GSM8K, by contrast pairs (CAA) or few-shot prompts (DAC).

In: `VectorSettings` (model + adapter, GSM8K problems or a `--pairs-from` file, pool and k, prompt style,
method, layers, the method's options, the activation cache). Out: `<out>/vectors.safetensors`,
`<out>/steer.json` (`gsmkit.generation.steer_files.SteerMeta`) and `<out>/manifest.json`, built in a
hidden staging folder and renamed into place; returns `VectorsResult`.

- CAA (Rimsky et al. 2023, arXiv 2312.06681): per layer L, the mean over pairs of h_L(positive) -
  h_L(negative), h_L being decoder layer L's output averaged over the completion's tokens (or at its last
  token, `--position last`). The prompt is rendered as `eval gsm8k` renders it (`prompts.encode_prompt`,
  the pool's first k exemplars, pool problems left out); a completion is a solution rendered as training
  renders its target (`prompts.render_target`). Pairs: `gsmkit.steer.pairs`.
- DAC (Scalena et al. 2024, arXiv 2406.17563): per layer L and generation step t < T, the mean over
  problems alive at step t in both runs of a_L(k-shot prompt)[t] - a_L(zero-shot prompt)[t], a_L being
  the input of layer L's attention output projection at the position that predicts generated token t,
  each prompt decoded greedily on its own (`gsmkit.steer.activations`). Steps where no problem is alive
  get a zero vector; `details.alive` says how many problems each step averaged.

Order: the output folder, layers (`model_shape`), data, pool and pairs are checked before anything
loads. Activations come from the cache (`gsmkit.steer.activation_cache`) where it has them; only when an
entry is missing is the model loaded, and the entries it computes are written as each chunk finishes
(an interrupted run keeps them). Vectors are always averaged from the entries (float32, in problem
order), so a run that reads every entry writes the same vectors, bit for bit, as the run that made them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError
from gsmkit.fields import check_fields, setting
from gsmkit.generation.steer_files import METHODS, SteerMeta
from gsmkit.modeling import ModelSpec
from gsmkit.settings import DecodeOptions, ProblemOptions, PromptOptions, RunOptions, override, resolved_model
from gsmkit.steer.pairs import NEGATIVES

CAA_POSITIONS = ("mean", "last")
OnStart = Callable[[int, int], None] | None
OnProgress = Callable[[int], None] | None


@dataclass(frozen=True)
class VectorSettings(ProblemOptions, PromptOptions, RunOptions):
    model: ModelSpec
    out: Path = setting(Path("runs/steer-vectors"), "Output folder (vectors.safetensors, steer.json, "
                        "manifest.json).", short="-o", path={"file_okay": False, "dir_okay": True})
    method: str = setting("caa", "caa (contrast pairs: gold against wrong solutions) | dac (k-shot against "
                          "zero-shot prompts, one vector per generation step).", choices=METHODS)
    layers: str = setting("all", "Decoder layers to make vectors for (0-based): all, L, L,L or L-L.")
    split: str = override(ProblemOptions, "split", "train")
    limit: int | None = setting(None, "Use at most this many problems (or pairs).", min=1, show_default=False)
    negatives: str | None = setting(
        None, "CAA's negatives: corrupted (the solution with its arithmetic results and final answer "
        "changed, seeded) | sampled (a wrong completion sampled from the model).",
        choices=NEGATIVES, show_default="corrupted")
    pairs_from: Path | None = setting(
        None, "CAA pairs from a file instead of --data: a `gsmkit generate-traces` file (its correct traces "
        "are the positives) or JSONL of {prompt, positive, negative} (prompt: the question).",
        show_default=False, path={"exists": True, "dir_okay": False})
    position: str | None = setting(None, "CAA: average h over the completion's tokens (mean) or take its "
                                   "last token (last).", choices=CAA_POSITIONS, show_default="mean")
    steps: int = setting(30, "DAC: generation steps with a vector (T).", min=1)
    attempts: int = setting(4, "Sampled negatives: samples per problem before the corrupted solution is "
                            "used instead.", min=1)
    seed: int = override(DecodeOptions, "seed", help="Seed of the corrupted and sampled negatives.")
    batch_size: int = override(DecodeOptions, "batch_size", 8, help="Sequences per forward pass.")
    max_new_tokens: int = override(DecodeOptions, "max_new_tokens", help="Sampled negatives: token budget.")
    cache_dir: Path | None = setting(None, "Activation cache folder.",
                                     show_default="$XDG_CACHE_HOME/gsmkit/steer, else ~/.cache/gsmkit/steer",
                                     path={"file_okay": False, "dir_okay": True})
    no_cache: bool = setting(False, "Neither read nor write the activation cache.")

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_pool()
        self.check_thinking()
        if self.method == "dac":
            if self.k < 1:
                raise ConfigError("--method dac compares k-shot with zero-shot prompts: it needs --k >= 1",
                                  hint="pass --pool pool.jsonl (from `gsmkit fewshot`) and --k 3")
            caa_only = (("--pairs-from", self.pairs_from), ("--negatives", self.negatives),
                        ("--position", self.position))
            given = [flag for flag, value in caa_only if value is not None]
            if given:
                raise ConfigError(f"{given[0]} is for --method caa", hint=f"drop {given[0]}")

    def resolved(self) -> VectorSettings:
        """CAA's position rule filled in (`mean` unless --position says otherwise), as the run, its cache key
        and its manifest hold it, and the model's adapter checked (`settings.resolved_model`). Idempotent."""
        position = {"position": self.position or "mean"} if self.method == "caa" else {}
        return replace(self, **position, **resolved_model(self))

    @property
    def position_rule(self) -> str:
        """Where a vector applies, as steer.json and the cache key record it: DAC's is `step` (one vector per
        generation step); CAA's is --position (`mean` once resolved)."""
        return "step" if self.method == "dac" else self.position or "mean"


@dataclass
class VectorsResult:
    """What a run wrote (`meta`: the steer.json), where, how long it took, and whether the model loaded."""

    meta: SteerMeta
    out: Path
    wall_s: float
    model_loaded: bool

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {"out": str(self.out), "method": m.method, "layers": m.layers, "pairs": m.pairs, "k": m.k,
                "style": m.style, "negatives": m.negatives, "position": m.position, "steps": m.steps,
                "cache": m.cache, "model_loaded": self.model_loaded, "wall_s": self.wall_s, "norms": m.norms,
                "details": m.details}


@dataclass(frozen=True)
class _Item:
    """One problem of the run: its pair (CAA) or question (DAC), and its cache entry's name."""

    id: str
    question: str
    pair: Any  # pairs.ContrastPair (CAA) or None
    name: str


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def _inputs(settings: VectorSettings) -> tuple[list[Any], list[Any], int, str, int]:
    """(pairs or problems, exemplars, pool problems left out, negatives mode, rows skipped), all checked."""
    from gsmkit.data.fewshot import pool_exemplars, pool_hashes, problems_for_run, read_pool
    from gsmkit.data.gsm8k import select_problems
    from gsmkit.steer.pairs import drop_pool_questions, pairs_from_problems, read_pairs_file

    if settings.pairs_from is None:
        problems, exemplars, excluded = problems_for_run(settings.data, settings.split, settings.offset,
                                                         settings.limit, settings.pool, settings.k)
        if settings.method == "dac":
            return problems, exemplars, excluded, "", 0
        mode = settings.negatives or "corrupted"
        return pairs_from_problems(problems, mode, settings.seed), exemplars, excluded, mode, 0
    found = read_pairs_file(settings.pairs_from, settings.negatives, settings.seed)
    pairs = select_problems(found.pairs, settings.offset, settings.limit)
    exemplars, excluded = [], 0
    if settings.k > 0:
        pool = read_pool(settings.pool)
        exemplars = pool_exemplars(pool, settings.k, str(settings.pool))
        pairs, excluded = drop_pool_questions(pairs, pool_hashes(pool[: settings.k]))
    mode = "file" if found.kind == "pairs" else settings.negatives or "corrupted"
    return pairs, exemplars, excluded, mode, found.skipped


def _cache_key(settings: VectorSettings, fingerprints: dict[str, Any], layers: tuple[int, ...],
               exemplars: list[Any], mode: str) -> dict[str, Any]:
    from gsmkit.prompts import PROMPT_VERSION
    from gsmkit.steer.activations import SAMPLING
    from gsmkit.steer.pairs import CORRUPTION_VERSION

    spec = settings.model
    key: dict[str, Any] = {
        "method": settings.method, **fingerprints, "layers": list(layers), "style": settings.style,
        "system_prompt": settings.system_prompt, "prompt_version": PROMPT_VERSION, "k": settings.k,
        "exemplars": _digest([[ex.question, ex.answer] for ex in exemplars]),
        "position": settings.position_rule,
        "dtype": spec.dtype, "device": spec.device, "load_in_4bit": spec.load_in_4bit,
    }
    if settings.thinking != "auto":  # (absent for auto: the keys of caches made before --thinking stay valid)
        key["thinking"] = settings.thinking
    if settings.method == "dac":
        key["steps"] = settings.steps
    else:
        key["negatives"] = mode
        if mode in NEGATIVES:
            key.update(seed=settings.seed, corruption_version=CORRUPTION_VERSION)
        if mode == "sampled":
            key["sampling"] = {"attempts": settings.attempts, "max_new_tokens": settings.max_new_tokens,
                               **SAMPLING}
    return key


def make_vectors(settings: VectorSettings, on_start: OnStart = None, on_progress: OnProgress = None
                 ) -> VectorsResult:
    """Compute (or read from the cache) the activations, average them, write the vector folder."""
    t_wall = time.perf_counter()
    from gsmkit.evaluation.run import check_thinking_early
    from gsmkit.generation.steer_files import (
        adapter_sha256,
        model_fingerprint,
        model_shape,
        parse_layers,
        tokenizer_fingerprint,
    )
    from gsmkit.run_folder import check_new_folder, check_output
    from gsmkit.steer.activation_cache import ActivationCache, default_cache_dir

    settings = settings.resolved()
    spec = settings.model
    out = settings.out.expanduser()
    check_new_folder(out, settings.overwrite, protected=(settings.pool, settings.pairs_from, spec.model,
                                                         spec.adapter, settings.data))
    if not settings.no_cache:  # entries are written as they are computed: a cache it cannot write fails now
        check_output(settings.cache_dir or default_cache_dir(), folder=True, option="--cache-dir",
                     inputs=(spec.model, spec.adapter))
    shape = model_shape(spec.model)
    layers = parse_layers(settings.layers, range(shape.num_layers))
    rows, exemplars, excluded, mode, skipped = _inputs(settings)
    check_thinking_early(spec, settings.style, settings.thinking)  # even when every entry is cached
    if not rows:
        raise DataError("no problem is left to make vectors from (all are few-shot exemplars, or --offset is "
                        "past the end)", hint="lower --offset, or raise --limit")
    fingerprints = {"model_fingerprint": model_fingerprint(spec.model),
                    "tokenizer_fingerprint": tokenizer_fingerprint(spec.model),
                    "adapter_sha256": adapter_sha256(spec.adapter)}
    key = _cache_key(settings, fingerprints, layers, exemplars, mode)
    cache = ActivationCache(settings.cache_dir or default_cache_dir(), key, not settings.no_cache)
    if settings.method == "caa":
        items = [_Item(p.id, p.question, p, cache.entry_name(p.id, p.text_hash())) for p in rows]
    else:
        items = [_Item(p.id, p.question, None, cache.entry_name(p.id, _digest(p.question))) for p in rows]
    width = shape.vector_size(settings.method)
    entries = {}
    for item in items:
        entry = cache.get(item.name, lambda e: _fits(e, settings.method, len(layers), width))
        if entry is not None:
            entries[item.name] = entry
    missing = list({i.name: i for i in items if i.name not in entries}.values())
    if missing:
        from gsmkit.steer.compute import compute_entries

        for name, entry in compute_entries(settings, mode, layers, exemplars, missing, on_start, on_progress):
            cache.put(name, entry)
            entries[name] = entry
    ordered = [entries[i.name] for i in items]
    vectors, norms, details = (_average_caa(ordered, layers, mode) if settings.method == "caa"
                               else _average_dac(ordered, layers, settings.steps))
    first = ordered[0].metadata
    details = {**details, "excluded_pool_problems": excluded, "dtype": first.get("dtype"),
               **({"skipped_rows": skipped} if settings.pairs_from is not None else {})}
    meta = _meta(settings, shape, layers, fingerprints, first.get("style", settings.style), items, norms,
                 mode, cache.describe(), details)
    _publish(settings, out, meta, vectors)
    return VectorsResult(meta, out, round(time.perf_counter() - t_wall, 3), bool(missing))


def _fits(entry: Any, method: str, n_layers: int, width: int) -> bool:
    names = ("pos", "neg") if method == "caa" else ("kshot", "zeroshot")
    arrays = entry.arrays
    if not all(n in arrays for n in names):
        return False
    if method == "caa":
        return all(arrays[n].shape == (n_layers, width) for n in names)
    return all(arrays[n].ndim == 3 and arrays[n].shape[1:] == (n_layers, width) and arrays[n].shape[0] >= 1
               for n in names)


def _average_caa(entries: list[Any], layers: tuple[int, ...], mode: str
                 ) -> tuple[dict[int, Any], dict[str, Any], dict[str, Any]]:
    import numpy as np

    diffs = np.stack([e.arrays["pos"].astype(np.float64) - e.arrays["neg"].astype(np.float64)
                      for e in entries])
    mean = diffs.mean(axis=0).astype(np.float32)
    vectors = {layer: mean[i] for i, layer in enumerate(layers)}
    norms = {str(layer): float(np.linalg.norm(v)) for layer, v in vectors.items()}
    tokens = {side: round(sum(int(e.metadata.get(f"{side}_tokens", 0)) for e in entries) / len(entries), 2)
              for side in ("pos", "neg")}
    details: dict[str, Any] = {"completion_tokens": {"positive": tokens["pos"], "negative": tokens["neg"]}}
    if mode == "sampled":
        details["sampled_fallbacks"] = sum(e.metadata.get("negative_source") == "corrupted" for e in entries)
    return vectors, norms, details


def _average_dac(entries: list[Any], layers: tuple[int, ...], steps: int
                 ) -> tuple[dict[int, Any], dict[str, Any], dict[str, Any]]:
    import numpy as np

    n_layers, width = entries[0].arrays["kshot"].shape[1:]
    total = np.zeros((steps, n_layers, width), dtype=np.float64)
    alive = np.zeros(steps, dtype=np.int64)
    for e in entries:
        kshot, zero = e.arrays["kshot"], e.arrays["zeroshot"]
        n = min(len(kshot), len(zero), steps)
        total[:n] += kshot[:n].astype(np.float64) - zero[:n].astype(np.float64)
        alive[:n] += 1
    mean = (total / np.maximum(alive, 1)[:, None, None]).astype(np.float32)
    vectors = {layer: np.ascontiguousarray(mean[:, i, :]) for i, layer in enumerate(layers)}
    norms = {str(layer): [float(np.linalg.norm(row)) for row in v] for layer, v in vectors.items()}
    generated = {side: round(sum(len(e.arrays[side]) for e in entries) / len(entries), 2)
                 for side in ("kshot", "zeroshot")}
    return vectors, norms, {"alive": alive.tolist(), "steps_generated": generated}


def _meta(settings: VectorSettings, shape: Any, layers: tuple[int, ...], fingerprints: dict[str, Any],
          style: str, items: list[_Item], norms: dict[str, Any], mode: str, cache: dict[str, Any],
          details: dict[str, Any]) -> SteerMeta:
    from gsmkit.generation.steer_files import FORMAT, HOOKS, VERSION
    from gsmkit.prompts import PROMPT_VERSION
    from gsmkit.records import content_hash

    dac = settings.method == "dac"
    return SteerMeta(
        format=FORMAT, version=VERSION, method=settings.method, hook=HOOKS[settings.method],
        layers=list(layers), num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        vector_size=shape.vector_size(settings.method), steps=settings.steps if dac else None,
        position=settings.position_rule, norms=norms, model=settings.model.model,
        model_fingerprint=fingerprints["model_fingerprint"], adapter=settings.model.adapter,
        adapter_sha256=fingerprints["adapter_sha256"],
        tokenizer_fingerprint=fingerprints["tokenizer_fingerprint"], style=style,
        prompt_version=PROMPT_VERSION, k=settings.k, ids=[i.id for i in items],
        sha256=[content_hash(i.question) for i in items], pairs=len(items),
        negatives=None if dac else mode,
        data=str(settings.pairs_from) if settings.pairs_from is not None else settings.data,
        split=None if settings.pairs_from is not None else settings.split, cache=cache, details=details)


def _publish(settings: VectorSettings, out: Path, meta: SteerMeta, vectors: dict[int, Any]) -> None:
    from gsmkit.data.gsm8k import source_file
    from gsmkit.generation.steer_files import write_steer
    from gsmkit.jsonl import write_json
    from gsmkit.manifest import build_manifest
    from gsmkit.run_folder import MANIFEST, publish_folder, staging_folder

    data = settings.pairs_from or source_file(settings.data, settings.split)
    manifest = build_manifest(
        "steer vectors", settings,
        inputs={"data": data, "pool": settings.pool, "adapter": settings.model.adapter},
        seeds={"seed": settings.seed},
        extra={"resolved": {"style": meta.style, "layers": meta.layers, "position": meta.position,
                            "negatives": meta.negatives, "vector_size": meta.vector_size, "cache": meta.cache,
                            "dtype": meta.details.get("dtype")}})
    with staging_folder(out) as tmp:
        write_steer(tmp, meta, vectors)
        write_json(tmp / MANIFEST, manifest)
        publish_folder(tmp, out)
