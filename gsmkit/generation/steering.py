"""Activation steering at generation time: vectors added to a model's activations by forward hooks.

In: a vector folder written by `gsmkit steer vectors` (read and checked by `steer_files`), the layers, the
strength alpha and the positions to steer. Out: a `Steering` that `HFEngine` applies inside
`generate()`: hooks installed when generation starts and removed when it ends (`SteeringHooks`).

What is added where:
- CAA (Rimsky et al. 2023, arXiv 2312.06681): `alpha * v[L]` added to the output of decoder layer L (the
  residual stream), at the positions that produce generated tokens (`generated`: the last prompt position
  and every generated one) or at every position, the prompt and the shared few-shot prefix included (`all`).
- DAC (Scalena et al. 2024, arXiv 2406.17563): `alpha_t * v[L][t]` added to the input of layer L's
  attention output projection at generation step t < T (the position that predicts generated token t),
  with alpha_t set each step by `dac_alpha` (the engine probes the model with alpha = 0 and alpha = cap).

The engine tells the hooks, before each forward pass, which vector row each (row, position) takes
(`index`, -1 = untouched) and each row's alpha; `_steer_add` adds exactly `alpha * v` there and nothing
elsewhere, so alpha = 0 leaves every activation bit for bit as it was (`check_zero_steering` proves it on
the problems of a run).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from gsmkit.errors import ConfigError, SteeringCheckError
from gsmkit.families import attention_output, decoder_layers
from gsmkit.settings import STEER_POSITIONS as POSITIONS

ZERO_CHECK_PROBLEMS = 8  # problems `eval gsm8k --check-zero` compares (a search compares all its validation)


@dataclass(frozen=True)
class Steering:
    """What to add: `vectors` {layer: float32 [S, H]} (S = 1 for CAA, S = T steps for DAC), `alpha` (CAA's
    strength; DAC's cap on alpha_t), `positions` (CAA), `top_p` (DAC's token sets), `source` (the folder)."""

    method: str  # "caa" | "dac"
    hook: str  # "residual" | "o_proj_input"
    vectors: dict[int, Any] = field(repr=False)
    alpha: float = 1.0
    positions: str = "generated"
    top_p: float = 0.95
    source: str = ""

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ConfigError(f"--steer-positions must be generated or all, got '{self.positions}'")
        if self.method == "dac" and self.positions != "generated":
            raise ConfigError("DAC vectors are per generation step: --steer-positions all does not apply",
                              hint="drop --steer-positions, or use CAA vectors")
        if not self.vectors:
            raise ConfigError("no steering layer chosen", hint="pass --steer-layer with a layer in the file")
        if self.alpha < 0 and self.method == "dac":
            raise ConfigError(f"DAC's --steer-alpha caps a KL divergence: it must be >= 0, got {self.alpha}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.vectors))

    @property
    def steps(self) -> int:
        """Vector rows per layer: 1 for CAA, T for DAC."""
        return int(next(iter(self.vectors.values())).shape[0])

    def with_alpha(self, alpha: float) -> Steering:
        return dataclasses.replace(self, alpha=float(alpha))

    def with_layers(self, layers: Sequence[int]) -> Steering:
        missing = [layer for layer in layers if layer not in self.vectors]
        if missing:
            raise ConfigError(f"layer {missing[0]} is not in {self.source or 'the vectors'}",
                              hint=f"layers there: {','.join(map(str, self.layers))}")
        return dataclasses.replace(self, vectors={layer: self.vectors[layer] for layer in layers})

    def describe(self) -> dict[str, Any]:
        """For manifests and summaries."""
        return {"method": self.method, "hook": self.hook, "layers": list(self.layers), "alpha": self.alpha,
                "positions": self.positions, "steps": self.steps, "source": self.source,
                **({"top_p": self.top_p} if self.method == "dac" else {})}


def load_steering(folder: str | Path, layers: str | None, alpha: float, positions: str, spec: Any,
                  top_p: float = 0.95) -> Steering:
    """The steering a run asked for, checked against the model it will steer; no model loads."""
    from gsmkit.generation.steer_files import check_steer_for, parse_layers, read_steer

    meta, vectors = read_steer(folder)
    check_steer_for(meta, folder, spec)
    chosen = parse_layers(layers, meta.layers, "--steer-layer")
    return Steering(meta.method, meta.hook, {layer: vectors[layer] for layer in chosen}, alpha, positions,
                    top_p, str(folder))


def steering_for(settings: Any) -> Steering | None:
    """The steering a command's `SteerOptions` ask for (None without --steer), checked before any model
    loads: the vectors fit the model, the layers exist, the backend can be hooked."""
    if settings.steer is None:
        return None
    if getattr(settings, "backend", "hf") != "hf":
        raise ConfigError("--steer needs --backend hf",
                          hint="vLLM runs its own kernels, where gsmkit cannot add the vectors")
    return load_steering(settings.steer, settings.steer_layer, settings.steer_alpha, settings.steer_positions,
                         settings.model)


def steer_fingerprint(settings: Any) -> dict[str, Any]:
    """What a resumed steered run must also match: the vectors' bytes (a folder can be rewritten)."""
    if settings.steer is None:
        return {}
    from gsmkit.generation.steer_files import VECTORS_FILE
    from gsmkit.manifest import sha256_file

    return {"steer_vectors_sha256": sha256_file(Path(settings.steer) / VECTORS_FILE)}


