"""What gsmkit knows about model families: the one place that reads a model's shape and attention layout.

In: a transformers config (a `PretrainedConfig`, or config.json read as a dict, whose field names differ by
family: `num_hidden_layers` / `n_layer` / `num_layers`, `hidden_size` / `n_embd`), or a loaded causal LM
(a PEFT model's base included).
Out: `read_family` -> `Family` (layers, widths, heads and each layer's `LayerAttention`: full or a sliding
window of W positions, logit soft-capping); `decoder_layers` (the blocks, in order); `lora_targets` (the
names of every linear projection of the decoder layers, `nn.Linear`, bitsandbytes 4-bit and GPT-2's
`Conv1D`, fused ones such as `qkv_proj`, `c_attn`, `gate_up_proj` included, the output head never: PEFT's
`all-linear` rule); `attention_output` (the projection after attention, whose input DAC steers);
`shared_prefix_unsupported` (why the engine's shared-prefix attention cannot serve a model, or None) and
`positional_masks` (the engine masks every layer by position: model-side masks by slot are opened while
it runs).

Where a window comes from, family by family (transformers 4.57-5.x and configs on the Hub):
- `layer_types` ("sliding_attention" / "full_attention"; Qwen2, Qwen3, Gemma-2, Gemma-3 and newer
  configs) with `sliding_window`;
- `use_sliding_window` + `max_window_layers` (Qwen2 / Qwen3 config.json written before `layer_types`:
  layers from `max_window_layers` on are windowed);
- Gemma-2 without `layer_types`: every even layer is windowed; Gemma-3: `sliding_window_pattern` (6: five
  local layers, then one global); the Gemma-3 text config inside a multimodal config (`text_config`);
- `attention_layers` / `attention_types` ("local" / "global", GPT-Neo) with `window_size`;
- `sliding_window` alone (Mistral, Mixtral, Phi-3): every layer.
A window of W lets a query at position q see keys at positions q - W + 1 .. q (transformers'
`sliding_window_overlay`, GPT-Neo's local bias): W positions, itself included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gsmkit.errors import ConfigError, ModelError

LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")
HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads")
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads")
# the projection after attention (its input is the heads' output, DAC's steering point), per family
ATTENTION_OUTPUTS = ("self_attn.o_proj", "attn.c_proj", "attn.attention.out_proj", "attention.dense",
                     "self_attention.dense", "attn.out_proj", "attn.o_proj")
# module types LoRA may target: plain and quantised linear layers, and GPT-2's Conv1D (a transposed linear)
_LINEAR_TYPES = ("Linear", "Conv1D")


@dataclass(frozen=True)
class LayerAttention:
    """One decoder layer's attention: `window` W (sees its last W positions, itself included) or None (every
    earlier position), and `softcap` (logits become softcap * tanh(logits / softcap)) or None."""

    window: int | None = None
    softcap: float | None = None

    def describe(self) -> str:
        kind = f"sliding window {self.window}" if self.window else "full"
        return kind + (f", soft-capped at {self.softcap:g}" if self.softcap else "")


@dataclass(frozen=True)
class Family:
    """A model's shape and attention layout, read from its config (`read_family`)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerAttention, ...]
    bidirectional: bool = False
    unknown_layer_types: tuple[str, ...] = ()  # layer_types gsmkit's engine cannot mask (chunked, ...)

    @property
    def windows(self) -> tuple[int, ...]:
        """The distinct window sizes of its layers, smallest first (empty: every layer sees everything)."""
        return tuple(sorted({layer.window for layer in self.layers if layer.window}))

    @property
    def softcapped(self) -> bool:
        return any(layer.softcap for layer in self.layers)

    def describe(self) -> dict[str, Any]:
        """For manifests: the layout as runs of equal layers, e.g. {"0-4": "sliding window 512", "5": "full"}
        (layers of unknown types are listed under `unknown_layer_types`)."""
        runs: dict[str, str] = {}
        start = 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] != self.layers[start]:
                runs[f"{start}-{i - 1}" if i - 1 > start else str(start)] = self.layers[start].describe()
                start = i
        described = {"model_type": self.model_type, "layers": self.num_layers, "attention": runs}
        return {**described, "unknown_layer_types": list(self.unknown_layer_types)} \
            if self.unknown_layer_types else described


