"""The conversation store: SQLite in the rolechat home folder.

Contract:
- One database file (``<home>/rolechat.db``), WAL journal, foreign keys on, a busy timeout so a
  second process waits instead of failing. The schema is versioned with ``PRAGMA user_version``
  and brought up to date by :data:`MIGRATIONS`, in order, each in one transaction.
- Conversations hold id, title, persona, system prompt, model, parameters and times; messages
  hold their order, role, content, status, token count and the reply's usage and timings.
- A user message is written (``pending``, with the writing process's id and start time)
  *before* generation; the reply is written and the user message marked ``complete`` in one
  transaction *when the reply completes*; an interrupted reply marks its user message
  ``interrupted``. Opening the store marks ``interrupted`` the pending messages of processes
  that no longer run (killed mid-reply); another live process's pending turn is left alone.
- Reads take the same lock as writes, so a thread never reads inside another thread's open
  transaction on the shared connection. Only complete turns are ever loaded back into a
  :class:`~rolechat.conversation.Conversation`, so nothing half-done reaches the model.
- A conversation's KV snapshot files live beside the database (``kv/``, see
  :mod:`rolechat.engines.snapshots`); deleting the conversation deletes them.
- Errors (unknown id, unreadable or locked database, corrupt import) raise
  :class:`~rolechat.errors.StoreError` / :class:`~rolechat.errors.InvalidInput` with what to do.
- Pure persistence: a conversation and its live chat are kept together by
  :class:`~rolechat.saved.SavedChat`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from types import EllipsisType
from typing import Any

from .conversation import Conversation, check_text
from .engines.snapshots import delete_conversation_files
from .errors import InvalidInput, StoreError
from .params import GenerationParams
from .persona import get_persona

#: Schema migrations; migration i brings ``user_version`` from i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (
        id         INTEGER PRIMARY KEY,
        title      TEXT NOT NULL DEFAULT '',
        persona    TEXT,
        system     TEXT,
        model      TEXT,
        params     TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        seq             INTEGER NOT NULL,
        role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content         TEXT NOT NULL,
        status          TEXT NOT NULL DEFAULT 'complete'
                        CHECK (status IN ('pending', 'complete', 'interrupted')),
        tokens          INTEGER,
        usage           TEXT,
        created_at      TEXT NOT NULL,
        UNIQUE (conversation_id, seq)
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, seq);
    """,
    # 2: conversations belong to an owner (the server's API key, hashed); NULL: no owner.
    """
    ALTER TABLE conversations ADD COLUMN owner TEXT;
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at);
    """,
    # 3: a pending message names the process generating its reply ("pid:start time"), so a
    #    store opened later can tell a live process's turn from a dead one's.
    """
    ALTER TABLE messages ADD COLUMN writer TEXT;
    CREATE INDEX messages_pending ON messages (status) WHERE status = 'pending';
    """,
    # 4: what the window keeps of dropped turns (rolechat.memory): mode, summary, pins.
    """
    ALTER TABLE conversations ADD COLUMN memory TEXT NOT NULL DEFAULT '{}';
    """,
)


