"""Two REPLs on one conversation: in-process (two Repl objects on two Store connections to one
file, the fake engine) and for real (two `rolechat chat` processes in pseudo-terminals, the
embedded model). The second notices the first's turns before its next message; /undo, /retry
and /continue of a turn it did not show are refused with one line and change nothing."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat.cli.repl import Repl
from rolechat.saved import SavedChat
from rolechat.store import Store

SHORT = ("-t", "0", "--max-new-tokens", "12", "--threads", "1")
FIRST, SECOND, THIRD = "What is the capital of France?", "And of Germany?", "And of Spain?"
CHANGED = "this conversation changed in another window; /history to see it"
ADDED = re.compile(r"\[(\d+) turn\(s\) added in another window are now part of this "
                   r"conversation; /history to see them\]")


class Window:
    """One REPL, as a terminal would show it (its output so far, read and forgotten)."""

    def __init__(self, saved: SavedChat) -> None:
        self.out = io.StringIO()
        self.repl = Repl(saved, out=self.out)

    def __call__(self, line: str) -> str:
        self.repl.handle(line)
        text = self.out.getvalue()
        self.out.truncate(0)
        self.out.seek(0)
        return text


@pytest.fixture
def windows(tmp_path: Path) -> Iterator[tuple[Window, Window, Store]]:
    path = tmp_path / "rolechat.db"
    stores = [Store(path) for _ in range(3)]
    first = SavedChat.new(FakeEngine(), store=stores[0], params={"max_new_tokens": 32})
    a = Window(first)
    a("first question")
    assert first.cid is not None
    b = Window(SavedChat.resume(FakeEngine(), stores[1], first.cid))
    yield a, b, stores[2]
    for store in stores:
        store.close()


def kept(output: str) -> int:
    """How many earlier turns the reply's prompt kept (from its usage line)."""
    match = re.search(r"(\d+) earlier turn\(s\) kept", output)
    assert match, output
    return int(match.group(1))


def turns(store: Store, window: Window) -> list[tuple[str, str]]:
    cid = window.repl.saved.cid
    assert cid is not None
    return store.conversation(cid).to_tuples()


def test_a_stale_undo_is_refused_and_history_shows_why(windows: tuple[Window, Window,
                                                                      Store]) -> None:
    a, b, look = windows
    a("A's second question")
    before = turns(look, a)
    said = b("/undo")
    assert CHANGED in said and "removed the last turn" not in said
    assert turns(look, a) == before  # nothing deleted
    assert "A's second question" in b("/history")
    assert "removed the last turn: A's second question" in b("/undo")  # now it saw it
    assert turns(look, a) == [("first question", "echo")]


def test_a_stale_retry_or_continue_is_refused(windows: tuple[Window, Window, Store]) -> None:
    a, b, look = windows
    a("A's second question")
    before = turns(look, a)
    said = b("/retry")
    assert CHANGED in said and "retrying" not in said and "previous reply" not in said
    assert turns(look, a) == before
    a("/undo")
    said = b("/continue")
    assert CHANGED in said
    assert turns(look, a) == [("first question", "echo")]
    # With no turn shown, "nothing to undo" only when the store has none either.
    a("/undo")
    b("/history")
    a("another question")
    said = b("/retry")
    assert CHANGED in said and "nothing to retry" not in said


def test_the_next_message_notices_turns_added_elsewhere(windows: tuple[Window, Window,
                                                                       Store]) -> None:
    a, b, look = windows
    a("A's second question")
    a("A's third question")
    said = b("B's question")
    notice = ADDED.search(said)
    assert notice and notice.group(1) == "2", said
    assert said.index(notice.group(0)) < said.index("tok/s")  # said before the reply
    assert kept(said) == 3  # the prompt held all of them
    engine = b.repl.chat.engine
    assert isinstance(engine, FakeEngine)
    prompt = bytes(t for t in engine.prompts[-1] if t < 256).decode()
    assert "A's third question" in prompt
    assert [user for user, _ in turns(look, a)] == [
        "first question", "A's second question", "A's third question", "B's question"]
    assert not ADDED.search(b("/history"))  # said once
    assert CHANGED in a("/undo")  # A has not shown B's turn yet
    assert "B's question" in a("/history")  # the refusal showed it the store's turns
    assert "removed the last turn: B's question" in a("/undo")
    said = b("/window")
    assert "turn(s) you saw were changed or removed" in said and "/history" in said


@pytest.mark.slow
def test_two_repls_in_terminals(spawn_repl, rolechat_home: Path) -> None:
    one = spawn_repl(*SHORT)
    one.send(FIRST, "tok/s")
    two = spawn_repl("-c", *SHORT)  # the same conversation, in a second window
    assert FIRST in two.intro

    one.send(SECOND, "tok/s")
    refused = two.send("/undo", "/history to see it")
    assert CHANGED in refused
    store = Store(rolechat_home / "rolechat.db")
    cid = store.latest()
    assert cid is not None
    assert [user for user, _ in store.conversation(cid).to_tuples()] == [FIRST, SECOND]
    assert "[2] you › " in two.send("/history", SECOND)

    one.send(THIRD, "tok/s")
    said = two.send("And of Italy?", "tok/s")
    notice = ADDED.search(said)
    assert notice and notice.group(1) == "1", said
    assert kept(said) == 3  # the prompt kept all three earlier turns
    assert [user for user, _ in store.conversation(cid).to_tuples()] == [
        FIRST, SECOND, THIRD, "And of Italy?"]
    store.close()
    for repl in (one, two):
        repl.child.sendeof()
        assert repl.finish() == 0
