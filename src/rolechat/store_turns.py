"""A turn's life in the store's SQL, and each conversation's version: what
:class:`rolechat.store.Store` runs inside its transactions (it opens them; these functions
only read and write on the connection they are given).

Contract:
- Every write that changes a conversation (a message begun, completed, interrupted or
  continued, a turn undone or put back, its title, persona, system prompt, parameters or
  memory) adds one to its ``version`` in the same transaction (:func:`bump`) and returns the
  new version: a writer that knows the version it saw can tell its own write from another
  writer's (then the version moved by more than one). Marking a dead process's pending message
  interrupted changes no turn and leaves the version alone.
- A turn is named by its reply's message id. Ids are never reused (the table is
  ``AUTOINCREMENT``) and a continuation gives the reply a new id, so a name always means the
  text its author saw.
- A turn is a complete user message directly followed (in ``seq`` order) by a complete reply.
  Its tool calls and their results, if any, are kept on the reply's row (``steps``, OpenAI
  messages as JSON): they come and go with the reply, never apart from it.
  It completes *at the end*: when other messages were written after its user message (another
  window's turn or message), the message moves after them before its reply is written, so a
  turn's two messages always stand together, in the order turns completed. An interrupted
  reply's text so far follows its message the same way.
- :func:`check_last` refuses (:class:`~rolechat.errors.ConversationChanged`) an action whose
  named turn is not the last turn, or whose named version is not the stored one.
  :func:`drop_last` deletes exactly the last turn's two messages (never another writer's
  pending message, nor interrupted ones) and forgets the pins and summary marks of the turn it
  removes; :func:`put_back` writes a removed turn back at the end with its own ids.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from itertools import pairwise
from types import EllipsisType
from typing import Any, NamedTuple

from .conversation import steps_to_json
from .errors import ConversationChanged, InvalidInput

#: The migration that gives messages ids that are never reused and conversations a version.
VERSION_MIGRATION = """
    CREATE TABLE messages_v5 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        seq             INTEGER NOT NULL,
        role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content         TEXT NOT NULL,
        status          TEXT NOT NULL DEFAULT 'complete'
                        CHECK (status IN ('pending', 'complete', 'interrupted')),
        tokens          INTEGER,
        usage           TEXT,
        created_at      TEXT NOT NULL,
        writer          TEXT,
        UNIQUE (conversation_id, seq)
    );
    INSERT INTO messages_v5 (id, conversation_id, seq, role, content, status, tokens, usage,
                             created_at, writer)
        SELECT id, conversation_id, seq, role, content, status, tokens, usage, created_at,
               writer FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v5 RENAME TO messages;
    CREATE INDEX messages_by_conversation ON messages (conversation_id, seq);
    CREATE INDEX messages_pending ON messages (status) WHERE status = 'pending';
    ALTER TABLE conversations ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
"""


class Written(NamedTuple):
    """A write's message id (a user message begun, a reply written) and the conversation's
    version after it."""

    id: int
    version: int


def bump(db: sqlite3.Connection, cid: int) -> int:
    """Add one to conversation ``cid``'s version; the new version."""
    row = db.execute("UPDATE conversations SET version = version + 1 WHERE id = ? "
                     "RETURNING version", (cid,)).fetchone()
    return int(row[0]) if row is not None else 0


def version_of(db: sqlite3.Connection, cid: int) -> int | None:
    row = db.execute("SELECT version FROM conversations WHERE id = ?", (cid,)).fetchone()
    return int(row[0]) if row is not None else None


def next_seq(db: sqlite3.Connection, cid: int) -> int:
    row = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages "
                     "WHERE conversation_id = ?", (cid,)).fetchone()
    return int(row[0])


def _row_kind(row: Any) -> tuple[str, str]:
    return row["role"], row["status"]


def turn_pairs(messages: Sequence[Any], kind: Callable[[Any], tuple[str, str]] = _row_kind
               ) -> list[tuple[Any, Any]]:
    """The turns among messages in ``seq`` order (rows, or anything ``kind`` reads a role and
    a status from): each complete user message directly followed by a complete reply."""
    return [(user, reply) for user, reply in pairwise(messages)
            if kind(user) == ("user", "complete") and kind(reply) == ("assistant", "complete")]


def last_turn(db: sqlite3.Connection, cid: int) -> tuple[sqlite3.Row, sqlite3.Row] | None:
    """The conversation's last turn (its user message and its reply), or None."""
    pairs = turn_pairs(db.execute("SELECT * FROM messages WHERE conversation_id = ? "
                                  "AND branch_id IS NULL ORDER BY seq", (cid,)).fetchall())
    return pairs[-1] if pairs else None