def text_config(config: Any) -> Any:
    """The language model's config: a multimodal config's `text_config`, else the config itself."""
    if isinstance(config, Mapping):
        inner = config.get("text_config")
        return inner if isinstance(inner, Mapping) else config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def config_field(config: Any, names: Sequence[str], what: str) -> int:
    """The first of `names` that `config` sets, as an int; ModelError naming them all if none does."""
    for name in names:
        value = _get(config, name)
        if value is not None and not isinstance(value, bool):
            try:
                return int(value)
            except (TypeError, ValueError):
                break
    raise ModelError(f"the model's config has no usable {what} ({' / '.join(names)})",
                     hint="pass a model folder whose config.json transformers wrote")


def read_family(config: Any) -> Family:
    """The shape and per-layer attention of the model `config` describes (a PretrainedConfig or a dict)."""
    config = text_config(config)
    layers = config_field(config, LAYER_FIELDS, "number of layers")
    hidden = config_field(config, HIDDEN_FIELDS, "hidden size")
    heads = config_field(config, HEAD_FIELDS, "number of attention heads")
    kv_heads = heads
    if any(_get(config, n) is not None for n in KV_HEAD_FIELDS):
        kv_heads = config_field(config, KV_HEAD_FIELDS, "number of key/value heads")
    head_dim = _get(config, "head_dim")
    softcap = _get(config, "attn_logit_softcapping") or None
    kinds = _get(config, "layer_types") or ()
    windows = _windows(config, layers)
    return Family(
        model_type=str(_get(config, "model_type") or "unknown"),
        num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(head_dim) if head_dim else hidden // heads,
        layers=tuple(LayerAttention(w, float(softcap) if softcap else None) for w in windows),
        bidirectional=bool(_get(config, "use_bidirectional_attention")),
        unknown_layer_types=tuple(sorted(set(kinds) - {"full_attention", "sliding_attention"})),
    )


def _windows(config: Any, n: int) -> list[int | None]:
    """Each layer's window (None: full attention), from whichever fields the family uses."""
    local = _get(config, "attention_layers") or _expand_attention_types(_get(config, "attention_types"))
    if local:  # GPT-Neo
        size = config_field(config, ("window_size",), "local attention window")
        return [size if kind == "local" else None for kind in local][:n]
    window = _get(config, "sliding_window")
    window = int(window) if window else None
    kinds = _get(config, "layer_types")
    if kinds:  # other kinds (chunked attention) are Family.unknown_layer_types
        return [window if kind == "sliding_attention" else None for kind in kinds][:n]
    if window is None:
        return [None] * n
    use = _get(config, "use_sliding_window")
    model_type = _get(config, "model_type")
    if use is False:  # Qwen2 / Qwen3 with the window switched off
        return [None] * n
    if use is True and _get(config, "max_window_layers") is not None:
        first = int(_get(config, "max_window_layers"))
        return [window if i >= first else None for i in range(n)]
    if model_type == "gemma2":
        return [window if i % 2 == 0 else None for i in range(n)]
    if model_type in ("gemma3", "gemma3_text"):
        every = int(_get(config, "sliding_window_pattern") or 6)
        return [window if (i + 1) % every else None for i in range(n)]
    return [window] * n


def _expand_attention_types(types: Any) -> list[str] | None:
    """GPT-Neo's config.json form [[["global", "local"], 12]] as one kind per layer."""
    if not types:
        return None
    return [kind for kinds, repeat in types for _ in range(int(repeat)) for kind in kinds]


def model_family(model: Any) -> Family:
    """`read_family` of a loaded model (a PEFT model's base)."""
    return read_family(_base(model).config)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- modules -----------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> list[Any]:
    """The decoder blocks of a causal LM, in order: the module list holding one block per layer
    (`model.layers`, GPT-2's `transformer.h`, GPT-NeoX's `gpt_neox.layers`, ...)."""
    import torch

    base = _base(model)
    n = model_family(base).num_layers
    found = [(name, module) for name, module in base.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n and n]
    # a multimodal model may hold another list of n blocks (a vision tower): the language model's comes first
    found.sort(key=lambda item: any(part in item[0] for part in ("vision", "visual", "audio", "encoder")))
    for _, module in found:
        return list(module)
    raise ModelError(f"cannot find the {n} decoder layers of {type(base).__name__}",
                     hint="gsmkit supports causal LMs whose blocks sit in one nn.ModuleList")


def _is_linear(module: Any) -> bool:
    return any(kind in type(module).__name__ for kind in _LINEAR_TYPES)


