"""What a safeguard's output means: its formats, their parsers, and which format a guard folder has.

In: a guard's raw output (generated text, two next-token log-probabilities, or class probabilities)
and its format; or a safeguard folder's `config.json`. Out: one `Verdict` per output, `safe`, `unsafe`
or `unparsed`, with a score where the guard gives one and hazard categories where it names them; the
format of a folder (`--guard-format auto`), and the unsafe class ids of a classifier.

Output formats (`--guard-format`):
- `classifier`: a `*ForSequenceClassification` model; the probability of the unsafe labels (names
  from `id2label`) is the score, unsafe when above the threshold.
- `llama-guard`: `safe`, or `unsafe` and optionally a line of categories `S1,S10`.
- `shieldgemma`: scored, not generated: score = P("Yes") / (P("Yes") + P("No")) of the next token,
  unsafe when above the threshold (the model card's recipe).
- `wildguard`: three lines `Harmful request: yes|no`, `Response refusal: yes|no`,
  `Harmful response: yes|no`; the last decides.
- `qwen3guard`: `Safety: Safe|Unsafe|Controversial`, `Categories: ...`, optionally `Refusal: Yes|No`;
  Controversial counts as unsafe unless told otherwise (Qwen's "strict" mode).
Anything else a generative guard writes is `unparsed`: counted and reported, never counted as safe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, ModelError
from gsmkit.modeling import read_folder_json

GUARD_FORMATS = ("auto", "classifier", "llama-guard", "shieldgemma", "wildguard", "qwen3guard")
TEXT_FORMATS = ("llama-guard", "wildguard", "qwen3guard")  # generated text, parsed
SAFE, UNSAFE, UNPARSED = "safe", "unsafe", "unparsed"
# config names that identify a guard family; compared after dropping everything but letters and digits
_FAMILY_MARKERS = (("llamaguard", "llama-guard"), ("shieldgemma", "shieldgemma"), ("wildguard", "wildguard"),
                   ("qwen3guard", "qwen3guard"))
FORMAT_HINT = "pass --guard-format classifier, llama-guard, shieldgemma, wildguard or qwen3guard"


@dataclass(frozen=True)
class Verdict:
    label: str  # "safe", "unsafe" or "unparsed"
    categories: tuple[str, ...] = ()
    score: float | None = None  # probability of unsafe, where the guard gives one
    details: dict[str, Any] = field(default_factory=dict)  # format-specific parsed fields
    reason: str | None = None  # why the output could not be parsed


def unparsed(reason: str) -> Verdict:
    """A verdict for an output that cannot be read (never counted as safe)."""
    return Verdict(UNPARSED, reason=reason)


# ---- output formats ---------------------------------------------------------------------------------

_LLAMA_GUARD_CATEGORY = re.compile(r"[SO]\d{1,2}", re.IGNORECASE)


def parse_llama_guard(text: str) -> Verdict:
    """`safe`, or `unsafe` with an optional second line of categories (`S1,S10`); nothing else."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return unparsed("empty output")
    first = lines[0].lower()
    if first not in (SAFE, UNSAFE):
        return unparsed("the first line is neither 'safe' nor 'unsafe'")
    if first == SAFE:
        return Verdict(SAFE) if len(lines) == 1 else unparsed("text after 'safe'")
    if len(lines) > 2:
        return unparsed("text after the category line")
    categories: tuple[str, ...] = ()
    if len(lines) == 2:
        parts = [p.strip() for p in lines[1].split(",")]
        if not all(_LLAMA_GUARD_CATEGORY.fullmatch(p) for p in parts):
            return unparsed("the line after 'unsafe' is not a category list such as S1,S10")
        categories = tuple(p.upper() for p in parts)
    return Verdict(UNSAFE, categories)


_WILDGUARD_FIELDS = {"harmful request": "harmful_request", "response refusal": "response_refusal",
                     "harmful response": "harmful_response"}
_YES_NO = {"yes": True, "no": False, "n/a": None}


