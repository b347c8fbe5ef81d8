"""Each decoder layer's own attention mask in the engine's slot axis: windows honoured by position.

In: the model's `families.Family` (each layer's window), and per forward pass the engine's boolean mask
[B, Q, T] (True = may attend), the queries' positions [B, Q] and the position of the first slot of the
rows' own tokens (the shared prefix's length when rows read it from one copy, else 0).
Out: `LayerMasks`, which while installed (`with masks.installed(model):`) hands every decoder layer the
mask of its layout for the pass: the engine's mask for full-attention layers, that mask cut to the last W
positions for a layer of window W.

Why: the engine gives the model a 4-D mask it builds itself, and transformers applies such a mask as given,
for every layer, so no window would ever apply (Mistral, Gemma-2/3, Qwen2/3 with sliding layers, GPT-Neo's
local layers would silently attend to everything). Masks are per layer type, so they are built once per
pass and window and swapped in by a forward pre-hook on each decoder layer (the `attention_mask` argument,
by keyword or position). Rows share a slot axis with padding, so a slot's distance is not a position's:
the window is applied by position (each real slot's position is counted along the row), and model-side
masks by slot distance (GPT-Neo's band buffer) are opened while the hooks are on
(`families.positional_masks`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.families import Family, decoder_layers, positional_masks


class LayerMasks:
    """Per-layer masks for models with windowed layers; `active` is False (and nothing is hooked) for
    models whose every layer sees every earlier position."""

    def __init__(self, family: Family):
        if unknown := ", ".join(family.unknown_layer_types):
            raise ConfigError(f"this {family.model_type} model has {unknown} layers, which gsmkit's engine "
                              "cannot mask", hint="use --backend vllm")
        self.windows = [layer.window for layer in family.layers]
        self.active = bool(family.windows)
        self._masks: list[Any] | None = None

    def set(self, mask_bool: Any, full: Any, position_ids: Any, first_position: int,
            additive: Callable[[Any], Any]) -> None:
        """The masks of the next forward pass: `mask_bool` [B, Q, T] (the last query of a row sees all its
        real slots), `full` its additive form [B, 1, Q, T] (what full-attention layers get), `position_ids`
        [B, Q], `additive` turns a boolean mask into the model's additive one."""
        import torch

        if not self.active:
            return
        Q, T = mask_bool.shape[1], mask_bool.shape[2]
        real = mask_bool[:, -1, :]
        slot_position = first_position + real.long().cumsum(-1) - 1  # [B, T], right for real slots
        own = torch.zeros(Q, T, dtype=torch.bool, device=mask_bool.device)
        own[:, T - Q:] = torch.eye(Q, dtype=torch.bool, device=mask_bool.device)  # padding sees itself
        by_window: dict[int | None, Any] = {None: full}
        for window in sorted({w for w in self.windows if w}):
            near = slot_position[:, None, :] > position_ids[:, :, None] - window
            by_window[window] = additive(mask_bool & (near | own))[:, None]
        self._masks = [by_window[w] for w in self.windows]

    def clear(self) -> None:
        self._masks = None

    @contextlib.contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        """Every decoder layer of `model` takes its own mask from the last `set` while inside."""
        if not self.active:
            yield
            return
        handles = []
        for i, layer in enumerate(decoder_layers(model)):
            handles.append(layer.register_forward_pre_hook(self._hook(i, layer), with_kwargs=True))
        try:
            with positional_masks(model):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.clear()

    def _hook(self, i: int, layer: Any):
        names = [p for p in inspect.signature(layer.forward).parameters if p != "self"]
        at = names.index("attention_mask") if "attention_mask" in names else None

        def hook(_module, args, kwargs):
            if self._masks is None:
                return None
            if "attention_mask" in kwargs or at is None or len(args) <= at:
                kwargs["attention_mask"] = self._masks[i]
            else:
                args = (*args[:at], self._masks[i], *args[at + 1:])
            return args, kwargs

        return hook
