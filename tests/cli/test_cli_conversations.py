"""``rolechat ask`` logging (``-c``, ``--cid``, ``--no-log``), ``rolechat conversations ...``
and resuming a piped ``rolechat chat``, through the real installed command."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROLECHAT, Cli, Result
from rolechat.conversation import Conversation
from rolechat.store import Store

#: Short, greedy, single-threaded generation.
FAST = ("-t", "0", "--max-new-tokens", "8", "--threads", "1")
#: A model that cannot load: a command that fails with exit 2 failed before loading it.
NO_MODEL = ("--model", "/nonexistent/model.gguf")


def store(cli: Cli) -> Store:
    return Store(cli.home / "rolechat.db")


def seeded(cli: Cli, turns: list[tuple[str, str]], system: str | None = "Be brief.") -> int:
    """A saved conversation, written straight into the command's store (no model needed)."""
    saved = store(cli)
    try:
        return saved.import_conversation(Conversation.from_tuples(turns, system=system))
    finally:
        saved.close()


# ----- ask --------------------------------------------------------------------------------------

def test_ask_logs_continues_and_no_log(cli: Cli) -> None:
    first = cli.ask_json(*FAST, "What is the capital of France?")
    second = cli.ask_json(*FAST, "Name a colour.")
    assert isinstance(first["conversation_id"], int)
    assert first["conversation_id"] != second["conversation_id"]

    listing = cli.ok("conversations", "list").out
    assert "What is the capital of France?" in listing and "Name a colour." in listing
    assert len(store(cli).recent()) == 2

    unlogged = cli.ask_json(*FAST, "--no-log", "Say hi.")
    assert unlogged["conversation_id"] is None
    assert len(store(cli).recent()) == 2
    assert "Say hi." not in cli.ok("conversations", "list").out

    # -c continues the most recent conversation.
    cont = cli.ask_json(*FAST, "-c", "And of Italy?")
    assert cont["conversation_id"] == second["conversation_id"]
    shown = cli.ok("conversations", "show", str(second["conversation_id"])).out
    assert shown.count("### You") == 2
    assert shown.index("Name a colour.") < shown.index("And of Italy?")
    assert second["response"].strip() in shown

    # --cid continues a chosen one; the prompt holds its earlier turn.
    cid = first["conversation_id"]
    again = cli.ask_json(*FAST, "--cid", str(cid), "Repeat my first question.")
    assert again["conversation_id"] == cid
    assert again["window"]["prompt_tokens"] > first["window"]["prompt_tokens"]
    shown = cli.ok("conversations", "show", str(cid)).out
    assert "What is the capital of France?" in shown and "Repeat my first question." in shown
    assert len(store(cli).recent()) == 2
    # ... and becomes the most recent, which -c picks next.
    assert store(cli).latest() == cid


def test_ask_streamed_is_logged_too(cli: Cli) -> None:
    out = cli.ok("ask", *FAST, "Hello there").out
    (info,) = store(cli).recent()
    conversation = store(cli).conversation(info.id)
    assert conversation.to_tuples() == [("Hello there", out.rstrip("\n"))]
    assert info.title == "Hello there" and info.turns == 1


def test_ask_with_an_unknown_cid_fails_before_loading_the_model(cli: Cli) -> None:
    line = cli.fails("ask", *NO_MODEL, "--cid", "999", "hello", code=2)
    assert "there is no conversation 999" in line
    assert "rolechat conversations list" in line


def test_ask_continue_with_an_empty_store(cli: Cli) -> None:
    line = cli.fails("ask", *NO_MODEL, "-c", "hello", code=2)
    assert line == ("error: There is no saved conversation to continue. "
                    "Start one with `rolechat chat`.")
    assert store(cli).recent() == []


def test_ask_no_log_does_not_need_the_store(cli: Cli) -> None:
    cli.ask_json(*FAST, "--no-log", "hi")
    assert not (cli.home / "rolechat.db").exists()


# ----- conversations -----------------------------------------------------------------------------

def test_list_empty_and_limit(cli: Cli) -> None:
    assert "id" in cli.ok("conversations", "list").out
    for n in range(3):
        seeded(cli, [(f"question number {n}", "answer")])
    out = cli.ok("conversations", "list", "--limit", "2").out
    assert "question number 2" in out and "question number 1" in out
    assert "question number 0" not in out
    cli.fails("conversations", "list", "--limit", "0", code=2)


