"""Token-weighted loss and perplexity of a causal LM, on encoded examples or on a JSONL file.

Low level, in: a model and `Encoded` examples (labels -100 where not scored, from `gsmkit.tokenization`).
Out: `response_nll` gives `(sum of negative log-likelihood, number of scored tokens, per example)`;
perplexity is exp(sum / n). Batches are length-sorted so padding stays small; padding is never scored.

`eval ppl`, in: `EvalPplSettings` (model + adapter, a JSONL file of `{prompt, response}` rows, scored
on the response only, or `{text}` rows, scored on every token after the first; optional
`metadata: {source, difficulty, domain, ...}`). Out: `<out>/items.jsonl` (one row per item, file
order), `<out>/metrics.json` (overall and per metadata group) and `<out>/manifest.json`; returns
`PplMetrics`.

How a row becomes tokens and how long texts are windowed: `gsmkit.evaluation.ppl_items`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.evaluation.ppl_items import GROUP_FIELDS, encode_item, read_ppl_items, sliding_windows
from gsmkit.fields import Record, check_fields, setting
from gsmkit.modeling import ModelSpec
from gsmkit.processes import Processes
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.settings import RunOptions
from gsmkit.tokenization import IGNORE_INDEX, Encoded

ITEMS = "items.jsonl"
METRICS = "metrics.json"
DEFAULT_WINDOW_CAP = 4096  # --max-length default: the model's max_position_embeddings, at most this



def _collate(encoded: Sequence[Any], idx: Sequence[int], pad_id: int):
    """Right-padded (input_ids, labels, attention_mask) tensors for the rows `idx` of `encoded`."""
    import torch

    width = max(len(encoded[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(encoded[i].input_ids)
        ids[row, :n] = torch.tensor(encoded[i].input_ids)
        labels[row, :n] = torch.tensor(encoded[i].labels)
        attn[row, :n] = 1
    return ids, labels, attn


def _batches(model: Any, encoded: Sequence[Any], batch_size: int, pad_id: int):
    """Yield `(rows of encoded, logits, labels)` of each length-sorted batch, in inference mode."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, labels, attn = _collate(encoded, idx, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            yield idx, logits, labels.to(device)


