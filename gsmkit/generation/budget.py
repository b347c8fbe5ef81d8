"""A reasoning budget (`--thinking-budget N`): a row's reasoning section is closed after N tokens by forcing
its closing tag, and the model then writes its answer within what is left of `--max-new-tokens` (budget
forcing, arXiv 2501.19393).

In: a `ThinkingBudget` (N and the `reasoning.Section` whose end is forced), the engine's tokenizer, and each
row's prompt ids and tokens as it grows. Out: `Budgets.row(prompt_ids)`, a `RowBudget` per row, which
`saw(tokens)` after every appended token and gives `forced()` the closing tag's next token, if any;
`forced_tokens(rows)` is what `sampling.choose` puts in place of its picks.

Where N counts from: the first token after the section's start tag, or the first generated token when the
prompt itself opened the section (a thinking template's `<think>\\n` generation prompt). A row reaches its
budget when N tokens follow the start and the end tag has not appeared in them: its next tokens are the end
tag's ids (`tokenizer.encode(end)`), one per decode step, so the row never leaves the batch and every other
row's step is as it would have been. Tags are looked for in decoded text with special tokens kept (a tag may
be an added token), in the newest tokens only, as stop strings are.

Every rule depends on the row's own tokens only, never on the batch, the prefix cache or the process, so
greedy completions under a budget are the same in all of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.reasoning import Section, opened_by_prompt


@dataclass(frozen=True)
class ThinkingBudget:
    """At most `tokens` tokens of reasoning inside `section`, then its end tag is forced."""

    tokens: int
    section: Section


class RowBudget:
    """One row's budget: where its reasoning began, whether its section closed, the end tag's ids to force."""

    def __init__(self, budget: ThinkingBudget, end_ids: tuple[int, ...], decode: Any, opened: bool):
        self.budget = budget
        self.end_ids = end_ids
        self.decode = decode  # token ids -> text, special tokens kept
        self.start: int | None = 0 if opened else None  # index in the row's tokens where reasoning begins
        self.closed = False
        self.pending: deque[int] = deque()
        self.forced_at: int | None = None  # index in the row's tokens of the first forced token
        self._tail = max(len(budget.section.start), len(budget.section.end)) + 8
        self._reached(0)

    def _reached(self, n: int) -> None:
        if self.start is not None and n - self.start >= self.budget.tokens:
            self.pending.extend(self.end_ids)
            self.forced_at = n

    def saw(self, tokens: Sequence[int]) -> None:
        """After a token joined the row: note the section opening or closing, or the budget reached."""
        if self.closed or self.pending:
            return
        section = self.budget.section
        if self.start is None:
            if section.start in self.decode(tokens[-self._tail:]):
                self.start = len(tokens)
                self._reached(len(tokens))
            return
        if section.end in self.decode(tokens[self.start:][-self._tail:]):
            self.closed = True
            return
        self._reached(len(tokens))

    def forced(self) -> int | None:
        """The token this row must take next (the end tag's next id), or None to keep the model's pick."""
        if not self.pending:
            return None
        token = self.pending.popleft()
        if not self.pending:
            self.closed = True
        return token


class Budgets:
    """The budget of one engine call, with the tokenizer that encodes the end tag and decodes rows."""

    def __init__(self, budget: ThinkingBudget, tokenizer: Any):
        self.budget = budget
        self.tokenizer = tokenizer
        self.end_ids = tuple(tokenizer.encode(budget.section.end, add_special_tokens=False))
        if not self.end_ids:
            raise ConfigError(f"the tokenizer encodes the end tag {budget.section.end!r} as no tokens",
                              hint="drop --thinking-budget")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def row(self, prompt_ids: Sequence[int]) -> RowBudget:
        """A new row's budget; the prompt opened the section when its text ends inside it."""
        opened = opened_by_prompt(self._decode(prompt_ids), self.budget.section)
        return RowBudget(self.budget, self.end_ids, self._decode, opened)


def budgets_for(budget: ThinkingBudget | None, tokenizer: Any) -> Budgets | None:
    return Budgets(budget, tokenizer) if budget is not None else None


def forced_tokens(budgets: Sequence[RowBudget | None]) -> list[int | None] | None:
    """Each row's forced next token (None: the model's pick); None when no row has a budget."""
    if all(b is None for b in budgets):
        return None
    return [b.forced() if b is not None else None for b in budgets]
