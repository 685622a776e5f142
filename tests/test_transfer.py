"""Imports and exports (rolechat.transfer with the real store): a whole file is checked before
anything is written and written in one transaction (a failure, or a kill, leaves nothing), a
large import keeps every message, nothing is dropped silently, and interrupted messages travel
through JSON and Markdown."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from rolechat.errors import InvalidInput, StoreError
from rolechat.store import Store
from rolechat.transfer import read_import


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "rolechat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    opened = Store(db_path)
    yield opened
    opened.close()


def rows(path: Path) -> tuple[int, int]:
    """(conversations, messages) in the file, counted by a connection of its own."""
    db = sqlite3.connect(path)
    try:
        return (db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0],
                db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        db.close()


def messages(count: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "x" * 40}
            for i in range(count)]


TWO_TURNS = messages(4)


# ----- nothing to import, nothing dropped ------------------------------------------------------

@pytest.mark.parametrize("text", ["[]", '{"messages": []}', '{"messages": null}',
                                  '{"system": "Be brief.", "messages": []}',
                                  '[{"role": "system", "content": "Be brief."}]'])
def test_a_file_without_messages_is_refused(store: Store, db_path: Path, text: str) -> None:
    with pytest.raises(InvalidInput, match="no messages: there is nothing to import") as caught:
        store.import_file(text)
    assert caught.value.exit_code == 2
    assert rows(db_path) == (0, 0)


def test_a_last_unanswered_message_is_kept_interrupted(store: Store) -> None:
    text = json.dumps([*TWO_TURNS, {"role": "user", "content": "No answer yet"}])
    assert read_import(text).unanswered is True
    cid = store.import_file(text)
    assert [(m.role, m.content, m.status) for m in store.messages(cid)][-1] == (
        "user", "No answer yet", "interrupted")
    assert len(store.messages(cid)) == 5
    assert len(store.conversation(cid).turns) == 2 and store.info(cid).turns == 2
    assert "### You (interrupted: not answered)\n\nNo answer yet" in store.export(cid, "md")
    assert read_import(json.dumps(TWO_TURNS)).unanswered is False


def test_a_single_question_is_kept_and_names_the_conversation(store: Store) -> None:
    cid = store.import_file('[{"role": "user", "content": "Only a question"}]')
    assert [(m.content, m.status) for m in store.messages(cid)] == [("Only a question",
                                                                    "interrupted")]
    assert store.info(cid).title == "Only a question"
    assert store.conversation(cid).turns == []


# ----- checked in full, written at once --------------------------------------------------------

BAD_FILES = [
    ({"messages": TWO_TURNS, "memory": {"mode": "everything"}}, "memory.mode"),
    ({"messages": TWO_TURNS, "memory": {"pins": [5]}}, "memory.pins must list turns from 0 to 1"),
    ({"messages": TWO_TURNS, "memory": [1, 2]}, "memory must be an object, got list"),
    ({"messages": TWO_TURNS, "params": {"temperature": 9}}, "temperature"),
    ({"messages": TWO_TURNS, "params": "hot"}, "params must be an object"),
    ({"messages": TWO_TURNS, "persona": "wizard"}, "Unknown persona"),
    ({"messages": TWO_TURNS, "title": 5}, "title must be text"),
    ({"messages": [*TWO_TURNS, {"role": "user", "content": "ok", "status": "maybe"}]},
     "unknown status"),
    ({"messages": [{"role": "assistant", "content": "cut", "status": "interrupted"}]},
     "interrupted assistant message cannot stand here"),
]


@pytest.mark.parametrize(("data", "match"), BAD_FILES)
def test_a_bad_file_leaves_nothing_behind(store: Store, db_path: Path, data: object,
                                          match: str) -> None:
    """The bad memory section used to fail after the conversation was written."""
    with pytest.raises(Exception, match=match) as caught:
        store.import_file(json.dumps(data))
    assert getattr(caught.value, "exit_code", None) == 2
    assert rows(db_path) == (0, 0)


def test_a_file_nested_too_deeply(store: Store, db_path: Path) -> None:
    with pytest.raises(InvalidInput, match="nested too deeply") as caught:
        store.import_file("[" * 100_000 + "]" * 100_000)
    assert caught.value.exit_code == 2
    assert rows(db_path) == (0, 0)


def test_a_failure_in_the_middle_of_the_write_leaves_nothing(store: Store,
                                                             db_path: Path) -> None:
    """A real SQLite failure at the 1,001st message: the transaction takes everything back."""
    store.import_file(json.dumps(TWO_TURNS))  # something already there stays
    before = rows(db_path)
    store._db.execute("CREATE TEMP TRIGGER fail BEFORE INSERT ON main.messages "
                      "WHEN NEW.seq = 1000 BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    with pytest.raises(StoreError, match="injected failure"):
        store.import_file(json.dumps(messages(3000)))
    assert rows(db_path) == before
    assert not store._db.in_transaction
    store._db.execute("DROP TRIGGER fail")
    cid = store.import_file(json.dumps(messages(3000)))  # the store works on
    assert len(store.messages(cid)) == 3000


KILLED_IMPORT = textwrap.dedent("""
    import json, sys, time
    from rolechat.store import Store

    store = Store(sys.argv[1])
    def pause():
        print("WRITING", flush=True)
        time.sleep(120)
    store._db.create_function("pause", 0, pause)
    store._db.execute("CREATE TEMP TRIGGER slow BEFORE INSERT ON main.messages "
                      "WHEN NEW.seq = 1000 BEGIN SELECT pause(); END")
    store.import_file(sys.stdin.read())
    print("DONE", flush=True)