def process_id(pid: int | None = None) -> str:
    """A process's identity that survives pid reuse: ``"pid:start time"``."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return f"{pid}:{psutil.Process(pid).create_time():.2f}"


def process_alive(writer: str | None) -> bool:
    """Whether the process a pending message names still runs."""
    if not writer:
        return False
    try:
        pid = int(writer.split(":", 1)[0])
        return process_id(pid) == writer
    except (ValueError, OSError, LookupError):
        return False
    except Exception:  # psutil.NoSuchProcess / AccessDenied
        return False


#: How long SQLite waits for a lock in one try, and how long a write tries in all (seconds).
BUSY_STEP_S = 0.25
LOCK_TIMEOUT_S = 30.0


def _now() -> str:
    # Microseconds: ``recent``/``latest`` order by this, and two writes often share a second.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


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


@dataclass(frozen=True)
class StoredMessage:
    id: int
    seq: int
    role: str
    content: str
    status: str
    tokens: int | None
    usage: dict[str, Any] | None


class Store:
    """Conversations in one SQLite file. Safe to open from several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One connection shared by threads (the server's worker and handlers): one transaction
        # at a time.
        self._lock = threading.RLock()
        #: How long a write waits for another process's lock before it gives up (seconds).
        self.lock_timeout = LOCK_TIMEOUT_S
        #: Called once when a write starts waiting for another process's lock (the CLI shows
        #: a line, so that a wait is never silent).
        self.on_wait: Callable[[str], None] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_STEP_S * 1000)}")
            if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode = DELETE")
            self._migrate()
            self._writer = process_id()
            #: Turns saved from recovery files, and dead processes' turns marked interrupted.
            self.restored = self._restore_kept_turns()
            self.recovered = self._recover()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(str(self.path), str(exc)) from None

    @classmethod
    def default(cls) -> Store:
        from .paths import home

        return cls(home() / "rolechat.db")

    def close(self) -> None:
        self._db.close()

    # ----- schema ------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def _read(self, sql: str, args: Any = ()) -> list[sqlite3.Row]:
        """A read, under the same lock as writes: never inside another thread's transaction
        on the shared connection."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(str(self.path), str(exc)) from None

    def _migrate(self) -> None:
        current = self.version
        if current > len(MIGRATIONS):
            raise StoreError(str(self.path), f"schema version {current} is newer than this "
                             f"rolechat knows ({len(MIGRATIONS)})", "Upgrade rolechat.")
        for version in range(current, len(MIGRATIONS)):
            try:  # one transaction per migration: the schema and its version move together
                self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[version]} "
                                       f"PRAGMA user_version = {version + 1}; COMMIT;")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _recover(self) -> int:
        """Mark ``interrupted`` the pending messages whose process has died (killed in the
        middle of a reply); a live process's pending turn is left alone. How many."""
        dead = [row["id"] for row in self._read(
            "SELECT id, writer FROM messages WHERE status = 'pending'")
            if not process_alive(row["writer"])]
        if dead:
            try:
                with self._transaction() as db:
                    db.executemany("UPDATE messages SET status = 'interrupted' WHERE id = ? "
                                   "AND status = 'pending'", [(i,) for i in dead])
            except StoreError:  # a read-only or busy database: they stay out of prompts anyway
                return 0
        return len(dead)

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting (with one notice) while another process holds the lock, up
        to ``lock_timeout``."""
        deadline = time.monotonic() + self.lock_timeout
        told = False
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
                if not told and self.on_wait is not None:
                    told = True
                    self.on_wait(f"waiting for the conversation store {self.path} (another "
                                 f"process holds it locked; up to {self.lock_timeout:.0f} s)…")
                time.sleep(BUSY_STEP_S / 2)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._begin()
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(str(self.path), str(exc)) from None

    # ----- turns that could not be written -------------------------------------------------
    @property
    def recovery_dir(self) -> Path:
        """Where turns wait that could not be written (``recovery/`` beside the database)."""
        return self.path.parent / "recovery"

    def keep_for_later(self, cid: int, user_id: int | None, user: str, reply: str,
                       tokens: int, usage: dict[str, Any]) -> Path:
        """Write a finished turn the database refused (locked) to a recovery file, which the
        next :class:`Store` opened on this database saves; returns the file."""
        folder = self.recovery_dir
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"turn-{time.time_ns()}-{os.getpid()}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps({
            "conversation_id": cid, "user_id": user_id, "user": user, "reply": reply,
            "tokens": tokens, "usage": usage}, ensure_ascii=False), encoding="utf-8")
        os.replace(temporary, target)
        return target

    def _restore_kept_turns(self) -> int:
        """Save the turns :meth:`keep_for_later` kept: complete the pending message they
        answer, or append them; files are removed once saved. How many."""
        if not self.recovery_dir.is_dir():
            return 0
        saved = 0
        for path in sorted(self.recovery_dir.glob("turn-*.json")):
            try:
                kept = json.loads(path.read_text(encoding="utf-8"))
                cid = int(kept["conversation_id"])
                rows = self._read("SELECT status FROM messages WHERE id = ? AND "
                                  "conversation_id = ?", (kept.get("user_id"), cid))
                if rows and rows[0]["status"] in ("pending", "interrupted"):
                    user_id = int(kept["user_id"])
                else:
                    user_id = self.begin_turn(cid, kept["user"])
                self.complete_turn(cid, user_id, kept["reply"], int(kept["tokens"]),
                                   kept["usage"])
            except StoreError as exc:
                if exc.missing:  # the conversation is gone: nothing to save it to
                    path.unlink(missing_ok=True)
                continue  # still locked or read-only: the next open tries again
            except (OSError, ValueError, KeyError, TypeError):
                continue
            path.unlink(missing_ok=True)
            saved += 1
        return saved

    # ----- conversations -----------------------------------------------------------------
    def create(self, *, persona: str | None = None, system: str | None = None,
               model: str | None = None, params: dict[str, Any] | None = None,
               title: str = "", owner: str | None = None) -> int:
        check_text(title, "title", allow_blank=True)
        now = _now()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, persona, system, model, params, created_at,"
                " updated_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (title, persona, system, model, json.dumps(params or {}), now, now, owner))
        return int(cursor.lastrowid or 0)

    def info(self, cid: int, *, owner: str | EllipsisType | None = ...) -> ConversationInfo:
        """Conversation ``cid``; with ``owner`` given, only if it belongs to that owner (a
        conversation of another owner is reported missing, like one that does not exist)."""
        where, args = "c.id = ?", list[Any]([cid])
        if owner is not ...:
            where, args = "c.id = ? AND c.owner IS ?", [cid, owner]
        if not 0 <= cid < 2**63:  # SQLite's integer range: no such conversation
            raise StoreError(str(self.path), f"there is no conversation {cid}",
                             "See `rolechat conversations list`.", missing=True)
        rows = self._read(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND "
            "m.role = 'assistant' AND m.status = 'complete') AS turns FROM conversations c "
            f"WHERE {where}", args)
        row = rows[0] if rows else None
        if row is None:
            raise StoreError(str(self.path), f"there is no conversation {cid}",
                             "See `rolechat conversations list`.", missing=True)
        return _info(row)

    def recent(self, limit: int = 50, *,
               owner: str | EllipsisType | None = ...) -> list[ConversationInfo]:
        """The newest conversations first; with ``owner`` given, only that owner's."""
        where, args = "", list[Any]([limit])
        if owner is not ...:
            where, args = "WHERE c.owner IS ? ", [owner, limit]
        rows = self._read(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND "
            "m.role = 'assistant' AND m.status = 'complete') AS turns FROM conversations c "
            f"{where}"
            "ORDER BY c.updated_at DESC, c.id DESC LIMIT ?", args)
        return [_info(row) for row in rows]

    def latest(self) -> int | None:
        rows = self._read("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC "
                          "LIMIT 1")
        return int(rows[0][0]) if rows else None

    def update(self, cid: int, **fields: Any) -> None:
        """Change title, persona, system, model, params or memory."""
        allowed = {"title", "persona", "system", "model", "params", "memory"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInput(f"Unknown conversation fields {sorted(unknown)}.",
                               f"Use {sorted(allowed)}.")
        self.info(cid)
        for name in ("title", "system"):
            if fields.get(name) is not None:
                check_text(fields[name], name, allow_blank=True)
        for name in ("params", "memory"):
            if name in fields:
                fields[name] = json.dumps(fields[name] or {}, ensure_ascii=False)
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction() as db:
            db.execute(f"UPDATE conversations SET {sets}, updated_at = ? WHERE id = ?",
                       (*fields.values(), _now(), cid))

    def delete(self, cid: int) -> None:
        """Delete conversation ``cid``, its messages and its KV snapshot files."""
        self.info(cid)
        with self._transaction() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
        delete_conversation_files(self.kv_root, cid)

    @property
    def kv_root(self) -> Path:
        """Where the conversations' KV snapshots live: ``kv/`` beside the database."""
        return self.path.parent / "kv"

    # ----- messages ----------------------------------------------------------------------
    def messages(self, cid: int) -> list[StoredMessage]:
        self.info(cid)
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (cid,))
        return [StoredMessage(r["id"], r["seq"], r["role"], r["content"], r["status"],
                              r["tokens"], json.loads(r["usage"]) if r["usage"] else None)
                for r in rows]

    def conversation(self, cid: int) -> Conversation:
        """The completed turns only: a pending or interrupted message never comes back."""
        info = self.info(cid)
        stored = self.messages(cid)
        turns = []
        for user, reply in pairwise(stored):
            if (user.role, reply.role) == ("user", "assistant") and user.status == "complete":
                turns.append((user.content, reply.content))
        return Conversation.from_tuples(turns, system=info.system)

    def _next_seq(self, db: sqlite3.Connection, cid: int) -> int:
        row = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages "
                         "WHERE conversation_id = ?", (cid,)).fetchone()
        return int(row[0])

    def begin_turn(self, cid: int, text: str, tokens: int | None = None) -> int:
        """Save the user's message before generating; returns its id."""
        self.info(cid)
        now = _now()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, status, tokens,"
                " created_at, writer) VALUES (?, ?, 'user', ?, 'pending', ?, ?, ?)",
                (cid, self._next_seq(db, cid), text, tokens, now, self._writer))
            db.execute("UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' "
                       "THEN ? ELSE title END WHERE id = ?", (now, _title(text), cid))
        return int(cursor.lastrowid or 0)

    def complete_turn(self, cid: int, user_id: int, reply: str, tokens: int,
                      usage: dict[str, Any], *, memory: dict[str, Any] | None = None) -> None:
        """Save the finished reply and mark its user message complete, atomically (with the
        conversation's new ``memory`` when the turn changed it)."""
        now = _now()
        with self._transaction() as db:
            if memory is not None:
                db.execute("UPDATE conversations SET memory = ? WHERE id = ?",
                           (json.dumps(memory, ensure_ascii=False), cid))
            db.execute("UPDATE messages SET status = 'complete' WHERE id = ?", (user_id,))
            db.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, status, tokens, usage,"
                " created_at) VALUES (?, ?, 'assistant', ?, 'complete', ?, ?, ?)",
                (cid, self._next_seq(db, cid), reply, tokens, json.dumps(usage), now))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))

    def extend_last_reply(self, cid: int, text: str, tokens: int,
                          usage: dict[str, Any]) -> None:
        """Append a continuation to the newest reply (``/continue``): its text, its tokens,
        and the continuation's usage (marked ``continued``)."""
        with self._transaction() as db:
            row = db.execute("SELECT id, usage FROM messages WHERE conversation_id = ? AND "
                             "role = 'assistant' AND status = 'complete' ORDER BY seq DESC "
                             "LIMIT 1", (cid,)).fetchone()
            if row is None:
                raise InvalidInput("There is no reply to continue.", "Send a message first.")
            db.execute("UPDATE messages SET content = content || ?, tokens = COALESCE(tokens, 0)"
                       " + ?, usage = ? WHERE id = ?",
                       (text, tokens, json.dumps({**usage, "continued": True}), row["id"]))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (_now(), cid))

    def interrupt_turn(self, user_id: int, partial: str = "") -> None:
        """The reply did not complete: keep the message, and the reply's text so far
        (``partial``), both marked interrupted and out of every prompt."""
        with self._transaction() as db:
            changed = db.execute("UPDATE messages SET status = 'interrupted' WHERE id = ? AND "
                                 "status = 'pending'", (user_id,)).rowcount
            if partial and changed:
                cid = db.execute("SELECT conversation_id FROM messages WHERE id = ?",
                                 (user_id,)).fetchone()[0]
                db.execute(
                    "INSERT INTO messages (conversation_id, seq, role, content, status,"
                    " created_at) VALUES (?, ?, 'assistant', ?, 'interrupted', ?)",
                    (cid, self._next_seq(db, cid), partial, _now()))

    def drop_last_turn(self, cid: int) -> None:
        """Delete the newest complete turn (and anything after it): ``/undo``."""
        stored = [m for m in self.messages(cid)
                  if m.role == "assistant" and m.status == "complete"]
        if not stored:
            return
        last = stored[-1].seq
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND seq >= ?",
                       (cid, last - 1))

    def import_conversation(self, conversation: Conversation, **fields: Any) -> int:
        cid = self.create(system=conversation.system, **fields)
        for turn in conversation.turns:
            user_id = self.begin_turn(cid, turn.user)
            self.complete_turn(cid, user_id, turn.assistant, 0, {})
        return cid


    def export(self, cid: int, fmt: str) -> str:
        """The conversation as ``json`` (rolechat's own, re-importable) or ``md``."""
        info = self.info(cid)
        conversation = self.conversation(cid)
        if fmt == "json":
            return json.dumps({**conversation.to_dict(), "id": info.id, "title": info.title,
                               "persona": info.persona, "model": info.model,
                               "params": info.params, "memory": info.memory,
                               "created_at": info.created_at},
                              ensure_ascii=False, indent=2)
        if fmt == "md":
            text = conversation.to_markdown(info.title or f"Conversation {info.id}")
            summary, pins = info.memory.get("summary"), info.memory.get("pins") or []
            if summary:
                text += f"\n## Summary of the earlier turns\n\n{summary}\n"
            if pins:
                text += f"\nPinned turns: {', '.join(str(p + 1) for p in pins)}\n"
            return text
        raise InvalidInput(f"Unknown export format {fmt!r}.", "Use md or json.")

    def import_file(self, text: str) -> int:
        """Import an OpenAI message list or rolechat's own JSON; returns the new id."""
        conversation = Conversation.from_json(text)
        if conversation.pending is not None:
            conversation.messages.pop()  # a question without its answer is not a turn
        data = json.loads(text)
        fields: dict[str, Any] = {}
        if isinstance(data, dict):
            fields = {k: data[k] for k in ("title", "persona", "model", "params")
                      if isinstance(data.get(k), (str, dict))}
        # What the file carries must resume later, so it is checked as the CLI would.
        if "params" in fields:
            fields["params"] = GenerationParams.from_mapping(fields["params"]).explicit()
        if "persona" in fields:
            get_persona(fields["persona"])
        cid = self.import_conversation(conversation, **fields)
        memory = data.get("memory") if isinstance(data, dict) else None
        if isinstance(memory, dict) and memory:
            self.update(cid, memory=check_memory_record(memory, len(conversation.turns)))
        return cid


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 60 else line[:59] + "…"


