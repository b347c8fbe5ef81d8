"""Generation for `eval gsm8k`, `eval safety` and `generate-traces`: one `Engine` protocol, two backends.

In: a `modeling.ModelSpec` and a backend name (`build_engine`), then `GenRequest`s and `SamplingSettings`.
Out: an engine whose `generate` yields one `GenResult` per (request, sample), and whose `describe()` says
what ran (backend, device, dtype) for manifests.

Modules: `engine` (the types, the `Engine` protocol and the rules both backends share), `hf` (`HFEngine`,
the batched engine on transformers) and `vllm` (`VLLMEngine`, CUDA only). Import from this package.
"""

from __future__ import annotations

from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.generation.engine import (
    BACKENDS,
    Engine,
    GenRequest,
    GenResult,
    SamplingSettings,
    common_prefix_length,
    cut_at_stop,
    describe_device,
    row_seed,
)
from gsmkit.generation.hf import HFEngine
from gsmkit.generation.vllm import VLLMEngine, check_vllm_available

__all__ = [
    "BACKENDS", "Engine", "GenRequest", "GenResult", "HFEngine", "SamplingSettings", "VLLMEngine",
    "build_engine", "check_vllm_available", "common_prefix_length", "cut_at_stop", "describe_device",
    "row_seed",
]


def build_engine(spec: Any, backend: str = "hf", batch_size: int | None = None, prefix_cache: bool = True,
                 seed: int = 0, steering: Any = None):
    """Load what `spec` (a `modeling.ModelSpec`) names and wrap it in an engine: (loaded, tokenizer, engine).

    `batch_size` None is auto (`batch_size.auto_batch_size`). `loaded` is None for vLLM, which loads the
    weights itself (loading them here too would hold them twice on the GPU); `engine.describe()` says
    where either one runs. `steering` (a `steering.Steering`) is applied by the HF engine; vLLM refuses
    it. Everything that can be refused is refused before any weights load."""
    from gsmkit.modeling import eos_token_ids, load_model, load_tokenizer, locate_weights

    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend '{backend}'", hint="choose hf or vllm")
    if backend == "vllm":
        if steering is not None:
            raise ConfigError("--steer needs --backend hf",
                              hint="vLLM runs its own kernels, where gsmkit cannot add the vectors")
        check_vllm_available()
        if spec.load_in_4bit:
            raise ConfigError("--load-in-4bit is not supported with --backend vllm", hint="use --backend hf")
        if locate_weights(spec.model)[2] == "gguf":
            raise ConfigError("--backend vllm needs a model folder or Hub id, not a .gguf file",
                              hint="use --backend hf, or save the model with save_pretrained first")
        tok = load_tokenizer(spec.model, spec.trust_remote_code)
        # vLLM reads the generation config's end-of-sequence ids itself; these are the tokenizer's own.
        return None, tok, VLLMEngine(spec.model, tok, spec.adapter, spec.dtype, batch_size, seed,
                                     stop_token_ids=eos_token_ids(tok))
    loaded = load_model(spec)
    engine = HFEngine(loaded.model, loaded.tokenizer, batch_size=batch_size, prefix_cache=prefix_cache,
                      stop_token_ids=eos_token_ids(loaded.tokenizer, loaded.model), steering=steering)
    return loaded, loaded.tokenizer, engine
