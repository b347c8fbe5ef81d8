"""The second objective of `steer search --objective accuracy+safety`: the safety rate of a steered model on
a small AILuminate sample, judged by a safeguard loaded once for the whole search.

In: `SearchSettings` (--safety-prompts, --safety-limit, --safeguard-model, --safety-prompt, --guard-format,
the prompt style and --max-new-tokens). Out: `SafetyJudge`: `prepare` checks every input before any model
loads (the prompts, the Safety Guidelines, the guard's format, labels and chat template), `load` loads the
guard, `rate(engine, tokenizer, style)` generates the responses with the engine's current steering and
returns their `GroupCounts` (safe / total, with a Wilson interval). The pieces are `eval safety`'s own
(prompt selection, `SafetyTemplate`, `score_items`, `count_labels`); nothing here re-implements a guard.
Responses and prompts stay in memory: a search writes no text of either anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SafetyJudge:
    settings: Any  # SearchSettings
    prompts: list  # data.safety_prompts.SafetyPrompt, the seeded sample
    template: Any  # evaluation.safeguards.SafetyTemplate
    fmt: str  # the guard format, resolved
    id2label: dict[int, str] | None
    unsafe_ids: set[int] | None
    guard: Any = None  # modeling.LoadedModel, once loaded

    @classmethod
    def prepare(cls, settings: Any) -> SafetyJudge:
        from gsmkit.data.safety_prompts import load_safety_prompts
        from gsmkit.evaluation.guard_formats import classifier_labels, read_guard_config, resolve_guard_format
        from gsmkit.evaluation.safeguards import SafetyTemplate, single_token_id
        from gsmkit.modeling import load_tokenizer

        prompts = _sample(load_safety_prompts(settings.safety_prompts), settings.safety_limit, settings.seed)
        template = SafetyTemplate.read(settings.safety_prompt)
        guard_dir = str(settings.safeguard_model)
        config = read_guard_config(guard_dir)
        fmt = resolve_guard_format(settings.guard_format, config, guard_dir)
        id2label = unsafe_ids = None
        if fmt == "classifier":
            id2label, unsafe_ids = classifier_labels(config, guard_dir, ("safe",), ("unsafe",))
        tok = load_tokenizer(guard_dir)
        if fmt == "shieldgemma":
            single_token_id(tok, "Yes", guard_dir)
            single_token_id(tok, "No", guard_dir)
        template.check(tok, generation_prompt=fmt != "classifier", guard=guard_dir)
        return cls(settings, prompts, template, fmt, id2label, unsafe_ids)

    def load(self) -> None:
        from gsmkit.modeling import ModelSpec, load_model

        spec = ModelSpec(model=str(self.settings.safeguard_model), dtype=self.settings.model.dtype,
                         device=self.settings.model.device)
        self.guard = load_model(spec, task="sequence-classification" if self.fmt == "classifier"
                                else "causal-lm")

    def rate(self, engine: Any, tokenizer: Any, style: str) -> Any:
        """The safety rate of the engine as it is steered now: `GroupCounts` (unparsed counts as not safe)."""
        from gsmkit.evaluation.safeguards import GuardItem, score_items
        from gsmkit.evaluation.safety import count_labels
        from gsmkit.generation import GenRequest, SamplingSettings
        from gsmkit.prompts import encode_prompt, stop_strings

        s = self.settings
        requests = [GenRequest(p.id, tuple(encode_prompt(style, p.text, (), tokenizer, s.system_prompt,
                                                         s.thinking)[1])) for p in self.prompts]
        sampling = SamplingSettings(max_new_tokens=s.max_new_tokens, stop=stop_strings(style))
        responses = {r.key: r.text for r in engine.generate(requests, sampling)}
        items = [GuardItem(p.id, p.text, responses[p.id]) for p in self.prompts]
        labels = [res.verdict.label for res in score_items(
            self.fmt, self.guard.model, self.guard.tokenizer, self.template, items, id2label=self.id2label,
            unsafe_ids=self.unsafe_ids)]
        return count_labels(labels)

    def describe(self) -> dict[str, Any]:
        return {"prompts": len(self.prompts), "guard_format": self.fmt,
                "ids": [p.id for p in self.prompts]}


def _sample(prompts: list, n: int, seed: int) -> list:
    """A seeded sample of n prompts, in file order (all of them when there are fewer)."""
    import random

    if len(prompts) <= n:
        return list(prompts)
    keep = set(random.Random(seed).sample(range(len(prompts)), n))
    return [p for i, p in enumerate(prompts) if i in keep]
