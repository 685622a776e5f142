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
- Branches travel in JSON: :func:`export_json` writes the versions the conversation does not
  show as ``branches`` (each with the message it goes on from), :func:`read_import` checks them
  and the store writes them back (their tool steps are not carried).
- :func:`check_memory_record` is the one check of a memory record (imported or stored).
"""

from __future__ import annotations

import dataclasses
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
    #: Other versions (rolechat.store_branches): each goes on from a message — None (the
    #: start), ``(None, i)`` (entry i) or ``(k, j)`` (message j of branch k, an earlier one) —
    #: with its messages ``(role, content, status)``.
    branches: list[tuple[tuple[int | None, int] | None, list[tuple[str, str, str]]]] = field(
        default_factory=list)

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
    plan = _finish(_grouped(system, read, fields))
    if isinstance(data, Mapping) and data.get("branches"):
        plan = dataclasses.replace(plan, branches=read_branches(data["branches"],
                                                                len(plan.entries)))
    return plan


def read_branches(data: Any, shown: int) -> list[tuple[tuple[int | None, int] | None,
                                                       list[tuple[str, str, str]]]]:
    """An export's ``branches``, checked (``shown``: how many messages the file shows)."""
    if not isinstance(data, list):
        raise InvalidInput("The file's branches must be a list.", "Fix or remove 'branches'.",
                           field="branches")
    out: list[tuple[tuple[int | None, int] | None, list[tuple[str, str, str]]]] = []
    for k, branch in enumerate(data):
        where = f"branches[{k}]"
        if not isinstance(branch, Mapping) or not isinstance(branch.get("messages"), list) \
                or not branch["messages"]:
            raise InvalidInput(f"{where} must be an object with a non-empty messages list.",
                               "Fix or remove that branch.", field=where)
        after, at = branch.get("after"), None
        if after is not None:
            index, held = (after.get("message"), after.get("branch")) \
                if isinstance(after, Mapping) else (None, None)
            size = shown if held is None else (
                len(out[held][1]) if isinstance(held, int) and 0 <= held < k else -1)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
                raise InvalidInput(f"{where}.after names no message of the file (an earlier "
                                   "branch's, or one it shows).", "Fix or remove that branch.",
                                   field=f"{where}.after")
            at = (held, index)
        messages: list[tuple[str, str, str]] = []
        for j, item in enumerate(branch["messages"]):
            place = f"{where}.messages[{j}]"
            role = item.get("role") if isinstance(item, Mapping) else None
            status = item.get("status", "complete") if isinstance(item, Mapping) else None
            if role not in ("user", "assistant") or status not in ("complete", "interrupted") \
                    or not isinstance(item.get("content"), str):
                raise InvalidInput(f"{place} must be a user or assistant message with text "
                                   "content (status complete or interrupted).",
                                   "Fix or remove that message.", field=place)
            messages.append((role, check_text(item["content"], "message", allow_blank=True),
                             status))
        out.append((at, messages))
    return out


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
                      memory, unanswered, plan.steps, plan.branches)


# ----- exports ---------------------------------------------------------------------------------

def _item(m: StoredMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.status != "complete":
        item["status"] = m.status
    return item


def export_json(info: ConversationInfo, messages: Sequence[StoredMessage],
                branches: Sequence[tuple[int, int | None, Sequence[StoredMessage]]] = ()
                ) -> str:
    """rolechat's own JSON: re-importable, interrupted messages marked so. With ``branches``
    (the other versions, each after the branch holding the message it goes on from), a
    ``branches`` list: each version's ``after`` (null: the start; ``{"message": i}``: the i-th
    of ``messages``; ``{"branch": k, "message": j}``: the j-th of branch k) and its
    ``messages`` (their tool steps are not carried)."""
    items: list[dict[str, Any]] = []
    for m in messages:
        items += [step.to_openai() for step in m.steps]
        items.append(_item(m))
    body: dict[str, Any] = {"system": info.system, "messages": items, "id": info.id,
                            "title": info.title, "persona": info.persona, "model": info.model,
                            "params": info.params, "memory": info.memory,
                            "created_at": info.created_at}
    if branches:
        where: dict[int, dict[str, int]] = {m.id: {"message": i} for i, m in enumerate(messages)}
        out = []
        for k, (_, after, held) in enumerate(branches):
            out.append({"after": where.get(after) if after is not None else None,
                        "messages": [_item(m) for m in held]})
            where.update({m.id: {"branch": k, "message": j} for j, m in enumerate(held)})
        body["branches"] = out
    return json.dumps(body, ensure_ascii=False, indent=2)


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
