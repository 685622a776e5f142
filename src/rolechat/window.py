"""The sliding window: which whole turns of a conversation fit in the model's context.

Contract — :meth:`Window.plan` returns a :class:`WindowPlan` such that:
- the prompt has at most ``budget = context_length - max_new_tokens`` tokens;
- the system prompt is always kept and the prompt always ends with the current user message;
- turns (a user message and its reply) are kept or dropped whole, oldest dropped first, and at
  most ``max_turns`` turns are kept when that is set;
- it is sticky: it starts from ``first_turn`` (the first turn the previous plan kept), so
  turns already dropped stay dropped and the cached prefix stays valid; when it must drop more,
  it drops down to ``low_water × budget`` so that the next turns append without sliding again.
It counts tokens by asking the engine; it never tokenizes by itself. The plan carries the
prompt's token ids when the engine has them (``prompt_ids``), so the engine does not tokenize
the chosen prompt again, and says whether its counts are estimates (``estimated``). A user
message that cannot fit even alone raises :class:`~rolechat.errors.ContextOverflow` with the
numbers; a ``max_new_tokens`` that leaves no room raises
:class:`~rolechat.errors.InvalidParams`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .conversation import Conversation, Message
from .errors import ContextOverflow, InvalidParams
from .params import GenerationParams


class TokenCounter(Protocol):
    context_length: int
    exact_counts: bool

    def count_tokens(self, messages: list[Message]) -> int: ...

    def prompt_ids(self, messages: list[Message]) -> list[int] | None: ...


def check_room(params: GenerationParams, context_length: int) -> int:
    """The prompt budget ``context_length - max_new_tokens``; InvalidParams if it is empty."""
    if params.max_new_tokens >= context_length:
        raise InvalidParams([("max_new_tokens", f"must be less than the context length "
                              f"{context_length} (got {params.max_new_tokens})")])
    return context_length - params.max_new_tokens


@dataclass(frozen=True)
class WindowPlan:
    #: What the model receives: system prompt, kept turns, the user message.
    messages: list[Message]
    #: Index of the first kept turn; every turn before it is dropped.
    first_turn: int
    #: Number of completed turns in the conversation.
    total_turns: int
    prompt_tokens: int
    budget: int
    context_length: int
    max_new_tokens: int
    #: The prompt's token ids (None where the engine does not tokenize locally).
    prompt_ids: list[int] | None = field(default=None, repr=False, compare=False)
    #: True when the counts are estimates (a remote engine without a local tokenizer).
    estimated: bool = False

    @property
    def kept(self) -> list[int]:
        return list(range(self.first_turn, self.total_turns))

    @property
    def dropped(self) -> list[int]:
        return list(range(self.first_turn))

    def summary(self) -> str:
        kept, dropped = len(self.kept), len(self.dropped)
        about = "~" if self.estimated else ""
        text = (f"{about}{self.prompt_tokens}/{self.budget} prompt tokens"
                f"{' (estimated)' if self.estimated else ''}, {kept} earlier turn(s) kept")
        return text + (f", {dropped} oldest dropped" if dropped else "")

    def to_dict(self) -> dict[str, Any]:
        return {"first_turn": self.first_turn, "kept": self.kept, "dropped": self.dropped,
                "prompt_tokens": self.prompt_tokens, "budget": self.budget,
                "context_length": self.context_length, "max_new_tokens": self.max_new_tokens,
                "estimated": self.estimated}


@dataclass(frozen=True)
class Window:
    #: After a slide, the prompt is cut down to this fraction of the budget.
    low_water: float = 0.75
    #: Keep at most this many of the newest turns (None: as many as fit).
    max_turns: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.low_water <= 1.0:
            raise InvalidParams([("low_water", f"must be in (0, 1] (got {self.low_water!r})")],
                                what="window settings")
        if self.max_turns is not None and self.max_turns < 0:
            raise InvalidParams([("max_turns", f"must be >= 0 (got {self.max_turns!r})")],
                                what="window settings")

    def plan(self, conversation: Conversation, user: str, engine: TokenCounter,
             params: GenerationParams, *, first_turn: int = 0) -> WindowPlan:
        """Choose the turns for a prompt that ends with ``user``."""
        context = engine.context_length
        budget = check_room(params, context)
        total = len(conversation.turns)
        start = min(max(first_turn, 0), total)
        if self.max_turns is not None:
            start = max(start, total - self.max_turns)

        def count(first: int) -> tuple[list[Message], int, list[int] | None]:
            messages = conversation.prompt_messages(user, first_turn=first)
            ids = engine.prompt_ids(messages)
            return messages, len(ids) if ids is not None else engine.count_tokens(messages), ids

        def plan(first: int, counted: tuple[list[Message], int, list[int] | None]) -> WindowPlan:
            return WindowPlan(counted[0], first, total, counted[1], budget, context,
                              params.max_new_tokens, counted[2], not engine.exact_counts)

        current = count(start)
        if current[1] <= budget:
            return plan(start, current)
        alone = count(total)
        if alone[1] > budget:
            raise ContextOverflow(prompt_tokens=alone[1], available_tokens=budget,
                                  context_length=context, max_new_tokens=params.max_new_tokens)
        target = int(budget * self.low_water)
        if alone[1] > target:
            return plan(total, alone)
        # Smallest first turn whose prompt is at or below the low-water mark: tokens only
        # shrink as turns are dropped, so binary search over (start, total].
        lo, hi, best = start + 1, total, (total, alone)
        while lo <= hi:
            mid = (lo + hi) // 2
            counted = count(mid)
            if counted[1] <= target:
                best, hi = (mid, counted), mid - 1
            else:
                lo = mid + 1
        return plan(best[0], best[1])
