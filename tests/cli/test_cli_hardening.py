"""The CLI as a new user meets it: bad bytes, failed runs that must save nothing, a locked
store, signals, closed pipes, and messages that say what is really wrong (real processes)."""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROLECHAT
from rolechat.store import Store

INVALID, MODEL = 2, 4
COUNT = "Count from 1 to 1000, separated by commas."


def conversations(home: Path) -> list[int]:
    if not (home / "rolechat.db").exists():
        return []
    store = Store(home / "rolechat.db")
    try:
        return [info.id for info in store.recent()]
    finally:
        store.close()


# ----- bytes that are not UTF-8 ------------------------------------------------------------------

def test_invalid_bytes_on_stdin_are_a_clear_error(cli, rolechat_home: Path) -> None:
    proc = subprocess.run([str(ROLECHAT), "ask", "--threads", "1"], input=b"hello \xff\xfe",
                          capture_output=True, env=cli.env, timeout=60, check=False)
    assert proc.returncode == INVALID and proc.stdout == b""
    assert proc.stderr.decode().strip() == ("error: The question is not valid text: it holds "
                                           "the byte 0xff, which is not UTF-8, at character "
                                           "6. Send UTF-8 text.")
    assert conversations(rolechat_home) == []  # nothing saved


def test_importing_a_file_that_is_not_utf8(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"role": "user", "content": "hi \xff"}]')
    line = cli.fails("conversations", "import", str(bad), code=INVALID)
    assert "is not UTF-8 text: byte 0xff" in line


@pytest.mark.parametrize(("field", "words"), [
    ('"params": {"temperature": 99}', ["temperature", "99"]),
    ('"persona": "nobody"', ["nobody", "concise, expert, support, tutorial"]),
])
def test_import_refuses_what_could_never_resume(cli, rolechat_home: Path, tmp_path: Path,
                                               field: str, words: list[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                    f'"content": "yo"}}], {field}}}', encoding="utf-8")
    line = cli.fails("conversations", "import", str(path), code=INVALID)
    assert all(word in line for word in words), line
    assert conversations(rolechat_home) == []


# ----- nothing saved until it is valid ------------------------------------------------------------

def test_a_failed_ask_leaves_no_conversation(cli, rolechat_home: Path) -> None:
    cli.fails("ask", "hi", "--max-new-tokens", "9000", "--threads", "1", code=INVALID)
    cli.fails("ask", "x" * 40_000, "--threads", "1", code=3)  # cannot fit in the context
    assert conversations(rolechat_home) == []
    first = cli.ask_json("Hello.", *cli.FAST)
    # Flags given to one `ask -c` apply to that reply only.
    cli.ask_json("-c", "Again.", "--max-new-tokens", "4", "--temperature", "0.5",
                 "--threads", "1")
    store = Store(rolechat_home / "rolechat.db")
    assert store.info(first["conversation_id"]).params == {"temperature": 0.0,
                                                            "max_new_tokens": 16}
    store.close()


# ----- a store another process holds --------------------------------------------------------------

def test_a_locked_store_is_waited_for_visibly(cli, rolechat_home: Path) -> None:
    cli.ask_json("Hello.", *cli.FAST)  # the store exists
    other = sqlite3.connect(rolechat_home / "rolechat.db", isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # held until the command says it is waiting
    proc = subprocess.Popen([str(ROLECHAT), "ask", "-c", "And now?", *cli.FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli.env,
                            cwd=cli.tmp)
    assert proc.stderr is not None
    said = b""
    try:
        while b"waiting for the conversation store" not in said:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                break  # it ended without saying so: the assertion below shows what it said
            said += chunk
    finally:
        other.execute("ROLLBACK")
        other.close()
    out, rest = proc.communicate(timeout=120)
    assert proc.returncode == 0, (said + rest).decode()
    assert "waiting for the conversation store" in said.decode()
    assert out.decode().strip()  # and then it answered


# ----- signals and pipes ---------------------------------------------------------------------

def test_sigterm_mid_reply_marks_the_turn_interrupted(cli, rolechat_home: Path) -> None:
    proc = subprocess.Popen([str(ROLECHAT), "ask", COUNT, "-t", "0", "--max-new-tokens", "600",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli.env)
    assert proc.stdout is not None
    proc.stdout.read(20)  # the reply is streaming
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    store = Store(rolechat_home / "rolechat.db")
    (cid,) = [info.id for info in store.recent()]
    kept = [(m.role, m.status) for m in store.messages(cid)]
    assert kept == [("user", "interrupted"), ("assistant", "interrupted")]  # the text so far
    assert store.messages(cid)[1].content and store.conversation(cid).turns == []
    store.close()


def test_a_closed_stdout_ends_quietly(cli) -> None:
    proc = subprocess.Popen([str(ROLECHAT), "ask", COUNT, "-t", "0", "--max-new-tokens", "300",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli.env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(5)
    proc.stdout.close()  # `| head -c 5`
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


# ----- messages that say what is wrong ---------------------------------------------------------

def test_a_template_path_that_is_not_a_file(cli) -> None:
    line = cli.fails("ask", "hi", "--chat-template", "/nonexistent/file.jinja", "--threads", "1",
                     code=INVALID)
    assert "There is no chat template file '/nonexistent/file.jinja'" in line


def test_a_tiny_gguf_says_why(cli, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.gguf"
    header = struct.pack("<4sIQQ", b"GGUF", 3, 1, 1000)  # 1 tensor, 1000 keys, in 100 bytes
    tiny.write_bytes(header + b"\x00" * (100 - len(header)))
    line = cli.fails("ask", "hi", "--model", str(tiny), code=MODEL)
    assert "the GGUF header is damaged (the file ends in the middle of its header)" in line


def test_a_huge_context_length_says_so(cli) -> None:
    line = cli.fails("ask", "hi", "--context-length", "100000000", "--threads", "1", code=MODEL)
    assert "context of 100000000 tokens" in line and "--context-length (at most 8192)" in line


def test_nan_is_not_a_number(cli) -> None:
    line = cli.fails("ask", "hi", "-t", "nan", code=INVALID)
    assert "temperature: input should be a finite number (got nan)" in line


def test_a_persona_with_an_empty_system_prompt(cli, rolechat_home: Path) -> None:
    folder = rolechat_home / "personas"
    folder.mkdir(parents=True)
    (folder / "blank.toml").write_text('system = ""\n', encoding="utf-8")
    line = cli.fails("ask", "hi", "--persona", "blank", code=INVALID)
    assert "empty" in line and "Write a system prompt" in line
    assert "Type some text" not in line


def test_the_default_threads_survive_contention_setting(cli) -> None:
    """llama.cpp's OpenMP threads are told to spin briefly (see benchmarks/contention.py)."""
    code = ("import os, rolechat.engines.llama_cpp as m; print(os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in cli.env.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([str(Path(str(ROLECHAT)).parent / "python"), "-c", code],
                          capture_output=True, text=True, env=env, timeout=60, check=True)
    assert done.stdout.strip() == "1000"
    env["GOMP_SPINCOUNT"] = "5"
    done = subprocess.run([str(Path(str(ROLECHAT)).parent / "python"), "-c", code],
                          capture_output=True, text=True, env=env, timeout=60, check=True)
    assert done.stdout.strip() == "5"  # a value the user set is kept
    assert os.environ.get("GOMP_SPINCOUNT") in (None, "1000", "5") and time
