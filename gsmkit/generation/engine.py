"""What every generation backend shares: the request and result types, the sampling settings, the
`Engine` protocol, and the rules that must not differ between backends (per-sample seeds, stop cuts).

In: nothing to load; these are plain types and pure functions.
Out: `SamplingSettings`, `GenRequest`, `GenResult`, `Engine`, `row_seed`, `cut_at_stop`,
`common_prefix_length`, `checked_requests`, `describe_device`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from gsmkit.errors import ConfigError
from gsmkit.fields import check_fields
from gsmkit.generation.budget import ThinkingBudget
from gsmkit.reasoning import check_budget
from gsmkit.settings import DecodeOptions, SamplingOptions, override

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How the engine decodes. Defaults and bounds are the option groups' (`settings.DecodeOptions`,
    `settings.SamplingOptions`): declared there once, checked here by `check_fields`."""

    max_new_tokens: int = override(DecodeOptions, "max_new_tokens")
    do_sample: bool = False
    temperature: float = override(SamplingOptions, "temperature")
    top_p: float = override(SamplingOptions, "top_p")
    top_k: int = override(SamplingOptions, "top_k")
    seed: int = override(DecodeOptions, "seed")
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # also return each sampled token's log-probability (GenResult.logprobs)
    thinking_budget: ThinkingBudget | None = None  # close each reasoning section after N tokens (`budget`)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.do_sample and self.temperature <= 0:
            raise ConfigError("sampling needs --temperature > 0", hint="drop --do-sample for greedy decoding")
        if self.thinking_budget is not None:
            check_budget(self.thinking_budget.tokens, self.max_new_tokens)


@dataclass(frozen=True)
class GenRequest:
    key: str
    prompt_ids: tuple[int, ...]
    num_samples: int = 1


@dataclass(frozen=True)
class GenResult:
    key: str
    sample_index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" or "length"
    num_prompt_tokens: int
    end_token: int | None = None  # the end-of-sequence token that ended it (left out of token_ids)
    # with SamplingSettings.logprobs: log softmax(logits / temperature) of token_ids, then of end_token
    logprobs: tuple[float, ...] | None = None
    budget_forced: bool = False  # its reasoning section was closed by `SamplingSettings.thinking_budget`


# The callbacks of `Engine.generate`: each result as it is yielded; is (key, sample_index) still wanted?
OnResult = Callable[[GenResult], None] | None
Cancelled = Callable[[str, int], bool] | None


@runtime_checkable
class Engine(Protocol):
    """What `eval gsm8k`, `eval safety` and `generate-traces` may rely on, whatever the backend.

    `generate` yields one `GenResult` per (request, sample) that is not cancelled, in no fixed order:
    - sample `i` of request `key` is drawn from a generator seeded with `row_seed(settings.seed, key, i)`,
      so it does not depend on the other requests or samples of the call (greedy ignores the seed);
    - `text` is the decoded completion cut before the earliest of `settings.stop` (`cut_at_stop`), and
      `token_ids` leave out the end-of-sequence token that ended it (`end_token` holds it);
    - with `settings.logprobs`, `logprobs` holds log softmax(logits / temperature) of each token of
      `token_ids` and then of `end_token`: what a re-scoring pass of the same model computes (TRL's GRPO
      loss); a backend that cannot refuses with a ConfigError;
    - with `settings.thinking_budget`, a row's reasoning section ends after that many tokens: its end tag is
      forced (`budget`), and `budget_forced` says so; a backend that cannot refuses with a ConfigError;
    - `on_result(result)` is called just before each result is yielded;
    - `cancelled(key, i)` returning True means the caller no longer wants that sample: it is never
      yielded. How much compute that saves is the backend's own (see its docstring).
    `stats` holds the engine's counters (`prefix_tokens`, `prefill_tokens`, `decode_steps`,
    `generated_tokens`) accumulated over its calls. `describe()` says what actually ran, for manifests:
    `{"backend": "hf" | "vllm", "device": "cpu" | "cuda:0" | ..., "dtype": "torch.float32" | ...}`, plus
    `"gpu"` (the GPU's name) on CUDA and, from the HF engine, `"batch_size"` (its last call's rows).
    """

    stats: dict[str, int]

    def generate(self, requests: Sequence[GenRequest], settings: SamplingSettings, on_result: OnResult = None,
                 cancelled: Cancelled = None) -> Iterator[GenResult]: ...

    def describe(self) -> dict[str, str]: ...


def checked_requests(requests: Iterable[GenRequest]) -> list[GenRequest]:
    """The requests that ask for at least one sample; an empty prompt is an error (nothing to continue)."""
    requests = [r for r in requests if r.num_samples > 0]
    for r in requests:
        if not r.prompt_ids:
            raise ConfigError(f"request '{r.key}' has an empty prompt")
    return requests


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        i = 0
        limit = min(n, len(s))
        while i < limit and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def row_seed(seed: int, key: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cut_at_stop(text: str, stop: Iterable[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1 and i < cut:
            cut = i
    return text[:cut], cut != len(text)


def describe_device(device: Any) -> dict[str, str]:
    """`{"device": ...}` for a torch device, with the CUDA index made explicit and `"gpu"` (its name):
    `torch.device("cuda")` alone does not say which GPU, nor what it was."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return {"device": str(device)}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"device": f"cuda:{index}", "gpu": torch.cuda.get_device_name(index)}
