from __future__ import annotations

import itertools

import pytest

from fakes import FakeEngine
from rolechat import (
    Chat,
    Conversation,
    InvalidInput,
    InvalidParams,
    Window,
    chat_turn,
    inference,
)
from rolechat.persona import TUTORIAL_SYSTEM


def test_send_records_the_turn() -> None:
    engine = FakeEngine()
    engine.replies += ["first", "second"]
    chat = Chat(engine, persona="expert")
    reply = chat.send("q1")
    assert reply.text == "first" and reply.finish_reason == "stop"
    # Five characters and the end-of-turn token: every sampled token counts.
    assert reply.usage.generated_tokens == 6 and reply.usage.prompt_tokens > 0
    chat.send("q2")
    assert chat.conversation.to_tuples() == [("q1", "first"), ("q2", "second")]
    assert chat.conversation.system == chat.persona.system
    assert chat.params.temperature == 0.3  # the expert persona's default


def test_second_turn_reuses_the_cached_prefix() -> None:
    chat = Chat(FakeEngine())
    first = chat.send("hello")
    second = chat.send("again")
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= first.usage.prompt_tokens


def test_stream_yields_chunks_then_reply() -> None:
    engine = FakeEngine()
    engine.replies.append("abc")
    chat = Chat(engine)
    stream = chat.stream("q")
    assert list(stream) == ["a", "b", "c"]
    assert stream.reply is not None and stream.reply.text == "abc"
    assert chat.last_reply is stream.reply


def test_input_is_validated_before_generating() -> None:
    engine = FakeEngine()
    chat = Chat(engine)
    for bad in ("", "   ", 5, None):
        with pytest.raises(InvalidInput):
            chat.stream(bad)  # type: ignore[arg-type]
    assert engine.prompts == [] and chat.conversation.turns == []


def test_failed_reply_leaves_the_conversation_unchanged() -> None:
    engine = FakeEngine(fail_after=2)
    chat = Chat(engine)
    chat.conversation.append_turn("old", "turn")
    before = chat.conversation.copy()
    engine.replies.append("a long reply")
    with pytest.raises(RuntimeError):
        chat.send("new")
    assert chat.conversation == before
    assert not engine.busy()


def test_closed_stream_leaves_the_conversation_unchanged() -> None:
    engine = FakeEngine()
    engine.replies.append("abcdef")
    chat = Chat(engine)
    stream = chat.stream("q")
    assert next(stream) == "a"
    stream.close()
    assert chat.conversation.turns == [] and stream.reply is None
    assert not engine.busy()
    assert chat.send("q").text == "echo"  # the engine is free again


def test_keyboard_interrupt_mid_reply() -> None:
    chat = Chat(FakeEngine())
    with pytest.raises(KeyboardInterrupt), chat.stream("q") as stream:
        for _ in stream:
            raise KeyboardInterrupt
    assert chat.conversation.turns == []


def test_overrides_per_call_and_stop() -> None:
    engine = FakeEngine()
    engine.replies.append("keep STOP drop")
    chat = Chat(engine, params={"max_new_tokens": 100})
    reply = chat.send("q", stop=["STOP"])
    assert reply.text == "keep " and chat.params.stop == ()


def test_max_new_tokens_cuts_the_reply() -> None:
    engine = FakeEngine()
    engine.replies.append("abcdef")
    reply = Chat(engine, params={"max_new_tokens": 3}).send("q")
    assert (reply.text, reply.finish_reason) == ("abc", "length")


def test_system_override_and_reset() -> None:
    chat = Chat(FakeEngine(), system="Custom.")
    chat.send("q")
    chat.reset()
    assert chat.conversation == Conversation("Custom.") and chat.first_turn == 0
    chat.system = "Other."
    assert chat.prompt("x").startswith("<|im_start|>system\nOther.<|im_end|>")


def test_pending_message_must_be_answered_first() -> None:
    chat = Chat(FakeEngine(), conversation=Conversation.from_openai(
        [{"role": "user", "content": "waiting"}]))
    with pytest.raises(InvalidInput, match="no reply"):
        chat.send("next")


# ----- the tutorial's functional API ---------------------------------------------------------

def test_inference_returns_the_tutorials_dict() -> None:
    engine = FakeEngine()
    engine.replies.append("reply one")
    history: list[tuple[str, str]] = []
    result = inference(engine, None, history, "question")
    assert set(result) == {"response", "generated_tokens_count", "history"}
    assert result["response"] == "reply one"
    assert result["generated_tokens_count"] == len("reply one") + 1  # and the end of turn
    assert result["history"] == [("question", "reply one")]
    assert history == []  # the caller's list is not changed
    prompt = engine.prompts[0]
    assert bytes(t for t in prompt if t < 256).decode().startswith(f"system\n{TUTORIAL_SYSTEM}")


def test_chat_turn_passes_generation_kwargs() -> None:
    engine = FakeEngine()
    engine.replies.append("abcdef")
    result = chat_turn(engine, None, [("u", "a")], "q", max_new_tokens=2, temperature=0.0)
    assert result["response"] == "ab" and result["generated_tokens_count"] == 2
    assert result["history"] == [("u", "a"), ("q", "ab")]


def test_inference_keeps_the_window_sticky_across_calls() -> None:
    engine = FakeEngine(context_length=400)
    history: list[tuple[str, str]] = []
    starts = []
    for i in range(30):
        engine.replies.append(f"reply number {i:03d}")
        history = inference(engine, None, history, f"question {i:03d}", max_new_tokens=40)[
            "history"]
        prompt = engine.prompts[-1]
        starts.append(bytes(t for t in prompt[:80] if t < 256))
    slides = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    assert 0 < slides < 10  # it slides now and then, not every turn


@pytest.mark.parametrize("model, tokenizer, match", [
    ("not an engine", None, "rolechat engine"),
    (FakeEngine(), "a tokenizer", "tokenizer=None"),
])
def test_inference_bad_model(model: object, tokenizer: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        inference(model, tokenizer, [], "q")


def test_inference_bad_history() -> None:
    with pytest.raises(InvalidInput, match=r"history\[0\]"):
        inference(FakeEngine(), None, [("only user",)], "q")  # type: ignore[list-item]


# ----- library inputs get typed errors ------------------------------------------------------------

def test_bad_constructor_arguments_are_typed_errors() -> None:
    engine = FakeEngine()
    with pytest.raises(InvalidParams, match="params: must be a mapping"):
        Chat(engine, params=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="persona must be a persona's name"):
        Chat(engine, persona=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="engine must be a rolechat engine"):
        Chat("engine")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="user message is not valid text"):
        Chat(engine).send("a\ud800b")


def test_inference_takes_no_history_and_any_iterable() -> None:
    engine = FakeEngine()
    engine.replies += ["one", "two"]
    first = chat_turn(engine, None, None, "x")
    assert first["history"] == [("x", "one")]
    turns = ((u, a) for u, a in first["history"])  # a generator: read once, all kept
    second = chat_turn(engine, None, turns, "y")
    assert second["history"] == [("x", "one"), ("y", "two")]


def test_inference_sets_threads_where_an_engine_has_them() -> None:
    with pytest.raises(InvalidInput, match="threads"):
        inference(FakeEngine(), None, [], "x", threads=0)


def test_window_settings_errors_say_so() -> None:
    with pytest.raises(InvalidParams, match="Invalid window settings: low_water"):
        Window(low_water=0)