def test_show_export_import_delete(cli: Cli) -> None:
    cid = seeded(cli, [("Why is the sky blue?", "Rayleigh scattering."),
                       ("And sunsets?", "Longer path, more red.")])
    shown = cli.ok("conversations", "show", str(cid)).out
    assert shown.startswith("# Why is the sky blue?")
    assert shown.count("### You") == 2 and shown.count("### Assistant") == 2
    assert "**System:** Be brief." in shown

    md = cli.ok("conversations", "export", str(cid), "--format", "md").out
    assert md == shown

    exported = cli.ok("conversations", "export", str(cid)).json()  # json is the default
    assert exported["system"] == "Be brief."
    assert len(exported["messages"]) == 4

    target = cli.tmp / "saved.json"
    result = cli.ok("conversations", "export", str(cid), "--format", "json", "-o", str(target))
    assert result.out == "" and "wrote" in result.err
    assert json.loads(target.read_text(encoding="utf-8")) == exported

    imported = cli.ok("conversations", "import", str(target))
    new = int(imported.out.strip())
    assert new != cid
    assert f"rolechat chat --cid {new}" in imported.err
    assert store(cli).conversation(new) == store(cli).conversation(cid)
    assert cli.ok("conversations", "show", str(new)).out == shown

    deleted = cli.ok("conversations", "delete", str(cid))
    assert deleted.out == "" and f"deleted conversation {cid}" in deleted.err
    line = cli.fails("conversations", "show", str(cid), code=2)
    assert f"there is no conversation {cid}" in line
    cli.fails("conversations", "delete", str(cid), code=2)
    cli.fails("conversations", "export", str(cid), code=2)
    assert [c.id for c in store(cli).recent()] == [new]


def test_import_an_openai_list_from_a_file_and_stdin(cli: Cli) -> None:
    messages = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Arr!"},
                {"role": "user", "content": "unanswered"}]
    path = cli.write("openai.json", json.dumps(messages))
    result = cli.ok("conversations", "import", str(path))
    cid = int(result.out)
    conversation = store(cli).conversation(cid)
    assert conversation.system == "You are a pirate."
    assert conversation.to_tuples() == [("Hello", "Arr!")]
    # The unanswered question is kept, not dropped, and the command says so.
    assert "last message has no reply; it is kept as an unanswered message" in result.err
    assert [(m.content, m.status) for m in store(cli).messages(cid)][-1] == ("unanswered",
                                                                          "interrupted")
    shown = cli.ok("conversations", "show", str(cid)).out
    assert "### You (interrupted: not answered)\n\nunanswered" in shown

    piped = cli.ok("conversations", "import", "-", stdin=json.dumps(messages[:3]))
    assert store(cli).conversation(int(piped.out)) == conversation
    assert "no reply" not in piped.err


def test_a_bad_import_fails_cleanly(cli: Cli) -> None:
    corrupt = cli.write("corrupt.json", '{"messages": [{"role": "user", ')
    assert "Not valid JSON" in cli.fails("conversations", "import", str(corrupt), code=2)
    twice = cli.write("twice.json", json.dumps([{"role": "user", "content": "a"},
                                                {"role": "user", "content": "b"}]))
    assert "should be an assistant message" in cli.fails("conversations", "import", str(twice),
                                                         code=2)
    cli.fails("conversations", "import", str(cli.tmp / "missing.json"), code=2)
    empty = cli.write("empty.json", "[]")
    assert "there is nothing to import" in cli.fails("conversations", "import", str(empty),
                                                     code=2)
    deep = cli.write("deep.json", "[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in cli.fails("conversations", "import", str(deep), code=2)
    memory = cli.write("memory.json", json.dumps({
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "memory": {"mode": "summary", "pins": [3]}}))
    assert "memory.pins" in cli.fails("conversations", "import", str(memory), code=2)
    assert store(cli).recent() == []


def test_bad_arguments(cli: Cli) -> None:
    cid = seeded(cli, [("q", "a")])
    cli.fails("conversations", "export", str(cid), "--format", "html", code=2)
    cli.fails("conversations", "show", "abc", code=2)
    cli.fails("conversations", "show", "12345", code=2)


# ----- chat -c, piped ----------------------------------------------------------------------------

def test_piped_chat_resumes_with_continue(cli: Cli) -> None:
    cli.ok("chat", *FAST, stdin="hello\n")
    (info,) = store(cli).recent()
    assert info.title == "hello" and info.turns == 1

    resumed = cli.ok("chat", "-c", *FAST, stdin="/prompt\n")
    assert "<|im_start|>user\nhello<|im_end|>" in resumed.out  # /prompt shows the resumed turn
    assert len(store(cli).recent()) == 1  # resumed, not a new conversation


def test_a_store_that_is_not_a_database(cli: Cli) -> None:
    path = cli.home / "rolechat.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a database " * 100)
    line = cli.fails("conversations", "list", code=6)
    assert "rolechat.db" in line and "not a database" in line
    cli.fails("ask", *NO_MODEL, "hello", code=6)


