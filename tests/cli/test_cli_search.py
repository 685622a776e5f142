"""``rolechat conversations search``, the installed command in a subprocess: one plain line a hit
in a pipe (the match highlighted on a terminal), how to open it, ``--json``, ``--limit``,
Chinese text, and queries it refuses."""

from __future__ import annotations

import json

import pexpect
import pytest

from conftest import Cli
from rolechat.store import Store


@pytest.fixture
def seeded(cli: Cli) -> dict[str, int]:
    store = Store(cli.home / "rolechat.db")
    lights = store.create(title="Lighthouses")
    store.complete_turn(lights, store.begin_turn(lights, "Who keeps the lighthouse?"),
                        "A keeper, once;\nnow a machine.", 5, {})
    cooking = store.create(title="晚饭", owner="someone")  # the CLI sees every owner's
    store.complete_turn(cooking, store.begin_turn(cooking, "我想做家常菜"), "试试番茄炒蛋。", 5, {})
    many = store.create(title="Keepers all")
    for i in range(4):
        store.complete_turn(many, store.begin_turn(many, f"keeper number {i}"), "ok", 1, {})
    store.close()
    return {"lights": lights, "cooking": cooking, "many": many}


def test_one_line_a_hit_and_how_to_open_it(cli: Cli, seeded: dict[str, int]) -> None:
    result = cli.ok("conversations", "search", "machine")
    assert result.out.splitlines() == [
        f"{seeded['lights']:>4}  Lighthouses  assistant: A keeper, once; now a machine."]
    assert "\x1b[" not in result.out  # plain in a pipe
    assert f"rolechat chat --cid {seeded['lights']}" in result.err

    chinese = cli.ok("conversations", "search", "家常菜")
    assert chinese.out.splitlines() == [f"{seeded['cooking']:>4}  晚饭  user: 我想做家常菜"]
    short = cli.ok("conversations", "search", "菜")  # under 3 characters: the LIKE scan
    assert short.out == chinese.out

    nothing = cli.ok("conversations", "search", "zeppelin")
    assert nothing.out == "" and "zeppelin" in nothing.err


def test_json_and_limit(cli: Cli, seeded: dict[str, int]) -> None:
    hits = json.loads(cli.ok("conversations", "search", "keeper", "--json").out)
    assert len(hits) == 4  # 3 of one conversation at most, and the other's
    assert {h["conversation_id"] for h in hits} == {seeded["lights"], seeded["many"]}
    first = next(h for h in hits if h["conversation_id"] == seeded["lights"])
    assert first["title"] == "Lighthouses" and first["role"] == "assistant"
    assert [p["text"] for p in first["parts"] if p["match"]] == ["keeper"]
    assert isinstance(first["message_id"], int) and first["snippet"].startswith("A keeper")
    limited = json.loads(cli.ok("conversations", "search", "keeper", "--json",
                                "--limit", "1").out)
    assert len(limited) == 1


def test_the_match_is_highlighted_on_a_terminal(cli: Cli, seeded: dict[str, int]) -> None:
    child = cli.spawn("conversations", "search", "machine")
    child.expect(pexpect.EOF)
    raw = child.before
    assert "machine" in raw and "\x1b[" in raw
    before_match = raw[:raw.index("machine")]
    assert before_match.rstrip("\x1b[0123456789;m").endswith("now a ")  # a style starts there
    assert raw[raw.index("machine") + len("machine"):].startswith("\x1b[")


@pytest.mark.parametrize("query", ["", "   ", "x" * 201])
def test_a_blank_or_long_query_is_refused(cli: Cli, query: str) -> None:
    line = cli.fails("conversations", "search", query, code=2)
    assert "search" in line
