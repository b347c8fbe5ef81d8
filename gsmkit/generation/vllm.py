"""The vLLM backend (CUDA only): `VLLMEngine`, the `Engine` protocol on `vllm.LLM`.

In: a model folder or Hub id (vLLM loads the weights itself), its tokenizer, an optional LoRA adapter
folder; then `GenRequest`s and `SamplingSettings`.
Out: one `GenResult` per (request, sample) that is not cancelled, built by the same rules as `HFEngine`'s.

Prefix caching and continuous batching are vLLM's own. To keep the protocol's promises:
- every sample is its own vLLM request (`n=1`) seeded with `row_seed(seed, key, sample_index)`, so sample
  `i` of a request is the one `HFEngine` would seed, and does not depend on the other samples; the
  samples of one prompt still share its KV blocks through vLLM's prefix cache;
- the text is decoded from the tokens with our tokenizer and cut by `cut_at_stop`, and a final
  end-of-sequence token is left out of `token_ids`, as in `HFEngine`;
- the end-of-sequence ids `HFEngine` stops on are passed to vLLM as `stop_token_ids`.
Of the `stats` counters only `generated_tokens` is filled: the others are vLLM's internals.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from gsmkit.errors import ConfigError, ModelError
from gsmkit.generation.batch_size import CAPS
from gsmkit.generation.engine import (
    Cancelled,
    GenRequest,
    GenResult,
    OnResult,
    SamplingSettings,
    checked_requests,
    cut_at_stop,
    describe_device,
    row_seed,
)


def check_vllm_available() -> None:
    """Raise ConfigError unless vllm is installed and a CUDA GPU is visible (checked before any model
    loads)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--backend vllm needs the vllm package",
                          hint="pip install 'gsmkit[vllm]' on a CUDA machine")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--backend vllm needs a CUDA GPU, and none is visible", hint="use --backend hf")


class VLLMEngine:
    """`Engine` on vLLM: prefix caching and continuous batching are vLLM's own.

    Cancellation: `cancelled(key, i)` is asked before a sample is submitted (a cancelled one is never
    sent) and again when its result is ready (a sample cancelled by then is never yielded). vLLM's
    `LLM.generate` runs all submitted samples to the end before it returns, so it cannot stop a sample
    mid-batch: cancelling after submission saves no compute, only the yield. Results therefore all
    arrive together, after the whole call's generation, in request order.
    """

    def __init__(self, model_path: str, tokenizer: Any, adapter: str | None = None, dtype: str = "auto",
                 batch_size: int | None = None, seed: int = 0, stop_token_ids: Iterable[int] = ()):
        check_vllm_available()
        from vllm import LLM

        self.tokenizer = tokenizer
        self.adapter = adapter
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.llm = LLM(model=model_path, dtype=dtype, enable_prefix_caching=True,
                       enable_lora=adapter is not None, max_num_seqs=batch_size or CAPS["cuda"], seed=seed)
        self.stats = {"prefix_tokens": 0, "prefill_tokens": 0, "decode_steps": 0, "generated_tokens": 0}
        self._description = self._resolve_description()

    def describe(self) -> dict[str, str]:
        """The GPU vLLM runs on and the dtype it resolved (`--dtype auto` becomes a real one)."""
        return dict(self._description)

    def _resolve_description(self) -> dict[str, str]:
        # One GPU (no tensor parallelism), and vLLM's worker of local rank 0 uses the first visible one.
        engine = self.llm.llm_engine
        config = getattr(engine, "model_config", None) or getattr(getattr(engine, "vllm_config", None),
                                                                  "model_config", None)
        if config is None or getattr(config, "dtype", None) is None:
            raise ModelError("cannot read the dtype vLLM resolved (no llm_engine.model_config.dtype)",
                             hint="this vllm version is not supported; use --backend hf or vllm>=0.10")
        return {"backend": "vllm", **describe_device("cuda:0"), "dtype": str(config.dtype)}

    def _params(self, settings: SamplingSettings, key: str, sample_index: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None,
            stop_token_ids=sorted(self.stop_token_ids) or None,
            temperature=settings.temperature if settings.do_sample else 0.0, top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else -1,
            seed=row_seed(settings.seed, key, sample_index) if settings.do_sample else None,
        )

    def generate(self, requests: Sequence[GenRequest], settings: SamplingSettings, on_result: OnResult = None,
                 cancelled: Cancelled = None) -> Iterator[GenResult]:
        """Yield one result per sample not cancelled; see the class docstring for what cancelling saves."""
        if settings.logprobs:
            raise ConfigError("per-token log-probabilities are not returned by the vLLM engine backend",
                              hint="use the hf backend (GRPO's vLLM rollouts go through TRL's own path)")
        if settings.thinking_budget is not None:
            raise ConfigError("--thinking-budget is not applied by the vLLM engine backend",
                              hint="use --backend hf")
        jobs = [(r, s) for r in checked_requests(requests) for s in range(r.num_samples)
                if cancelled is None or not cancelled(r.key, s)]
        if not jobs:
            return
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, self.adapter)
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r, _ in jobs]
        params = [self._params(settings, r.key, s) for r, s in jobs]
        outputs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        for (r, s), out in zip(jobs, outputs, strict=True):
            res = self._result(r, s, out.outputs[0], settings)
            self.stats["generated_tokens"] += len(res.token_ids)  # cancelled or not, they were generated
            if cancelled is not None and cancelled(r.key, s):
                continue
            if on_result is not None:
                on_result(res)
            yield res

    def _result(self, request: GenRequest, sample_index: int, comp: Any,
                settings: SamplingSettings) -> GenResult:
        """A vLLM `CompletionOutput` as `HFEngine` would have reported it."""
        if comp.finish_reason not in ("stop", "length"):
            raise ModelError(f"vLLM ended sample {sample_index} of '{request.key}' with finish reason "
                             f"{comp.finish_reason!r}", hint="rerun; if it persists, use --backend hf")
        tokens = list(comp.token_ids)
        stop_reason = getattr(comp, "stop_reason", None)
        # Stopped by a token (end-of-sequence or one of stop_token_ids, not a stop string): vLLM keeps that
        # token in token_ids, HFEngine does not.
        by_token = comp.finish_reason == "stop" and not isinstance(stop_reason, str)
        end = None
        if by_token and tokens and (tokens[-1] == stop_reason or tokens[-1] in self.stop_token_ids):
            end = tokens.pop()
        text, hit = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), settings.stop)
        reason = "stop" if comp.finish_reason == "stop" or hit else "length"
        return GenResult(request.key, sample_index, tuple(tokens), text, reason, len(request.prompt_ids),
                         end_token=end)
