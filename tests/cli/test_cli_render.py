"""How replies and lines show on a terminal (cli/render.py): every word, once, in order, at any
width, in both renderings, in English and in Chinese. A real pseudo-terminal of the given size
receives the output and a terminal emulator (pyte, with scrollback) reads the screen back."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.markdown import Markdown
from wcwidth import wcswidth

from rolechat.cli.render import RENDERINGS, ReplyView, WordWrap, wrap
from screens import screen_lines

ENGLISH = """\
The ocean has a long and **storied history**, one that spans centuries and continents. From \
the earliest days of human civilization, the ocean has been a vital resource, providing \
sustenance and support to countless civilizations. The ancient Greeks, in particular, were \
instrumental in shaping the maritime industry, as they harnessed the power of the ocean to \
build their ships and navigate across the known world. Phoenician traders carried purple dye, \
cedar and glass from port to port; Polynesian navigators crossed thousands of miles of open \
water by reading the swells, the stars and the flight of birds; and the merchants of the \
Indian Ocean timed their voyages to the monsoon winds, which reversed direction with the \
seasons and carried whole fleets between Africa, Arabia and India. Each of these traditions \
grew out of close observation and passed from one generation of sailors to the next.

In the *eighteenth century*, the development of sailing ships revolutionized the way people \
traveled, and the ocean became a crucial component of this journey. The invention of the \
sailboat, which allowed sailors to navigate with the wind, was a testament to the ingenuity of \
the human spirit.

Three things changed everything:

1. The compass, which let sailors keep a heading far from land.
2. The chronometer, which finally made longitude something a navigator could measure.
3. Steam, which freed ships from the wind altogether.

The advent of the steam engine revolutionized the way ships operated, and the ocean became a \
critical component of this revolution. The development of the tanker, a large vessel designed \
to carry cargo across great distances, changed trade forever."""

CHINESE = """\
海洋有着悠久而丰富的历史，跨越了许多世纪和大陆。从人类文明的最早时期开始，海洋就是一种重要的资源，\
为无数文明提供了食物和支持。古希腊人在塑造航海业方面发挥了重要作用，他们利用海洋的力量建造船只，\
并在世界各地航行。腓尼基商人把紫色染料、雪松和玻璃从一个港口运到另一个港口；波利尼西亚的航海者通过\
观察海浪、星辰和飞鸟的方向，横渡了数千英里的开阔水域；印度洋上的商人则根据季风安排航程。\
今天我们用Python和SQLite这样的工具来记录这些故事。

在**十八世纪**，帆船的发展彻底改变了人们旅行的方式，海洋成为这段旅程中至关重要的组成部分。帆船的发明\
使水手能够借助风力航行，这证明了人类精神的独创性。造船厂以其精湛的工艺而闻名，见证了造船业的兴起。

三件事改变了一切：

1. 指南针，让水手在远离陆地时也能保持航向。
2. 航海天文钟，让经度第一次可以被测量。
3. 蒸汽机，让船只彻底摆脱了风的束缚。

蒸汽机的出现彻底改变了船舶的运行方式，海洋成为这场革命的关键组成部分。油轮是一种设计用于长距离\
运输货物的大型船只，它永远地改变了贸易。如今，集装箱船每天在各大洋之间往返，把货物送到世界的每一个角落。"""

TEXTS = {"english": ENGLISH, "chinese": CHINESE}


def words(text: str) -> list[str]:
    """The words of a text, whatever Markdown did to it: Latin words and numbers, and each
    Chinese character (Chinese has no spaces); punctuation, bullets and emphasis left out."""
    return re.findall(r"[A-Za-z0-9']+|[\u4e00-\u9fff]", text)


def chunks(text: str, sizes: tuple[int, ...] = (3, 1, 4, 1, 5, 2)) -> list[str]:
    """The text in pieces of a few characters, as a model streams tokens."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(text[start:start + size])
        start += size
    return pieces


def stream(terminal, text: str, columns: int, rendering: str, rows: int = 24) -> list[str]:
    term = terminal(columns, rows)
    view = ReplyView(term.out, rendering)
    # Markdown is drawn again for every chunk here (see REFRESH_S below): words, not letters.
    for chunk in chunks(text, (7, 3, 11, 5) if rendering == "markdown" else (3, 1, 4, 1, 5, 2)):
        view.show(chunk)
    view.done()
    return term.lines()


