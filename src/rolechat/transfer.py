"""Conversations in and out of the store as files: import checks, JSON and Markdown exports.

Contract:
- :func:`read_import` reads a whole file — an OpenAI message list or rolechat's own JSON — and
  checks all of it (messages, title, persona, model, parameters, the memory section) before
  anything is written: it returns an :class:`ImportPlan`, which
  :meth:`rolechat.store.Store.write_import` writes in one transaction. A file with no messages
  is refused. A file that ends with a user message keeps it as an unanswered message, marked
  ``interrupted`` (``ImportPlan.unanswered``; the CLI says so): never part of a turn, never
  dropped.
- Interrupted messages travel: :func:`export_json` marks them ``"status": "interrupted"``
  (re-imported, they stay out of the turns), :func:`export_markdown` labels them. A pending
  message (its reply still generating elsewhere) is exported ``pending`` and imported as
  ``interrupted``.
- :func:`check_memory_record` is the one check of a memory record (imported or stored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .conversation import (
    Conversation,
    Message,
    check_text,
    parse_json,
    read_transcript,
    render_markdown,
    steps_to_json,
    with_steps,
)
from .errors import InvalidInput
from .params import GenerationParams
from .persona import get_persona

if TYPE_CHECKING:
    from .store import ConversationInfo, StoredMessage


@dataclass(frozen=True)
class ImportPlan:
    """A file's conversation, checked in full: what :meth:`Store.write_import` writes."""

    system: str | None
    #: Every message in order: ``(role, content, status)``, status ``complete`` or
    #: ``interrupted``.
    entries: list[tuple[str, str, str]]
    title: str = ""
    persona: str | None = None
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    #: The file ended with a user message that has no reply: it is kept, ``interrupted``.
    unanswered: bool = False
    #: The tool calls and results before a reply: entry index → steps (OpenAI JSON).
    steps: dict[int, str] = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return sum(1 for role, _, status in self.entries
                   if role == "assistant" and status == "complete")


def plan_conversation(conversation: Conversation, **fields: Any) -> ImportPlan:
    """An already checked :class:`Conversation` (its complete turns) as an import."""
    return _finish(_grouped(conversation.system,
                            [(m, "complete") for m in conversation.messages], fields))


def _grouped(system: str | None, read: list[tuple[Message, str]],
             fields: dict[str, Any]) -> ImportPlan:
    """An import's messages, each reply carrying the tool calls and results before it."""
    entries: list[tuple[str, str, str]] = []
    steps: dict[int, str] = {}
    for message, status, before in with_steps(read):
        if before:
            steps[len(entries)] = steps_to_json(before) or ""
        entries.append((message.role, message.content, status))
    return ImportPlan(system, entries, **fields, steps=steps)


def read_import(text: str) -> ImportPlan:
    """The file's text, checked in full; InvalidInput names the first thing wrong."""
    data = parse_json(text)
    system, read = read_transcript(data)
    if not read:
        raise InvalidInput("The file holds no messages: there is nothing to import.",
                           "Import a file with at least one user message (an OpenAI message "
                           "list or a `rolechat conversations export`).")
    fields: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for name in ("title", "persona", "model"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"The file's {name} must be text, got "
                                   f"{type(value).__name__}.", f"Fix or remove {name!r}.",
                                   field=name)
            if value is not None:
                fields[name] = value
        for name in ("params", "memory"):
            value = data.get(name)
            if value is not None and not isinstance(value, Mapping):
                raise InvalidInput(f"The file's {name} must be an object, got "
                                   f"{type(value).__name__}.", f"Fix or remove {name!r}.",
                                   field=name)
            if value:
                fields[name] = dict(value)
    # What the file carries must resume later, so it is checked as the CLI would.
    if "title" in fields:
        check_text(fields["title"], "title", allow_blank=True)
    if "persona" in fields:
        get_persona(fields["persona"])
    if "params" in fields:
        fields["params"] = GenerationParams.from_mapping(fields["params"]).explicit()
    return _finish(_grouped(system, read, fields))