def linear_modules(model: Any) -> list[tuple[str, Any]]:
    """(path, module) of every linear projection inside the decoder layers (LoRA wrappers' inner layers
    skipped), in model order; the output head and embeddings lie outside them."""
    names = {id(layer) for layer in decoder_layers(model)}
    found: list[tuple[str, Any]] = []
    for name, module in _base(model).named_modules():
        if id(module) in names:
            for sub, leaf in module.named_modules():
                if sub and _is_linear(leaf) and not _inside_lora(sub):
                    found.append((f"{name}.{sub}", leaf))
    return found


def is_conv1d(module: Any) -> bool:
    """A GPT-2-style `Conv1D` (its weight stored transposed, [in, out]), or the 4-bit layer that replaced one
    (bitsandbytes keeps the original class as `source_cls`)."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(module, "source_cls", None)
    return isinstance(module, Conv1D) or (isinstance(source, type) and issubclass(source, Conv1D))


def _inside_lora(path: str) -> bool:
    parts = path.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "lora_embedding_A", "lora_embedding_B") for p in parts)


def lora_targets(model: Any) -> list[str]:
    """The leaf names of every linear projection of the decoder layers (PEFT's `all-linear` rule): q/k/v/o,
    gate/up/down on Llama-like models, `qkv_proj` / `gate_up_proj` on Phi-3, `c_attn` / `c_proj` / `c_fc` on
    GPT-2, `out_proj` / `c_fc` / `c_proj` on GPT-Neo; never the output head."""
    seen: dict[str, None] = {}
    for path, _ in linear_modules(model):
        seen.setdefault(path.rsplit(".", 1)[-1])
    if not seen:
        raise ModelError(f"{type(_base(model)).__name__} has no linear projections in its decoder layers",
                         hint="LoRA needs nn.Linear or Conv1D projections")
    return list(seen)


def check_lora_targets(model: Any, wanted: Sequence[str]) -> list[str]:
    """`--target-modules` checked against the model: each name must be a linear projection of the decoder
    layers; ConfigError naming the projections that exist otherwise (the head is never one)."""
    present = lora_targets(model)
    head = _base(model).get_output_embeddings() if hasattr(_base(model), "get_output_embeddings") else None
    head_names = {name.rsplit(".", 1)[-1] for name, m in _base(model).named_modules() if m is head and name}
    for name in wanted:
        if name in head_names and name not in present:
            raise ConfigError(f"--target-modules {name} is the output head, which LoRA never targets",
                              hint=f"projections of the decoder layers: {', '.join(present)}")
    missing = [name for name in wanted if name not in present]
    if missing:
        raise ConfigError(f"--target-modules {', '.join(missing)} not found among the model's linear "
                          "projections", hint=f"present: {', '.join(present)}")
    return list(dict.fromkeys(wanted))


def attention_output(layer: Any) -> Any:
    """The projection that follows attention in a decoder block (`self_attn.o_proj`, GPT-2's `attn.c_proj`,
    GPT-Neo's `attn.attention.out_proj`, GPT-NeoX's `attention.dense`; a LoRA wrapper around it, if any)."""
    for path in ATTENTION_OUTPUTS:
        module = layer
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return module
    raise ModelError(f"decoder layer {type(layer).__name__} has no attention output projection gsmkit knows "
                     f"({', '.join(ATTENTION_OUTPUTS)})", hint="steer with CAA (the residual stream) instead")


# ---- what the engine's fast paths serve ----------------------------------------------------------------


def shared_prefix_unsupported(model: Any) -> str | None:
    """Why `model`'s attention cannot read a shared prefix once for all rows (the engine then copies the
    prefix into each row: exact, slower); None if it can. Windows and soft-capping are served."""
    base = _base(model)
    name = type(base).__name__
    family = model_family(base)
    if not getattr(base, "_supports_attention_backend", False):
        return f"{name} does not use transformers' attention interface"
    if family.bidirectional:
        return f"{name} attends bidirectionally"
    if any(hasattr(m, "sinks") for m in base.modules()):
        return f"{name} has attention sinks"
    return None


@contextlib.contextmanager
def positional_masks(model: Any) -> Iterator[None]:
    """While it runs, the model masks only by the masks the engine gives it, by position. GPT-Neo's local
    layers also mask by slot distance (a lower-triangular band buffer), which is not position distance once
    rows are padded in a shared slot axis: their band is widened to the global layers' plain causal one for
    the duration, the window coming from the engine's mask instead."""
    swapped: list[tuple[Any, Any]] = []
    for module in _base(model).modules():
        if getattr(module, "attention_type", None) == "local" and hasattr(module, "bias"):
            swapped.append((module, module.bias))
            module.bias = module.bias.new_ones(module.bias.shape).tril()
    try:
        yield
    finally:
        for module, bias in swapped:
            module.bias = bias