def test_the_store_path_is_per_home(cli: Cli, tmp_path: Path) -> None:
    cid = seeded(cli, [("q", "a")])
    other = tmp_path / "other-home"
    result = cli.run("conversations", "show", str(cid))
    assert result.code == 0
    cli.env["ROLECHAT_HOME"] = str(other)
    cli.fails("conversations", "show", str(cid), code=2)


def test_chat_no_log_saves_nothing_and_can_read_a_saved_conversation(cli: Cli) -> None:
    result = cli.ok("chat", "--no-log", *FAST, stdin="hello\n/exit\n")
    assert "tokens ·" in result.out
    assert not (cli.home / "rolechat.db").exists()  # no store is even opened...
    assert not (cli.home / "input_history").exists()  # ...nor the input history

    cid = seeded(cli, [("What is 2+2?", "4.")])
    result = cli.ok("chat", "--no-log", "-c", *FAST, stdin="/prompt\nAnd 3+3?\n/exit\n")
    assert "What is 2+2?" in result.out  # the saved history is in the prompt
    saved = store(cli)
    try:
        assert saved.conversation(cid).to_tuples() == [("What is 2+2?", "4.")]  # unchanged
        assert len(saved.recent(10)) == 1
    finally:
        saved.close()


def test_memory_flags_are_saved_with_the_conversation(cli: Cli) -> None:
    data = cli.ask_json(*FAST, "--memory", "summary", "--summary-tokens", "40", "Hi, I am Ada.")
    cid = data["conversation_id"]
    assert data["window"]["summary"] is None and data["window"]["pinned"] == []
    saved = store(cli)
    try:
        assert saved.info(cid).memory["mode"] == "summary"
    finally:
        saved.close()
    error = cli.fails("ask", "--memory", "everything", "hi", code=2)
    assert "--memory" in error and "'everything' is not one of 'none', 'summary'" in error
    error = cli.fails("ask", "--summary-tokens", "2", "hi", code=2)
    assert "--summary-tokens" in error


# ----- interrupted turns, damaged rows, read-only and full stores -------------------------------

def test_show_and_export_keep_interrupted_turns(cli: Cli) -> None:
    cid = seeded(cli, [("Show me code", "Sure.")])
    saved = store(cli)
    try:
        cut = saved.begin_turn(cid, "Write a loop")
        saved.interrupt_turn(cut, "Here:\n\n```python\nfor i in range(3):\n")
    finally:
        saved.close()
    shown = cli.ok("conversations", "show", str(cid)).out
    assert "### You (interrupted)\n\nWrite a loop" in shown
    assert ("### Assistant (interrupted: the reply was cut off here)\n\nHere:\n\n```python\n"
            "for i in range(3):\n```\n") in shown
    exported = cli.ok("conversations", "export", str(cid)).json()
    assert exported["messages"][2:] == [
        {"role": "user", "content": "Write a loop", "status": "interrupted"},
        {"role": "assistant", "content": "Here:\n\n```python\nfor i in range(3):\n",
         "status": "interrupted"}]
    path = cli.write("again.json", json.dumps(exported))
    again = int(cli.ok("conversations", "import", str(path)).out)
    assert store(cli).conversation(again).to_tuples() == [("Show me code", "Sure.")]
    assert cli.ok("conversations", "show", str(again)).out == shown.replace(
        f"Conversation {cid}", f"Conversation {again}")


