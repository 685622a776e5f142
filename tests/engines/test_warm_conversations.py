"""Every conversation stays warm, on the real embedded model: interleaved conversations restore
their KV snapshots, and greedy replies stay identical, token for token, to replies evaluated
from an empty cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cold import cold_reply as reference
from rolechat import Chat, Conversation
from rolechat.engines.kvstore import KVStore
from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat.engines.snapshots import DiskTier

GREEDY = {"temperature": 0.0, "max_new_tokens": 4}
TOPICS = ("the sea", "mountains", "bread", "the moon")
#: Each conversation comes back five times after the others took the sequence.
ROUNDS = 6


@pytest.fixture(scope="module")
def warm() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(context_length=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def cold() -> Iterator[LlamaCppEngine]:
    """The reference: no snapshots, and the cache emptied before every reply."""
    engine = LlamaCppEngine(context_length=2048, kv_cache_ram=0)
    yield engine
    engine.close()


def cold_reply(cold: LlamaCppEngine, conversation: Conversation, text: str) -> str:
    return reference(cold, conversation, text, GREEDY)


@pytest.fixture(scope="module")
def parallel() -> Iterator[LlamaCppEngine]:
    """Four sequences: four conversations stay resident, each in its own."""
    engine = LlamaCppEngine(context_length=2048, parallel=4)
    yield engine
    engine.close()


@pytest.mark.slow
def test_interleaved_conversations_restore_and_match_cold_replies(
        warm: LlamaCppEngine, cold: LlamaCppEngine) -> None:
    """One sequence, four conversations: every switch restores a snapshot from RAM."""
    warm.reset_cache()
    chats = []
    for index, topic in enumerate(TOPICS):
        chat = Chat(warm, system=f"You like {topic}.", params=GREEDY)
        chat.cache_key = f"conversation-{index}"
        chats.append(chat)
    for round_ in range(ROUNDS):
        for index, chat in enumerate(chats):
            text = f"{round_}: more on {TOPICS[index]}?"
            before = chat.conversation.copy()
            last = chat.last_reply
            reply = chat.send(text)
            assert reply.text == cold_reply(cold, before, text), (round_, index)
            usage = reply.usage
            if last is None:
                continue
            # Switching back restored this conversation's snapshot: its last prompt and reply
            # are reused (all but the reply's last token or two, which the template rewrites),
            # and only the new message is evaluated.
            assert usage.kv_source == "ram", (round_, index, usage)
            assert usage.restored_tokens == usage.cached_tokens
            assert usage.cached_tokens >= (last.usage.prompt_tokens
                                           + last.usage.generated_tokens - 3)
            assert usage.prompt_tokens - usage.cached_tokens < 40
    stats = warm.kv_stats()["ram"]
    assert stats["hits"] >= len(TOPICS) * (ROUNDS - 1) and stats["entries"] == 4
    assert stats["bytes"] <= stats["max_bytes"]


def test_resident_conversations_stay_in_their_sequences_and_match_cold_replies(
        parallel: LlamaCppEngine, cold: LlamaCppEngine) -> None:
    """Four sequences, four conversations: each stays in its sequence, nothing is copied."""
    chats = []
    for index, topic in enumerate(TOPICS):
        chat = Chat(parallel, system=f"You like {topic}.", params=GREEDY)
        chat.cache_key = f"conversation-{index}"
        chats.append(chat)
    for round_ in range(3):
        for index, chat in enumerate(chats):
            text = f"{round_}: more on {TOPICS[index]}?"
            before = chat.conversation.copy()
            last = chat.last_reply
            reply = chat.send(text)
            assert reply.text == cold_reply(cold, before, text), (round_, index)
            if last is not None:
                usage = reply.usage
                assert usage.kv_source == "live" and usage.restored_tokens == 0
                assert usage.cached_tokens >= (last.usage.prompt_tokens
                                               + last.usage.generated_tokens - 3)
    sequences = parallel.kv_stats()["sequences"]
    assert sorted(s["conversation"] for s in sequences) == [f"conversation-{i}"
                                                            for i in range(4)]


def test_a_new_engine_restores_from_disk_and_matches_a_cold_reply(
        tmp_path: Path, cold: LlamaCppEngine) -> None:
    first = LlamaCppEngine(context_length=2048, n_threads=1,
                           kv_store=KVStore(disk=DiskTier(tmp_path / "kv")))
    chat = Chat(first, system="You are a librarian.", params=GREEDY)
    chat.cache_key = "conversation-1"
    chat.send("Recommend a book about whales.")
    first.close()  # its snapshot file is written
    # A new engine, as in a new process: its RAM is empty, the file is on disk.
    fresh = LlamaCppEngine(context_length=2048, n_threads=1,
                           kv_store=KVStore(disk=DiskTier(tmp_path / "kv")))
    try:
        resumed = Chat(fresh, conversation=chat.conversation.copy(), params=GREEDY)
        resumed.cache_key = "conversation-1"
        reply = resumed.send("Why that one?")
        assert reply.usage.kv_source == "disk"
        last = chat.last_reply
        assert last is not None
        assert reply.usage.restored_tokens >= (last.usage.prompt_tokens
                                               + last.usage.generated_tokens - 3)
        assert reply.text == cold_reply(cold, chat.conversation, "Why that one?")
    finally:
        fresh.close()


def test_a_seeded_reply_is_the_same_whatever_the_cache_held(warm: LlamaCppEngine) -> None:
    params = {"temperature": 1.0, "seed": 1234, "max_new_tokens": 24}
    warm.reset_cache()
    first = Chat(warm, params=params).send("Tell me a short story.").text
    again = Chat(warm, params=params).send("Tell me a short story.")  # now fully cached
    assert again.usage.cached_tokens > 0
    assert again.text == first


LONG_GREEDY = {"temperature": 0.0, "max_new_tokens": 64}
LETTER = ("Dear neighbours, the garden by the river needs help this spring: the old fence has "
          "fallen, the pond is full of leaves, and the apple trees want pruning. ") * 12


@pytest.mark.slow
def test_a_long_conversation_matches_cold_replies(warm: LlamaCppEngine, cold: LlamaCppEngine,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past a few hundred tokens llama.cpp decodes a sequence that is alone in its batch with
    another attention kernel than a prompt batch's: those tokens are not reused for an exact
    reply until evaluated again, so every next greedy turn still matches a cold reply (with
    them reused as they were, the second turn's text differed), even when the machine's load
    leaves the two engines different numbers of free cores: an exact reply's lone long steps
    always run on all the threads (with one thread, the text differed)."""
    warm.reset_cache()
    # As on a busy machine: the warm engine is given one free core, the cold one all of them
    # (a lone long sequence's decode step splits its cells between the threads).
    assert warm.adapter._free is not None  # type: ignore[attr-defined]
    monkeypatch.setattr(warm.adapter._free, "look", lambda: 1)  # type: ignore[attr-defined]
    chat = Chat(warm, system="You are a helpful neighbour.", params=LONG_GREEDY)
    chat.cache_key = "long"
    first = chat.send(LETTER + "What should we do first?")
    assert first.usage.prompt_tokens > 256 and first.usage.generated_tokens > 16
    for text in ("Tell me more about the pond.", "And the apple trees?"):
        before = chat.conversation.copy()
        reply = chat.send(text)
        assert reply.usage.cached_tokens > 256
        assert reply.text == reference(cold, before, text, LONG_GREEDY), text
