"""Two saved chats on one conversation, as two REPLs have them (two Store objects on one
database file, the fake engine): the second notices the first's turns before its next message,
and an undo, retry or continue of a turn it did not see is refused and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat.errors import ConversationChanged
from rolechat.saved import SavedChat
from rolechat.store import Store


@pytest.fixture
def windows(tmp_path: Path) -> Iterator[tuple[SavedChat, SavedChat, Store]]:
    """Window A starts a conversation with one turn; window B resumes it. Each has its own
    Store (connection) and engine; the third Store is for looking."""
    path = tmp_path / "rolechat.db"
    stores = [Store(path) for _ in range(3)]
    a = SavedChat.new(FakeEngine(), store=stores[0])
    a.send("first question")
    assert a.cid is not None
    b = SavedChat.resume(FakeEngine(), stores[1], a.cid)
    yield a, b, stores[2]
    for store in stores:
        store.close()


def prompt_text(engine: FakeEngine) -> str:
    """The last prompt the fake engine got, as text."""
    return bytes(t for t in engine.prompts[-1] if t < 256).decode()


def stored(store: Store, saved: SavedChat) -> list[tuple[str, str]]:
    assert saved.cid is not None
    return store.conversation(saved.cid).to_tuples()


def test_the_next_message_holds_the_other_windows_turns(windows: tuple[SavedChat, SavedChat,
                                                                        Store]) -> None:
    a, b, look = windows
    a.send("A's second question")
    a.send("A's third question")
    changes = b.refresh()  # what the REPL does (and says) before it sends
    assert (changes.added, changes.removed, changes.settings) == (2, 0, False)
    assert not b.refresh()  # nothing more: one read of the version
    b.send("B's question")
    engine = b.chat.engine
    assert isinstance(engine, FakeEngine)
    prompt = prompt_text(engine)
    assert "A's second question" in prompt and "A's third question" in prompt
    assert [user for user, _ in stored(look, b)] == [
        "first question", "A's second question", "A's third question", "B's question"]
    # Without the explicit refresh, sending catches up by itself.
    b.send("B again")
    a.send("A after B")
    engine = a.chat.engine
    assert isinstance(engine, FakeEngine)
    assert "B again" in prompt_text(engine) and "B's question" in prompt_text(engine)
    assert a.turn_ids[:5] == b.turn_ids and len(a.turn_ids) == 6


def test_undo_of_a_turn_it_did_not_see_is_refused(windows: tuple[SavedChat, SavedChat,
                                                                  Store]) -> None:
    a, b, look = windows
    a.send("A's second question")  # B has not seen it
    before, seen = look.messages(a.cid or 0), b.last_turn
    with pytest.raises(ConversationChanged) as refused:
        b.undo()
    assert (refused.value.turn, refused.value.last) == (seen, a.last_turn)
    assert look.messages(a.cid or 0) == before  # nothing deleted
    # B now shows what the store holds, so its next undo is of the turn it shows.
    assert b.chat.conversation.to_tuples() == stored(look, a)
    turn = b.undo()
    assert turn is not None and turn.user == "A's second question"
    assert stored(look, a) == [("first question", "echo")]
    # A's view is stale now: its undo names a turn that is gone.
    with pytest.raises(ConversationChanged):
        a.undo()
    assert stored(look, a) == [("first question", "echo")]
    assert a.chat.conversation.to_tuples() == [("first question", "echo")]


def test_a_retry_or_continue_of_a_turn_it_did_not_see_is_refused(
        windows: tuple[SavedChat, SavedChat, Store]) -> None:
    a, b, look = windows
    a.send("A's second question")
    before = look.messages(a.cid or 0)
    with pytest.raises(ConversationChanged):
        b.retry()
    assert look.messages(a.cid or 0) == before
    a.undo()
    a.send("A's question again")
    with pytest.raises(ConversationChanged):
        b.continue_reply()  # B saw the undone turn, not this one
    before = look.messages(a.cid or 0)
    with pytest.raises(ConversationChanged):
        a.retry(turn=b.turn_ids[0])  # a turn named explicitly: the first, not the last
    assert look.messages(a.cid or 0) == before


def test_a_continuation_elsewhere_makes_the_turn_stale(windows: tuple[SavedChat, SavedChat,
                                                                      Store]) -> None:
    a, b, look = windows
    with a.continue_reply() as chunks:  # A goes on with the reply B has seen
        assert "".join(chunks) == "echo"
    assert stored(look, a) == [("first question", "echoecho")]
    with pytest.raises(ConversationChanged):
        b.undo()  # B never saw "echoecho"
    assert stored(look, a) == [("first question", "echoecho")]
    assert b.chat.conversation.to_tuples() == [("first question", "echoecho")]


def test_a_retry_that_fails_puts_back_the_same_turn(windows: tuple[SavedChat, SavedChat,
                                                                   Store]) -> None:
    a, b, look = windows
    engine = a.chat.engine
    assert isinstance(engine, FakeEngine)
    engine.replies.append("a reply that breaks")
    engine.fail_after = 2
    with pytest.raises(RuntimeError), a.retry() as chunks:
        for _ in chunks:
            pass
    assert stored(look, a) == [("first question", "echo")]
    assert a.turn_ids == b.turn_ids  # the same turn, by name: B's view is not stale
    assert b.undo() is not None
    assert stored(look, a) == []


def test_settings_changed_elsewhere_are_taken(windows: tuple[SavedChat, SavedChat,
                                                             Store]) -> None:
    a, b, _look = windows
    a.set_system("Be a pirate.")
    a.pin(0)
    changes = b.refresh()
    assert changes.settings and not changes.added
    assert b.chat.system == "Be a pirate." and b.chat.memory.pins == {0}
    b.send("ahoy")
    engine = b.chat.engine
    assert isinstance(engine, FakeEngine)
    assert "Be a pirate." in prompt_text(engine)


def test_the_reply_names_its_turn(windows: tuple[SavedChat, SavedChat, Store]) -> None:
    a, _b, look = windows
    reply = a.send("second")
    assert reply.turn == a.last_turn == look.load(a.cid or 0).turn_ids[-1]
    assert a.chat.last_reply is reply