def _finish(plan: ImportPlan) -> ImportPlan:
    """Keep a last unanswered user message as interrupted; check the memory section against
    the turns."""
    entries, unanswered = plan.entries, False
    if entries[-1][0] == "user" and entries[-1][2] == "complete":
        entries = [*entries[:-1], ("user", entries[-1][1], "interrupted")]
        unanswered = True
    memory = plan.memory
    if memory:
        turns = sum(1 for role, _, status in entries
                    if role == "assistant" and status == "complete")
        memory = check_memory_record(memory, turns)
    return ImportPlan(plan.system, entries, plan.title, plan.persona, plan.model, plan.params,
                      memory, unanswered, plan.steps)


# ----- exports ---------------------------------------------------------------------------------

def export_json(info: ConversationInfo, messages: Sequence[StoredMessage]) -> str:
    """rolechat's own JSON: re-importable, interrupted messages marked so."""
    items: list[dict[str, Any]] = []
    for m in messages:
        items += [step.to_openai() for step in m.steps]
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.status != "complete":
            item["status"] = m.status
        items.append(item)
    return json.dumps({"system": info.system, "messages": items, "id": info.id,
                       "title": info.title, "persona": info.persona, "model": info.model,
                       "params": info.params, "memory": info.memory,
                       "created_at": info.created_at}, ensure_ascii=False, indent=2)


def export_markdown(info: ConversationInfo, messages: Sequence[StoredMessage]) -> str:
    """Every message under "You" / "Assistant" (interrupted ones labelled), then the memory's
    summary and pins."""
    entries = [entry for m in messages for entry in (
        *((step, "complete") for step in m.steps),
        (Message("user" if m.role == "user" else "assistant", m.content), m.status))]
    text = render_markdown(info.title or f"Conversation {info.id}", info.system, entries)
    summary, pins = info.memory.get("summary"), info.memory.get("pins") or []
    if summary:
        text += f"\n## Summary of the earlier turns\n\n{summary}\n"
    if pins:
        text += f"\nPinned turns: {', '.join(str(p + 1) for p in pins)}\n"
    return text


# ----- the memory section ----------------------------------------------------------------------

def check_memory_record(memory: Any, turns: int | None) -> dict[str, Any]:
    """A stored or imported memory record, checked against a conversation of ``turns`` turns
    (None: its shape only). InvalidInput says what is wrong."""
    if not isinstance(memory, Mapping):
        raise InvalidInput(f"memory must be an object, got {type(memory).__name__}.",
                           "Fix the memory section.")
    mode, summary = memory.get("mode", "none"), memory.get("summary")
    covers, pins = memory.get("covers", 0), memory.get("pins", [])
    limit = turns if turns is not None else 2**62
    if mode not in ("none", "summary"):
        raise InvalidInput(f"memory.mode must be none or summary, got {mode!r}.",
                           "Fix the memory section.")
    if summary is not None and not isinstance(summary, str):
        raise InvalidInput("memory.summary must be text.", "Fix the memory section.")
    if not isinstance(covers, int) or not 0 <= covers <= limit:
        span = f"from 0 to {turns}" if turns is not None else "of 0 or more"
        raise InvalidInput(f"memory.covers must be a turn count {span}, got {covers!r:.40}.",
                           "Fix the memory section.")
    for name in ("pins", "summarized"):
        value = memory.get(name, [])
        if not isinstance(value, list) or not all(isinstance(p, int) and 0 <= p < limit
                                                  for p in value):
            raise InvalidInput(f"memory.{name} must list turns from 0 to "
                               f"{'the last' if turns is None else turns - 1}, got "
                               f"{value!r:.40}.", "Fix the memory section.")
    record = {"mode": mode, "summary": summary, "covers": covers, "pins": sorted(set(pins))}
    if "summarized" in memory:
        record["summarized"] = sorted(set(memory["summarized"]))
    return record
