"""Helpers for the CLI tests: run the real installed ``rolechat`` command.

Every run gets its own ``ROLECHAT_HOME`` (the test's temp home from the autouse fixture in
tests/conftest.py). Model runs use ``--threads 1``: the machine may be shared with other test
runs, and llama.cpp's spinning worker threads slow down badly when they compete for cores.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest

from screens import Terminal, screen_lines

ROLECHAT = Path(sys.executable).parent / "rolechat"

#: Short, greedy, single-threaded generation for fast and deterministic runs.
FAST = ("-t", "0", "--max-new-tokens", "16", "--threads", "1")

#: CSI / OSC / two-byte escape sequences, and carriage returns (a pty turns \n into \r\n).
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_=>]|\r")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout:\n{self.out}\n--- stderr:\n{self.err}"


class Cli:
    """Runs ``rolechat`` as a subprocess in an isolated home."""

    FAST = FAST

    def __init__(self, home: Path, tmp: Path) -> None:
        self.home = home
        self.tmp = tmp
        self.env = {**os.environ, "ROLECHAT_HOME": str(home)}
        self.children: list[pexpect.spawn] = []

    @staticmethod
    def clean(text: str) -> str:
        return strip_ansi(text)

    def run(self, *args: str, stdin: str | None = None, timeout: float = 60) -> Result:
        proc = subprocess.run(
            [str(ROLECHAT), *args], input=None if stdin is None else stdin.encode("utf-8"),
            stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True,
            env=self.env, cwd=self.tmp, timeout=timeout, check=False)
        return Result(proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8"))

    def ok(self, *args: str, stdin: str | None = None) -> Result:
        result = self.run(*args, stdin=stdin)
        assert result.code == 0, result.describe()
        return result

    def fails(self, *args: str, code: int | None = None, stdin: str | None = None) -> str:
        """Run a command that must fail cleanly; return its one error line."""
        result = self.run(*args, stdin=stdin)
        assert result.code != 0, result.describe()
        if code is not None:
            assert result.code == code, result.describe()
        assert result.out == "", result.describe()
        lines = result.err.splitlines()
        assert len(lines) == 1, result.describe()
        assert lines[0].startswith("error: "), result.describe()
        assert "Traceback" not in result.err
        return lines[0]

    def write(self, name: str, content: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        return path

    def spawn(self, *args: str) -> pexpect.spawn:
        """``rolechat ARGS`` in a pseudo-terminal (stdin and stdout are a TTY)."""
        child = pexpect.spawn(str(ROLECHAT), list(args), env={**self.env, "TERM": "xterm"},
                              dimensions=(40, 200), encoding="utf-8", timeout=30,
                              preexec_fn=terminal_signals)
        self.children.append(child)
        return child

    def on_terminal(self, *args: str, columns: int = 40,
                    timeout: float = 60) -> tuple[int, list[str]]:
        """Run ``rolechat ARGS`` in a pseudo-terminal ``columns`` wide, to the end: (exit
        status, the lines a terminal shows, scrollback first)."""
        child = pexpect.spawn(str(ROLECHAT), list(args), env={**self.env, "TERM": "xterm"},
                              dimensions=(24, columns), encoding="utf-8", timeout=timeout,
                              preexec_fn=terminal_signals)
        self.children.append(child)
        log = io.StringIO()
        child.logfile_read = log
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
        return child.exitstatus, screen_lines(log.getvalue(), columns, 24)

    def ask_json(self, *args: str, stdin: str | None = None) -> dict[str, Any]:
        data = self.ok("ask", "--json", *args, stdin=stdin).json()
        assert isinstance(data, dict)
        return data


@pytest.fixture
def cli(rolechat_home: Path, tmp_path: Path) -> Iterator[Cli]:
    work = tmp_path / "work"
    work.mkdir()
    runner = Cli(rolechat_home, work)
    yield runner
    for child in runner.children:
        if child.isalive():
            child.terminate(force=True)


def terminal_signals() -> None:
    """In the child: Ctrl-C interrupts, as in a terminal. A shell script that starts a job in
    the background (`make test &`) has it ignore SIGINT, and every process below it inherits
    that, rolechat included; Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ReplSession:
    """``rolechat chat`` in a real pseudo-terminal (prompt_toolkit with TERM=xterm).

    prompt_toolkit redraws ``you ›`` once more when a line is accepted (or Ctrl-C is pressed),
    so waiting for the prompt right after sending would match that final redraw. :meth:`send`
    therefore waits first for a marker that only the command's own output contains, and then
    for the next prompt. Only then is the terminal in raw mode again: a Ctrl-D sent earlier
    would reach a terminal in cooked mode and be lost.
    """

    PROMPT = "you ›"

    def __init__(self, home: Path, *args: str, columns: int = 200) -> None:
        self.columns = columns
        env = {**os.environ, "ROLECHAT_HOME": str(home), "TERM": "xterm",
               "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.home = home
        env.pop("NO_COLOR", None)
        for name in ("COLUMNS", "LINES"):  # the pty's own size, as in a terminal (pytest-xdist
            env.pop(name, None)             # workers have COLUMNS=80)
        if "--render" not in args:  # plain text: each reply is written once, as it comes
            args = ("--render", "plain", *args)
        #: Everything the terminal received (for a terminal emulator to replay).
        self.log = io.StringIO()
        self.child = pexpect.spawn(str(ROLECHAT), ["chat", *args], env=env,
                                   dimensions=(40, columns), encoding="utf-8", timeout=30,
                                   preexec_fn=terminal_signals)
        self.child.logfile_read = self.log
        self.banner = self.expect("leave")  # the end of the banner, wrapped at any width
        #: What was printed between the banner and the first prompt.
        self.intro = self.wait_prompt()

    def expect(self, pattern: str) -> str:
        """Wait for the literal ``pattern``; return the clean text before it and it."""
        self.child.expect_exact(pattern)
        return strip_ansi(self.child.before + self.child.after)

    def wait_prompt(self) -> str:
        """Wait for the next prompt; return the clean text printed before it."""
        self.child.expect_exact(self.PROMPT)
        return strip_ansi(self.child.before)

    def send(self, line: str, marker: str) -> str:
        """Send one line; return its clean output (up to the next prompt)."""
        assert marker not in line
        self.child.sendline(line)
        return self.expect(marker) + self.wait_prompt()

    def finish(self, timeout: float = 30) -> int:
        """Wait for the process to end; return its exit status."""
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        assert self.child.signalstatus is None, f"killed by signal {self.child.signalstatus}"
        status = self.child.exitstatus
        assert status is not None
        return status


@pytest.fixture
def spawn_repl(rolechat_home: Path) -> Iterator[Any]:
    sessions: list[ReplSession] = []

    def spawn(*args: str, columns: int = 200) -> ReplSession:
        session = ReplSession(rolechat_home, *args, columns=columns)
        sessions.append(session)
        return session

    yield spawn
    for session in sessions:
        if session.child.isalive():
            session.child.terminate(force=True)


@pytest.fixture
def terminal() -> Iterator[Any]:
    """``terminal(columns, rows=24)``: a :class:`Terminal`, closed after the test."""
    opened: list[Terminal] = []

    def open_terminal(columns: int, rows: int = 24) -> Terminal:
        opened.append(Terminal(columns, rows))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()
