"""What the REPL shows on a terminal: replies in both renderings, and every other line wrapped
between words at the terminal's width (FakeEngine; a real pseudo-terminal read back through a
terminal emulator)."""

from __future__ import annotations

import io
import re

from wcwidth import wcswidth

from fakes import FakeEngine
from rolechat.cli.render import WordWrap
from rolechat.cli.repl import Repl
from rolechat.saved import SavedChat


def test_markdown_reply_is_rendered_once_on_a_terminal(terminal):
    engine = FakeEngine()
    engine.replies += ["**Bold** answer\n\n- one\n- two", "plain answer"]
    term = terminal(80)
    repl = Repl(SavedChat.new(engine, params={"max_new_tokens": 64}), out=term.out)
    repl.handle("q1")
    repl.handle("q2")
    text = "\n".join(term.lines())
    assert "**" not in text and "Bold answer" in text  # rendered while it streamed...
    assert "─" not in text  # ...with no rule and no second copy after it
    assert text.count("Bold answer") == 1
    assert "• one" in text and "• two" in text
    assert "plain answer" in text


def test_plain_rendering_wraps_words_on_a_terminal(terminal):
    engine = FakeEngine()
    words = " ".join(f"word{i:02d}" for i in range(30))
    engine.replies.append(words)
    term = terminal(40)
    repl = Repl(SavedChat.new(engine, params={"max_new_tokens": 400}), out=term.out,
                rendering="plain")
    repl.handle("q")
    lines = term.lines()
    reply = [line for line in lines if line.startswith("word")]
    assert " ".join(" ".join(reply).split()) == words  # every word, none broken
    assert all(len(line) <= 40 for line in reply) and len(reply) > 1


def test_word_wrap_never_breaks_a_word_and_keeps_newlines():
    wrap = WordWrap(12)
    text = "alpha beta gamma delta\nepsilon zeta averyveryverylongword end"
    out = "".join(wrap.push(piece) for piece in (text[:5], text[5:17], text[17:])) + wrap.finish()
    lines = out.split("\n")
    assert all(len(line) <= 12 for line in lines), lines
    assert out.replace("\n", " ").split() == \
        ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "averyveryver", "ylongword",
         "end"]
    assert "delta\nepsilon" in out.replace(" \n", "\n")  # the reply's own newline stays


def _words(text: str) -> list[str]:
    """Latin words whole, every other character on its own (Chinese has no spaces); numbers
    (timings) vary from run to run, the words around them do not."""
    return re.findall(r"[A-Za-z']+|N|\S", re.sub(r"\d+(?:\.\d+)?", "N", text))


def test_every_line_wraps_between_words_on_a_terminal(terminal):
    reply = ("An answer that goes on for a while, so that it needs several lines at forty "
             "columns, 然后用中文继续说下去，这一段话没有空格，也必须在屏幕边缘正确换行。")
    commands = ["A question long enough to need two lines at forty columns, surely.",
                "/history", "/window", "/params", "/help", "/system", "/foo",
                "/set temperature 7", "/undo", "/history"]
    term = terminal(40)
    shown_by: dict[str, str] = {}
    for out in (term.out, io.StringIO()):
        engine = FakeEngine()
        engine.replies.append(reply)
        repl = Repl(SavedChat.new(engine, params={"max_new_tokens": 400}), out=out,
                    rendering="plain")
        for line in commands:
            repl.handle(line)
        if isinstance(out, io.StringIO):
            shown_by["pipe"] = out.getvalue()
    lines = term.lines()
    assert all(wcswidth(line) <= 40 for line in lines), lines
    raw = shown_by["pipe"]  # not a terminal: lines as they are, unwrapped
    assert any(wcswidth(line) > 40 for line in raw.splitlines())
    # Wrapping only put line breaks where there were spaces (or inside Chinese).
    assert _words("\n".join(lines)) == _words(raw), (lines, raw)
