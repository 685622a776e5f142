"""Branches: the versions of a conversation that an edit or a regeneration left behind.

Contract:
- A conversation shows one branch, its *active* messages (``branch_id IS NULL``): every reader
  of the store (its messages, turns, turn counts, search, export) sees only those, so the
  window, the prompt, resume and the KV state follow the active branch.
- :func:`fork` at an active message moves it and every active message after it (by ``seq``)
  into a new branch row, which remembers the active message before it (``after_id``; NULL:
  from the start). The conversation goes on from there: an edit of that user message, or a
  regeneration of its turn, is then written as usual. Messages keep their ids and ``seq``.
- :func:`switch` makes a branch active: the active messages after its ``after_id`` become a
  branch of their own (the same ``after_id``), and the branch's messages become active.
- :func:`versions`: for each active message where branches diverge, its place among them,
  oldest first (``index`` from 1, ``count``, and each version's branch id, None for the
  active one): what a "2/3" switcher shows.
- :func:`tree`: every branch with the message it goes on from and its messages (exports);
  :func:`write_tree` writes an import's branches back.
- Each change moves the conversation's version (rolechat.store_turns.bump).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .store_turns import bump

#: Migration 9: the branch rows, and each message's branch (NULL: active).
BRANCH_MIGRATION = """
    CREATE TABLE branches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        after_id INTEGER,
        created_at TEXT NOT NULL
    );
    CREATE INDEX branches_conversation ON branches(conversation_id, after_id);
    ALTER TABLE messages ADD COLUMN branch_id INTEGER REFERENCES branches(id) ON DELETE CASCADE;
    CREATE INDEX messages_branch ON messages(branch_id);
"""


class NoSuchBranch(LookupError):
    """The branch or message named is not this conversation's (or not where it must be)."""


def _after(db: sqlite3.Connection, cid: int, seq: int) -> Any:
    """The active message just before ``seq`` (None: there is none)."""
    row = db.execute("SELECT id FROM messages WHERE conversation_id = ? AND branch_id IS NULL "
                     "AND seq < ? ORDER BY seq DESC LIMIT 1", (cid, seq)).fetchone()
    return row["id"] if row is not None else None


def _seq_of(db: sqlite3.Connection, message_id: Any) -> int:
    if message_id is None:
        return -1
    row = db.execute("SELECT seq FROM messages WHERE id = ?", (message_id,)).fetchone()
    return int(row["seq"]) if row is not None else -1


def _branch_from(db: sqlite3.Connection, cid: int, after_id: Any, now: str) -> int | None:
    """Move the active messages after ``after_id`` into a new branch; its id (None: there were
    none to move)."""
    seq = _seq_of(db, after_id)
    tail = db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND "
                      "branch_id IS NULL AND seq > ?", (cid, seq)).fetchone()[0]
    if not tail:
        return None
    branch = int(db.execute("INSERT INTO branches (conversation_id, after_id, created_at) "
                            "VALUES (?, ?, ?)", (cid, after_id, now)).lastrowid or 0)
    db.execute("UPDATE messages SET branch_id = ? WHERE conversation_id = ? AND "
               "branch_id IS NULL AND seq > ?", (branch, cid, seq))
    return branch


def fork(db: sqlite3.Connection, cid: int, message_id: int, now: str,
         role: str | None = None) -> tuple[int, int]:
    """Keep active message ``message_id`` (a ``role`` message, if given) and everything after
    it as a branch; (the branch's id, the new version)."""
    row = db.execute("SELECT seq, role FROM messages WHERE id = ? AND conversation_id = ? AND "
                     "branch_id IS NULL", (message_id, cid)).fetchone()
    if row is None or (role is not None and row["role"] != role):
        kind = f"a {role} message" if role is not None else "one"
        raise NoSuchBranch(f"message {message_id} is not {kind} this conversation shows")
    branch = _branch_from(db, cid, _after(db, cid, int(row["seq"])), now)
    assert branch is not None
    return branch, bump(db, cid)


