"""How rolechat shows text on a terminal: replies (one rendering, never two) and every other line.

Contract:
- Widths are display columns (``wcwidth``): a CJK character takes two. Every line rolechat
  writes to a terminal wraps between words at the terminal's width (:class:`WordWrap`,
  :func:`wrap`, :func:`echo`); a Latin word is never broken unless it is longer than a line.
  CJK text has no spaces, so a line may also break before or after any wide character, as
  terminals and rich break it. Not on a terminal (a pipe, a file), text is written as it is.
- :class:`ReplyView` shows one streaming reply:
  - ``markdown`` (the default on a terminal): the reply is rendered as Markdown while it streams
    (bold, lists and code blocks appear as such; words wrap at the terminal's edge). Blocks that
    nothing later can change are printed for good as they complete; only the block being
    written is redrawn (``rich.live``), and while it is taller than the screen its last lines
    are shown, then all of it when the reply ends. Every word is on the screen once, in order.
  - ``plain``: the text as it comes, wrapped by :class:`WordWrap`.
  - Not on a terminal, the text is written as it comes, unwrapped.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import click
from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from wcwidth import wcwidth

RENDERINGS = ("markdown", "plain")


def terminal_size(stream: TextIO) -> os.terminal_size | None:
    """The size of the terminal ``stream`` writes to, now (it may have been resized, and a
    ``COLUMNS`` variable left over from elsewhere does not count); None when it is not one."""
    try:
        if not stream.isatty():
            return None
        return os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None


class WordWrap:
    """Streamed text → the same text with newlines put between words so that no line passes
    ``width`` display columns. A word longer than a line is split, as a terminal would; a line
    may break on either side of a wide (CJK) character."""

    def __init__(self, width: int) -> None:
        self.width = max(10, width)
        self._column = 0
        self._word = ""
        self._word_width = 0

    def push(self, text: str) -> str:
        out: list[str] = []
        for char in text:
            if char == "\n":
                out.append(self._flush() + "\n")
                self._column = 0
            elif char == "\r":
                continue  # it would send the cursor back over the line
            elif char.isspace():
                out.append(self._flush())
                out.append(self._space(char))
            else:
                width = wcwidth(char)
                if width == 2:  # a wide character is a word of its own
                    out.append(self._flush())
                    if self._column + 2 > self.width:
                        out.append("\n")
                        self._column = 0
                    out.append(char)
                    self._column += 2
                elif width <= 0:  # combining marks, joiners: they go with what precedes them
                    if self._word:
                        self._word += char
                    else:
                        out.append(char)
                else:
                    self._word += char
                    self._word_width += 1
                    if self._word_width >= self.width:
                        out.append(self._flush())
        return "".join(out)

    def _space(self, char: str) -> str:
        """A space where the line has room; at the edge the line ends there anyway."""
        if char == "\t":
            width = 8 - self._column % 8
            char = " " * width
        else:
            width = max(1, wcwidth(char))
        if self._column + width > self.width:
            return ""
        self._column += width
        return char

    def _flush(self) -> str:
        word, width = self._word, self._word_width
        self._word, self._word_width = "", 0
        if not word:
            return ""
        if self._column and self._column + width > self.width:
            self._column = width
            return "\n" + word
        self._column += width
        return word

    def finish(self) -> str:
        return self._flush()


def wrap(text: str, width: int) -> str:
    """``text`` with newlines between words so that no line passes ``width`` columns."""
    wrapper = WordWrap(width)
    return wrapper.push(text) + wrapper.finish()


def wrapped(text: str, stream: TextIO) -> str:
    """``text`` wrapped at the width of the terminal ``stream`` writes to; as it is otherwise."""
    size = terminal_size(stream)
    return text if size is None else wrap(text, size.columns)


def echo(text: str = "", *, err: bool = False, nl: bool = True) -> None:
    """``click.echo``, wrapped between words when the stream is a terminal."""
    stream = sys.stderr if err else sys.stdout
    click.echo(wrapped(text, stream), err=err, nl=nl)


#: The parser rich's Markdown uses, to find where its blocks start.
_BLOCKS = MarkdownIt().enable("strikethrough").enable("table")


def settled_length(text: str) -> int:
    """How much of ``text`` (Markdown being written) is whole blocks that nothing written after
    them can change: every top-level block before the last one, up to a blank line. 0 if none."""
    starts = [token.map[0] for token in _BLOCKS.parse(text)
              if token.level == 0 and token.map is not None]
    if len(starts) < 2:
        return 0
    lines = text.splitlines(keepends=True)
    last = starts[-1]
    if last < 1 or last > len(lines) or lines[last - 1].strip():
        return 0  # not separated by a blank line: the last block may still join the one before
    return sum(len(line) for line in lines[:last])


def _blank(line: list[Segment]) -> bool:
    """A line with nothing on it (a code block's padding has a background: it is not blank)."""
    return all(not segment.text.strip() and not (segment.style and segment.style.bgcolor)
               for segment in line)


def markdown_lines(console: Console, options: ConsoleOptions,
                   text: str) -> list[list[Segment]]:
    """``text`` rendered as Markdown, without blank lines before or after it: the view puts one
    blank line between blocks, as rich does between the blocks of one document."""
    lines = console.render_lines(Markdown(text), options, pad=False)
    start, end = 0, len(lines)
    while start < end and _blank(lines[start]):
        start += 1
    while end > start and _blank(lines[end - 1]):
        end -= 1
    return lines[start:end]


class _Lines:
    """Lines already rendered, each ended."""

    def __init__(self, lines: list[list[Segment]]) -> None:
        self._lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        for line in self._lines:
            yield from line
            yield Segment.line()


class _Tail:
    """The block being written, as Markdown; while the reply streams, only as many of its last
    lines as the screen holds (the live region must never be taller than the screen)."""

    def __init__(self, view: ReplyView) -> None:
        self._view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        lines = markdown_lines(console, options, self._view.tail)
        if not self._view.finished:
            lines = lines[-max(1, options.size.height - 1):]
        for index, line in enumerate(lines):
            if index:
                yield Segment.line()
            yield from line


class ReplyView:
    """Shows one reply while it streams: ``show(chunk)`` per chunk, then ``done()``."""

    #: The block being written is drawn again at most this often (seconds), not for every token.
    REFRESH_S = 0.1

    def __init__(self, out: TextIO, rendering: str) -> None:
        self._out = out
        size = terminal_size(out)
        self._rendering = rendering if size is not None else "raw"
        self._text = ""
        self._settled = 0  # characters of the text printed for good (markdown)
        self._drawn = 0.0
        self.finished = False
        self._live: Live | None = None
        self._wrap = WordWrap(size.columns if size is not None else 80)
        if self._rendering == "markdown" and size is not None:
            self._console = Console(file=out, width=size.columns, height=size.lines,
                                    highlight=False, soft_wrap=False)
            tail = _Tail(self)
            self._live = Live(console=self._console, auto_refresh=False, transient=False,
                              vertical_overflow="visible", get_renderable=lambda: tail)
            self._live.start()

    @property
    def tail(self) -> str:
        """The text not yet printed for good."""
        return self._text[self._settled:]

    def show(self, chunk: str) -> None:
        self._text += chunk
        if self._live is not None:
            if "\n" in chunk:
                self._settle()
            now = time.monotonic()
            if now - self._drawn >= self.REFRESH_S:
                self._drawn = now
                self._live.refresh()
            return
        if self._rendering == "plain":
            self._out.write(self._wrap.push(chunk))
        else:
            self._out.write(chunk)
        self._out.flush()

    def _settle(self) -> None:
        """Print the blocks that are complete above the live region, for good."""
        tail = self.tail
        cut = settled_length(tail)
        if not cut:
            return
        self._settled += cut  # first: the live region is drawn again below what is printed
        lines = markdown_lines(self._console, self._console.options, tail[:cut])
        if lines:
            self._console.print(_Lines([*lines, []]))  # and a blank line between blocks

    def done(self) -> None:
        """The reply ended (or was stopped): leave what is shown, end the line."""
        self.finished = True
        if self._live is not None:
            self._live.stop()  # draws the last block whole
            return
        if self._rendering == "plain":
            self._out.write(self._wrap.finish())
        self._out.write("\n")
        self._out.flush()