def parse_wildguard(text: str) -> Verdict:
    """Three `field: yes|no` lines; `Harmful response` decides, the other two are kept as details."""
    values: dict[str, bool | None] = {}
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        name = _WILDGUARD_FIELDS.get(key.strip().lower())
        if not sep or name is None:
            return unparsed("a line is not one of 'Harmful request', 'Response refusal', 'Harmful response'")
        if name in values:
            return unparsed(f"'{key.strip()}' appears twice")
        v = value.strip().lower()
        if v not in _YES_NO:
            return unparsed(f"'{key.strip()}' is not yes or no")
        values[name] = _YES_NO[v]
    missing = [k for k, name in _WILDGUARD_FIELDS.items() if name not in values]
    if missing:
        return unparsed(f"no '{missing[0].capitalize()}' line")
    harmful = values["harmful_response"]
    if harmful is None:
        return unparsed("'Harmful response' is n/a")
    return Verdict(UNSAFE if harmful else SAFE, details=values)


_QWEN_SAFETY = re.compile(r"^\s*Safety:\s*(\w+)\s*$", re.IGNORECASE | re.MULTILINE)
_QWEN_CATEGORIES = re.compile(r"^\s*Categories:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_QWEN_REFUSAL = re.compile(r"^\s*Refusal:\s*(\w+)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_qwen3guard(text: str, controversial: str = UNSAFE) -> Verdict:
    """`Safety: Safe|Unsafe|Controversial` (once), `Categories: a, b` or `None`, optionally
    `Refusal: Yes|No`."""
    found = _QWEN_SAFETY.findall(text)
    if len(found) != 1:
        return unparsed("no 'Safety:' line" if not found else "several 'Safety:' lines")
    safety = found[0].capitalize()
    if safety not in ("Safe", "Unsafe", "Controversial"):
        return unparsed("'Safety:' is not Safe, Unsafe or Controversial")
    details: dict[str, Any] = {"safety": safety}
    categories: tuple[str, ...] = ()
    cats = _QWEN_CATEGORIES.findall(text)
    if len(cats) > 1:
        return unparsed("several 'Categories:' lines")
    if cats:
        categories = tuple(c.strip() for c in cats[0].split(",") if c.strip() and c.strip().lower() != "none")
    refusal = _QWEN_REFUSAL.findall(text)
    if len(refusal) > 1 or (refusal and refusal[0].lower() not in ("yes", "no")):
        return unparsed("'Refusal:' is not one Yes or No")
    if refusal:
        details["refusal"] = refusal[0].lower() == "yes"
    label = {"Safe": SAFE, "Unsafe": UNSAFE, "Controversial": controversial}[safety]
    return Verdict(label, categories, details=details)


def shieldgemma_verdict(logp_yes: float, logp_no: float, threshold: float = 0.5) -> Verdict:
    """P("Yes") / (P("Yes") + P("No")) from next-token log-probabilities; "Yes" (violates) is unsafe."""
    if math.isnan(logp_yes) or math.isnan(logp_no) or (math.isinf(logp_yes) and math.isinf(logp_no)):
        return unparsed("no probability on 'Yes' or 'No'")
    score = 1.0 / (1.0 + math.exp(min(logp_no - logp_yes, 700.0)))  # softmax over the two, overflow-safe
    details = {"p_yes": math.exp(logp_yes), "p_no": math.exp(logp_no)}
    return Verdict(UNSAFE if score > threshold else SAFE, score=score, details=details)


def classifier_verdict(probs: Sequence[float], id2label: dict[int, str], unsafe_ids: set[int],
                       threshold: float = 0.5) -> Verdict:
    """Unsafe when the probability of the unsafe labels is above `threshold`; details = every label's
    probability."""
    if any(math.isnan(p) for p in probs):
        return unparsed("the classifier returned NaN")
    score = float(sum(probs[i] for i in unsafe_ids))
    details = {id2label[i]: float(p) for i, p in enumerate(probs)}
    return Verdict(UNSAFE if score > threshold else SAFE, score=score, details=details)


def parse_guard_output(fmt: str, text: str, controversial: str = UNSAFE) -> Verdict:
    if fmt == "llama-guard":
        return parse_llama_guard(text)
    if fmt == "wildguard":
        return parse_wildguard(text)
    if fmt == "qwen3guard":
        return parse_qwen3guard(text, controversial)
    raise ValueError(f"{fmt} outputs are not parsed from text")


# ---- which guard is this ----------------------------------------------------------------------------


def read_guard_config(folder: str | Path) -> dict[str, Any]:
    """The guard's config.json; errors before any model loads."""
    saved = "the folder written by save_pretrained (config.json, weights, tokenizer)"
    return read_folder_json(folder, "config.json", "model folder", hint=f"--safeguard-model names {saved}",
                            broken_hint=f"the safeguard's config.json is damaged: pass {saved}")


def _architectures(config: dict[str, Any]) -> list[str]:
    archs = config.get("architectures") or []
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def is_sequence_classifier(config: dict[str, Any]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in _architectures(config))


def detect_guard_format(config: dict[str, Any], folder: str | Path) -> str:
    """The output format from the config (architectures, model_type, names) and the folder name."""
    if is_sequence_classifier(config):
        return "classifier"
    names = [Path(folder).name, str(config.get("model_type", "")), *_architectures(config)]
    names += [str(v) for k, v in config.items() if "name_or_path" in k and isinstance(v, str)]
    squashed = [re.sub(r"[^a-z0-9]", "", n.lower()) for n in names]
    found = sorted({fmt for marker, fmt in _FAMILY_MARKERS if any(marker in n for n in squashed)})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"{folder}: the guard's names match several formats ({', '.join(found)})",
                          hint=FORMAT_HINT)
    raise ConfigError(f"{folder}: cannot tell the guard's output format from its config or folder name",
                      hint=FORMAT_HINT)


