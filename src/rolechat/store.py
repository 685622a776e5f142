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
  that no longer run (killed mid-reply, a zombie not yet reaped, a reused pid), and every read
  of a conversation's messages checks its other writers' pending messages again, so a store
  opened before such a process died never shows its message pending either. Another live
  process's pending turn is left alone.
- ``Store(path, read_only=True)`` (the CLI's list, show and export) opens the file with
  SQLite's ``mode=ro``: no folder is made, no migration, recovery or any other write runs, so
  a read-only file or folder, or a full disk, can still be read (a missing file reads as an
  empty store). Writes on a read-only store or a full disk fail with one line that says so.
- A row whose ``params`` or ``memory`` is damaged (not a JSON object) is still listed, with
  ``ConversationInfo.damaged`` naming the field; :meth:`Store.info` refuses to open it with a
  StoreError that names the conversation and the field and says what to do (export, import
  again, delete). Its messages can still be shown and exported.
- Every write to a conversation adds one to its ``version`` (:meth:`Store.version_of`, one
  indexed read) and returns the new one, so a reader can tell cheaply whether another writer
  changed it. A turn is named by its reply's id (never reused; a continuation gives the reply a
  new id); a turn completes at the end of the conversation, its two messages together, however
  turns of several writers interleave. :meth:`Store.drop_last_turn` and
  :meth:`Store.extend_last_reply` take the turn they act on (and a version) and check it inside
  their transaction: a stale action raises :class:`~rolechat.errors.ConversationChanged` and
  changes nothing. Undo deletes exactly the turn's two messages. (The SQL is in
  :mod:`rolechat.store_turns`, the records in :mod:`rolechat.store_rows`.)
- Reads take the same lock as writes, so a thread never reads inside another thread's open
  transaction on the shared connection. Only complete turns are ever loaded back into a
  :class:`~rolechat.conversation.Conversation`, so nothing half-done reaches the model.
- Imports (:mod:`rolechat.transfer` checks the whole file first) are written in one
  transaction: all of it or, on any failure, nothing.
- :meth:`Store.search`: every message and title that holds a query's terms, with a marked
  snippet, from FTS5 trigram indexes that triggers keep in step (:mod:`rolechat.store_search`).
- The KV snapshot files of its conversations live beside the database (``kv_root``: ``kv/``);
  the store only says where. The engine's KV store owns them (:mod:`rolechat.engines.kvstore`):
  whoever deletes a conversation also tells the engine to forget it, or removes its files
  (``rolechat conversations delete``).
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import EllipsisType
from typing import Any

from . import store_branches as branching
from . import store_search as searching
from . import store_turns as turns
from .conversation import Conversation, Message, check_text, steps_from_json, steps_to_json
from .errors import ConversationChanged, InvalidInput, StoreError
from .store_db import (
    BUSY_STEP_S,
    connect,
    newer_schema,
    open_read_only,
    process_alive,
    process_id,
    store_error,
)
from .store_rows import (
    ConversationInfo,
    Dropped,
    Loaded,
    StoredMessage,
    conversation_info,
    stored_message,
)
from .store_search import SearchHit
from .store_turns import TurnName, Written
from .transfer import (
    ImportPlan,
    check_memory_record,
    export_json,
    export_markdown,
    plan_conversation,
    read_import,
)

__all__ = ["MIGRATIONS", "ConversationInfo", "Dropped", "Loaded", "SearchHit", "Store",
           "StoredMessage", "Written", "check_memory_record", "process_alive", "process_id"]

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
    # 5: message ids are never reused (a turn is named by its reply's id) and every write to
    #    a conversation adds one to its version (rolechat.store_turns).
    turns.VERSION_MIGRATION,
    # 6: a reply's tool calls and their results, kept on its row (OpenAI messages, JSON).
    """
    ALTER TABLE messages ADD COLUMN steps TEXT;
    """,
    # 7: full-text search over messages and titles (FTS5, trigram; rolechat.store_search).
    searching.SEARCH_MIGRATION,
    # 8: a pending message's reply text so far, saved while it is written (what a crash
    #    leaves is put after the message, interrupted, when a store next opens).
    """
    ALTER TABLE messages ADD COLUMN partial TEXT;
    """,
    # 9: branches: the versions an edit or a regeneration left (rolechat.store_branches).
    branching.BRANCH_MIGRATION,
)


#: How long a write tries in all to get another process's lock (seconds).
LOCK_TIMEOUT_S = 30.0