def response_nll(
    model: Any, encoded: Sequence[Any], batch_size: int = 8, pad_id: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[float, int, list[tuple[float, int]]]:
    """(total NLL, scored tokens, per-example (nll, tokens) in input order)."""
    import torch

    per: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for idx, logits, labels in _batches(model, encoded, batch_size, pad_id):
        # position t predicts token t+1
        shift_logits, shift_labels = logits.float()[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        ).view(len(idx), -1)
        mask = shift_labels != IGNORE_INDEX
        for row, i in enumerate(idx):
            per[i] = (float(nll[row][mask[row]].sum()), int(mask[row].sum()))
        if on_progress:
            on_progress(len(idx))
    return sum(p[0] for p in per), sum(p[1] for p in per), per


def scored_logits(model: Any, encoded: Sequence[Any], batch_size: int = 8, pad_id: int = 0):
    """Yield `(index, logits [n, vocab] float32 on the CPU, targets [n])` for each example's scored tokens.

    The rows of `logits` are the model's predictions for the scored tokens `targets`, in position
    order; examples come in length-sorted batch order, so consumers key results by `index`.
    """
    for idx, logits, labels in _batches(model, encoded, batch_size, pad_id):
        shift_labels = labels[:, 1:]
        for row, i in enumerate(idx):
            mask = shift_labels[row] != IGNORE_INDEX
            yield i, logits[row, :-1][mask].float().cpu(), shift_labels[row][mask].cpu()


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean NLL); nan without tokens, inf where exp overflows (a loss above ~709)."""
    if not tokens:
        return float("nan")
    mean = total_nll / tokens
    return math.exp(mean) if mean < 709.0 else float("inf")


# --- eval ppl -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPplSettings(RunOptions):
    model: ModelSpec
    data: Path = setting(help="JSONL of {prompt, response} (loss on the response only) or {text} (loss on "
                         "every token after the first) rows, optional metadata.", show_default=False,
                         path={"dir_okay": False})
    out: Path = setting(Path("runs/eval-ppl"), "Output folder.", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    max_length: int | None = setting(
        None, "Window in tokens; longer texts are scored with a sliding window, never truncated (default: "
        f"the model's max_position_embeddings, at most {DEFAULT_WINDOW_CAP}).", min=2, show_default=False)
    stride: int | None = setting(
        None, "Tokens between window starts; each token keeps at least window - stride tokens of context "
        "(default: half the window).", min=1, show_default=False)
    batch_size: int = setting(8, "Sequences scored together (length-sorted).", min=1)
    limit: int | None = setting(None, "Score only the first N rows.", min=1, show_default=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stride is not None and self.max_length is not None and self.stride >= self.max_length:
            raise ConfigError(f"--stride {self.stride} must be smaller than --max-length {self.max_length}",
                              hint="each window needs left context for its first scored token; "
                                   "the default stride is half the window")


@dataclass
class PplGroup:
    n: int
    tokens: int
    loss: float
    ppl: float


@dataclass
class PplMetrics(Record):
    """`metrics.json` of `eval ppl`: token-weighted loss and perplexity, overall and per metadata group.

    Attributes:
        n: rows scored
        tokens: scored tokens
        loss: mean negative log-likelihood per scored token (natural log)
        ppl: `exp(loss)`
        groups: `{"source" | "difficulty" | "domain": {value: {n, tokens, loss, ppl}}}`, only for fields that
            some row has; a row without the field is left out of that field's groups
        max_length: the window in tokens, as resolved
        stride: tokens between window starts, as resolved
        windows: forward passes (sequences) in total
        items_over_window: rows longer than the window
        scoring_s: seconds spent in forward passes
        tokens_per_s: scored tokens per second of `scoring_s`
        wall_s: seconds for the whole command, model loading included
    """

    n: int
    tokens: int
    loss: float
    ppl: float
    groups: dict[str, dict[str, PplGroup]]
    max_length: int
    stride: int
    windows: int
    items_over_window: int
    scoring_s: float
    tokens_per_s: float
    wall_s: float


def _summary(rows: Sequence[tuple[float, int]]) -> PplGroup:
    nll, tokens = sum(r[0] for r in rows), sum(r[1] for r in rows)
    loss = nll / tokens if tokens else float("nan")
    return PplGroup(n=len(rows), tokens=tokens, loss=loss, ppl=perplexity(nll, tokens))


def model_window(model: Any) -> int:
    """The default window: max_position_embeddings (or n_positions), at most DEFAULT_WINDOW_CAP."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(int(limit), DEFAULT_WINDOW_CAP) if limit else DEFAULT_WINDOW_CAP