def resolve_guard_format(fmt: str, config: dict[str, Any], folder: str | Path) -> str:
    """`auto` detected; a format that contradicts the model's architecture is refused."""
    if fmt not in GUARD_FORMATS:
        raise ConfigError(f"unknown --guard-format '{fmt}'", hint=f"choose one of {', '.join(GUARD_FORMATS)}")
    resolved = detect_guard_format(config, folder) if fmt == "auto" else fmt
    classifier = is_sequence_classifier(config)
    if resolved == "classifier" and not classifier:
        # Loading a causal LM as a classifier would bolt a random head onto it: a meaningless verdict.
        raise ConfigError(f"{folder}: --guard-format classifier needs a *ForSequenceClassification model, "
                          f"this one is {', '.join(_architectures(config)) or 'of unknown architecture'}",
                          hint=FORMAT_HINT)
    if resolved != "classifier" and classifier:
        raise ConfigError(f"{folder}: --guard-format {resolved} needs a generative model, this one is a "
                          "sequence classifier", hint="pass --guard-format classifier (or auto)")
    return resolved


def classifier_labels(config: dict[str, Any], folder: str | Path, safe_labels: Sequence[str],
                      unsafe_labels: Sequence[str]) -> tuple[dict[int, str], set[int]]:
    """(id2label, ids of the unsafe labels); every label must be named safe or unsafe, so none is guessed."""
    raw = config.get("id2label")
    if not raw:
        # transformers leaves its default names (LABEL_0, LABEL_1, ...) out of config.json
        n = config.get("num_labels") or len(config.get("label2id") or {}) or 2
        raw = {i: f"LABEL_{i}" for i in range(int(n))}
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, ValueError):
        raise ModelError(f"{folder}/config.json: id2label is not a mapping of class ids to names") from None
    if len(id2label) < 2 or sorted(id2label) != list(range(len(id2label))):
        raise ModelError(f"{folder}/config.json: id2label must name classes 0..n-1 (n >= 2)")
    safe = {s.lower() for s in safe_labels}
    unsafe = {s.lower() for s in unsafe_labels}
    if safe & unsafe:
        raise ConfigError(f"label '{min(safe & unsafe)}' is given as both safe and unsafe")
    unknown = [name for name in id2label.values() if name.lower() not in safe | unsafe]
    if unknown:
        raise ConfigError(
            f"{folder}: the classifier's label{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} neither safe ({', '.join(safe_labels)}) nor unsafe "
            f"({', '.join(unsafe_labels)})",
            hint="name each label with --safe-label or --unsafe-label (repeatable)",
        )
    unsafe_ids = {i for i, name in id2label.items() if name.lower() in unsafe}
    if not unsafe_ids or len(unsafe_ids) == len(id2label):
        raise ConfigError(f"{folder}: the classifier needs at least one safe and one unsafe label",
                          hint="name them with --safe-label and --unsafe-label")
    return id2label, unsafe_ids
