"""Full-text search over stored conversations: the index's schema and the query behind
:meth:`rolechat.store.Store.search` (which holds the store's lock and turns SQLite errors into
StoreErrors; these functions only read on the connection they are given).

Contract:
- :data:`SEARCH_MIGRATION` adds two SQLite FTS5 indexes with the ``trigram`` tokenizer (any
  substring of 3 or more characters matches, case-insensitively, whatever the script: Chinese
  and Japanese text has no spaces between words), ``messages_fts`` over every message's text
  and ``titles_fts`` over conversation titles. Both are external-content indexes kept in step
  by triggers on every insert, delete (a conversation's cascade too) and change of the text,
  and the migration fills them from the rows already stored. A later migration that rebuilds
  ``messages`` or ``conversations`` must create their triggers again.
- Every message is searched whatever its status (pending, complete, interrupted: what a
  conversation shows), and so is every title.
- A query is split at whitespace into terms; a hit is one text (a message or a title) that holds
  every term, as it is typed (FTS5's syntax means nothing: quotes, ``*``, ``-``, ``AND``,
  ``NEAR``, parentheses are searched for as text). Terms of 3 or more characters go through the
  index; shorter ones (``AI``, ``菜``, ``家常``), which trigrams cannot find, are matched with
  ``LIKE`` (ASCII letters case-insensitively) — on the index's hits when the query also has a
  longer term, else by scanning the owner's messages.
- Order: with an indexed term, best match first (FTS5's bm25 rank), then the newest; with only
  short terms, the newest conversation first (as the list), its newest message first. At most
  ``per_conversation`` hits of one conversation, ``limit`` in all; a title is a hit only where
  none of its conversation's messages is (every hit carries its title: a title made from the
  first message would only say it again). ``owner``: as :meth:`~rolechat.store.Store.recent`
  (``...``: everyone's).
- Each hit has a snippet around its first match: whitespace runs (newlines) and control
  characters become one space, about :data:`SNIPPET_CHARS` characters, ``…`` where it was cut,
  split into parts with every term's occurrences marked (:attr:`SearchHit.parts`).
- A query that is blank, longer than :data:`MAX_QUERY` characters or not text is an
  InvalidInput naming the field ``q``.
"""

from __future__ import annotations

import re
import sqlite3
import unicodedata
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from .conversation import check_text
from .errors import InvalidInput

#: The migration that adds the search indexes and their triggers, and fills them.
SEARCH_MIGRATION = """
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content = 'messages', content_rowid = 'id', tokenize = 'trigram');
    CREATE VIRTUAL TABLE titles_fts USING fts5(
        title, content = 'conversations', content_rowid = 'id', tokenize = 'trigram');
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF id, content ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER titles_fts_insert AFTER INSERT ON conversations BEGIN
        INSERT INTO titles_fts (rowid, title) VALUES (new.id, new.title);
    END;
    CREATE TRIGGER titles_fts_delete AFTER DELETE ON conversations BEGIN
        INSERT INTO titles_fts (titles_fts, rowid, title) VALUES ('delete', old.id, old.title);
    END;
    CREATE TRIGGER titles_fts_update AFTER UPDATE OF id, title ON conversations BEGIN
        INSERT INTO titles_fts (titles_fts, rowid, title) VALUES ('delete', old.id, old.title);
        INSERT INTO titles_fts (rowid, title) VALUES (new.id, new.title);
    END;
    INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
    INSERT INTO titles_fts (titles_fts) VALUES ('rebuild');
"""

#: The longest query (characters).
MAX_QUERY = 200
#: The shortest term the trigram index finds; shorter ones are matched with LIKE.
TRIGRAM = 3
#: About how long a snippet is (characters), and how much of it comes before the match.
SNIPPET_CHARS, SNIPPET_BEFORE = 120, 40


@dataclass(frozen=True)
class SearchHit:
    """One text that holds every term: a message (``message_id``, ``role``) or a conversation's
    title (both None)."""

    conversation_id: int
    title: str
    message_id: int | None
    role: str | None
    #: The snippet, in order: ``(text, matched)``.
    parts: tuple[tuple[str, bool], ...]

    @property
    def snippet(self) -> str:
        return "".join(text for text, _ in self.parts)

    def to_json(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "role": self.role, "snippet": self.snippet,
                "parts": [{"text": text, "match": matched} for text, matched in self.parts]}


def query_terms(q: Any) -> list[str]:
    """The query's terms (whitespace-separated, each once); InvalidInput if there are none."""
    if isinstance(q, str) and len(q) > MAX_QUERY:
        raise InvalidInput(f"The search is {len(q)} characters long; at most {MAX_QUERY} are "
                           "searched.", "Search for a shorter piece of text.", field="q")
    text = check_text(q, "q", allow_blank=True)
    terms = list(dict.fromkeys(flat_text(text).split()))
    if not terms:
        raise InvalidInput("The search is empty.", "Type some text to search for.", field="q")
    return terms