def switch(db: sqlite3.Connection, cid: int, branch_id: int, now: str) -> int:
    """Make branch ``branch_id`` the one shown (what it replaces becomes a branch); the new
    version."""
    row = db.execute("SELECT after_id FROM branches WHERE id = ? AND conversation_id = ?",
                     (branch_id, cid)).fetchone()
    if row is None:
        raise NoSuchBranch(f"conversation {cid} has no branch {branch_id}")
    after = row["after_id"]
    if after is not None and db.execute(
            "SELECT 1 FROM messages WHERE id = ? AND branch_id IS NULL", (after,)).fetchone() \
            is None:
        raise NoSuchBranch(f"branch {branch_id} goes on from a message this conversation does "
                           "not show")
    _branch_from(db, cid, after, now)
    db.execute("UPDATE messages SET branch_id = NULL WHERE branch_id = ?", (branch_id,))
    db.execute("DELETE FROM branches WHERE id = ?", (branch_id,))
    return bump(db, cid)


def versions(db: sqlite3.Connection, cid: int) -> dict[int, dict[str, Any]]:
    """For each active message where the conversation has other versions: ``index`` (from 1),
    ``count`` and ``branches`` (each version's branch id, None for the active one), oldest
    version first (by the id of its first message)."""
    active = db.execute("SELECT id FROM messages WHERE conversation_id = ? AND branch_id IS "
                        "NULL ORDER BY seq", (cid,)).fetchall()
    first_after: dict[Any, int] = {}
    previous = None
    for row in active:
        first_after.setdefault(previous, row["id"])
        previous = row["id"]
    found: dict[int, dict[str, Any]] = {}
    for branch in db.execute("""
            SELECT b.id, b.after_id, MIN(m.id) AS first FROM branches b
            JOIN messages m ON m.branch_id = b.id
            WHERE b.conversation_id = ? GROUP BY b.id""", (cid,)).fetchall():
        shown = first_after.get(branch["after_id"])
        if shown is None:  # it goes on from a message of another branch
            continue
        found.setdefault(shown, {"shown": shown, "all": [(shown, None)]})["all"].append(
            (branch["first"], branch["id"]))
    out: dict[int, dict[str, Any]] = {}
    for shown, group in found.items():
        ordered = sorted(group["all"])
        ids = [branch for _, branch in ordered]
        out[shown] = {"index": ids.index(None) + 1, "count": len(ids), "branches": ids}
    return out


def tree(db: sqlite3.Connection, cid: int) -> list[tuple[int, Any, list[Any]]]:
    """Every branch of conversation ``cid``: (its id, the message it goes on from, its message
    rows in order), each after the branch that holds the message it goes on from."""
    rows = db.execute("SELECT id, after_id FROM branches WHERE conversation_id = ? ORDER BY id",
                      (cid,)).fetchall()
    found = [(int(r["id"]), r["after_id"], db.execute(
        "SELECT * FROM messages WHERE branch_id = ? ORDER BY seq", (r["id"],)).fetchall())
        for r in rows]
    placed: set[Any] = {r["id"] for r in db.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND branch_id IS NULL", (cid,))}
    placed.add(None)
    ordered: list[tuple[int, Any, list[Any]]] = []
    while found:
        ready = [b for b in found if b[1] in placed]
        if not ready:  # goes on from a message that is gone: it cannot be placed
            break
        for branch in ready:
            ordered.append(branch)
            placed.update(row["id"] for row in branch[2])
            found.remove(branch)
    return ordered


def write_tree(db: sqlite3.Connection, cid: int,
               branches: list[tuple[tuple[int | None, int] | None, list[tuple[str, str, str]]]],
               now: str) -> None:
    """An import's branches (rolechat.transfer.ImportPlan.branches), after its messages."""
    shown = [int(r["id"]) for r in db.execute(
        "SELECT id FROM messages WHERE conversation_id = ? ORDER BY seq", (cid,))]
    written: list[list[int]] = []
    for at, messages in branches:
        after = None if at is None else (shown if at[0] is None else written[at[0]])[at[1]]
        branch = int(db.execute("INSERT INTO branches (conversation_id, after_id, created_at) "
                                "VALUES (?, ?, ?)", (cid, after, now)).lastrowid or 0)
        ids = []
        for role, content, status in messages:
            seq = int(db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE "
                                 "conversation_id = ?", (cid,)).fetchone()[0])
            ids.append(int(db.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, status, tokens, "
                "usage, created_at, branch_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, seq, role, content, status,
                 *((0, "{}") if (role, status) == ("assistant", "complete") else (None, None)),
                 now, branch)).lastrowid or 0))
        written.append(ids)