""")


def test_an_import_killed_in_the_middle_leaves_nothing(db_path: Path) -> None:
    """SIGKILL while the 1,001st message is being written: nothing of the import remains
    (the report: 25,624 of 60,000 messages were left, with no marker)."""
    Store(db_path).close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IMPORT, str(db_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(messages(3000)).encode())
        proc.stdin.close()
        line = proc.stdout.readline()
        assert line == b"WRITING\n", (line, proc.stderr.read() if proc.stderr else b"")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reopened = Store(db_path)
    assert reopened.recent() == []
    reopened.close()
    assert rows(db_path) == (0, 0)


def test_sixty_thousand_messages_are_all_there(store: Store, db_path: Path) -> None:
    """The report's size: 60,000 messages (timed by hand: see the README's conversations)."""
    sent = messages(60_000)
    cid = store.import_file(json.dumps([{"role": "system", "content": "Be brief."}, *sent]))
    db = sqlite3.connect(db_path)
    try:
        stored = db.execute("SELECT seq, role, content, status FROM messages "
                            "WHERE conversation_id = ? ORDER BY seq", (cid,)).fetchall()
    finally:
        db.close()
    assert stored == [(i, m["role"], m["content"], "complete") for i, m in enumerate(sent)]
    assert store.info(cid).turns == 30_000
    assert store.conversation(cid).system == "Be brief."


# ----- interrupted messages travel ------------------------------------------------------------

def interrupted_conversation(store: Store) -> int:
    cid = store.create(system="Be brief.")
    first = store.begin_turn(cid, "first")
    store.complete_turn(cid, first, "one", 1, {})
    cut = store.begin_turn(cid, "tell me a story")
    store.interrupt_turn(cut, "Once upon a time")
    alone = store.begin_turn(cid, "are you there?")
    store.interrupt_turn(alone)
    second = store.begin_turn(cid, "second")
    store.complete_turn(cid, second, "two", 1, {})
    store.begin_turn(cid, "still being answered")  # pending: this process is alive
    return cid


def test_json_export_keeps_interrupted_messages_and_import_keeps_them_out_of_turns(
        store: Store) -> None:
    cid = interrupted_conversation(store)
    data = json.loads(store.export(cid, "json"))
    assert data["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "tell me a story", "status": "interrupted"},
        {"role": "assistant", "content": "Once upon a time", "status": "interrupted"},
        {"role": "user", "content": "are you there?", "status": "interrupted"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": "still being answered", "status": "pending"}]

    again = store.import_file(json.dumps(data))
    assert [(m.role, m.content, m.status) for m in store.messages(again)] == [
        ("user", "first", "complete"), ("assistant", "one", "complete"),
        ("user", "tell me a story", "interrupted"),
        ("assistant", "Once upon a time", "interrupted"),
        ("user", "are you there?", "interrupted"),
        ("user", "second", "complete"), ("assistant", "two", "complete"),
        ("user", "still being answered", "interrupted")]
    assert store.conversation(again) == store.conversation(cid)
    assert store.conversation(again).to_tuples() == [("first", "one"), ("second", "two")]
    assert store.info(again).turns == 2


def test_markdown_export_labels_interrupted_messages(store: Store) -> None:
    cid = interrupted_conversation(store)
    md = store.export(cid, "md")
    assert md.split("### ")[1:] == [
        "You\n\nfirst\n\n", "Assistant\n\none\n\n",
        "You (interrupted)\n\ntell me a story\n\n",
        "Assistant (interrupted: the reply was cut off here)\n\nOnce upon a time\n\n",
        "You (interrupted: not answered)\n\nare you there?\n\n",
        "You\n\nsecond\n\n", "Assistant\n\ntwo\n\n",
        "You (pending: its reply is being written)\n\nstill being answered\n"]


def headings(markdown: str) -> list[str]:
    """The headings a CommonMark parser sees (a heading swallowed by code is not one)."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]


def test_a_cut_off_code_fence_does_not_swallow_the_rest_of_the_markdown(store: Store) -> None:
    cid = store.create()
    cut = store.begin_turn(cid, "Show me code")
    store.interrupt_turn(cut, "Here:\n\n```python\nprint('hi')\n")
    for question, reply in (("Tildes?", "~~~~\ncode ```\n~~~\nstill code"),
                            ("Nested?", "````md\n```python\nx\n```\n"),
                            ("Closed?", "```\nfine\n```\nafter")):
        user = store.begin_turn(cid, question)
        store.complete_turn(cid, user, reply, 1, {})
    md = store.export(cid, "md")
    assert headings(md) == [
        "Show me code", "You (interrupted)",
        "Assistant (interrupted: the reply was cut off here)", "You", "Assistant",
        "You", "Assistant", "You", "Assistant"]
    assert "print('hi')\n```\n\n### You" in md
    assert "still code\n~~~~\n\n### You" in md
    assert "```\n````\n\n### You" in md
    assert "```\nafter\n" in md  # a closed fence gets nothing added
