"""A terminal for tests: a pseudo-terminal of a given size whose output is read back through a
terminal emulator (pyte), as a person would see it."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import threading

import pyte


def screen_lines(log: str, columns: int, rows: int) -> list[str]:
    """What a terminal of this size shows after receiving ``log``: the lines that scrolled off
    its top (its scrollback) and then its screen, without trailing blanks. Wide characters take
    two columns, as in a real terminal."""
    screen = pyte.HistoryScreen(columns, rows, history=100_000)
    pyte.Stream(screen).feed(log)
    gone = ["".join(line[x].data for x in range(columns)).rstrip()
            for line in screen.history.top]
    lines = gone + [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return lines


class Terminal:
    """A pseudo-terminal of a given size: what the code under test writes to ``out`` (a real
    terminal for it: ``isatty()``, its size) is read back as a person would see it."""

    def __init__(self, columns: int, rows: int) -> None:
        self.columns, self.rows = columns, rows
        self._master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.out = open(slave, "w", encoding="utf-8")  # noqa: SIM115 (closed by lines())
        self._received = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # the other end is closed and everything was read
                return
            if not data:
                return
            self._received.extend(data)

    def lines(self) -> list[str]:
        """Close the terminal; the lines it shows (scrollback first)."""
        self.close()
        return screen_lines(self._received.decode("utf-8"), self.columns, self.rows)

    def close(self) -> None:
        if not self.out.closed:
            self.out.close()
            self._reader.join(timeout=10)
            os.close(self._master)

