"""The sliding window: which whole turns of a conversation fit in the model's context.

Contract — :meth:`Window.plan` returns a :class:`WindowPlan` such that:
- the prompt has at most ``budget = context_length - max_new_tokens`` tokens;
- the system prompt is always kept and the prompt always ends with the current user message
  (and, in a turn with tool calls, the calls and results so far: ``steps``);
- turns (a user message and its reply) are kept or dropped whole, oldest dropped first, and at
  most ``max_turns`` turns are kept when that is set;
- it is sticky: it starts from ``first_turn`` (the first turn the previous plan kept), so
  turns already dropped stay dropped and the cached prefix stays valid; when it must drop more,
  it drops down to ``low_water × budget`` so that the next turns append without sliding again.
- with memory (:mod:`rolechat.memory`): the conversation's summary is in the system message and
  its pinned turns come right after it, whatever else is dropped; a slide under
  ``Window(summarize=True)`` leaves room for the summary to grow to its cap, and the plan lists
  the turns to fold into it (``summarize``), which the chat does before generating.
- users name that setting the window's memory mode (``--memory none|summary``, a persona's
  ``[window] memory``, a session's ``params.memory``, the stored record's ``mode``):
  :func:`summarizes`, :func:`memory_mode` and :func:`window_fields` are the one conversion.
It counts tokens by asking the engine; it never tokenizes by itself. The plan carries the
prompt's token ids when the engine has them (``prompt_ids``), so the engine does not tokenize
the chosen prompt again, and says whether its counts are estimates (``estimated``). A user
message that cannot fit even alone raises :class:`~rolechat.errors.ContextOverflow` with the
numbers; a ``max_new_tokens`` that leaves no room raises
:class:`~rolechat.errors.InvalidParams`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .conversation import Conversation, Message, Turn
from .errors import ContextOverflow, InvalidParams
from .memory import Memory, check_template, system_with_summary
from .params import GenerationParams


class TokenCounter(Protocol):
    context_length: int
    exact_counts: bool

    def count_tokens(self, messages: list[Message]) -> int: ...

    def count_text(self, text: str) -> int: ...

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
    #: Pinned turns kept before ``first_turn`` (right after the system prompt).
    pinned: tuple[int, ...] = ()
    #: The conversation summary in the system message (None: none).
    memory_summary: str | None = None
    #: Turns this slide folds into the summary before the reply (a summarizing window only).
    summarize: tuple[int, ...] = ()
    #: Turns the running summary covers.
    summarized: tuple[int, ...] = ()
    #: What the summarization cost (its own usage, apart from the reply's).
    summary_usage: Any = field(default=None, compare=False)
    #: Why a slide dropped turns without summarizing them (None: it did not).
    memory_note: str | None = None
    #: The open turn's tool calls and results after the user message, and the tools offered.
    steps: tuple[Message, ...] = field(default=(), repr=False)
    tools: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def kept(self) -> list[int]:
        return [*self.pinned, *range(self.first_turn, self.total_turns)]

    @property
    def dropped(self) -> list[int]:
        return [i for i in range(self.first_turn) if i not in self.pinned]

    def summary(self) -> str:
        kept, dropped = len(self.kept), len(self.dropped)
        about = "~" if self.estimated else ""
        text = (f"{about}{self.prompt_tokens}/{self.budget} prompt tokens"
                f"{' (estimated)' if self.estimated else ''}, {kept} earlier turn(s) kept")
        if self.pinned:
            text += f" ({len(self.pinned)} pinned)"
        text += f", {dropped} oldest dropped" if dropped else ""
        if self.summarized:
            text += f", {len(self.summarized)} in the summary"
        return text

    def to_dict(self) -> dict[str, Any]:
        usage = self.summary_usage
        return {"first_turn": self.first_turn, "kept": self.kept, "dropped": self.dropped,
                "pinned": list(self.pinned), "summary": self.memory_summary,
                "summarized": list(self.summarized), "summarize": list(self.summarize),
                "summary_usage": usage.to_dict() if usage is not None else None,
                "memory_note": self.memory_note,
                "prompt_tokens": self.prompt_tokens, "budget": self.budget,
                "context_length": self.context_length, "max_new_tokens": self.max_new_tokens,
                "estimated": self.estimated}


#: The window settings a CLI flag or a session's params may give, as users name them (a
#: persona's ``[window]`` may also set ``summary_template``); :func:`window_fields` converts them.
MEMORY_SETTINGS = ("memory", "summary_tokens")
#: The window's memory mode as users name it: ``none`` forgets dropped turns, ``summary`` folds
#: them into a running summary (:attr:`Window.summarize`).
MEMORY_MODES = ("none", "summary")


def summarizes(mode: Any) -> bool:
    """:attr:`Window.summarize` for a memory mode (``summary``: True); InvalidParams names the
    modes."""
    if mode not in MEMORY_MODES:
        raise InvalidParams([("memory", f"must be one of {', '.join(MEMORY_MODES)} "
                              f"(got {mode!r})")], what="window settings")
    return bool(mode == "summary")


def memory_mode(summarize: bool) -> str:
    """The memory mode users see for :attr:`Window.summarize`."""
    return "summary" if summarize else "none"


def window_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`Window` fields for settings named as users name them (``memory`` becomes
    ``summarize``; the others keep their names)."""
    fields = dict(settings)
    if "memory" in fields:
        fields["summarize"] = summarizes(fields.pop("memory"))
    return fields