def test_a_damaged_row_leaves_the_list_usable(cli: Cli) -> None:
    seeded(cli, [("A healthy one", "yes")])
    bad = seeded(cli, [("A damaged one", "still here")])
    worse = seeded(cli, [("Bad memory", "here too")])
    db = sqlite3.connect(cli.home / "rolechat.db")
    with db:
        db.execute("UPDATE conversations SET params = '{oops' WHERE id = ?", (bad,))
        db.execute("UPDATE conversations SET memory = '[1,2]' WHERE id = ?", (worse,))
    db.close()

    listed = cli.ok("conversations", "list")
    assert "A healthy one" in listed.out
    assert "A damaged one [damaged: params]" in listed.out
    assert "Bad memory [damaged: memory]" in listed.out
    assert f"conversation(s) {worse}, {bad} are damaged" in listed.err

    line = cli.fails("ask", *NO_MODEL, "--cid", str(bad), "hello", code=6)
    assert f"conversation {bad} is damaged: its params field is not valid JSON" in line
    assert f"rolechat conversations export {bad} -o copy.json" in line
    line = cli.fails("chat", *NO_MODEL, "--cid", str(worse), code=6, stdin="hi\n")
    assert f"conversation {worse} is damaged: its memory field is not a JSON object" in line

    shown = cli.ok("conversations", "show", str(bad))
    assert "still here" in shown.out and "is damaged" in shown.err
    copy = cli.tmp / "copy.json"
    cli.ok("conversations", "export", str(bad), "-o", str(copy))
    fixed = int(cli.ok("conversations", "import", str(copy)).out)
    assert store(cli).conversation(fixed).to_tuples() == [("A damaged one", "still here")]
    cli.ok("conversations", "delete", str(bad))
    assert cli.ok("conversations", "list").out.count("[damaged") == 1


def without_file_permission_override() -> None:
    """In the child: root loses the capabilities that ignore file permissions, so a read-only
    file or folder is read-only for it too (another user needs nothing)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def with_a_full_disk() -> None:
    """In the child: no file may grow (a full disk, as far as this process can tell)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def run_limited(cli: Cli, limit: Callable[[], None], *args: str) -> Result:
    try:
        proc = subprocess.run([str(ROLECHAT), "conversations", *args], env=cli.env,
                              cwd=cli.tmp, capture_output=True, preexec_fn=limit, timeout=60,
                              check=False)
    except subprocess.SubprocessError as exc:  # e.g. root without CAP_SETPCAP
        pytest.skip(f"this machine cannot limit a child process that way ({exc})")
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_a_read_only_store_can_be_read(cli: Cli) -> None:
    """A read-only file in a read-only folder, without a WAL file: list, show and export
    work (they used to open the store for writing); writes fail with one line."""
    cid = seeded(cli, [("Why is the sky blue?", "Rayleigh scattering.")])
    expected = cli.ok("conversations", "show", str(cid)).out
    database = cli.home / "rolechat.db"
    database.chmod(0o444)
    cli.home.chmod(0o555)
    try:
        listed = run_limited(cli, without_file_permission_override, "list")
        assert listed.code == 0, listed.describe()
        assert "Why is the sky blue?" in listed.out
        shown = run_limited(cli, without_file_permission_override, "show", str(cid))
        assert (shown.code, shown.out) == (0, expected), shown.describe()
        exported = run_limited(cli, without_file_permission_override, "export", str(cid))
        assert exported.code == 0 and json.loads(exported.out)["id"] == cid
        for write in (("delete", str(cid)), ("import", str(cli.write("in.json", "[{\"role\": "
                                                                   "\"user\", \"content\": "
                                                                   "\"hi\"}]")))):
            refused = run_limited(cli, without_file_permission_override, *write)
            assert refused.code == 6, refused.describe()
            (line,) = refused.err.splitlines()
            assert line.startswith("error: ") and "it cannot be written" in line
            assert "list, show and export still work" in line
    finally:
        cli.home.chmod(0o755)
        database.chmod(0o644)
    assert [c.id for c in store(cli).recent()] == [cid]


def test_a_full_disk_does_not_stop_reads(cli: Cli) -> None:
    cid = seeded(cli, [("Why is the sky blue?", "Rayleigh scattering.")])
    expected = cli.ok("conversations", "show", str(cid)).out
    shown = run_limited(cli, with_a_full_disk, "show", str(cid))
    assert (shown.code, shown.out) == (0, expected), shown.describe()
    listed = run_limited(cli, with_a_full_disk, "list")
    assert listed.code == 0 and "Why is the sky blue?" in listed.out, listed.describe()
    refused = run_limited(cli, with_a_full_disk, "delete", str(cid))
    assert refused.code == 6 and len(refused.err.splitlines()) == 1, refused.describe()
    assert refused.err.startswith("error: Conversation store")
    assert [c.id for c in store(cli).recent()] == [cid]