# -- where the hooks go ------------------------------------------------------------------------------


def _steer_add(h: Any, vectors: Any, index: Any, alpha: Any) -> Any:
    """h [B, Q, H] plus alpha[b] * vectors[index[b, q]] where index >= 0; exactly h elsewhere, and at 0."""
    rows = vectors[index.clamp(min=0)]  # [B, Q, H]
    scale = alpha.to(rows.dtype)[:, None, None] * (index >= 0).to(rows.dtype)[..., None]
    return h + (scale * rows).to(h.dtype)


class SteeringHooks:
    """Hooks that add a `Steering`'s vectors while installed (`with SteeringHooks(model, s) as hooks:`).

    Before each forward pass the engine calls `hooks.set(index, alpha)`: `index` long [B, Q] (the vector
    row of each position, -1 = untouched) and `alpha` float [B]. A forward pass with no `set` since the
    last one adds nothing (the hooks are cleared after each pass)."""

    def __init__(self, model: Any, steering: Steering):
        self.model = model
        self.steering = steering
        self.index = None
        self.alpha = None
        self._handles: list[Any] = []
        param = next(model.parameters())
        device = param.device
        dtype = param.dtype if param.dtype.is_floating_point else None
        self._vectors = {layer: v.to(device=device, dtype=dtype or v.dtype) for layer, v in
                         steering.vectors.items()}
        self.device = device

    def set(self, index: Any, alpha: Any) -> None:
        self.index, self.alpha = index, alpha

    def clear(self) -> None:
        self.index = self.alpha = None

    def __enter__(self) -> Self:
        blocks = decoder_layers(self.model)
        for layer, v in self._vectors.items():
            if not 0 <= layer < len(blocks):
                raise ConfigError(f"--steer-layer {layer} is out of range: the model has {len(blocks)} "
                                  "layers")
            if self.steering.hook == "residual":
                self._handles.append(blocks[layer].register_forward_hook(self._output_hook(v)))
            else:
                self._handles.append(attention_output(blocks[layer]).register_forward_pre_hook(
                    self._input_hook(v)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def _output_hook(self, v: Any):
        def hook(_module, _args, output):
            if self.index is None:
                return None
            if isinstance(output, tuple):
                return (_steer_add(output[0], v, self.index, self.alpha), *output[1:])
            return _steer_add(output, v, self.index, self.alpha)

        return hook

    def _input_hook(self, v: Any):
        def hook(_module, args):
            if self.index is None:
                return None
            return (_steer_add(args[0], v, self.index, self.alpha), *args[1:])

        return hook


@contextlib.contextmanager
def installed(model: Any, steering: Steering | None) -> Iterator[SteeringHooks | None]:
    """`SteeringHooks` on `model` for the block's duration, or None when there is nothing to steer."""
    if steering is None:
        yield None
        return
    with SteeringHooks(model, steering) as hooks:
        yield hooks


# -- which positions take which vector row (the engine's side) ---------------------------------------------


def prefix_index(steering: Steering, length: int, device: Any) -> Any | None:
    """index [1, P] for the shared few-shot prefix: steered only by CAA at `all` positions."""
    import torch

    if steering.method == "caa" and steering.positions == "all":
        return torch.zeros(1, length, dtype=torch.long, device=device)
    return None


def prefill_index(steering: Steering, real: Any) -> Any:
    """index [n, S] for right-aligned prompt suffixes (`real` bool [n, S]): CAA `all` steers every real
    token; otherwise only the last column, the position that predicts generated token 0 (DAC's step 0)."""
    import torch

    index = torch.full(real.shape, -1, dtype=torch.long, device=real.device)
    if steering.method == "caa" and steering.positions == "all":
        index[real] = 0
    else:
        index[:, -1] = 0
    return index


def decode_index(steering: Steering, generated: Sequence[int], device: Any) -> Any:
    """index [B, 1] for a decode step whose rows have generated `generated[b]` tokens so far: CAA steers
    every row; DAC row b takes step `generated[b]`'s vector while there is one."""
    import torch

    if steering.method == "caa":
        return torch.zeros(len(generated), 1, dtype=torch.long, device=device)
    steps = steering.steps
    return torch.tensor([[t if t < steps else -1] for t in generated], dtype=torch.long, device=device)


def steered_forward(forward: Any, hooks: SteeringHooks | None, index: Any | None, cache: Any,
                    *args: Any) -> tuple[Any, Any]:
    """`forward(*args, cache)` with the hooks told where to add (`index`, None = nowhere).

    CAA adds `alpha * v`. DAC first probes the same step with alpha = 0 and alpha = cap, rolling the KV
    cache back after each probe, sets each row's alpha_t with `dac_alpha`, then runs the step for real:
    three forward passes per steered step, and a cache that holds only the real pass."""
    import torch

    from gsmkit.generation.slot_cache import mark, rollback

    if hooks is None or index is None or not bool((index >= 0).any()):
        return forward(*args, cache)
    s = hooks.steering
    B = index.shape[0]
    try:
        if s.method == "caa":
            hooks.set(index, torch.full((B,), s.alpha, device=index.device))
            return forward(*args, cache)
        state = mark(cache)
        hooks.set(index, torch.zeros(B, device=index.device))
        unsteered, _ = forward(*args, cache)
        rollback(cache, state)
        hooks.set(index, torch.full((B,), s.alpha, device=index.device))
        steered, _ = forward(*args, cache)
        rollback(cache, state)
        alpha = dac_alpha(unsteered, steered, s.top_p, s.alpha)
        hooks.set(index, torch.where((index >= 0).any(dim=1), alpha.to(index.device), 0.0))
        return forward(*args, cache)
    finally:
        hooks.clear()


# -- DAC's strength per step ----------------------------------------------------------------------------


def top_p_mask(probs: Any, top_p: float) -> Any:
    """bool [B, V]: the smallest set of likeliest tokens whose mass reaches top_p (the first always in)."""
    import torch

    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)


def dac_alpha(logits_unsteered: Any, logits_steered: Any, top_p: float, cap: float) -> Any:
    """alpha_t [B] = clip(KL(p_unsteered || p_steered), 0, cap), both distributions restricted to the union
    of their top-p token sets and renormalised there (DAC's rule)."""
    import torch

    p0 = torch.softmax(logits_unsteered.float(), dim=-1)
    p1 = torch.softmax(logits_steered.float(), dim=-1)
    union = top_p_mask(p0, top_p) | top_p_mask(p1, top_p)
    q0 = torch.where(union, p0, 0.0)
    q1 = torch.where(union, p1, 0.0)
    q0 = q0 / q0.sum(-1, keepdim=True)
    q1 = q1 / q1.sum(-1, keepdim=True).clamp_min(1e-30)
    kl = torch.where(q0 > 0, q0 * (q0.clamp_min(1e-30).log() - q1.clamp_min(1e-30).log()), 0.0).sum(-1)
    return kl.clamp(0.0, cap)


# -- the zero check --------------------------------------------------------------------------------------


def check_zero_steering(engine: Any, steering: Steering, requests: Sequence[Any], sampling: Any) -> int:
    """Greedy outputs with the hooks installed at alpha = 0 must equal the unsteered ones token for token
    on `requests`; otherwise `SteeringCheckError` names the first request that differs. Returns how many
    requests were compared. The engine's own steering is restored afterwards."""
    greedy = dataclasses.replace(sampling, do_sample=False)
    before = engine.steering
    try:
        engine.steering = None
        plain = {r.key: r.token_ids for r in engine.generate(requests, greedy)}
        engine.steering = steering.with_alpha(0.0)
        zero = {r.key: r.token_ids for r in engine.generate(requests, greedy)}
    finally:
        engine.steering = before
    for req in requests:
        a, b = plain[req.key], zero[req.key]
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            raise SteeringCheckError(
                f"zero-steering check failed on problem {req.key}: with the hooks at alpha = 0 the output "
                f"differs from the unsteered one at generated token {at}",
                hint="the hooks change activations they must leave alone at alpha = 0, so steered results "
                     "would not be comparable with unsteered ones: please report it with the model's name")
    return len(requests)
