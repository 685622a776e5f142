"""Summary memory end to end with the real embedded model in a 1,024-token context: 60 turns,
every prompt fits and ends with the user's message, one summarization per slide, the cache
reused between slides, and the same summary after resuming."""

from __future__ import annotations

from pathlib import Path

import pytest

from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat.saved import SavedChat
from rolechat.store import Store
from rolechat.window import Window

TURNS = 60


@pytest.mark.slow
def test_sixty_turns_with_summary_memory(small_engine: LlamaCppEngine, tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    saved = SavedChat.new(small_engine, store=store, system="Be brief.",
                          params={"temperature": 0, "max_new_tokens": 8},
                          window=Window(summarize=True, summary_tokens=48))
    saved.send("My name is Ada and I am planning a trip to Lisbon in May.", pinned=True)
    previous = None
    slides = summarizations = summaries = 0
    for i in range(1, TURNS):
        text = f"Question {i}: name one thing to see in Lisbon, in a few words."
        reply = saved.send(text)
        plan = reply.plan
        assert plan.prompt_tokens <= plan.budget == 1024 - 8
        assert plan.messages[-1].role == "user" and plan.messages[-1].content == text
        assert plan.messages[1].content.startswith("My name is Ada")  # the pin, right after
        made = plan.summary_usage is not None or plan.memory_note is not None
        summarizations += made
        summaries += plan.summary_usage is not None and plan.memory_note is None
        if previous is not None and plan.first_turn != previous.first_turn:
            slides += 1
            assert made, plan
        elif previous is not None:  # between slides: no summary, the cache reused
            assert not made
            assert reply.usage.cached_tokens >= previous.prompt_tokens
        previous = plan
    assert slides >= 2 and summarizations == slides
    assert summaries >= 1  # at least one slide got its summary from the model
    memory = saved.chat.memory
    assert memory.pins == {0} and memory.covers >= 1
    if memory.summary:
        assert memory.summary in previous.messages[0].content
    assert len(store.conversation(saved.cid).turns) == TURNS  # nothing lost

    resumed = SavedChat.resume(small_engine, store, saved.cid)
    assert resumed.chat.memory == memory
    plan = resumed.plan("One more question?")
    assert plan.memory_summary == memory.summary and plan.pinned == (0,)
    assert not plan.summarize  # resuming does not summarize again
    store.close()
