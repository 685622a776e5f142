"""Memory of what the sliding window dropped: a running summary, and pinned turns.

Contract:
- :class:`Memory` is one conversation's memory: ``summary`` (a short note, or None),
  ``summarized`` (the turns, from 0, folded into it), ``covers`` (the first turn after the last
  slide that made it) and ``pins`` (turns that are always kept). A slide folds every turn it
  drops that is neither pinned nor summarized yet: turns an earlier slide dropped without a
  summary (it failed) and turns unpinned after they fell out of the window are not lost.
- The running summary is opt-in (``Window(summarize=True)``). It is made only when the window
  slides — never on a turn that does not — so the prompt's prefix, and the KV cache, stay
  valid between slides. The dropped turns and the previous summary go to the engine with the
  summarization template (:data:`DEFAULT_TEMPLATE`, or the window's own), greedily, bounded by
  the summary's token cap and by a time limit.
- The note goes at the end of the system message, between the lines :data:`SUMMARY_OPEN` and
  :data:`SUMMARY_CLOSE` (without a system prompt it is the whole system message)::

      You are a professional AI assistant.

      [Summary of the earlier conversation]
      The user, Ada, is planning a trip to Lisbon in May ...
      [End of summary]

- A template must contain ``{turns}`` (the dropped turns as ``User: ...`` / ``Assistant: ...``
  lines) and may contain ``{summary}`` (the previous summary as a paragraph
  ``Summary so far: ...`` and a blank line, or nothing the first time) and ``{max_words}``; any
  other placeholder is an error (:func:`check_template`).
- :func:`summarize` raises :class:`SummaryFailed` when the engine fails, the time limit cuts
  it, or it says nothing; the caller then drops the turns plainly and says so.
- Pinned turns are kept right after the system prompt, in order, whatever the window drops;
  the window raises :class:`~rolechat.errors.ContextOverflow` naming them if they alone do not
  fit.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from time import monotonic
from typing import Any

from .conversation import Message, Turn
from .engines.base import Engine, Usage
from .errors import InvalidInput
from .params import GenerationParams

SUMMARY_OPEN = "[Summary of the earlier conversation]"
SUMMARY_CLOSE = "[End of summary]"

#: The summarization prompt (the user message of a one-turn request to the engine).
DEFAULT_TEMPLATE = (
    "Summarize the conversation below for the assistant who continues it. Keep the facts that "
    "matter later: names, numbers, the user's goals and preferences, decisions made and open "
    "questions. Leave out greetings and small talk. Write plain sentences, at most {max_words} "
    "words, and nothing else.\n\n"
    "{summary}"
    "Conversation:\n{turns}"
)
SUMMARY_SYSTEM = "You write short, faithful summaries of conversations."
_FIELDS = {"turns", "summary", "max_words"}


class SummaryFailed(Exception):
    """The summarization did not give a usable summary (the reason is the message)."""

    def __init__(self, reason: str, usage: Usage | None = None) -> None:
        super().__init__(reason)
        self.usage = usage


@dataclass
class Memory:
    """One conversation's memory (see the module docstring)."""

    summary: str | None = None
    covers: int = 0
    pins: set[int] = field(default_factory=set)
    summarized: set[int] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "covers": self.covers, "pins": sorted(self.pins),
                "summarized": sorted(self.summarized)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Memory:
        data = data or {}
        covers, pins = int(data.get("covers", 0)), {int(p) for p in data.get("pins", [])}
        if "summarized" in data:
            summarized = {int(t) for t in data["summarized"]}
        else:  # a record from before the list was kept
            summarized = set(range(covers)) - pins if data.get("summary") else set()
        return cls(data.get("summary"), covers, pins, summarized)

    def copy(self) -> Memory:
        return replace(self, pins=set(self.pins), summarized=set(self.summarized))

    def forget_from(self, turns: int) -> None:
        """Turns from ``turns`` on are gone (undone): drop them from the pins and the summary's
        list."""
        self.pins = {p for p in self.pins if p < turns}
        self.summarized = {t for t in self.summarized if t < turns}
        self.covers = min(self.covers, turns)


def check_template(template: Any) -> str:
    """A summarization template, checked: ``{turns}`` is required, and only ``{summary}`` and
    ``{max_words}`` may join it."""
    if not isinstance(template, str):
        raise InvalidInput(f"The summary template must be text, got {type(template).__name__}.",
                           "Pass a string that contains {turns}.", field="summary_template")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template)
                 if name is not None}
    except ValueError as exc:
        raise InvalidInput(f"The summary template is not a valid format string: {exc}.",
                           "Double a literal brace: {{ and }}.",
                           field="summary_template") from None
    if "turns" not in names:
        raise InvalidInput("The summary template has no {turns} placeholder, so the model "
                           "would never see the turns to summarize.",
                           "Put {turns} where the dropped turns go (and optionally {summary} "
                           "and {max_words}).", field="summary_template")
    unknown = names - _FIELDS
    if unknown:
        raise InvalidInput(f"The summary template has unknown placeholders "
                           f"{', '.join('{' + n + '}' for n in sorted(unknown))}.",
                           "Use only {turns}, {summary} and {max_words} (double a literal "
                           "brace: {{ }}).", field="summary_template")
    return template


def system_with_summary(system: str | None, summary: str | None) -> str | None:
    """The system message with the summary section at its end (see the module docstring)."""
    if not summary:
        return system
    section = f"{SUMMARY_OPEN}\n{summary}\n{SUMMARY_CLOSE}"
    return section if not system else f"{system}\n\n{section}"


def summary_request(template: str, previous: str | None, turns: Sequence[Turn],
                    max_tokens: int) -> list[Message]:
    """The one-turn request that asks the engine for the new summary."""
    lines = []
    for turn in turns:
        lines += [f"User: {turn.user}", f"Assistant: {turn.assistant}"]
    summary = f"Summary so far: {previous}\n\n" if previous else ""
    text = template.format(turns="\n".join(lines), summary=summary,
                           max_words=max(10, max_tokens * 2 // 3))
    return [Message("system", SUMMARY_SYSTEM), Message("user", text)]


def summarize(engine: Engine, messages: list[Message], *, max_tokens: int,
              timeout_s: float) -> tuple[str, Usage]:
    """Run the summarization (greedy, at most ``max_tokens`` tokens and ``timeout_s`` seconds).
    Raises :class:`SummaryFailed` with the reason."""
    params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)
    deadline = monotonic() + timeout_s
    try:
        generation = engine.stream(messages, params)
    except Exception as exc:
        raise SummaryFailed(f"the engine refused it ({exc})") from None
    parts: list[str] = []
    try:
        for chunk in generation:
            parts.append(chunk)
            if monotonic() > deadline:
                raise SummaryFailed(f"it took longer than {timeout_s:g} s")
    except SummaryFailed:
        raise
    except Exception as exc:
        raise SummaryFailed(f"the engine failed ({type(exc).__name__}: {exc})") from None
    finally:
        generation.close()
    completion = generation.completion
    text = " ".join("".join(parts).split())
    if completion is None or not text:
        raise SummaryFailed("the model wrote nothing", completion.usage if completion else None)
    if completion.finish_reason == "length":  # cut at the cap: end at the last full sentence
        end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        if end > len(text) // 2:
            text = text[:end + 1]
    return text, completion.usage