#: A turn: its reply's id; None: no turn (the conversation has none); ``...``: whichever is last.
TurnName = int | None | EllipsisType


def check_last(db: sqlite3.Connection, cid: int, turn: TurnName,
               version: int | None) -> tuple[sqlite3.Row, sqlite3.Row] | None:
    """The last turn, if it is the one ``turn`` names and the version is ``version`` (None:
    any); else ConversationChanged."""
    last = last_turn(db, cid)
    last_id = int(last[1]["id"]) if last is not None else None
    named = None if turn is ... else turn
    current = version_of(db, cid)
    if version is not None and version != current:
        raise ConversationChanged(cid, turn=named, last=last_id, version=version,
                                  current=current)
    if turn is not ... and turn != last_id:
        raise ConversationChanged(cid, turn=named, last=last_id)
    return last


def move_to_end(db: sqlite3.Connection, cid: int, message_id: int) -> None:
    """Put message ``message_id`` after every other message of the conversation (when any was
    written after it)."""
    row = db.execute("SELECT seq FROM messages WHERE id = ? AND conversation_id = ?",
                     (message_id, cid)).fetchone()
    top = next_seq(db, cid)
    if row is not None and row["seq"] != top - 1:
        db.execute("UPDATE messages SET seq = ? WHERE id = ?", (top, message_id))


def begin(db: sqlite3.Connection, cid: int, text: str, tokens: int | None, now: str,
          writer: str) -> Written:
    cursor = db.execute(
        "INSERT INTO messages (conversation_id, seq, role, content, status, tokens,"
        " created_at, writer) VALUES (?, ?, 'user', ?, 'pending', ?, ?, ?)",
        (cid, next_seq(db, cid), text, tokens, now, writer))
    return Written(int(cursor.lastrowid or 0), bump(db, cid))


def complete(db: sqlite3.Connection, cid: int, user_id: int, reply: str, tokens: int,
             usage: dict[str, Any], now: str, *, memory: dict[str, Any] | None,
             seen: int | None, steps: str | None = None) -> Written:
    """The reply after its message (moved to the end first), the message complete, and the
    conversation's ``memory`` when given: only if its version is still ``seen`` (None: any), so
    a writer that missed another's turn never overwrites pins it did not see."""
    if memory is not None and (seen is None or seen == version_of(db, cid)):
        db.execute("UPDATE conversations SET memory = ? WHERE id = ?",
                   (json.dumps(memory, ensure_ascii=False), cid))
    move_to_end(db, cid, user_id)
    db.execute("UPDATE messages SET status = 'complete', partial = NULL WHERE id = ?",
               (user_id,))
    cursor = db.execute(
        "INSERT INTO messages (conversation_id, seq, role, content, status, tokens, usage,"
        " created_at, steps) VALUES (?, ?, 'assistant', ?, 'complete', ?, ?, ?, ?)",
        (cid, next_seq(db, cid), reply, tokens, json.dumps(usage), now, steps))
    db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
    return Written(int(cursor.lastrowid or 0), bump(db, cid))


def extend(db: sqlite3.Connection, cid: int, turn: TurnName, text: str, tokens: int,
           usage: dict[str, Any], now: str) -> Written:
    """Append ``text`` to the last turn's reply (the one ``turn`` names); the reply gets a new
    id."""
    last = check_last(db, cid, turn, None)
    if last is None:
        raise InvalidInput("There is no reply to continue.", "Send a message first.")
    old = last[1]
    usage = {**usage, "continued": True}
    db.execute("DELETE FROM messages WHERE id = ?", (old["id"],))
    cursor = db.execute(
        "INSERT INTO messages (conversation_id, seq, role, content, status, tokens, usage,"
        " created_at, steps) VALUES (?, ?, 'assistant', ?, 'complete', ?, ?, ?, ?)",
        (cid, old["seq"], old["content"] + text, (old["tokens"] or 0) + tokens,
         json.dumps(usage), old["created_at"], old["steps"]))
    db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
    return Written(int(cursor.lastrowid or 0), bump(db, cid))