@dataclass(frozen=True)
class Window:
    #: After a slide, the prompt is cut down to this fraction of the budget.
    low_water: float = 0.75
    #: Keep at most this many of the newest turns (None: as many as fit).
    max_turns: int | None = None
    #: Whether a slide folds the turns it drops into a running summary (False: they are
    #: forgotten). Users call it the memory mode: ``summary`` or ``none`` (:func:`memory_mode`).
    summarize: bool = False
    #: The summary's token cap (None: 1/16 of the context, at least 32).
    summary_tokens: int | None = None
    #: The summarization prompt (None: :data:`rolechat.memory.DEFAULT_TEMPLATE`).
    summary_template: str | None = None
    #: The longest a summarization may take, in seconds.
    summary_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0.0 < self.low_water <= 1.0:
            raise InvalidParams([("low_water", f"must be in (0, 1] (got {self.low_water!r})")],
                                what="window settings")
        if self.max_turns is not None and self.max_turns < 0:
            raise InvalidParams([("max_turns", f"must be >= 0 (got {self.max_turns!r})")],
                                what="window settings")
        if not isinstance(self.summarize, bool):
            raise InvalidParams([("summarize", f"must be True or False (got {self.summarize!r})")],
                                what="window settings")
        if self.summary_tokens is not None and (
                not isinstance(self.summary_tokens, int) or self.summary_tokens < 8):
            raise InvalidParams([("summary_tokens",
                                  f"must be a whole number >= 8 (got {self.summary_tokens!r})")],
                                what="window settings")
        if not self.summary_timeout_s > 0:
            raise InvalidParams([("summary_timeout_s",
                                  f"must be > 0 (got {self.summary_timeout_s!r})")],
                                what="window settings")
        if self.summary_template is not None:
            check_template(self.summary_template)

    def summary_cap(self, context_length: int) -> int:
        """The summary's token cap for a model with this context."""
        return self.summary_tokens or max(32, context_length // 16)

    def plan(self, conversation: Conversation, user: str, engine: TokenCounter,
             params: GenerationParams, *, first_turn: int = 0,
             memory: Memory | None = None, steps: Sequence[Message] = (),
             tools: Sequence[dict[str, Any]] = ()) -> WindowPlan:
        """Choose the turns for a prompt that ends with ``user`` (and the tool calls and
        results of its turn so far, ``steps``), offering the model ``tools``."""
        draft = _Draft.of(conversation, user, engine, params, memory or Memory(),
                          tuple(steps), tuple(tools))
        start = min(max(first_turn, 0), draft.total)
        if self.max_turns is not None:
            start = max(start, draft.total - self.max_turns)
        current = draft.count(start)
        if current.tokens <= draft.budget:
            return draft.plan(start, current)
        alone = draft.count(draft.total)
        if alone.tokens > draft.budget:
            raise ContextOverflow(prompt_tokens=alone.tokens, available_tokens=draft.budget,
                                  context_length=draft.context,
                                  max_new_tokens=params.max_new_tokens,
                                  pinned=[p for p in draft.pins if p < draft.total])
        first, counted = self._slide(draft, start, alone)
        return draft.plan(first, counted, self._to_fold(draft, first))

    def _target(self, draft: _Draft) -> int:
        """The most tokens a prompt may have after a slide: the low-water mark, less the room
        the summary may still grow into."""
        target = int(draft.budget * self.low_water)
        if self.summarize:  # room for the summary to grow to its cap after the slide
            summary = draft.memory.summary
            section = (draft.engine.count_text(system_with_summary("", summary) or "")
                       if summary else 0)
            target -= max(0, self.summary_cap(draft.context) + 24 - section)
        return target

    def _slide(self, draft: _Draft, start: int, alone: _Counted) -> tuple[int, _Counted]:
        """The smallest first turn after ``start`` whose prompt is at or below the target (the
        user message alone when none is), and its count."""
        target = self._target(draft)
        best = (draft.total, alone)
        if alone.tokens > target:
            return best
        # Tokens only shrink as turns are dropped, so binary search over (start, total].
        lo, hi = start + 1, draft.total
        while lo <= hi:
            mid = (lo + hi) // 2
            counted = draft.count(mid)
            if counted.tokens <= target:
                best, hi = (mid, counted), mid - 1
            else:
                lo = mid + 1
        return best

    def _to_fold(self, draft: _Draft, first: int) -> tuple[int, ...]:
        """The turns a slide to ``first`` folds into the summary: every dropped turn not pinned
        nor summarized yet (none unless the window summarizes)."""
        if not self.summarize:
            return ()
        memory = draft.memory
        return tuple(i for i in range(first) if i not in memory.pins and
                     i not in memory.summarized)


class _Counted(NamedTuple):
    """A candidate prompt and its size."""

    messages: list[Message]
    tokens: int
    ids: list[int] | None


@dataclass(frozen=True)
class _Draft:
    """What one :meth:`Window.plan` works from: the conversation's turns, the pins and summary
    that stay, the budget, and how to count a prompt that starts at a given turn."""

    turns: list[Turn]
    user: str
    engine: TokenCounter
    params: GenerationParams
    memory: Memory
    pins: list[int]
    system: str | None
    budget: int
    steps: tuple[Message, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, conversation: Conversation, user: str, engine: TokenCounter,
           params: GenerationParams, memory: Memory, steps: tuple[Message, ...] = (),
           tools: tuple[dict[str, Any], ...] = ()) -> _Draft:
        budget = check_room(params, engine.context_length)
        turns = list(conversation.turns)
        return cls(turns, user, engine, params, memory,
                   pins=sorted(p for p in memory.pins if p < len(turns)),
                   system=system_with_summary(conversation.system, memory.summary),
                   budget=budget, steps=steps, tools=tools)

    @property
    def total(self) -> int:
        return len(self.turns)

    @property
    def context(self) -> int:
        return self.engine.context_length

    def messages_from(self, first: int) -> list[Message]:
        """System prompt (and the tools offered), pinned turns before ``first``, turns from
        ``first``, the user's message and its steps so far."""
        out = []
        if self.system is not None or self.tools:
            out.append(Message("system", self.system or "", tools=self.tools))
        for index in [*(p for p in self.pins if p < first), *range(first, self.total)]:
            out += self.turns[index].messages()
        return [*out, Message("user", self.user), *self.steps]

    def count(self, first: int) -> _Counted:
        messages = self.messages_from(first)
        ids = self.engine.prompt_ids(messages)
        return _Counted(messages, len(ids) if ids is not None
                        else self.engine.count_tokens(messages), ids)

    def plan(self, first: int, counted: _Counted, summarize: tuple[int, ...] = ()) -> WindowPlan:
        memory, total = self.memory, self.total
        return WindowPlan(counted.messages, first, total, counted.tokens, self.budget,
                          self.context, self.params.max_new_tokens, counted.ids,
                          not self.engine.exact_counts,
                          pinned=tuple(p for p in self.pins if p < first),
                          memory_summary=memory.summary, summarize=summarize,
                          summarized=tuple(sorted(t for t in memory.summarized if t < total))
                          if memory.summary else (), steps=self.steps, tools=self.tools)