def resolve_window(model: Any, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) for this model; a window longer than the model's positions is an error."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_length is None:
        max_length = model_window(model)
    elif limit and max_length > int(limit):
        raise ConfigError(f"--max-length {max_length} is longer than the model's context ({limit} positions)",
                          hint=f"use --max-length {limit} or less; longer texts are scored with a sliding "
                               "window")
    if stride is None:
        stride = max(1, max_length // 2)
    if stride >= max_length:
        raise ConfigError(f"--stride {stride} must be smaller than the window ({max_length} tokens)",
                          hint="the default stride is half the window")
    return max_length, stride


def run_output(settings: EvalPplSettings) -> RunOutput:
    """The evaluation's folder: items, metrics and manifest, written together at the end (no journal:
    a run scores everything again, so an existing result is refused unless --overwrite)."""
    return RunOutput.folder(settings.out, finals=(ITEMS, METRICS), overwrite=settings.overwrite,
                            what="perplexity evaluation",
                            inputs=(settings.data, settings.model.model, settings.model.adapter))


def evaluate_ppl(
    settings: EvalPplSettings, on_progress: Callable[[int, int], None] | None = None
) -> PplMetrics:
    """Score the file; `on_progress(done, total)` counts windows (one per item that fits the window)."""
    t_wall = time.perf_counter()
    from gsmkit.manifest import build_manifest, run_fingerprint, to_jsonable
    from gsmkit.modeling import load_model, load_tokenizer
    from gsmkit.settings import resolved_model

    settings = dataclasses.replace(settings, **resolved_model(settings))  # the adapter checked, first

    # Everything that can fail on input is checked before the model loads, the output path first.
    output = run_output(settings)
    items = read_ppl_items(settings.data, settings.limit)
    procs = Processes.from_env()
    if procs.is_main or not output.overwrite:  # the same checks everywhere; only the main one clears
        output.prepare(run_fingerprint(settings, ("out", "overwrite", "batch_size")))
    procs.barrier()
    tokenizer = load_tokenizer(settings.model.model, settings.model.trust_remote_code)
    encoded = [encode_item(item, tokenizer) for item in items]
    loaded = load_model(settings.model)
    max_length, stride = resolve_window(loaded.model, settings.max_length, settings.stride)

    windows = [w for i, (ids, labels) in enumerate(encoded)
               for w in sliding_windows(ids, labels, max_length, stride, i)]
    # Several processes: process i scores every N-th window; the main one gathers and publishes.
    mine = procs.shard(range(len(windows)))
    rows = [Encoded(input_ids=windows[j].input_ids, labels=windows[j].labels,
                    where=items[windows[j].item].where, truncated=False) for j in mine]
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, len(rows))

    advance(0)
    t0 = time.perf_counter()
    _, _, per_window = response_nll(loaded.model, rows, settings.batch_size, loaded.tokenizer.pad_token_id,
                                    advance)
    scoring_s = time.perf_counter() - t0
    if procs.count > 1:
        scored: dict[int, Any] = {}
        for shard in procs.gather(list(zip(mine, per_window, strict=True))):
            scored.update(shard)
        per_window = [scored[j] for j in range(len(windows))]

    per_item = [[0.0, 0, 0] for _ in items]  # nll, tokens, windows
    for w, (nll, tokens) in zip(windows, per_window, strict=True):
        acc = per_item[w.item]
        acc[0], acc[1], acc[2] = acc[0] + nll, acc[1] + tokens, acc[2] + 1
    item_rows = [{"index": item.index, "line": int(item.where.rsplit(":", 1)[1]), "mode": item.mode,
                  **item.groups, "tokens": tokens, "loss": nll / tokens, "ppl": perplexity(nll, tokens),
                  "windows": count} for item, (nll, tokens, count) in zip(items, per_item, strict=True)]

    overall = _summary([(nll, tokens) for nll, tokens, _ in per_item])
    groups: dict[str, dict[str, PplGroup]] = {}
    for name in GROUP_FIELDS:
        by_value: dict[str, list[tuple[float, int]]] = {}
        for item, (nll, tokens, _) in zip(items, per_item, strict=True):
            if name in item.groups:
                by_value.setdefault(item.groups[name], []).append((nll, tokens))
        if by_value:
            groups[name] = {value: _summary(rs) for value, rs in sorted(by_value.items())}
    metrics = PplMetrics(
        n=overall.n, tokens=overall.tokens, loss=overall.loss, ppl=overall.ppl, groups=groups,
        max_length=max_length, stride=stride, windows=len(windows),
        items_over_window=sum(len(ids) > max_length for ids, _ in encoded),
        scoring_s=round(scoring_s, 3),
        tokens_per_s=round(overall.tokens / scoring_s, 2) if scoring_s > 0 else 0.0,
        wall_s=round(time.perf_counter() - t_wall, 3),
    )
    manifest = build_manifest(
        "eval ppl", settings, inputs={"data": settings.data},
        extra={"resolved": {"max_length": max_length, "stride": stride, "dtype": str(loaded.dtype),
                            "device": str(loaded.device),
                            "processes": {"count": procs.count, "windows_scored": procs.gather(len(mine))}}},
    )
    if procs.is_main:
        output.publish({ITEMS: jsonl_writer(to_jsonable(r) for r in item_rows),
                        METRICS: json_writer(to_jsonable({**metrics.to_dict(), "manifest": manifest})),
                        MANIFEST: json_writer(manifest)})
    procs.barrier()
    return metrics
