"""SavedChat: the live chat and its stored record kept consistent (fake engine, real SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat.errors import InvalidInput, StoreError
from rolechat.params import GenerationParams
from rolechat.saved import SavedChat
from rolechat.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "rolechat.db")


def test_a_completed_send_writes_both_messages(store: Store) -> None:
    engine = FakeEngine()
    engine.replies += ["Hello there!", "Fine."]
    saved = SavedChat.new(engine, store=store)
    reply = saved.send("Hi")
    saved.send("How are you?")
    assert saved.cid is not None
    assert store.conversation(saved.cid).to_tuples() == [("Hi", "Hello there!"),
                                                          ("How are you?", "Fine.")]
    messages = store.messages(saved.cid)
    assert [m.status for m in messages] == ["complete"] * 4
    assert messages[0].tokens == len("Hi")  # the fake engine counts one token per byte
    # The reply's characters and its end-of-turn token.
    assert messages[1].tokens == reply.usage.generated_tokens == len("Hello there!") + 1
    assert messages[1].usage is not None
    assert messages[1].usage["finish_reason"] == "stop"
    assert messages[1].usage["generated_tokens"] == len("Hello there!") + 1
    assert "window" in messages[1].usage and "kv_source" in messages[1].usage


def test_nothing_is_saved_until_a_turn_starts(store: Store) -> None:
    saved = SavedChat.new(FakeEngine(context_length=256), store=store,
                          params={"max_new_tokens": 32})
    with pytest.raises(InvalidInput):
        saved.send("   ")
    with pytest.raises(Exception, match="needs"):
        saved.send("x" * 1000)  # cannot fit: refused before generating
    assert saved.cid is None and store.recent() == []
    saved.send("hello")
    assert saved.cid is not None and len(store.recent()) == 1


def test_an_engine_failure_marks_the_turn_interrupted(store: Store) -> None:
    engine = FakeEngine()
    engine.replies += ["first reply", "this one breaks"]
    saved = SavedChat.new(engine, store=store)
    saved.send("one")
    before = saved.chat.conversation.copy()
    engine.fail_after = 2
    with pytest.raises(RuntimeError, match="mid-reply"):
        saved.send("two")
    assert saved.chat.conversation == before
    assert saved.cid is not None
    assert [(m.content, m.status) for m in store.messages(saved.cid)] == [
        ("one", "complete"), ("first reply", "complete"), ("two", "interrupted"),
        ("th", "interrupted")]  # the reply's text until the engine failed, kept, marked
    assert store.conversation(saved.cid).to_tuples() == [("one", "first reply")]


def test_closing_a_stream_early_marks_it_interrupted(store: Store) -> None:
    engine = FakeEngine()
    engine.replies.append("a long reply that is cut off")
    saved = SavedChat.new(engine, store=store)
    stream = saved.stream("tell me")
    assert saved.cid is not None
    assert store.messages(saved.cid)[0].status == "pending"  # written before generating
    next(stream)
    stream.close()
    stream.close()  # twice is harmless
    assert [(m.content, m.status) for m in store.messages(saved.cid)] == [
        ("tell me", "interrupted"), ("a", "interrupted")]  # the message and the text so far
    assert saved.chat.conversation.turns == []


def test_resume_and_what_is_saved(store: Store) -> None:
    params = GenerationParams(temperature=0.3, max_new_tokens=20)
    saved = SavedChat.new(FakeEngine(), store=store, persona="expert", system="Be brief.",
                          params=params)
    saved.send("one")
    saved.send("two")
    cid = saved.cid
    assert cid is not None
    info = store.info(cid)
    assert (info.persona, info.system, info.model) == ("expert", "Be brief.", "fake")
    assert info.params == {"temperature": 0.3, "max_new_tokens": 20}

    engine = FakeEngine()
    resumed = SavedChat.resume(engine, store, cid)
    chat = resumed.chat
    assert chat.persona.name == "expert" and chat.system == "Be brief."
    assert (chat.params.temperature, chat.params.max_new_tokens) == (0.3, 20)
    assert chat.conversation.to_tuples() == [("one", "echo"), ("two", "echo")]
    assert chat.cache_key == f"conversation-{cid}"
    resumed.send("three")
    prompt = bytes(t for t in engine.prompts[-1] if t < 256).decode()
    assert "one" in prompt and "two" in prompt and "Be brief." in prompt
    assert store.conversation(cid).to_tuples()[-1] == ("three", "echo")
    assert len(store.recent()) == 1  # resumed, not copied

    # Overrides apply to this session only with save=False ...
    once = SavedChat.resume(FakeEngine(), store, cid, params={"temperature": 0.9}, save=False)
    assert once.chat.params.temperature == 0.9
    assert store.info(cid).params == {"temperature": 0.3, "max_new_tokens": 20}
    # ... and are stored for next time by default.
    again = SavedChat.resume(FakeEngine(), store, cid, persona="concise", system="New system.",
                             params=GenerationParams(temperature=0.7))
    assert again.chat.persona.name == "concise" and again.chat.system == "New system."
    info = store.info(cid)
    assert (info.persona, info.system) == ("concise", "New system.")
    assert info.params == {"temperature": 0.7, "max_new_tokens": 20}


def test_resume_an_unknown_id(store: Store) -> None:
    with pytest.raises(StoreError) as caught:
        SavedChat.resume(FakeEngine(), store, 42)
    assert caught.value.missing and caught.value.exit_code == 2


def test_undo_removes_the_turn_everywhere(store: Store) -> None:
    saved = SavedChat.new(FakeEngine(), store=store)
    saved.send("one")
    saved.send("two")
    turn = saved.undo()
    assert turn is not None and turn.user == "two"
    assert saved.chat.conversation.to_tuples() == [("one", "echo")]
    assert saved.cid is not None
    assert store.conversation(saved.cid).to_tuples() == [("one", "echo")]
    assert saved.chat.last_reply is None
    saved.undo()
    assert saved.undo() is None


def test_retry_replaces_the_last_reply(store: Store) -> None:
    engine = FakeEngine()
    engine.replies += ["first", "second"]
    saved = SavedChat.new(engine, store=store)
    saved.send("question")
    with saved.retry() as chunks:
        assert "".join(chunks) == "second"
    assert saved.cid is not None
    assert store.conversation(saved.cid).to_tuples() == [("question", "second")]
    assert engine.prompts[0] == engine.prompts[1]  # the same prompt went out again


def test_a_retry_that_fails_keeps_the_old_turn_and_its_usage(store: Store) -> None:
    engine = FakeEngine()
    engine.replies += ["the good reply", "a reply that breaks"]
    saved = SavedChat.new(engine, store=store)
    first = saved.send("question")
    assert saved.cid is not None
    stored = store.messages(saved.cid)[1]
    engine.fail_after = 3
    with pytest.raises(RuntimeError), saved.retry() as chunks:
        for _ in chunks:
            pass
    assert saved.chat.conversation.to_tuples() == [("question", "the good reply")]
    assert saved.chat.last_reply is first
    assert store.conversation(saved.cid).to_tuples() == [("question", "the good reply")]
    back = [m for m in store.messages(saved.cid) if m.role == "assistant"][-1]
    assert (back.tokens, back.usage) == (stored.tokens, stored.usage)


def test_retry_with_nothing_to_retry(store: Store) -> None:
    with pytest.raises(InvalidInput, match="no turn to retry"):
        SavedChat.new(FakeEngine(), store=store).retry()


def test_role_and_parameters_change_together(store: Store) -> None:
    saved = SavedChat.new(FakeEngine(), store=store, params={"temperature": 0.2})
    saved.send("hi")
    assert saved.cid is not None
    saved.set_system("Be a pirate.")
    assert saved.chat.system == store.info(saved.cid).system == "Be a pirate."
    saved.set_persona("expert", keep={"temperature": 0.2})
    info = store.info(saved.cid)
    assert saved.chat.persona.name == info.persona == "expert"
    assert saved.chat.params.temperature == info.params["temperature"] == 0.2
    saved.set_params(GenerationParams(top_k=5))
    assert store.info(saved.cid).params == {"top_k": 5} and saved.chat.params.top_k == 5


def test_reset_starts_a_new_conversation(store: Store) -> None:
    saved = SavedChat.new(FakeEngine(), store=store, persona="support")
    saved.send("hi")
    fresh = saved.reset()
    assert fresh.cid is not None and fresh.cid != saved.cid
    assert fresh.chat.persona.name == "support" and fresh.chat.conversation.turns == []
    assert len(store.recent()) == 2


def test_without_a_store_everything_works_on_the_chat(tmp_path: Path) -> None:
    saved = SavedChat.new(FakeEngine())
    saved.send("one")
    assert saved.undo() is not None and saved.cid is None
    assert not (tmp_path / "rolechat.db").exists()
