"""Memory of dropped turns with the byte-level fake engine: the running summary (made only on
slides, within the budget, kept out of the cached prefix between slides), pinned turns, the
summary template, failures that fall back to plain dropping, and the stored memory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from fakes import Summarizer
from rolechat import Chat, ContextOverflow, InvalidInput, Window
from rolechat.errors import InvalidParams
from rolechat.memory import (
    SUMMARY_CLOSE,
    SUMMARY_OPEN,
    Memory,
    check_template,
    system_with_summary,
)
from rolechat.saved import SavedChat
from rolechat.store import Store
from rolechat.window import window_fields


def summary_chat(engine: Summarizer | None = None, **window: object) -> Chat:
    engine = engine or Summarizer()
    settings = {"summarize": True, "summary_tokens": 40, **window}
    return Chat(engine, system="Be brief.", params={"max_new_tokens": 40},
                window=Window(**settings))  # type: ignore[arg-type]


def run_turns(chat: Chat, count: int, start: int = 0) -> list:
    replies = []
    for i in range(start, start + count):
        replies.append(chat.send(f"Question number {i} about the topic?"))
    return replies


def test_summary_only_on_slides_within_the_budget_and_reuse_between_slides() -> None:
    chat = summary_chat()
    engine = chat.engine
    assert isinstance(engine, Summarizer)
    replies = run_turns(chat, 40)
    slides = 0
    for previous, reply in itertools.pairwise(replies):
        plan = reply.plan
        assert plan.prompt_tokens <= plan.budget  # the budget is never exceeded
        assert plan.messages[-1].role == "user"  # and the prompt ends with the user
        if plan.first_turn != previous.plan.first_turn:
            slides += 1
            assert plan.summary_usage is not None and plan.summary_usage.generated_tokens > 0
            assert plan.memory_summary == f"S{slides}: the user asked questions."
        else:  # between slides: no summary made, the whole previous prompt is reused
            assert plan.summary_usage is None
            assert reply.usage.cached_tokens >= previous.plan.prompt_tokens
    assert slides >= 3 and engine.summaries == slides  # one summary per slide, none else
    # The summary is in the system message, delimited, and covers every dropped turn.
    system = replies[-1].plan.messages[0].content
    assert system.startswith("Be brief.\n\n" + SUMMARY_OPEN + "\nS") and system.endswith(
        SUMMARY_CLOSE)
    assert list(replies[-1].plan.summarized) == replies[-1].plan.dropped
    # Each summary request held the previous summary and the turns the slide dropped.
    assert "Summary so far" not in engine.summary_prompts[0]  # nothing to copy the first time
    assert "Summary so far: S1: the user asked questions." in engine.summary_prompts[1]
    assert "User: Question number 0 about the topic?" in engine.summary_prompts[0]


def test_plain_dropping_is_unchanged_without_memory() -> None:
    engine = Summarizer()
    chat = Chat(engine, system="Be brief.", params={"max_new_tokens": 40})
    replies = run_turns(chat, 30)
    assert engine.summaries == 0 and replies[-1].plan.dropped
    assert replies[-1].plan.memory_summary is None


def test_pinned_turns_stay_right_after_the_system_prompt() -> None:
    chat = summary_chat()
    run_turns(chat, 2)
    assert chat.pin(0) == 0
    replies = run_turns(chat, 30, start=2)
    for reply in replies:
        plan = reply.plan
        assert plan.prompt_tokens <= plan.budget
        assert plan.messages[1].content == "Question number 0 about the topic?"
        assert 0 in plan.kept and 0 not in plan.dropped
    last = replies[-1].plan
    assert last.pinned == (0,) and last.dropped and 0 not in last.summarized
    assert all("Question number 0 " not in p for p in chat.engine.summary_prompts)  # type: ignore[attr-defined]
    chat.unpin(0)
    assert chat.plan("next?").pinned == ()


def test_pin_errors() -> None:
    chat = summary_chat()
    with pytest.raises(InvalidInput, match="There is no turn 0: the conversation has 0"):
        chat.pin(0)
    run_turns(chat, 2)
    with pytest.raises(InvalidInput, match="There is no turn 5"):
        chat.pin(5)
    with pytest.raises(InvalidInput, match="by its index"):
        chat.pin("first")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="Turn 1 is not pinned"):
        chat.unpin(1)
    assert chat.pin(-1) == 1  # the last turn


def test_pins_that_overflow_the_budget_name_the_pins() -> None:
    engine = Summarizer(context_length=700)
    chat = Chat(engine, params={"max_new_tokens": 210})
    for i in range(3):
        engine.replies.append("x" * 200)
        chat.send(f"long question {i}")
    chat.pin(0)
    chat.pin(2)
    with pytest.raises(ContextOverflow) as info:
        chat.send("and now?")
    assert "pinned turn(s) 1, 3" in info.value.message and "/unpin" in info.value.hint
    assert info.value.pinned == [0, 2]
    assert len(chat.conversation.turns) == 3  # nothing lost
    chat.unpin(2)
    assert chat.send("and now?").plan.pinned == (0,)


def test_a_failed_summary_drops_plainly_says_so_and_nothing_is_lost(tmp_path: Path) -> None:
    engine = Summarizer()
    store = Store(tmp_path / "s.db")
    saved = SavedChat(summary_chat(engine), store)
    for i in range(40):
        reply = saved.send(f"Question number {i} about the topic?")
        if reply.plan.first_turn:
            break
    first = reply.plan
    assert first.memory_summary == "S1: the user asked questions."
    engine.fail_summaries = 1
    while True:
        i += 1
        reply = saved.send(f"Question number {i} about the topic?")
        if reply.plan.first_turn != first.first_turn:
            break
    plan = reply.plan
    assert plan.memory_note is not None and "no summary (the engine failed" in plan.memory_note
    assert plan.memory_summary == "S1: the user asked questions."  # the old one stays
    assert plan.prompt_tokens <= plan.budget
    assert len(store.conversation(saved.cid).turns) == i + 1  # every turn saved
    # The next slide folds in the turns the failed one dropped.
    while True:
        i += 1
        again = saved.send(f"Question number {i} about the topic?")
        if again.plan.first_turn != plan.first_turn:
            break
    assert again.plan.memory_summary == "S2: the user asked questions."
    assert f"Question number {first.first_turn}" in engine.summary_prompts[-1]
    store.close()


def test_memory_is_stored_and_restored_on_resume(tmp_path: Path) -> None:
    engine = Summarizer()
    store = Store(tmp_path / "s.db")
    saved = SavedChat(summary_chat(engine), store)
    saved.send("My name is Ada.")
    saved.pin(0)
    for i in range(30):
        saved.send(f"Question number {i} about the topic?")
    memory = saved.chat.memory
    assert memory.summary and memory.covers > 0 and memory.pins == {0}
    resumed = SavedChat.resume(engine, store, saved.cid)
    assert resumed.chat.window.summarize
    assert resumed.chat.memory == memory
    plan = resumed.plan("Next question?")
    assert plan.memory_summary == memory.summary and plan.pinned == (0,)
    assert plan.first_turn >= memory.covers and not plan.summarize
    exported = json.loads(store.export(saved.cid, "json"))
    assert exported["memory"] == {"mode": "summary", **memory.to_dict()}
    assert memory.summary in store.export(saved.cid, "md")
    saved.undo()
    assert store.info(saved.cid).memory["pins"] == [0]
    store.close()


def test_summary_template_checks() -> None:
    assert check_template("Sum up: {turns} (before: {summary}, {max_words} words)")
    with pytest.raises(InvalidInput, match=r"no \{turns\} placeholder"):
        check_template("Summarize the conversation.")
    with pytest.raises(InvalidInput, match=r"unknown placeholders \{name\}"):
        check_template("{turns} for {name}")
    with pytest.raises(InvalidInput, match="not a valid format string"):
        check_template("{turns} {")
    with pytest.raises(InvalidInput, match=r"no \{turns\}"):
        Window(summarize=True, summary_template="nothing here")
    engine = Summarizer()
    chat = summary_chat(engine, summary_template="Notes please. {turns}")
    run_turns(chat, 30)
    assert engine.summary_prompts and "Notes please. User: Question number 0" in \
        engine.summary_prompts[0]


def test_window_settings_are_checked() -> None:
    with pytest.raises(InvalidParams, match="memory: must be one of none, summary"):
        Window(**window_fields({"memory": "everything"}))
    with pytest.raises(InvalidParams, match="summarize: must be True or False"):
        Window(summarize="summary")  # type: ignore[arg-type]
    with pytest.raises(InvalidParams, match="summary_tokens"):
        Window(summarize=True, summary_tokens=2)
    assert Window().summary_cap(8192) == 512 and Window().summary_cap(256) == 32


def test_system_with_summary() -> None:
    assert system_with_summary("Be brief.", None) == "Be brief."
    assert system_with_summary(None, "S") == f"{SUMMARY_OPEN}\nS\n{SUMMARY_CLOSE}"
    assert system_with_summary("Be brief.", "S") == \
        f"Be brief.\n\n{SUMMARY_OPEN}\nS\n{SUMMARY_CLOSE}"
    assert Memory.from_dict(Memory("S", 3, {1}).to_dict()) == Memory("S", 3, {1})


def test_a_turn_unpinned_after_it_fell_out_goes_into_the_next_summary() -> None:
    engine = Summarizer()
    chat = summary_chat(engine)
    chat.send("My name is Ada.")
    chat.pin(0)
    run_turns(chat, 30)
    assert 0 not in chat.memory.summarized and chat.memory.summarized
    chat.unpin(0)
    assert 0 not in chat.plan("next?").summarized  # not in the summary: it was pinned
    before = engine.summaries
    i = 100
    while engine.summaries == before:
        chat.send(f"Question number {i} about the topic?")
        i += 1
    assert "User: My name is Ada." in engine.summary_prompts[-1]  # folded in at the next slide
    assert 0 in chat.memory.summarized


def test_a_summary_that_does_not_fit_beside_the_message_is_left_out() -> None:
    engine = Summarizer(context_length=700)
    chat = Chat(engine, params={"max_new_tokens": 150},
                window=Window(summarize=True, summary_tokens=200))
    for i in range(3):
        engine.replies.append("y" * 100)
        chat.send(f"question {i}")
    reply = chat.send("z" * 380)  # the message alone nearly fills the budget
    plan = reply.plan
    assert plan.prompt_tokens <= plan.budget and plan.first_turn == 3
    assert plan.memory_note is not None and "did not fit" in plan.memory_note
    assert chat.memory.summary is None and len(chat.conversation.turns) == 4


def test_a_summary_past_its_time_limit_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import rolechat.memory

    clock = iter(range(0, 10_000, 5))  # every look at the clock: 5 s later
    monkeypatch.setattr(rolechat.memory, "monotonic", lambda: float(next(clock)))
    chat = summary_chat(summary_timeout_s=12)
    replies = run_turns(chat, 30)
    slid = [r.plan for r in replies if r.plan.memory_note]
    assert slid and "took longer than 12 s" in (slid[0].memory_note or "")
    assert chat.memory.summary is None and slid[0].prompt_tokens <= slid[0].budget