def _now() -> str:
    # Microseconds: ``recent``/``latest`` order by this, and two writes often share a second.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Store:
    """Conversations in one SQLite file. Safe to open from several processes."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        #: Opened with ``mode=ro``: reads only, nothing written, not even recovery.
        self.read_only = read_only
        # One connection shared by threads (the server's worker and handlers): one transaction
        # at a time.
        self._lock = threading.RLock()
        #: How long a write waits for another process's lock before it gives up (seconds).
        self.lock_timeout = LOCK_TIMEOUT_S
        #: Called once when a write starts waiting for another process's lock (the CLI shows
        #: a line, so that a wait is never silent).
        self.on_wait: Callable[[str], None] | None = None
        #: Turns saved from recovery files, and dead processes' turns marked interrupted.
        self.restored = self.recovered = 0
        self._writer = process_id()
        try:
            if read_only:
                self._db = open_read_only(self.path, MIGRATIONS, upgrade=self._upgrade)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect(str(self.path))
            if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode = DELETE")
            self._migrate()
            self.restored = self._restore_kept_turns()
            self.recovered = len(self._recover())
        except (sqlite3.Error, OSError) as exc:
            raise store_error(self.path, exc) from None

    def _upgrade(self) -> None:
        """Bring an older schema up to date with a read-write open (for a read-only one)."""
        Store(self.path).close()

    @classmethod
    def default(cls, *, read_only: bool = False) -> Store:
        from .paths import home

        return cls(home() / "rolechat.db", read_only=read_only)

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
                raise store_error(self.path, exc) from None

    def _migrate(self) -> None:
        current = self.version
        if current > len(MIGRATIONS):
            raise newer_schema(self.path, current, len(MIGRATIONS))
        for version in range(current, len(MIGRATIONS)):
            try:  # one transaction per migration: the schema and its version move together
                self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[version]} "
                                       f"PRAGMA user_version = {version + 1}; COMMIT;")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _recover(self, cid: int | None = None) -> set[int]:
        """The pending messages (of conversation ``cid``, or all) whose process has died
        (killed in the middle of a reply), marked ``interrupted`` where the store can be
        written; a live process's pending turn is left alone. Their ids."""
        where, args = ("AND conversation_id = ?", (cid,)) if cid is not None else ("", ())
        dead = {row["id"] for row in self._read(
            f"SELECT id, writer FROM messages WHERE status = 'pending' {where}", args)
            if row["writer"] != self._writer and not process_alive(row["writer"])}
        if dead and not self.read_only and not self._db.in_transaction:
            try:  # a read does not wait for another process's lock to write this
                with self._transaction(wait=cid is None) as db:
                    for message_id in sorted(dead):  # with the reply text saved so far
                        turns.interrupt(db, message_id, None, _now())
            except StoreError:  # busy: they read interrupted anyway, and stay out of prompts
                pass
        return dead

    def _begin(self, wait: bool = True) -> None:
        """BEGIN IMMEDIATE, waiting (with one notice) while another process holds the lock, up
        to ``lock_timeout`` (not at all without ``wait``)."""
        if self.read_only:
            raise StoreError(str(self.path), "it was opened read-only",
                             "Open it with Store(path) to change it.")
        deadline = time.monotonic() + (self.lock_timeout if wait else 0)
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
    def _transaction(self, wait: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._begin(wait)
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise store_error(self.path, exc) from None

    # ----- turns that could not be written -------------------------------------------------
    @property
    def recovery_dir(self) -> Path:
        """Where turns wait that could not be written (``recovery/`` beside the database)."""
        return self.path.parent / "recovery"

    def keep_for_later(self, cid: int, user_id: int | None, user: str, reply: str,
                       tokens: int, usage: dict[str, Any],
                       steps: Sequence[Message] = ()) -> Path:
        """Write a finished turn the database refused (locked) to a recovery file, which the
        next :class:`Store` opened on this database saves; returns the file."""
        folder = self.recovery_dir
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"turn-{time.time_ns()}-{os.getpid()}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps({
            "conversation_id": cid, "user_id": user_id, "user": user, "reply": reply,
            "tokens": tokens, "usage": usage, "steps": steps_to_json(steps)},
            ensure_ascii=False), encoding="utf-8")
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
                                   kept["usage"], steps=steps_from_json(kept.get("steps")))
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

    def info(self, cid: int, *, owner: str | EllipsisType | None = ...,
             damaged_ok: bool = False) -> ConversationInfo:
        """Conversation ``cid``; with ``owner`` given, only if it belongs to that owner (a
        conversation of another owner is reported missing, like one that does not exist). A
        conversation with a damaged field is refused (a StoreError that says what to do)
        unless ``damaged_ok``: then it comes with the field read as empty."""
        where, args = "c.id = ?", list[Any]([cid])
        if owner is not ...:
            where, args = "c.id = ? AND c.owner IS ?", [cid, owner]
        if not 0 <= cid < 2**63:  # SQLite's integer range: no such conversation
            raise StoreError(str(self.path), f"there is no conversation {cid}",
                             "See `rolechat conversations list`.", missing=True)
        rows = self._read(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND "
            "m.role = 'assistant' AND m.status = 'complete' AND m.branch_id IS NULL) AS turns "
            "FROM conversations c "
            f"WHERE {where}", args)
        row = rows[0] if rows else None
        if row is None:
            raise StoreError(str(self.path), f"there is no conversation {cid}",
                             "See `rolechat conversations list`.", missing=True)
        info = conversation_info(row)
        if info.damaged and not damaged_ok:
            name, why = next(iter(info.damaged.items()))
            raise StoreError(
                str(self.path), f"conversation {cid} is damaged: its {name} field {why}",
                f"Export what it holds with `rolechat conversations export {cid} -o copy.json`"
                f" (the damaged {name} is left out) and import that file, or delete it with "
                f"`rolechat conversations delete {cid}`.")
        return info

    def recent(self, limit: int = 50, *,
               owner: str | EllipsisType | None = ...) -> list[ConversationInfo]:
        """The newest conversations first; with ``owner`` given, only that owner's."""
        where, args = "", list[Any]([limit])
        if owner is not ...:
            where, args = "WHERE c.owner IS ? ", [owner, limit]
        rows = self._read(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND "
            "m.role = 'assistant' AND m.status = 'complete' AND m.branch_id IS NULL) AS turns "
            "FROM conversations c "
            f"{where}"
            "ORDER BY c.updated_at DESC, c.id DESC LIMIT ?", args)
        return [conversation_info(row) for row in rows]

    def search(self, q: str, *, owner: str | EllipsisType | None = ..., limit: int = 20,
               per_conversation: int = 3) -> list[SearchHit]:
        """The messages and titles that hold every term of ``q``, each with a snippet (see
        :mod:`rolechat.store_search`); with ``owner`` given, only that owner's."""
        with self._lock:
            try:
                return searching.find(self._db, q, owner=owner, limit=limit,
                                      per_conversation=per_conversation)
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from None

    def latest(self) -> int | None:
        rows = self._read("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC "
                          "LIMIT 1")
        return int(rows[0][0]) if rows else None

    def update(self, cid: int, **fields: Any) -> int:
        """Change title, persona, system, model, params or memory; the new version."""
        allowed = {"title", "persona", "system", "model", "params", "memory"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInput(f"Unknown conversation fields {sorted(unknown)}.",
                               f"Use {sorted(allowed)}.")
        self.info(cid, damaged_ok=True)  # a damaged field can be written again
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
            return turns.bump(db, cid)

    def delete(self, cid: int) -> None:
        """Delete conversation ``cid`` and its messages (its KV snapshot files are the KV
        store's: see the module's contract)."""
        self.info(cid, damaged_ok=True)
        with self._transaction() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (cid,))

    @property
    def kv_root(self) -> Path:
        """Where the conversations' KV snapshots live: ``kv/`` beside the database."""
        return self.path.parent / "kv"

    # ----- messages ----------------------------------------------------------------------
    def messages(self, cid: int) -> list[StoredMessage]:
        """Every message, in order. A pending message whose process has died reads (and is
        marked, where the store can be written) ``interrupted``."""
        self.info(cid, damaged_ok=True)
        dead = self._recover(cid)
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? AND branch_id IS NULL "
                          "ORDER BY seq", (cid,))
        return [stored_message(r, interrupted=r["id"] in dead) for r in rows]

    def conversation(self, cid: int) -> Conversation:
        """The completed turns only: a pending or interrupted message never comes back."""
        return self.load(cid).conversation

    def load(self, cid: int) -> Loaded:
        """The conversation's record, completed turns, turn names and version."""
        info = self.info(cid)
        pairs = turns.turn_pairs(self.messages(cid), lambda m: (m.role, m.status))
        conversation = Conversation(info.system, [
            m for u, r in pairs for m in (Message("user", u.content), *r.steps,
                                          Message("assistant", r.content))])
        return Loaded(info, conversation, [r.id for _, r in pairs], info.version)

    def version_of(self, cid: int) -> int:
        """Conversation ``cid``'s version (one indexed read): it changes with every write."""
        rows = self._read("SELECT version FROM conversations WHERE id = ?", (cid,))
        if not rows:
            raise StoreError(str(self.path), f"there is no conversation {cid}",
                             "See `rolechat conversations list`.", missing=True)
        return int(rows[0][0])

    def check_last_turn(self, cid: int, turn: TurnName, version: int | None = None) -> None:
        """Raise ConversationChanged unless ``turn`` is the last turn (None: there is none) and,
        with ``version``, the version is that one."""
        with self._lock:
            try:
                turns.check_last(self._db, cid, turn, version)
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from None

    def begin_turn(self, cid: int, text: str, tokens: int | None = None) -> int:
        """Save the user's message before generating; returns its id."""
        return self.start_turn(cid, text, tokens).id

    def start_turn(self, cid: int, text: str, tokens: int | None = None) -> Written:
        """:meth:`begin_turn`, with the conversation's version after it."""
        self.info(cid)
        now = _now()
        with self._transaction() as db:
            written = turns.begin(db, cid, text, tokens, now, self._writer)
            db.execute("UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' "
                       "THEN ? ELSE title END WHERE id = ?", (now, _title(text), cid))
        return written

    def complete_turn(self, cid: int, user_id: int, reply: str, tokens: int,
                      usage: dict[str, Any], *, memory: dict[str, Any] | None = None,
                      seen: int | None = None, steps: Sequence[Message] = ()) -> Written:
        """Save the finished reply (and the tool calls and results before it, ``steps``) and
        mark its user message complete, atomically, the turn at the end of the conversation
        (with its new ``memory`` when the turn changed it, and, with ``seen``, only if the
        version is still that one). The reply's id and the new version."""
        with self._transaction() as db:
            return turns.complete(db, cid, user_id, reply, tokens, usage, _now(),
                                  memory=memory, seen=seen, steps=steps_to_json(steps))

    def extend_last_reply(self, cid: int, text: str, tokens: int, usage: dict[str, Any], *,
                          turn: TurnName = ...) -> Written:
        """Append a continuation to the newest reply (``/continue``): its text, its tokens,
        and the continuation's usage (marked ``continued``). With ``turn``, only if that is
        still the last turn (else ConversationChanged). The reply gets a new id: returned, with
        the new version."""
        with self._transaction() as db:
            return turns.extend(db, cid, turn, text, tokens, usage, _now())

    def interrupt_turn(self, user_id: int, partial: str | None = "") -> int | None:
        """The reply did not complete: keep the message, and the reply's text so far
        (``partial``; None: the text last saved with :meth:`save_partial`), both marked
        interrupted and out of every prompt. The new version (None: the message was not
        pending)."""
        with self._transaction() as db:
            return turns.interrupt(db, user_id, partial, _now())

    # ----- branches (rolechat.store_branches) ----------------------------------------------
    def fork(self, cid: int, message_id: int, *, version: int | None = None,
             role: str | None = None) -> int:
        """Keep active message ``message_id`` and what follows it as a branch, so that the
        conversation goes on from the message before it (an edit, a regeneration); the new
        version. With ``version``, only at that version (else ConversationChanged); a message
        the conversation does not show (or not a ``role`` one, if given) is an
        InvalidInput."""
        self.info(cid, damaged_ok=True)
        with self._transaction() as db:
            self._at_version(db, cid, version)
            try:
                return branching.fork(db, cid, message_id, _now(), role)[1]
            except branching.NoSuchBranch as exc:
                raise InvalidInput(f"Cannot branch there: {exc}.",
                                   "Name a message the conversation shows (its id).") from None

    def switch_branch(self, cid: int, branch: int, *, version: int | None = None) -> int:
        """Show branch ``branch`` (what it replaces becomes a branch); the new version."""
        self.info(cid, damaged_ok=True)
        with self._transaction() as db:
            self._at_version(db, cid, version)
            try:
                return branching.switch(db, cid, branch, _now())
            except branching.NoSuchBranch as exc:
                raise InvalidInput(f"Cannot switch: {exc}.",
                                   "Switch to a branch GET /v1/conversations/{id} lists under "
                                   "a message's versions.") from None

    def versions(self, cid: int) -> dict[int, dict[str, Any]]:
        """The active messages where other versions diverge, with their place among them."""
        with self._lock:
            try:
                return branching.versions(self._db, cid)
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from None

    def branch_tree(self, cid: int) -> list[tuple[int, int | None, list[StoredMessage]]]:
        """Every branch: its id, the message it goes on from, its messages (for exports)."""
        with self._lock:
            try:
                found = branching.tree(self._db, cid)
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from None
        return [(bid, after, [stored_message(r) for r in rows]) for bid, after, rows in found]

    def _at_version(self, db: sqlite3.Connection, cid: int, version: int | None) -> None:
        current = turns.version_of(db, cid)
        if version is not None and current != version:
            raise ConversationChanged(cid, version=version, current=current)

    def revive_stopped(self, cid: int, reply_id: int) -> int | None:
        """Make a stopped reply (the last message, interrupted after its interrupted message)
        a complete turn as it stopped, to continue it; the new version (None: it is not)."""
        with self._transaction() as db:
            return turns.revive(db, cid, reply_id)

    def save_partial(self, user_id: int, text: str) -> bool:
        """Keep the reply text so far of pending message ``user_id`` (a server does, every few
        seconds), so that a crash loses at most those seconds: the next open puts it after the
        message, both interrupted. No version change; never waits for another process's lock
        (False then, or when the message is no longer pending)."""
        try:
            with self._transaction(wait=False) as db:
                return turns.save_partial(db, user_id, text)
        except StoreError:
            return False

    def drop_last_turn(self, cid: int, turn: TurnName = ..., *,
                       version: int | None = None) -> Dropped | None:
        """Delete the newest complete turn's two messages (``/undo``): with ``turn``, only if
        it is still that one, and with ``version`` only at that version (checked in the same
        transaction; else ConversationChanged and nothing is deleted). What was removed, or
        None if there is no turn."""
        self.info(cid, damaged_ok=True)
        self._recover(cid)
        with self._transaction() as db:
            dropped = turns.drop_last(db, cid, turn, version)
        if dropped is None:
            return None
        user, reply, version = dropped
        return Dropped(stored_message(user), stored_message(reply), version)

    def put_back_turn(self, cid: int, user: StoredMessage, reply: StoredMessage) -> int:
        """Write a turn :meth:`drop_last_turn` removed back at the end, with its own ids (a
        retry that did not complete); the new version."""
        with self._transaction() as db:
            return turns.put_back(db, cid, user, reply, _now())

    # ----- files -------------------------------------------------------------------------
    def import_file(self, text: str) -> int:
        """Import an OpenAI message list or rolechat's own JSON (checked in full first, see
        :func:`rolechat.transfer.read_import`); returns the new id."""
        return self.write_import(read_import(text))

    def import_conversation(self, conversation: Conversation, *, owner: str | None = None,
                            **fields: Any) -> int:
        """Store ``conversation`` (title, persona, model, params in ``fields``); its id."""
        return self.write_import(plan_conversation(conversation, **fields), owner=owner)

    def write_import(self, plan: ImportPlan, *, owner: str | None = None) -> int:
        """Write a checked import in one transaction: the conversation and every message, or
        (on any failure) nothing. Returns the new id."""
        now = _now()
        first = next((content for role, content, _ in plan.entries if role == "user"), "")
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, persona, system, model, params, memory, "
                "created_at, updated_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (plan.title or _title(first), plan.persona, plan.system, plan.model,
                 json.dumps(plan.params, ensure_ascii=False),
                 json.dumps(plan.memory, ensure_ascii=False), now, now, owner))
            cid = int(cursor.lastrowid or 0)
            # A complete reply gets the token count and usage a live one has (none measured).
            db.executemany(
                "INSERT INTO messages (conversation_id, seq, role, content, status, tokens, "
                "usage, created_at, steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((cid, seq, role, content, status,
                  *((0, "{}") if (role, status) == ("assistant", "complete") else (None, None)),
                  now, plan.steps.get(seq)) for seq, (role, content, status)
                 in enumerate(plan.entries)))
            if plan.branches:
                branching.write_tree(db, cid, plan.branches, now)
        return cid

    def export(self, cid: int, fmt: str) -> str:
        """The conversation as ``json`` (rolechat's own, re-importable) or ``md``, every
        message included (interrupted ones marked); a damaged field is left out."""
        if fmt not in ("json", "md"):
            raise InvalidInput(f"Unknown export format {fmt!r}.", "Use md or json.")
        info = self.info(cid, damaged_ok=True)
        messages = self.messages(cid)
        if fmt == "json":  # the branch shown, and every other version with it
            return export_json(info, messages, self.branch_tree(cid))
        return export_markdown(info, messages)


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 60 else line[:59] + "…"