def _phrase(term: str) -> str:
    """A term as an FTS5 string: every character literal."""
    return '"' + term.replace('"', '""') + '"'


def _like(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def find(db: sqlite3.Connection, q: str, *, owner: str | EllipsisType | None = ...,
         limit: int = 20, per_conversation: int = 3) -> list[SearchHit]:
    """The hits for ``q`` (see the module's contract)."""
    terms = query_terms(q)
    indexed = [t for t in terms if len(t) >= TRIGRAM]
    short = [t for t in terms if len(t) < TRIGRAM]
    args: dict[str, Any] = {"owner": owner, "limit": max(int(limit), 0),
                            "per": max(int(per_conversation), 1),
                            **{f"like{i}": _like(t) for i, t in enumerate(short)}}
    owned = "" if owner is ... else "AND c.owner IS :owner"

    def likes(column: str) -> str:
        return "".join(f" AND {column} LIKE :like{i} ESCAPE '\\'" for i in range(len(short)))

    if indexed:
        args["match"] = " ".join(map(_phrase, indexed))
        hits = f"""
            SELECT m.conversation_id AS cid, m.id AS mid, m.role, m.content AS text, f.rank AS score
            FROM messages_fts f JOIN messages m ON m.id = f.rowid
            JOIN conversations c ON c.id = m.conversation_id
            WHERE messages_fts MATCH :match AND m.branch_id IS NULL {owned}{likes('m.content')}
            UNION ALL
            SELECT c.id, NULL, NULL, c.title, f.rank
            FROM titles_fts f JOIN conversations c ON c.id = f.rowid
            WHERE titles_fts MATCH :match {owned}{likes('c.title')}"""
    else:
        hits = f"""
            SELECT m.conversation_id AS cid, m.id AS mid, m.role, m.content AS text, 0 AS score
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            WHERE m.branch_id IS NULL {owned}{likes('m.content')}
            UNION ALL
            SELECT c.id, NULL, NULL, c.title, 0 FROM conversations c
            WHERE 1 {owned}{likes('c.title')}"""
    rows = db.execute(f"""
        WITH hits AS ({hits}),
        ranked AS (SELECT hits.*, ROW_NUMBER() OVER (
            PARTITION BY cid ORDER BY mid IS NULL, score, mid DESC) AS n,
            MAX(mid IS NOT NULL) OVER (PARTITION BY cid) AS messaged FROM hits)
        SELECT r.cid, r.mid, r.role, r.text, c.title FROM ranked r
        JOIN conversations c ON c.id = r.cid
        WHERE r.n <= :per AND (r.mid IS NOT NULL OR NOT r.messaged)
        ORDER BY r.score, c.updated_at DESC, c.id DESC, r.mid IS NOT NULL, r.mid DESC
        LIMIT :limit""", args).fetchall()
    pattern = re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)),
                         re.IGNORECASE)
    return [SearchHit(int(row["cid"]), row["title"],
                      None if row["mid"] is None else int(row["mid"]), row["role"],
                      snippet(row["text"], pattern)) for row in rows]


def flat_text(text: str) -> str:
    """Control characters and whitespace runs as one space, none at either end."""
    return " ".join("".join(" " if unicodedata.category(c) == "Cc" else c
                            for c in text).split())


def snippet(text: str, pattern: re.Pattern[str]) -> tuple[tuple[str, bool], ...]:
    """About :data:`SNIPPET_CHARS` characters of ``text`` around the first match of
    ``pattern``, each match marked; ``…`` where the text was cut."""
    flat = flat_text(text)
    first = pattern.search(flat)
    at = first.start() if first else 0
    start = max(0, at - SNIPPET_BEFORE)
    if start:  # begin at a word's start where one is near (Latin text), else where it falls
        space = flat.rfind(" ", max(0, start - 12), start + 1)
        start = space + 1 if space >= 0 else start
    end = min(len(flat), max(start + SNIPPET_CHARS, first.end() if first else 0))
    if end < len(flat):
        space = flat.find(" ", end - 12, end)
        end = space if space > (first.end() if first else start) else end
    window = flat[start:end]
    parts: list[tuple[str, bool]] = [("…", False)] if start else []
    done = 0
    for found in pattern.finditer(window):
        if found.start() > done:
            parts.append((window[done:found.start()], False))
        parts.append((found.group(), True))
        done = found.end()
    if done < len(window):
        parts.append((window[done:], False))
    if end < len(flat):
        parts.append(("…", False))
    merged: list[tuple[str, bool]] = []  # neighbours of one kind as one part
    for part, matched in parts:
        if merged and merged[-1][1] == matched:
            merged[-1] = (merged[-1][0] + part, matched)
        else:
            merged.append((part, matched))
    return tuple(merged)
