"""Several writers on one conversation, at the store's level: versions, turn names that are
never reused, turns that complete together however writers interleave, and undo or continue
that check the turn they name inside their transaction (two Store connections on one file, and
two threads racing)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rolechat.errors import ConversationChanged
from rolechat.store import MIGRATIONS, Store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "rolechat.db"


@pytest.fixture
def two(db_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two connections on one file, as two processes (two REPLs, a REPL and the server) have."""
    first, second = Store(db_path), Store(db_path)
    yield first, second
    first.close()
    second.close()


def turn(store: Store, cid: int, user: str, reply: str) -> int:
    """One whole turn; its name (the reply's id)."""
    return store.complete_turn(cid, store.begin_turn(cid, user), reply, 1, {}).id


def test_every_write_moves_the_version_by_one(db_path: Path) -> None:
    store = Store(db_path)
    cid = store.create()
    assert store.version_of(cid) == store.info(cid).version == 0
    begun = store.start_turn(cid, "hi")
    assert begun.version == 1
    done = store.complete_turn(cid, begun.id, "hello", 1, {})
    assert done.version == 2 == store.version_of(cid)
    assert store.extend_last_reply(cid, " there", 1, {}).version == 3
    assert store.update(cid, title="t") == 4
    assert store.interrupt_turn(store.begin_turn(cid, "cut"), "so f") == 6
    dropped = store.drop_last_turn(cid)
    assert dropped is not None and dropped.version == 7
    assert store.put_back_turn(cid, dropped.user, dropped.reply) == 8
    assert store.load(cid).version == 8
    store.close()


def test_turn_names_are_never_reused(db_path: Path) -> None:
    store = Store(db_path)
    cid = store.create()
    first = turn(store, cid, "one", "1")
    store.drop_last_turn(cid)
    second = turn(store, cid, "one", "1")  # the same text again, a different turn
    assert second > first
    # A continuation gives the reply a new name: an action that saw the old text is stale.
    continued = store.extend_last_reply(cid, " more", 1, {}, turn=second).id
    assert continued > second and store.load(cid).turn_ids == [continued]
    with pytest.raises(ConversationChanged):
        store.drop_last_turn(cid, second)
    store.close()


def test_interleaved_writers_keep_each_turn_together(two: tuple[Store, Store]) -> None:
    a, b = two
    cid = a.create()
    asked = a.begin_turn(cid, "A's question")  # A's reply is being written...
    turn(b, cid, "B's question", "B's answer")  # ...while B completes a whole turn
    a.complete_turn(cid, asked, "A's answer", 1, {})
    assert a.conversation(cid).to_tuples() == [("B's question", "B's answer"),
                                                ("A's question", "A's answer")]
    assert [m.content for m in b.messages(cid)] == [
        "B's question", "B's answer", "A's question", "A's answer"]
    # An interrupted reply's text follows its own message the same way.
    cut = a.begin_turn(cid, "A's cut question")
    turn(b, cid, "B again", "B's second answer")
    a.interrupt_turn(cut, "A's text so f")
    assert [(m.content, m.status) for m in a.messages(cid)][-2:] == [
        ("A's cut question", "interrupted"), ("A's text so f", "interrupted")]
    assert a.conversation(cid).to_tuples()[-1] == ("B again", "B's second answer")


def test_a_stale_undo_is_refused_and_deletes_nothing(two: tuple[Store, Store]) -> None:
    a, b = two
    cid = a.create()
    seen = turn(a, cid, "one", "1")
    seen_version = a.version_of(cid)
    newer = turn(b, cid, "two", "2")  # another window's turn
    with pytest.raises(ConversationChanged) as refused:
        a.drop_last_turn(cid, seen)
    assert (refused.value.turn, refused.value.last) == (seen, newer)
    assert "Nothing was changed" in str(refused.value)
    with pytest.raises(ConversationChanged) as refused:
        a.drop_last_turn(cid, newer, version=seen_version)  # the right turn, an old version
    assert (refused.value.version, refused.value.current) == (seen_version,
                                                              b.version_of(cid))
    assert a.conversation(cid).to_tuples() == [("one", "1"), ("two", "2")]
    dropped = a.drop_last_turn(cid, newer, version=b.version_of(cid))
    assert dropped is not None and dropped.reply.id == newer
    # Naming no turn means "there is none": refused while there is one.
    with pytest.raises(ConversationChanged):
        a.drop_last_turn(cid, None)
    assert a.conversation(cid).to_tuples() == [("one", "1")]


def test_two_connections_racing_to_undo_one_turn(db_path: Path) -> None:
    setup = Store(db_path)
    cid = setup.create()
    turn(setup, cid, "one", "1")
    last = turn(setup, cid, "two", "2")
    setup.close()
    stores = [Store(db_path), Store(db_path)]
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def undo(store: Store) -> None:
        start.wait()
        try:
            store.drop_last_turn(cid, last)
            outcomes.append("removed")
        except ConversationChanged:
            outcomes.append("refused")

    threads = [threading.Thread(target=undo, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "removed"]  # never "removed" twice
    assert stores[0].conversation(cid).to_tuples() == [("one", "1")]
    for store in stores:
        store.close()


def test_undo_forgets_the_pins_of_the_turn_it_removes(db_path: Path) -> None:
    store = Store(db_path)
    cid = store.create()
    turn(store, cid, "one", "1")
    last = turn(store, cid, "two", "2")
    store.update(cid, memory={"mode": "none", "summary": None, "covers": 0, "pins": [0, 1]})
    store.drop_last_turn(cid, last)
    assert store.info(cid).memory["pins"] == [0]
    store.close()


def test_a_stale_writer_does_not_overwrite_the_memory(two: tuple[Store, Store]) -> None:
    a, b = two
    cid = a.create()
    begun = a.start_turn(cid, "A's question")
    b.update(cid, memory={"mode": "none", "summary": None, "covers": 0, "pins": []})
    a.complete_turn(cid, begun.id, "A's answer", 1, {},
                    memory={"mode": "summary", "summary": "stale", "covers": 0, "pins": [0]},
                    seen=begun.version)
    assert a.info(cid).memory == {"mode": "none", "summary": None, "covers": 0, "pins": []}


def test_the_migration_keeps_ids_and_starts_every_version_at_0(db_path: Path) -> None:
    db = sqlite3.connect(db_path)
    for version, script in enumerate(MIGRATIONS[:4]):
        db.executescript(f"{script}; PRAGMA user_version = {version + 1};")
    db.execute("INSERT INTO conversations (id, title, created_at, updated_at) "
               "VALUES (3, 'old', 'x', 'x')")
    db.executemany("INSERT INTO messages (id, conversation_id, seq, role, content, created_at) "
                   "VALUES (?, 3, ?, ?, ?, 'x')",
                   [(10, 0, "user", "hi"), (11, 1, "assistant", "hello")])
    db.commit()
    db.close()
    store = Store(db_path)
    loaded = store.load(3)
    assert loaded.turn_ids == [11] and loaded.version == 0
    assert loaded.conversation.to_tuples() == [("hi", "hello")]
    store.drop_last_turn(3, 11)
    assert turn(store, 3, "hi", "hello") > 11  # the old ids are not used again
    store.close()
