"""A pending message of a process killed with SIGKILL never stays pending: not when the killed
process is a zombie its parent has not reaped yet (the server restarted at once), and not in a
store opened while it still ran (a server that opened the store before). A live process's
pending turn is left alone and still completes. Real processes, real signals, real SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rolechat.store import Store, process_alive

#: Opens the store, begins a turn, says so, then waits: "partial TEXT" saves the reply's text
#: so far (as a server does while it writes), "complete" completes the turn.
WRITER = textwrap.dedent("""
    import sys
    from rolechat.store import Store

    store = Store(sys.argv[1])
    cid = store.create()
    user = store.begin_turn(cid, "a question being answered")
    print(cid, user, flush=True)
    line = sys.stdin.readline()
    if line.startswith("partial "):
        print(store.save_partial(user, line[8:-1]), flush=True)
        line = sys.stdin.readline()
    if line == "complete\\n":
        store.complete_turn(cid, user, "the answer", 2, {})
        print("COMPLETED", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "rolechat.db"
    Store(path).close()
    return path


@pytest.fixture
def writer(db_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def started(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    assert proc.stdout is not None
    cid, user = proc.stdout.readline().split()
    return int(cid), int(user)


def kill_unreaped(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL, then wait until it has died *without reaping it*: it stays a zombie, as a
    killed server does until its parent (a supervisor, a shell, a test harness) waits."""
    if not hasattr(os, "waitid"):
        pytest.skip("needs os.waitid to wait for a child without reaping it")
    os.kill(proc.pid, signal.SIGKILL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


def status_in_file(path: Path, message_id: int) -> str:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return str(db.execute("SELECT status FROM messages WHERE id = ?",
                              (message_id,)).fetchone()[0])
    finally:
        db.close()


def test_a_store_opened_after_the_kill_shows_no_pending_message(
        db_path: Path, writer: subprocess.Popen[bytes]) -> None:
    cid, user = started(writer)
    kill_unreaped(writer)
    store = Store(db_path)  # the restarted server, its killed predecessor not reaped yet
    assert store.recovered == 1
    assert [(m.id, m.status) for m in store.messages(cid)] == [(user, "interrupted")]
    assert status_in_file(db_path, user) == "interrupted"
    store.close()


def test_a_store_opened_before_the_kill_sees_it_on_the_next_read(
        db_path: Path, writer: subprocess.Popen[bytes]) -> None:
    cid, user = started(writer)
    store = Store(db_path)  # opened while the writer ran: its turn is rightly pending
    assert store.recovered == 0
    assert [m.status for m in store.messages(cid)] == ["pending"]
    kill_unreaped(writer)
    assert [m.status for m in store.messages(cid)] == ["interrupted"]  # no restart needed
    assert status_in_file(db_path, user) == "interrupted"
    assert store.conversation(cid).turns == []
    store.close()


def test_the_text_a_killed_writer_had_saved_comes_back_after_its_message(
        db_path: Path, writer: subprocess.Popen[bytes]) -> None:
    cid, user = started(writer)
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write("partial Half of the answer, 中文 too\n".encode())
    writer.stdin.flush()
    assert writer.stdout.readline() == b"True\n"
    before = Store(db_path, read_only=True).version_of(cid)
    kill_unreaped(writer)
    store = Store(db_path)  # the restarted server
    assert store.recovered == 1
    assert [(m.role, m.status, m.content) for m in store.messages(cid)] == [
        ("user", "interrupted", "a question being answered"),
        ("assistant", "interrupted", "Half of the answer, 中文 too")]
    assert store.version_of(cid) > before  # a change the clients that follow it see
    assert store.conversation(cid).turns == []  # never part of a prompt
    assert not store.save_partial(user, "too late")  # no longer pending
    store.close()


def test_a_read_only_store_reads_a_dead_writers_message_as_interrupted(
        db_path: Path, writer: subprocess.Popen[bytes]) -> None:
    cid, user = started(writer)
    kill_unreaped(writer)
    reader = Store(db_path, read_only=True)
    assert [m.status for m in reader.messages(cid)] == ["interrupted"]
    assert status_in_file(db_path, user) == "pending"  # a reader writes nothing
    reader.close()


def test_a_live_writers_turn_is_left_alone_and_completes(
        db_path: Path, writer: subprocess.Popen[bytes]) -> None:
    cid, _ = started(writer)
    store = Store(db_path)
    assert store.recovered == 0
    assert [m.status for m in store.messages(cid)] == ["pending"]
    assert Store(db_path).recovered == 0  # opened again: still left alone
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(b"complete\n")
    writer.stdin.flush()
    assert writer.stdout.readline() == b"COMPLETED\n"
    assert [(m.role, m.status) for m in store.messages(cid)] == [("user", "complete"),
                                                                  ("assistant", "complete")]
    assert store.conversation(cid).to_tuples() == [("a question being answered",
                                                    "the answer")]
    store.close()


def test_process_alive() -> None:
    me = psutil.Process()
    assert process_alive(f"{me.pid}:{me.create_time():.2f}")
    assert not process_alive(f"{me.pid}:{me.create_time() - 5:.2f}")  # the pid, reused
    assert not process_alive(None) and not process_alive("") and not process_alive("x:y")
    assert not process_alive("999999999:12.00")
