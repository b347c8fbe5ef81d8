"""Thresholds on study metrics: `--require 'gsm8k.strict>=0.37'`, `--baseline simple|medium|strong|auto`, and
`bench --gate`.

In: requirement texts `METRIC OP NUMBER` (OP one of >=, <=, >, <) and preset names. Out: checked
`Requirement`s that say whether a value holds; `METRICS` maps each metric name to its `summary.csv`
column, so the names a user types, the columns of the report and the gate of the bench are one list.
A missing value (the run has no such evaluation) never holds: a threshold is met only by a measurement.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from gsmkit.errors import ConfigError

# metric name -> summary.csv column. `.lo` / `.hi`: the bounds of the metric's 95% interval; `.n`: its sample.
METRICS: dict[str, str] = {
    "gsm8k.strict": "gsm8k_strict", "gsm8k.strict.lo": "gsm8k_strict_lo",
    "gsm8k.strict.hi": "gsm8k_strict_hi",
    "gsm8k.flexible": "gsm8k_flexible", "gsm8k.flexible.lo": "gsm8k_flexible_lo",
    "gsm8k.flexible.hi": "gsm8k_flexible_hi",
    "gsm8k.n": "gsm8k_n", "gsm8k.answer_share": "gsm8k_answer_share",
    "gsm8k.reasoning_share": "gsm8k_reasoning_share", "gsm8k.ended_in_reasoning": "gsm8k_ended_in_reasoning",
    "safety": "safety", "safety.lo": "safety_lo", "safety.hi": "safety_hi", "safety.n": "safety_n",
    "safety.unparsed": "safety_unparsed",
    "ppl": "ppl", "ppl.tokens": "ppl_tokens",
}

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_PATTERN = re.compile(r"\s*([A-Za-z0-9_.]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")
METRICS_HINT = "metrics: " + ", ".join(METRICS)


@dataclass(frozen=True)
class Requirement:
    """`metric op value`, e.g. gsm8k.strict >= 0.37; `text` is how it is shown."""

    metric: str
    op: str
    value: float
    text: str

    @property
    def column(self) -> str:
        return METRICS[self.metric]

    def holds(self, value: float | None) -> bool:
        """Whether a measured `value` meets the requirement; a missing value never does."""
        if value is None or math.isnan(float(value)):
            return False
        return _OPS[self.op](float(value), self.value)


def parse_requirement(text: str) -> Requirement:
    """A requirement from its text; ConfigError (a usage error at the CLI) naming the known metrics."""
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise ConfigError(f"requirement {text!r} is not METRIC OP NUMBER",
                          hint="for example --require 'gsm8k.strict>=0.37' (OP: >=, <=, >, <)")
    metric, op, number = match.groups()
    if metric not in METRICS:
        raise ConfigError(f"requirement {text!r}: unknown metric '{metric}'", hint=METRICS_HINT)
    return Requirement(metric, op, float(number), f"{metric}{op}{number}")


def baseline_requirements(preset: str) -> list[Requirement]:
    """The thresholds a run of `preset` must clear (`training.config.PRESET_BASELINES`)."""
    from gsmkit.training.config import PRESET_BASELINES

    if preset not in PRESET_BASELINES:
        raise ConfigError(f"unknown baseline '{preset}'",
                          hint=f"choose one of {', '.join(PRESET_BASELINES)}, or auto (the run's own preset)")
    return [Requirement(metric, ">=", value, f"{metric}>={value:g}")
            for metric, value in PRESET_BASELINES[preset].items()]
