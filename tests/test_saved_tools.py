"""Tool calls in saved conversations (fake engine, real SQLite): a turn's calls and results are
stored with its reply, come back on resume and go into the next prompt through the template,
leave with the turn on undo, and travel through export and import (checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat.errors import InvalidInput
from rolechat.saved import SavedChat
from rolechat.store import Store


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"21 degrees in {city}"


def call(name: str, **arguments: object) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "rolechat.db")


def tool_turn(store: Store) -> tuple[SavedChat, FakeEngine]:
    engine = FakeEngine()
    engine.replies += ["Hello!", call("get_weather", city="Paris"), "It is 21 degrees."]
    saved = SavedChat.new(engine, store=store)
    saved.send("Hi")
    saved.send("Weather in Paris?", tools=[get_weather])
    return saved, engine


def test_a_tool_turn_is_stored_once_with_its_steps(store: Store) -> None:
    saved, _ = tool_turn(store)
    assert saved.cid is not None
    messages = store.messages(saved.cid)
    # Two rounds, one turn: the user message was written once, the reply carries the steps.
    assert [(m.role, m.status) for m in messages] == [("user", "complete")] * 1 + [
        ("assistant", "complete"), ("user", "complete"), ("assistant", "complete")]
    steps = messages[-1].steps
    assert [m.role for m in steps] == ["assistant", "tool"]
    assert steps[0].tool_calls[0].name == "get_weather"
    assert steps[1].content == "21 degrees in Paris"
    turn = store.conversation(saved.cid).turns[-1]
    assert turn.steps == steps and turn.assistant == "It is 21 degrees."


def test_a_resumed_conversation_replays_the_calls_in_its_prompt(store: Store) -> None:
    saved, _ = tool_turn(store)
    assert saved.cid is not None
    engine = FakeEngine()
    engine.replies.append("You're welcome.")
    again = SavedChat.resume(engine, store, saved.cid)
    again.send("Thanks")
    prompt = bytes(t for t in engine.prompts[0] if t < 256).decode()
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n21 degrees in Paris\n</tool_response>" in prompt
    assert prompt.index("<tool_response>") < prompt.index("It is 21 degrees.")


def test_undo_takes_the_calls_with_the_turn(store: Store) -> None:
    saved, _ = tool_turn(store)
    assert saved.cid is not None
    removed = saved.undo()
    assert removed is not None and removed.steps and removed.assistant == "It is 21 degrees."
    assert [m.role for m in store.messages(saved.cid)] == ["user", "assistant"]


def test_a_failed_round_leaves_the_message_interrupted_and_no_steps(store: Store) -> None:
    engine = FakeEngine()
    engine.replies += [call("get_weather", city="Oslo")]
    saved = SavedChat.new(engine, store=store)
    engine.fail_after = 30  # the second round breaks mid-reply
    with pytest.raises(RuntimeError):
        saved.send("Weather in Oslo?", tools=[get_weather])
    assert saved.cid is not None
    assert [(m.role, m.status) for m in store.messages(saved.cid)][:1] == [
        ("user", "interrupted")]
    assert store.conversation(saved.cid).turns == []
    assert saved.chat.open_turn is None


def test_export_and_import_keep_the_calls(store: Store, tmp_path: Path) -> None:
    saved, _ = tool_turn(store)
    assert saved.cid is not None
    exported = json.loads(store.export(saved.cid, "json"))
    roles = [m["role"] for m in exported["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert exported["messages"][3]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert exported["messages"][4]["tool_call_id"] == \
        exported["messages"][3]["tool_calls"][0]["id"]
    copy = store.import_file(json.dumps(exported))
    assert store.conversation(copy).turns == store.conversation(saved.cid).turns
    markdown = store.export(saved.cid, "md")
    assert "### Assistant calls tools" in markdown and '`get_weather({"city": "Paris"})`' in \
        markdown and "### Tool result" in markdown


def test_an_import_with_a_result_but_no_call_is_refused(store: Store) -> None:
    bad = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "tool", "tool_call_id": "call_1", "content": "21"},
                        {"role": "assistant", "content": "Done."}]}
    with pytest.raises(InvalidInput, match=r"messages\[1\]") as caught:
        store.import_file(json.dumps(bad))
    assert caught.value.field == "messages[1]"
    assert store.recent() == []  # nothing written


def test_retry_answers_again_after_the_same_calls(store: Store) -> None:
    saved, engine = tool_turn(store)
    assert saved.cid is not None
    engine.replies.append("Paris: 21 degrees.")
    with saved.retry() as chunks:
        for _ in chunks:
            pass
    turn = store.conversation(saved.cid).turns[-1]
    assert turn.assistant == "Paris: 21 degrees." and [m.role for m in turn.steps] == [
        "assistant", "tool"]