def check_memory_record(memory: dict[str, Any], turns: int) -> dict[str, Any]:
    """A stored or imported memory record, checked: InvalidInput says what is wrong."""
    mode, summary = memory.get("mode", "none"), memory.get("summary")
    covers, pins = memory.get("covers", 0), memory.get("pins", [])
    if mode not in ("none", "summary"):
        raise InvalidInput(f"memory.mode must be none or summary, got {mode!r}.",
                           "Fix the file's memory section.")
    if summary is not None and not isinstance(summary, str):
        raise InvalidInput("memory.summary must be text.", "Fix the file's memory section.")
    if not isinstance(covers, int) or not 0 <= covers <= turns:
        raise InvalidInput(f"memory.covers must be a turn count from 0 to {turns}, got "
                           f"{covers!r}.", "Fix the file's memory section.")
    for name in ("pins", "summarized"):
        value = memory.get(name, [])
        if not isinstance(value, list) or not all(isinstance(p, int) and 0 <= p < turns
                                                  for p in value):
            raise InvalidInput(f"memory.{name} must list turns from 0 to {turns - 1}, got "
                               f"{value!r}.", "Fix the file's memory section.")
    record = {"mode": mode, "summary": summary, "covers": covers, "pins": sorted(set(pins))}
    if "summarized" in memory:
        record["summarized"] = sorted(set(memory["summarized"]))
    return record


def _info(row: sqlite3.Row) -> ConversationInfo:
    return ConversationInfo(row["id"], row["title"], row["persona"], row["system"], row["model"],
                            json.loads(row["params"] or "{}"), row["created_at"],
                            row["updated_at"], row["turns"], row["owner"],
                            json.loads(row["memory"] or "{}"))
