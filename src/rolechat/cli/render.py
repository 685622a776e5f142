"""How the REPL shows a streaming reply: one rendering, never two.

Contract:
- ``markdown`` (the default on a terminal): the reply is re-rendered as Markdown while it
  streams (``rich.live``, as ``transformers chat`` does): bold, lists and code blocks appear as
  such, and words wrap at the terminal's edge.
- ``plain``: the text as it comes, with words wrapped at the terminal's edge
  (:class:`WordWrap`), never broken in the middle.
- Not on a terminal (a pipe, a file), the text is written as it comes, unwrapped.
"""

from __future__ import annotations

import contextlib
import os
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

RENDERINGS = ("markdown", "plain")


class WordWrap:
    """Streamed text → the same text with newlines put between words so that no line passes
    ``width`` columns. A word longer than a line is split, as a terminal would."""

    def __init__(self, width: int) -> None:
        self.width = max(10, width)
        self._column = 0
        self._word = ""

    def push(self, text: str) -> str:
        out: list[str] = []
        for char in text:
            if char == "\n":
                out.append(self._flush() + "\n")
                self._column = 0
            elif char.isspace():
                out.append(self._flush())
                if self._column < self.width:
                    out.append(char)
                    self._column += 1
            else:
                self._word += char
                if len(self._word) >= self.width:
                    out.append(self._flush())
        return "".join(out)

    def _flush(self) -> str:
        word, self._word = self._word, ""
        if not word:
            return ""
        if self._column and self._column + len(word) > self.width:
            self._column = len(word)
            return "\n" + word
        self._column += len(word)
        return word

    def finish(self) -> str:
        return self._flush()


class ReplyView:
    """Shows one reply while it streams: ``show(chunk)`` per chunk, then ``done()``."""

    def __init__(self, out: TextIO, console: Console, rendering: str) -> None:
        self._out = out
        self._terminal = out.isatty()
        self._rendering = rendering if self._terminal else "raw"
        self._text = ""
        self._live: Live | None = None
        # The terminal's size now: it may have been resized, and a COLUMNS variable left over
        # from elsewhere does not count.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if self._terminal:
                console.width = os.get_terminal_size(out.fileno()).columns
        self._wrap = WordWrap(console.width)
        if self._rendering == "markdown":
            # The Markdown is parsed again when the screen refreshes (10 times a second), not
            # for every token.
            self._live = Live(console=console, refresh_per_second=10, transient=False,
                              vertical_overflow="visible", get_renderable=self._rendered)
            self._live.start()

    def _rendered(self) -> Markdown | Text:
        return Markdown(self._text) if self._text.strip() else Text("")

    def show(self, chunk: str) -> None:
        self._text += chunk
        if self._live is not None:
            return
        if self._rendering == "plain":
            self._out.write(self._wrap.push(chunk))
            self._out.flush()
        else:
            self._out.write(chunk)
            self._out.flush()

    def done(self) -> None:
        """The reply ended (or was stopped): leave what is shown, end the line."""
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            return
        if self._rendering == "plain":
            self._out.write(self._wrap.finish())
        self._out.write("\n")
        self._out.flush()
