"""The conversation store: schema migrations, the turn life cycle (pending → complete or
interrupted), resuming, listing, export/import, damaged rows, locked and read-only databases,
and real processes killed with SIGKILL in the middle of a reply (reaped or not)."""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rolechat.store as store_module
from fakes import FakeEngine
from rolechat.conversation import Conversation
from rolechat.engines.adapter import Sampler
from rolechat.errors import InvalidInput, StoreError
from rolechat.saved import SavedChat
from rolechat.store import MIGRATIONS, Store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "rolechat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    opened = Store(db_path)
    yield opened
    opened.close()


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def one_turn(store: Store, cid: int, user: str, reply: str) -> int:
    user_id = store.begin_turn(cid, user)
    store.complete_turn(cid, user_id, reply, 3, {"generated_tokens": 3})
    return user_id


# ----- schema ----------------------------------------------------------------------------------

def test_migrations_on_a_blank_database(store: Store, db_path: Path) -> None:
    assert store.version == len(MIGRATIONS) == user_version(db_path)
    assert {"conversations", "messages"} <= tables(db_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopening_runs_no_migration_again(store: Store, db_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cid = store.create(title="kept")
    store.close()
    again = Store(db_path)  # migration 1 again would fail: "table conversations already exists"
    assert again.version == len(MIGRATIONS)
    assert again.info(cid).title == "kept"
    again.close()
    # A later migration runs alone, on top of what is there.
    monkeypatch.setattr(store_module, "MIGRATIONS",
                        (*MIGRATIONS, "CREATE TABLE extra (x INTEGER);"))
    upgraded = Store(db_path)
    assert upgraded.version == len(MIGRATIONS) + 1
    assert "extra" in tables(db_path)
    assert upgraded.info(cid).title == "kept"
    upgraded.close()


def test_a_failing_migration_changes_nothing(store: Store, db_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store.close()
    broken = "CREATE TABLE extra (x INTEGER); CREATE TABLE extra (y INTEGER);"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(StoreError, match="already exists"):
        Store(db_path)
    assert user_version(db_path) == len(MIGRATIONS)
    assert "extra" not in tables(db_path)


def test_a_newer_schema_is_refused(store: Store, db_path: Path) -> None:
    store._db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store.close()
    with pytest.raises(StoreError, match="newer") as caught:
        Store(db_path)
    assert caught.value.exit_code == 6
    assert "Upgrade rolechat" in str(caught.value)


def test_a_file_that_is_not_a_database(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not an sqlite database, just text " * 100)
    with pytest.raises(StoreError, match="not a database") as caught:
        Store(db_path)
    assert caught.value.exit_code == 6 and not caught.value.missing


def test_default_store_lives_in_the_rolechat_home(rolechat_home: Path) -> None:
    store = Store.default()
    assert store.path == rolechat_home / "rolechat.db"
    assert store.path.exists()
    store.close()


# ----- the turn life cycle ---------------------------------------------------------------------

def test_only_complete_turns_come_back(store: Store) -> None:
    cid = store.create(system="Be brief.")
    one_turn(store, cid, "first", "one")
    interrupted = store.begin_turn(cid, "cut off")
    store.interrupt_turn(interrupted)
    one_turn(store, cid, "second", "two")
    store.begin_turn(cid, "still pending")

    conversation = store.conversation(cid)
    assert conversation.to_tuples() == [("first", "one"), ("second", "two")]
    assert conversation.system == "Be brief."
    assert conversation.pending is None
    assert [(m.role, m.content, m.status) for m in store.messages(cid)] == [
        ("user", "first", "complete"), ("assistant", "one", "complete"),
        ("user", "cut off", "interrupted"),
        ("user", "second", "complete"), ("assistant", "two", "complete"),
        ("user", "still pending", "pending"),
    ]
    assert [m.seq for m in store.messages(cid)] == list(range(6))
    assert store.info(cid).turns == 2


def test_interrupting_a_completed_turn_changes_nothing(store: Store) -> None:
    cid = store.create()
    user_id = one_turn(store, cid, "q", "a")
    store.interrupt_turn(user_id)  # only a pending message can be interrupted
    assert store.messages(cid)[0].status == "complete"
    assert store.conversation(cid).to_tuples() == [("q", "a")]


def test_complete_turn_stores_tokens_and_usage(store: Store) -> None:
    cid = store.create()
    user_id = store.begin_turn(cid, "hi", tokens=2)
    usage = {"generated_tokens": 5, "finish_reason": "stop", "window": {"first_turn": 0}}
    store.complete_turn(cid, user_id, "hello", 5, usage)
    user, reply = store.messages(cid)
    assert (user.tokens, user.usage) == (2, None)
    assert (reply.role, reply.content, reply.tokens, reply.usage) == ("assistant", "hello", 5,
                                                                       usage)


def test_title_comes_from_the_first_message(store: Store) -> None:
    cid = store.create()
    long_text = "word " * 40
    one_turn(store, cid, "  A   question\nover two lines  ", "x")
    assert store.info(cid).title == "A question over two lines"
    one_turn(store, cid, "a later question", "y")  # the first message names it
    assert store.info(cid).title == "A question over two lines"

    other = store.create()
    store.begin_turn(other, long_text)
    title = store.info(other).title
    assert len(title) == 60 and title.endswith("…")
    assert title[:-1] == " ".join(long_text.split())[:59]

    named = store.create(title="My title")
    one_turn(store, named, "hello", "hi")
    assert store.info(named).title == "My title"


def test_drop_last_turn(store: Store) -> None:
    cid = store.create()
    one_turn(store, cid, "one", "1")
    one_turn(store, cid, "two", "2")
    store.begin_turn(cid, "pending after")  # another writer's reply, still being written
    dropped = store.drop_last_turn(cid)
    assert dropped is not None and (dropped.user.content, dropped.reply.content) == ("two", "2")
    assert store.conversation(cid).to_tuples() == [("one", "1")]
    # Exactly the turn's two messages go: never a message whose reply is being written.
    assert [m.content for m in store.messages(cid)] == ["one", "1", "pending after"]
    store.drop_last_turn(cid)
    assert store.drop_last_turn(cid) is None  # nothing left: no error
    assert [m.content for m in store.messages(cid)] == ["pending after"]


# ----- listing, editing, deleting ------------------------------------------------------------

def test_recent_and_latest_follow_activity(store: Store) -> None:
    assert store.recent() == [] and store.latest() is None
    first, second, third = store.create(), store.create(), store.create()
    assert [c.id for c in store.recent()] == [third, second, first]
    assert store.latest() == third
    # Activity in an older conversation moves it to the front, even within the same second.
    one_turn(store, first, "back to the first", "ok")
    assert store.latest() == first
    assert [c.id for c in store.recent()] == [first, third, second]
    store.update(second, title="renamed")
    assert store.latest() == second
    assert [c.id for c in store.recent(limit=2)] == [second, first]
    assert store.info(first).turns == 1


def test_update(store: Store) -> None:
    cid = store.create(persona="concise", params={"temperature": 0.1})
    store.update(cid, title="T", persona="expert", system="S", model="m",
                 params={"max_new_tokens": 3})
    info = store.info(cid)
    assert (info.title, info.persona, info.system, info.model, info.params) == (
        "T", "expert", "S", "m", {"max_new_tokens": 3})
    store.update(cid, params=None)
    assert store.info(cid).params == {}
    with pytest.raises(InvalidInput, match="Unknown conversation fields"):
        store.update(cid, colour="red")


def test_delete_cascades_to_messages(store: Store, db_path: Path) -> None:
    cid = store.create()
    keep = store.create()
    one_turn(store, cid, "a", "b")
    one_turn(store, keep, "c", "d")
    store.delete(cid)
    with sqlite3.connect(db_path) as db:
        counts = dict(db.execute("SELECT conversation_id, COUNT(*) FROM messages "
                                 "GROUP BY conversation_id").fetchall())
    assert counts == {keep: 2}
    assert [c.id for c in store.recent()] == [keep]


@pytest.mark.parametrize("call", [
    lambda s: s.info(999), lambda s: s.messages(999), lambda s: s.conversation(999),
    lambda s: s.delete(999), lambda s: s.update(999, title="x"),
    lambda s: s.begin_turn(999, "hi"), lambda s: s.export(999, "md"),
    lambda s: s.drop_last_turn(999),
])
def test_an_unknown_id(store: Store, call: object) -> None:
    with pytest.raises(StoreError) as caught:
        call(store)  # type: ignore[operator]
    assert caught.value.missing is True
    assert caught.value.exit_code == 2
    assert "there is no conversation 999" in str(caught.value)
    assert "rolechat conversations list" in str(caught.value)


# ----- export and import -----------------------------------------------------------------------

def test_export_md_and_json(store: Store) -> None:
    cid = store.create(system="Be brief.", persona="expert", params={"temperature": 0.2})
    one_turn(store, cid, "Why is the sky blue?", "Rayleigh scattering.")
    store.begin_turn(cid, "never answered")

    md = store.export(cid, "md")
    assert md.splitlines()[0] == "# Why is the sky blue?"
    assert "**System:** Be brief." in md
    assert "### You\n\nWhy is the sky blue?\n\n### Assistant\n\nRayleigh scattering." in md
    # Nothing is hidden: the message still waiting for its reply is shown, and says so.
    assert md.endswith("### You (pending: its reply is being written)\n\nnever answered\n")

    data = json.loads(store.export(cid, "json"))
    assert data["system"] == "Be brief."
    assert data["messages"] == [{"role": "user", "content": "Why is the sky blue?"},
                                {"role": "assistant", "content": "Rayleigh scattering."},
                                {"role": "user", "content": "never answered",
                                 "status": "pending"}]
    assert (data["id"], data["title"], data["persona"]) == (cid, "Why is the sky blue?",
                                                            "expert")
    assert data["params"] == {"temperature": 0.2}

    untitled = store.create()
    assert store.export(untitled, "md").startswith(f"# Conversation {untitled}")
    with pytest.raises(InvalidInput, match="Unknown export format"):
        store.export(cid, "html")


def test_import_round_trips_rolechat_json(store: Store) -> None:
    cid = store.create(system="Be brief.", persona="expert", params={"temperature": 0.2})
    one_turn(store, cid, "one", "1")
    one_turn(store, cid, "two", "2")
    new = store.import_file(store.export(cid, "json"))
    assert new != cid
    assert store.conversation(new) == store.conversation(cid)
    assert store.conversation(new).system == "Be brief."
    info = store.info(new)
    assert (info.title, info.persona, info.params) == ("one", "expert", {"temperature": 0.2})


def test_import_an_openai_message_list(store: Store) -> None:
    messages = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Arr!"},
                {"role": "user", "content": "Where is the treasure?"},
                {"role": "assistant", "content": "Buried."}]
    cid = store.import_file(json.dumps(messages))
    conversation = store.conversation(cid)
    assert conversation.system == "You are a pirate."
    assert conversation.to_tuples() == [("Hello", "Arr!"), ("Where is the treasure?", "Buried.")]
    assert store.info(cid).title == "Hello"


def test_import_keeps_an_unanswered_last_message_out_of_the_turns(store: Store) -> None:
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "No answer yet"}]
    cid = store.import_file(json.dumps(messages))
    assert store.conversation(cid).to_tuples() == [("Hello", "Hi")]
    assert [(m.content, m.status) for m in store.messages(cid)] == [
        ("Hello", "complete"), ("Hi", "complete"), ("No answer yet", "interrupted")]


@pytest.mark.parametrize(("text", "match"), [
    ('{"messages": [', "Not valid JSON"),
    ("", "Not valid JSON"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]',
     "should be an assistant message"),
    ('[{"role": "assistant", "content": "a"}]', "should be a user message"),
    ('{"no": "messages"}', "JSON list of messages"),
    ('[{"role": "wizard", "content": "a"}]', "unknown role"),
])
def test_a_bad_import_creates_nothing(store: Store, text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as caught:
        store.import_file(text)
    assert caught.value.exit_code == 2
    assert store.recent() == []


def test_import_conversation(store: Store) -> None:
    conversation = Conversation.from_tuples([("a", "b")], system="sys")
    cid = store.import_conversation(conversation, title="imported")
    assert store.conversation(cid) == conversation
    assert store.info(cid).title == "imported"


# ----- locked and read-only databases ----------------------------------------------------------

class StoreClock:
    """The store's clock, stepped by its own sleeps: how long a write waited, without timing
    it on a machine that may be busy."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def test_a_locked_database(store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = store.create()
    one_turn(store, cid, "q", "a")
    store.lock_timeout = 0.6
    waits: list[str] = []
    store.on_wait = waits.append
    clock = StoreClock()
    monkeypatch.setattr(store_module, "time", clock)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match="locked") as caught:
            store.begin_turn(cid, "blocked")
        # It waited, in steps, up to its timeout and no longer.
        step = store_module.BUSY_STEP_S / 2
        assert clock.slept == [step] * 5 and clock.now == pytest.approx(0.625)
        assert len(waits) == 1 and "another process holds it locked" in waits[0]
        assert caught.value.exit_code == 6 and not caught.value.missing
        assert "no other program holds it locked" in str(caught.value)
        assert not store._db.in_transaction
        # WAL: reading goes on while another process writes.
        assert store.conversation(cid).to_tuples() == [("q", "a")]
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.begin_turn(cid, "after the lock")  # the store works again once the lock is gone
    assert store.messages(cid)[-1].content == "after the lock"


def test_a_second_writer_waits_instead_of_failing(store: Store, db_path: Path) -> None:
    """The busy timeout: a lock held briefly by another process is waited for."""
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    timer.start()
    try:
        cid = store.create()  # waits ~0.3 s with the default timeout, then succeeds
    finally:
        timer.join()
        other.close()
    assert store.info(cid).id == cid


def test_a_read_only_database(store: Store, db_path: Path) -> None:
    """We run as root, so file permissions cannot make the file read-only; SQLite's own
    read-only mode (``mode=ro``) gives the same SQLITE_READONLY error on every write."""
    cid = store.create(title="kept")
    one_turn(store, cid, "q", "a")
    store._db.close()
    store._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None,
                                check_same_thread=False)
    store._db.row_factory = sqlite3.Row
    for write in (lambda: store.create(), lambda: store.begin_turn(cid, "x"),
                  lambda: store.update(cid, title="y"), lambda: store.delete(cid)):
        with pytest.raises(StoreError, match="readonly") as caught:
            write()
        assert caught.value.exit_code == 6
        assert not store._db.in_transaction
    assert store.conversation(cid).to_tuples() == [("q", "a")]  # reading still works
    assert store.info(cid).title == "kept"


# ----- a process killed in the middle of a reply ------------------------------------------------

KILLED_SCRIPT = textwrap.dedent("""
    import sys, time
    from rolechat import load_engine
    from rolechat.params import GenerationParams
    from rolechat.saved import SavedChat
    from rolechat.store import Store

    store = Store(sys.argv[1])
    engine = load_engine(n_threads=1)
    chat = SavedChat.new(engine, store=store,
                         params=GenerationParams(temperature=0, max_new_tokens=16))
    chat.send("Hello! What is your name?")
    chat.send("What is two plus two?")
    print("CID", chat.cid, flush=True)
    print("TWO-TURNS-DONE", flush=True)
    for chunk in chat.stream("Write a long story about a dragon.", max_new_tokens=400):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        time.sleep(0.02)  # keep the reply going long enough to be killed in the middle
    print("THIRD-TURN-DONE", flush=True)
""")
MARKER = "TWO-TURNS-DONE\n"


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_reply(rolechat_home: Path) -> None:
    path = rolechat_home / "rolechat.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SCRIPT, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + 120
    try:
        while True:
            text = output.decode("utf-8", errors="replace")
            if MARKER in text and len(text.split(MARKER, 1)[1].strip()) >= 10:
                break  # the third reply is streaming
            assert time.monotonic() < deadline, f"no streamed output in time: {text!r}"
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, (f"the script ended early: {text!r} "
                               f"{proc.stderr.read().decode() if proc.stderr else ''}")
                output += chunk
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode("utf-8", errors="replace")
    assert proc.returncode == -signal.SIGKILL
    assert "THIRD-TURN-DONE" not in text
    cid = int(text.split("CID ", 1)[1].split()[0])

    plain = sqlite3.connect(path)
    try:
        assert plain.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        plain.close()

    store = Store(path)
    conversation = store.conversation(cid)
    assert [t.user for t in conversation.turns] == ["Hello! What is your name?",
                                                     "What is two plus two?"]
    assert all(t.assistant for t in conversation.turns)
    messages = store.messages(cid)
    assert [(m.role, m.status) for m in messages] == [
        ("user", "complete"), ("assistant", "complete"),
        ("user", "complete"), ("assistant", "complete"),
        ("user", "interrupted")]  # the process died; opening the store marked it
    assert store.recovered == 1
    assert messages[-1].content == "Write a long story about a dragon."
    assert store.info(cid).turns == 2

    # The conversation continues cleanly, without the half-done turn.
    engine = FakeEngine()
    engine.replies.append("Welcome back.")
    chat = SavedChat.resume(engine, store, cid)
    assert chat.chat.conversation == conversation
    chat.send("Are you still there?")
    prompt = bytes(t for t in engine.prompts[-1] if t < 256).decode()
    assert "two plus two" in prompt and "dragon" not in prompt
    again = store.conversation(cid)
    assert len(again.turns) == 3
    assert again.turns[-1].user == "Are you still there?"
    assert again.turns[-1].assistant == "Welcome back."
    assert [m.status for m in store.messages(cid)][-3:] == ["interrupted", "complete",
                                                             "complete"]
    store.close()


# ----- recovery and concurrent reads -------------------------------------------------------------

def test_a_dead_writers_pending_turn_is_interrupted_a_live_ones_is_not(db_path: Path) -> None:
    store = Store(db_path)
    cid = store.create()
    mine = store.begin_turn(cid, "this process, still generating")
    dead = store.begin_turn(cid, "a process that was killed")
    live = store.begin_turn(cid, "another process, still generating")
    with store._transaction() as db:
        db.execute("UPDATE messages SET writer = ? WHERE id = ?", ("999999999:12.00", dead))
        db.execute("UPDATE messages SET writer = ? WHERE id = ?",
                   (store_module.process_id(os.getppid()), live))
    reopened = Store(db_path)
    assert reopened.recovered == 1
    statuses = {m.id: m.status for m in reopened.messages(cid)}
    assert statuses == {mine: "pending", dead: "interrupted", live: "pending"}


def test_reads_never_see_another_threads_open_transaction(store: Store) -> None:
    cid = store.create()
    inside, release, seen = threading.Event(), threading.Event(), []

    def writer() -> None:
        with pytest.raises(RuntimeError), store._transaction() as db:
            db.execute("INSERT INTO messages (conversation_id, seq, role, content, status, "
                       "created_at) VALUES (?, 0, 'user', 'half-written', 'pending', 'now')",
                       (cid,))
            inside.set()
            release.wait(10)
            raise RuntimeError("rolled back")

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    reader = threading.Thread(target=lambda: seen.append(store.messages(cid)))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and seen == []  # the read waits for the transaction to end
    release.set()
    thread.join(10)
    reader.join(10)
    assert seen == [[]]  # the half-written message was never visible


def test_a_reply_the_locked_store_refuses_is_kept_and_saved_later(db_path: Path,
                                                                  caplog: pytest.LogCaptureFixture
                                                                  ) -> None:
    """The database is locked by another process while a reply is generated: the reply is
    kept in a recovery file (one warning), and the next store opened there saves it."""
    store = Store(db_path)
    store.lock_timeout = 0.5
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)

    class LockingEngine(FakeEngine):
        def make_sampler(self, prompt: list[int]) -> Sampler:
            other.execute("BEGIN EXCLUSIVE")  # another process takes the lock mid-reply
            return super().make_sampler(prompt)

    engine = LockingEngine()
    engine.replies.append("the precious reply")
    saved = SavedChat.new(engine, store=store)
    with caplog.at_level("WARNING", "rolechat.store"):
        reply = saved.send("a question")
    assert reply.text == "the precious reply"
    assert "kept in" in caplog.text and len(caplog.records) == 1
    (kept,) = store.recovery_dir.glob("turn-*.json")
    other.execute("ROLLBACK")
    other.close()
    assert saved.cid is not None
    assert [(m.role, m.status) for m in store.messages(saved.cid)] == [("user", "pending")]

    reopened = Store(db_path)  # the next start
    assert reopened.restored == 1 and not kept.exists()
    assert reopened.conversation(saved.cid).to_tuples() == [("a question",
                                                             "the precious reply")]
    user, answer = reopened.messages(saved.cid)
    assert (user.status, answer.status) == ("complete", "complete")
    # The reply's characters and its end-of-turn token.
    assert answer.usage is not None
    assert answer.usage["generated_tokens"] == len(reply.text) + 1


def test_an_interrupted_reply_keeps_its_text_out_of_every_turn(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    cid = store.create(system="S")
    done = store.begin_turn(cid, "first")
    store.complete_turn(cid, done, "one", 1, {})
    cut = store.begin_turn(cid, "second")
    store.interrupt_turn(cut, "the reply so f")
    store.interrupt_turn(cut, "again")  # only a pending message is interrupted, once
    assert [(m.role, m.status, m.content) for m in store.messages(cid)] == [
        ("user", "complete", "first"), ("assistant", "complete", "one"),
        ("user", "interrupted", "second"), ("assistant", "interrupted", "the reply so f")]
    assert store.conversation(cid).to_tuples() == [("first", "one")]
    assert store.info(cid).turns == 1 and store.recent()[0].turns == 1
    store.extend_last_reply(cid, " more", 1, {})  # the complete reply, not the cut one
    assert store.messages(cid)[1].content == "one more"
    store.drop_last_turn(cid)  # /undo removes the last complete turn: its two messages only
    assert [(m.role, m.status) for m in store.messages(cid)] == [("user", "interrupted"),
                                                                  ("assistant", "interrupted")]
    empty = store.begin_turn(cid, "third")
    store.interrupt_turn(empty)  # stopped before any text: the message alone
    assert [(m.role, m.status) for m in store.messages(cid)][-1] == ("user", "interrupted")
    assert len(store.messages(cid)) == 3
    store.close()


# ----- damaged rows ----------------------------------------------------------------------------

def damage(path: Path, cid: int, column: str, value: str) -> None:
    """Write a bad value straight into the file, as a crash, a tool or a person might."""
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute(f"UPDATE conversations SET {column} = ? WHERE id = ?", (value, cid))
    finally:
        db.close()


def test_a_damaged_row_is_listed_and_refused_by_name(store: Store, db_path: Path) -> None:
    good, bad_params, bad_memory = (store.create(title=t) for t in ("good", "p", "m"))
    for cid in (good, bad_params, bad_memory):
        one_turn(store, cid, f"question {cid}", f"answer {cid}")
    damage(db_path, bad_params, "params", "{not json")
    damage(db_path, bad_memory, "memory", "[1,2]")

    listed = {info.id: info for info in store.recent()}  # every conversation is still listed
    assert listed[good].damaged == {}
    assert listed[bad_params].damaged == {"params": "is not valid JSON ('{not json')"}
    assert listed[bad_params].params == {}
    assert listed[bad_memory].damaged == {"memory": "is not a JSON object ('[1,2]')"}
    assert store.info(good).title == "good"

    for cid, name in ((bad_params, "params"), (bad_memory, "memory")):
        with pytest.raises(StoreError) as caught:
            store.info(cid)
        text = str(caught.value)
        assert f"conversation {cid} is damaged: its {name} field is not" in text
        assert f"rolechat conversations export {cid} -o copy.json" in text
        assert f"rolechat conversations delete {cid}" in text
        assert caught.value.exit_code == 6
        with pytest.raises(StoreError, match=f"conversation {cid} is damaged"):
            SavedChat.resume(FakeEngine(), store, cid)

    # What it holds can be exported (the damaged field left out), imported again, continued.
    copy = store.import_file(store.export(bad_params, "json"))
    assert store.conversation(copy).to_tuples() == [(f"question {bad_params}",
                                                     f"answer {bad_params}")]
    assert f"answer {bad_memory}" in store.export(bad_memory, "md")
    store.update(bad_memory, memory={})  # or repaired, or deleted
    assert store.info(bad_memory).memory == {}
    store.delete(bad_params)
    assert bad_params not in {info.id for info in store.recent()}


def test_a_memory_record_of_the_wrong_shape_is_damaged(store: Store, db_path: Path) -> None:
    cid = store.create()
    damage(db_path, cid, "memory", '{"mode": "everything"}')
    (info,) = store.recent()
    assert info.damaged == {"memory": "is not a memory record (memory.mode must be none or "
                                      "summary, got 'everything'.)"}
    with pytest.raises(StoreError, match="its memory field is not a memory record"):
        store.conversation(cid)


def test_a_damaged_usage_reads_as_unknown(store: Store, db_path: Path) -> None:
    cid = store.create()
    one_turn(store, cid, "q", "a")
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE messages SET usage = '{oops' WHERE role = 'assistant'")
    db.close()
    assert [m.usage for m in store.messages(cid)] == [None, None]
    assert store.conversation(cid).to_tuples() == [("q", "a")]


# ----- opened read-only ------------------------------------------------------------------------

def test_a_read_only_open_writes_nothing(store: Store, db_path: Path) -> None:
    cid = store.create(title="kept")
    one_turn(store, cid, "q", "a")
    dead = store.begin_turn(cid, "a killed process's question")
    with store._transaction() as db:
        db.execute("UPDATE messages SET writer = '999999999:12.00' WHERE id = ?", (dead,))
    store.close()
    before = db_path.read_bytes()

    reader = Store(db_path, read_only=True)
    assert reader.info(cid).title == "kept"
    assert reader.conversation(cid).to_tuples() == [("q", "a")]
    assert reader.messages(cid)[-1].status == "interrupted"  # read so, not written
    assert reader.recovered == 0
    for write in (lambda: reader.create(), lambda: reader.begin_turn(cid, "x"),
                  lambda: reader.update(cid, title="y"), lambda: reader.delete(cid),
                  lambda: reader.import_file('[{"role": "user", "content": "x"}]')):
        with pytest.raises(StoreError, match="opened read-only"):
            write()
    reader.close()
    assert db_path.read_bytes() == before
    plain = sqlite3.connect(db_path)
    try:
        assert plain.execute("SELECT status FROM messages WHERE id = ?",
                             (dead,)).fetchone() == ("pending",)
    finally:
        plain.close()


def test_a_read_only_open_of_a_missing_store_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / "rolechat.db"
    reader = Store(path, read_only=True)
    assert reader.recent() == [] and reader.latest() is None
    with pytest.raises(StoreError, match="there is no conversation 1"):
        reader.export(1, "md")
    reader.close()
    assert not path.parent.exists()


def test_a_read_only_open_brings_an_older_schema_up_to_date(store: Store, db_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    cid = store.create(title="old")
    store.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, "CREATE TABLE extra (x);"))
    reader = Store(db_path, read_only=True)
    assert reader.version == len(MIGRATIONS) + 1
    assert reader.info(cid).title == "old"
    reader.close()
