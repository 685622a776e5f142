"""The store's records, and how its rows are read into them.

Contract: :class:`ConversationInfo` (a conversation's row: its fields, turn count, owner,
memory, damaged fields and version), :class:`StoredMessage` (a message's row) and
:class:`Loaded` (a conversation as one reader saw it), :class:`Dropped` (a turn an undo
removed). A damaged ``params`` or ``memory`` column
reads as empty and is named in ``ConversationInfo.damaged``; a damaged usage reads as unknown.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from .conversation import Conversation, Message, steps_from_json
from .errors import InvalidInput
from .transfer import check_memory_record

log = logging.getLogger("rolechat.store")


@dataclass(frozen=True)
class ConversationInfo:
    id: int
    title: str
    persona: str | None
    system: str | None
    model: str | None
    params: dict[str, Any]
    created_at: str
    updated_at: str
    turns: int = 0
    #: Who the conversation belongs to (the server's hashed API key); None: nobody in particular.
    owner: str | None = None
    #: The window's memory (``mode``, ``summary``, ``covers``, ``pins``; see rolechat.memory).
    memory: dict[str, Any] = field(default_factory=dict)
    #: Fields whose stored value is damaged (read as empty): ``{"params": "not valid JSON"}``.
    damaged: dict[str, str] = field(default_factory=dict)
    #: Goes up by one with every write to the conversation (see rolechat.store_turns).
    version: int = 0


@dataclass(frozen=True)
class StoredMessage:
    id: int
    seq: int
    role: str
    content: str
    status: str
    tokens: int | None
    usage: dict[str, Any] | None
    #: A reply's tool calls and their results before it (see rolechat.conversation).
    steps: tuple[Message, ...] = ()


@dataclass(frozen=True)
class Dropped:
    """The turn an undo removed (its two messages as they were) and the version after it."""

    user: StoredMessage
    reply: StoredMessage
    version: int


@dataclass(frozen=True)
class Loaded:
    """A conversation as one reader saw it: its record, its completed turns, each turn's name
    (its reply's id) and its version (read first: the turns are at least that new)."""

    info: ConversationInfo
    conversation: Conversation
    turn_ids: list[int]
    version: int


def stored_message(row: sqlite3.Row, *, interrupted: bool = False) -> StoredMessage:
    return StoredMessage(row["id"], row["seq"], row["role"], row["content"],
                         "interrupted" if interrupted else row["status"], row["tokens"],
                         _usage(row["usage"]), _steps(row["steps"]))


def conversation_info(row: sqlite3.Row) -> ConversationInfo:
    damaged: dict[str, str] = {}
    params = _object(row["params"], "params", damaged)
    memory = _object(row["memory"], "memory", damaged)
    if "memory" not in damaged:
        try:
            check_memory_record(memory, None)
        except InvalidInput as exc:
            damaged["memory"], memory = f"is not a memory record ({exc.message})", {}
    return ConversationInfo(row["id"], row["title"], row["persona"], row["system"], row["model"],
                            params, row["created_at"], row["updated_at"], row["turns"],
                            row["owner"], memory, damaged, row["version"])


def _object(text: Any, name: str, damaged: dict[str, str]) -> dict[str, Any]:
    """A JSON object column; a damaged one reads as empty and is named in ``damaged``."""
    try:
        value = json.loads(text or "{}")
    except (ValueError, TypeError, RecursionError):
        damaged[name] = f"is not valid JSON ({str(text)[:40]!r})"
        return {}
    if not isinstance(value, dict):
        damaged[name] = f"is not a JSON object ({str(text)[:40]!r})"
        return {}
    return value


def _steps(text: str | None) -> tuple[Message, ...]:
    """A reply's tool steps; damaged, the reply reads as one without them (logged)."""
    try:
        return steps_from_json(text)
    except (InvalidInput, RecursionError) as exc:
        log.warning("a reply's stored tool calls are damaged (%s); read without them", exc)
        return ()


def _usage(text: str | None) -> dict[str, Any] | None:
    """A message's usage; damaged, it reads as unknown (None)."""
    try:
        value = json.loads(text) if text else None
    except (ValueError, TypeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
