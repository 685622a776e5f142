"""Every line a command prints on a terminal wraps between words at the terminal's width; in a
pipe the same text comes out as it is (no model needed here)."""

from __future__ import annotations

import json

from wcwidth import wcswidth


def test_conversations_show_wraps_between_words_on_a_terminal(cli):
    long = ("A message long enough to need several lines at forty columns, with words "
            "that must never be broken in the middle, 还有一段没有空格的中文句子也要正确换行。")
    path = cli.write("c.json", json.dumps([{"role": "user", "content": long},
                                           {"role": "assistant", "content": long}],
                                          ensure_ascii=False))
    cid = cli.ok("conversations", "import", str(path)).out.strip()
    piped = cli.ok("conversations", "show", cid).out  # not a terminal: as it is
    assert long in piped
    code, lines = cli.on_terminal("conversations", "show", cid, columns=40)
    assert code == 0
    assert all(wcswidth(line) <= 40 for line in lines), lines
    # Only line breaks were added: where there was a space, or inside the Chinese.
    latin = [word for word in " ".join(lines).split() if word.isascii()]
    assert latin == [word for word in piped.split() if word.isascii()], lines
    assert "".join("".join(lines).split()) == "".join(piped.split())