def interrupt(db: sqlite3.Connection, user_id: int, partial: str | None,
              now: str) -> int | None:
    """Mark a pending message interrupted, its reply's text so far after it (None: the text
    last saved on the message while the reply was written, :func:`save_partial`); the new
    version (None: it was not pending, nothing changed)."""
    row = db.execute("SELECT partial FROM messages WHERE id = ? AND status = 'pending'",
                     (user_id,)).fetchone()
    if row is None:
        return None
    if partial is None:
        partial = row["partial"] or ""
    db.execute("UPDATE messages SET status = 'interrupted', partial = NULL WHERE id = ?",
               (user_id,))
    cid = int(db.execute("SELECT conversation_id FROM messages WHERE id = ?",
                         (user_id,)).fetchone()[0])
    if partial:
        move_to_end(db, cid, user_id)
        db.execute(
            "INSERT INTO messages (conversation_id, seq, role, content, status,"
            " created_at) VALUES (?, ?, 'assistant', ?, 'interrupted', ?)",
            (cid, next_seq(db, cid), partial, now))
    return bump(db, cid)


def revive(db: sqlite3.Connection, cid: int, reply_id: int) -> int | None:
    """A stopped reply (interrupted, the last message shown, after its interrupted message)
    becomes a complete turn, its text as it stopped, so that it can be continued; the new
    version (None: ``reply_id`` is not such a reply)."""
    rows = db.execute("SELECT id, role, status FROM messages WHERE conversation_id = ? AND "
                      "branch_id IS NULL ORDER BY seq DESC LIMIT 2", (cid,)).fetchall()
    if len(rows) != 2 or rows[0]["id"] != reply_id \
            or (rows[0]["role"], rows[0]["status"]) != ("assistant", "interrupted") \
            or (rows[1]["role"], rows[1]["status"]) != ("user", "interrupted"):
        return None
    db.execute("UPDATE messages SET status = 'complete' WHERE id IN (?, ?)",
               (rows[0]["id"], rows[1]["id"]))
    return bump(db, cid)


def save_partial(db: sqlite3.Connection, user_id: int, text: str) -> bool:
    """Keep a pending message's reply text so far on its row (what a crash leaves: the next
    start puts it after the message, interrupted); not a change anybody sees, so the version
    stays. False if the message is no longer pending."""
    return bool(db.execute("UPDATE messages SET partial = ? WHERE id = ? AND status = "
                           "'pending'", (text, user_id)).rowcount)


def drop_last(db: sqlite3.Connection, cid: int, turn: TurnName,
              version: int | None) -> tuple[sqlite3.Row, sqlite3.Row, int] | None:
    """Delete the last turn (the one ``turn`` names, at version ``version`` if given): its two
    rows as they were and the new version; None if there is none."""
    last = check_last(db, cid, turn, version)
    if last is None:
        return None
    user, reply = last
    db.execute("DELETE FROM messages WHERE id IN (?, ?)", (user["id"], reply["id"]))
    left = len(turn_pairs(db.execute("SELECT role, status FROM messages WHERE "
                                     "conversation_id = ? AND branch_id IS NULL ORDER BY seq",
                                     (cid,)).fetchall()))
    _forget_from(db, cid, left)
    return user, reply, bump(db, cid)


def _forget_from(db: sqlite3.Connection, cid: int, turns: int) -> None:
    """Turns from ``turns`` on are gone: out of the stored pins and the summary's list (a
    damaged memory record is left as it is)."""
    row = db.execute("SELECT memory FROM conversations WHERE id = ?", (cid,)).fetchone()
    try:
        memory = json.loads(row["memory"] or "{}")
        kept = {**memory, "pins": [p for p in memory.get("pins", []) if p < turns],
                "covers": min(memory.get("covers", 0), turns)}
        if "summarized" in memory:
            kept["summarized"] = [t for t in memory["summarized"] if t < turns]
    except (ValueError, TypeError, AttributeError, RecursionError):
        return
    if kept == {"pins": [], "covers": 0, **memory}:
        return
    db.execute("UPDATE conversations SET memory = ? WHERE id = ?",
               (json.dumps(kept, ensure_ascii=False), cid))


def put_back(db: sqlite3.Connection, cid: int, user: Any, reply: Any, now: str) -> int:
    """Write a removed turn back at the end, with its own ids; the new version."""
    seq = next_seq(db, cid)
    for offset, (message, role) in enumerate(((user, "user"), (reply, "assistant"))):
        db.execute(
            "INSERT INTO messages (id, conversation_id, seq, role, content, status, tokens, "
            "usage, created_at, steps) VALUES (?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?)",
            (message.id, cid, seq + offset, role, message.content, message.tokens,
             json.dumps(message.usage) if message.usage is not None else None, now,
             steps_to_json(message.steps)))
    db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
    return bump(db, cid)