def rendered_whole(text: str, columns: int) -> list[str]:
    """The Markdown rendered at once, as lines on a screen (blank lines at the ends dropped)."""
    buffer = io.StringIO()
    Console(file=buffer, width=columns, force_terminal=True).print(Markdown(text))
    lines = screen_lines(buffer.getvalue().replace("\n", "\r\n"), columns, 500)
    while lines and not lines[0]:
        lines.pop(0)
    return lines


@pytest.mark.parametrize("columns", [40, 120])
@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("language", TEXTS)
def test_a_long_reply_shows_every_word_once(terminal, monkeypatch, language, rendering,
                                            columns):
    monkeypatch.setattr(ReplyView, "REFRESH_S", 0.0)  # redrawn at every chunk: the hard case
    text = TEXTS[language]
    lines = stream(terminal, text, columns, rendering)
    shown = "\n".join(lines)
    if rendering == "markdown" and language == "chinese":
        # rich folds a run of Chinese at the edge, wherever it is: a Latin word inside it may
        # be split over two lines. Every character is there, once, in order.
        assert "".join(words(shown)) == "".join(words(text)), shown
    else:
        assert words(shown) == words(text), shown  # every word, once, in order
    assert all(wcswidth(line) <= columns for line in lines), lines
    if rendering == "plain":  # the text itself, with line breaks only where it had a space...
        if language == "english":
            assert shown.split() == text.split(), shown
        else:  # ...or between two characters of Chinese
            assert "".join(shown.split()) == "".join(text.split()), shown
    else:  # the same screen as the whole reply rendered at once: nothing lost or doubled
        assert lines == rendered_whole(text, columns)
        assert "**" not in shown


def test_a_block_taller_than_the_screen_is_shown_whole_once(terminal, monkeypatch):
    monkeypatch.setattr(ReplyView, "REFRESH_S", 0.0)
    text = " ".join(f"word{i}" for i in range(200)) + "\n\nThe end."
    lines = stream(terminal, text, 40, "markdown", rows=10)  # the paragraph takes 30 lines
    assert words("\n".join(lines)) == words(text)
    assert lines == rendered_whole(text, 40)


def test_not_a_terminal_gets_the_text_as_it_comes():
    out = io.StringIO()
    view = ReplyView(out, "markdown")
    for chunk in chunks(ENGLISH):
        view.show(chunk)
    view.done()
    assert out.getvalue() == ENGLISH + "\n"


def test_word_wrap_counts_display_columns():
    paragraph = CHINESE.split("\n")[-1]  # Chinese only
    lines = wrap(paragraph, 40).split("\n")
    assert all(wcswidth(line) <= 40 for line in lines), lines
    # Chinese breaks between any two characters, so every line but the last is full (a
    # line may end one column short, where a wide character did not fit).
    assert all(wcswidth(line) >= 39 for line in lines[:-1]), lines
    assert "".join(lines) == paragraph


@pytest.mark.parametrize("width", range(10, 41, 3))
def test_word_wrap_keeps_latin_words_whole_in_chinese_text(width):
    text = "我们今天用Python和SQLite写了一个程序，它能记住每一次对话。" * 3
    lines = wrap(text, width).split("\n")
    assert all(wcswidth(line) <= width for line in lines), lines
    assert "".join(lines) == text
    for word in ("Python", "SQLite"):
        assert sum(line.count(word) for line in lines) == 3, lines


def test_word_wrap_streams_the_same_as_at_once():
    for text in (ENGLISH, CHINESE):
        wrapper = WordWrap(37)
        streamed = "".join(wrapper.push(chunk) for chunk in chunks(text)) + wrapper.finish()
        assert streamed == wrap(text, 37)


def test_word_wrap_splits_only_a_word_longer_than_the_line():
    lines = wrap("a " + "x" * 25 + " b", 10).split("\n")
    assert lines == ["a ", "x" * 10, "x" * 10, "x" * 5 + " b"]
    assert wrap("tab\tthen", 10) == "tab     \nthen"
