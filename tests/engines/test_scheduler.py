"""The scheduler over the fake engine: batching, queueing, cancelling, resident sequences,
eviction, shared prefixes, prompt chunks beside running streams, and the one thread that
evaluates everything (exact token arithmetic; the real model's numerics are in
test_batching.py)."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from arrivals import arriving_together
from fakes import FakeEngine
from rolechat import Chat, GenerationParams, Message
from rolechat.engines import scheduler as scheduler_module
from rolechat.engines.base import Cancelled, Generation

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=200)


def ask(engine: FakeEngine, text: str, params: GenerationParams = GREEDY,
        name: str | None = None) -> Generation:
    return engine.stream([Message("user", text)], params, cache_key=name)


def test_replies_run_together_in_one_batch() -> None:
    engine = FakeEngine(parallel=3)
    engine.replies += ["a" * 20, "b" * 20, "c" * 20]
    with arriving_together(engine):
        streams = [ask(engine, f"question {i}") for i in range(3)]
    assert ["".join(s) for s in streams] == ["a" * 20, "b" * 20, "c" * 20]
    assert max(engine.batches) == 3  # one decode step carried all three
    assert all(s.completion is not None and s.completion.finish_reason == "stop"
               for s in streams)


def test_a_request_waits_for_a_sequence_and_hears_how_many_are_ahead() -> None:
    engine = FakeEngine(parallel=1)
    engine.replies += ["first", "second", "third"]
    heard: list[list[int]] = [[], [], []]
    with arriving_together(engine):
        streams = [ask(engine, f"q{i}") for i in range(3)]
    for index, stream in enumerate(streams):
        stream.on_wait = heard[index].append
    assert ["".join(s) for s in streams] == ["first", "second", "third"]
    assert heard == [[], [0], [1, 0]]


def test_cancelling_one_stream_frees_it_and_leaves_the_others() -> None:
    engine = FakeEngine(parallel=3)
    engine.replies += ["x" * 40, "y" * 40, "z" * 40]
    steps = engine.adapter.steps = threading.Semaphore(0)  # type: ignore[attr-defined]
    with arriving_together(engine):
        streams = [ask(engine, f"q{i}") for i in range(3)]
    steps.release()  # the first's first step: then the second's prompt, and its first token
    assert next(streams[1]) == "y"
    streams[1].close()  # the reader left, before any decode step
    steps.release(1000)
    assert "".join(streams[0]) == "x" * 40 and "".join(streams[2]) == "z" * 40
    stats = engine.kv_stats()
    assert stats["cancelled"] == 1 and stats["done"] == 2
    assert all(s["state"] in ("idle", "free") for s in stats["sequences"])


def test_a_client_that_leaves_during_its_prompt_stops_it() -> None:
    """A long prompt is evaluated in chunks; a cancel between them stops it (what the server
    does when the client goes away)."""
    engine = FakeEngine(parallel=1, context_length=8192)
    engine.adapter.gate = threading.Event()  # type: ignore[attr-defined]
    stream = ask(engine, "w" * 2000)
    assert engine.adapter.entered.wait(30)  # type: ignore[attr-defined]
    stream.cancel()  # from another thread, while the first chunk is being evaluated
    engine.adapter.gate.set()  # type: ignore[attr-defined]
    with pytest.raises(Cancelled):
        list(stream)
    chunks = [n for kind, _, n in engine.events if kind == "prompt"]
    assert chunks == [engine.adapter.prompt_chunk]  # one chunk, not eight
    assert not engine.busy() and engine.kv_stats()["cancelled"] == 1
    # The sequence holds what was evaluated, and the next reply goes on from there.
    engine.replies.append("ok")
    assert "".join(ask(engine, "w" * 2000)) == "ok"


def test_a_long_prompt_is_taken_in_between_the_running_streams_steps() -> None:
    """While a reply is being generated, a new prompt goes in small chunks, each followed by a
    decode step of the running sequence, so its tokens keep coming."""
    engine = FakeEngine(parallel=2, context_length=8192)
    engine.scheduler.step_s, engine.scheduler.token_s = 0.010, 0.001  # a step = 10 tokens
    engine.scheduler.measure = False
    engine.replies += ["r" * 150, "done"]
    steps = engine.adapter.steps = threading.Semaphore(0)  # type: ignore[attr-defined]
    running = ask(engine, "go")
    assert next(running) == "r"  # its first token: then it waits for decode steps
    late = ask(engine, "p" * 600)
    steps.release(1000)
    assert "".join(late) == "done" and "".join(running) == "r" * 149
    chunks = [i for i, event in enumerate(engine.events) if event[:2] == ("prompt", 1)]
    assert len(chunks) > 10  # small chunks...
    for before, after in itertools.pairwise(chunks):  # ...the running one's steps between
        assert any(e[0] == "step" and 0 in e[1:] for e in engine.events[before:after])


def test_replies_that_arrive_together_start_together() -> None:
    """A burst: while prompts wait, the replies that have shown only their first token do not
    step, so every prompt of the burst goes in first (and at full size), then all of them
    decode together."""
    engine = FakeEngine(parallel=3)
    engine.scheduler.step_s, engine.scheduler.token_s = 0.010, 0.001  # beside: 20-token chunks
    engine.replies += ["a" * 10, "b" * 10, "c" * 10]
    with arriving_together(engine):
        streams = [ask(engine, "p" * 60 + str(i)) for i in range(3)]
    assert ["".join(s) for s in streams] == ["a" * 10, "b" * 10, "c" * 10]
    first_step = next(i for i, e in enumerate(engine.events) if e[0] == "step")
    # Each prompt in one chunk (nothing streaming to keep smooth), all before the first step;
    # what comes after the replies is the idle work (the next turn's header ahead).
    assert [e[0] for e in engine.events[:first_step]] == ["prompt"] * 3
    assert engine.events[first_step] == ("step", 0, 1, 2)


def test_beside_a_stream_a_small_chunk_rides_in_the_step() -> None:
    """Where a decode step's KV is canonical (llama.cpp's settings), a prompt whose chunks would
    be too small to be worth a call of their own goes one token per step, in the step's batch:
    the running reply's next token costs one token more, not a call more."""
    engine = FakeEngine(parallel=2, canonical_decode=True)
    engine.scheduler.step_s, engine.scheduler.token_s = 0.010, 0.004  # chunks of 3: ride
    engine.replies += ["r" * 150, "done"]
    steps = engine.adapter.steps = threading.Semaphore(0)  # type: ignore[attr-defined]
    running = ask(engine, "go")
    assert next(running) == "r"
    steps.release()  # its second token: it is streaming now
    assert next(running) == "r"
    late = ask(engine, "p" * 60)
    steps.release(1000)
    assert "".join(late) == "done" and "".join(running) == "r" * 148
    late_prompt = len(engine.prompts[1])
    # No prompt call for the late request (only, after its reply, the next turn's header ahead),
    # and its whole prompt went in the running reply's steps, one token each.
    assert [e for e in engine.events if e[:2] == ("prompt", 1)] == [("prompt", 1, 8)]
    assert engine.events.count(("step", 0, 1)) >= late_prompt
    assert late.completion is not None and late.completion.usage.prompt_tokens == late_prompt


def test_chunk_sizes() -> None:
    engine = FakeEngine()
    scheduler = engine.scheduler
    scheduler.step_s, scheduler.token_s = 0.010, 0.004
    # Beside a stream: a step's fixed cost and two more tokens (the next token within 3x).
    assert scheduler._chunk_size(2000, others=True) == 3
    assert scheduler._chunk_size(2000, others=False) == engine.adapter.prompt_chunk
    assert scheduler._chunk_size(3, others=False) == 3
    assert scheduler._chunk_size(257, others=False) == 257  # never a last chunk of 1 token...
    engine.adapter.prompt_chunk = engine.adapter.max_batch
    assert scheduler._chunk_size(513, others=False) == 510  # ...within the batch limit


def test_resident_conversations_stay_in_their_sequences() -> None:
    engine = FakeEngine(parallel=2)
    a = Chat(engine, system="A", params={"temperature": 0.0})
    b = Chat(engine, system="B", params={"temperature": 0.0})
    a.cache_key, b.cache_key = "conversation-a", "conversation-b"
    for round_ in range(3):
        for chat in (a, b):
            usage = chat.send(f"round {round_}").usage
            if round_:
                assert usage.kv_source == "live" and usage.restored_tokens == 0
        restores = engine.restores
    assert engine.restores == restores  # nothing restored after the first round
    names = {s["conversation"] for s in engine.kv_stats()["sequences"]}
    assert names == {"conversation-a", "conversation-b"}


def test_stateless_conversations_stay_in_their_own_sequences(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that send whole histories (the stateless endpoint) and alternate between
    conversations each keep a sequence, even with every history opening alike and no
    snapshot taken: a request takes over only the stateless sequence it continues."""
    monkeypatch.setattr(scheduler_module, "SNAPSHOT_AFTER_S", 60.0)
    engine = FakeEngine(parallel=3)
    taken = count_snapshots(engine)
    params = GenerationParams(temperature=0.7, max_new_tokens=8)
    histories = [[Message("system", f"Document {i}: " + "words " * 40)] for i in range(3)]
    for round_ in range(3):
        for index, history in enumerate(histories):
            history.append(Message("user", f"question {round_}"))
            stream = engine.stream(history, params)
            history.append(Message("assistant", "".join(stream)))
            assert stream.completion is not None
            usage = stream.completion.usage
            if round_:
                assert usage.kv_source == "live", (round_, index)
                assert usage.prompt_tokens - usage.cached_tokens < 30  # the new message
    assert taken == [] and engine.restores == 0
    cells = engine.adapter.cells  # type: ignore[attr-defined]
    assert len({tuple(c) for c in cells}) == 3 and min(map(len, cells)) > 250
    # A fourth conversation, no sequence free: the least recently used is snapshotted first,
    # and comes back from RAM.
    "".join(engine.stream([Message("user", "something else " * 20)], params))
    assert taken == [0]
    histories[0].append(Message("user", "and now?"))
    stream = engine.stream(histories[0], params)
    "".join(stream)
    assert stream.completion is not None and stream.completion.usage.kv_source == "ram"


def test_the_least_recently_used_conversation_is_evicted_and_restored() -> None:
    engine = FakeEngine(parallel=2)
    chats = [Chat(engine, system=f"S{i}", params={"temperature": 0.0}) for i in range(3)]
    for index, chat in enumerate(chats):
        chat.cache_key = f"conversation-{index}"
        chat.send("hello")
    # Two sequences, three conversations: the first one was evicted into RAM...
    names = {s["conversation"] for s in engine.kv_stats()["sequences"]}
    assert names == {"conversation-1", "conversation-2"}
    assert engine.kv.ram.get("conversation-0") is not None
    # ...and comes back from there.
    usage = chats[0].send("again").usage
    assert usage.kv_source == "ram" and usage.restored_tokens == usage.cached_tokens > 20


def count_snapshots(engine: FakeEngine) -> list[int]:
    """The sequences the adapter snapshots from now on, in order."""
    taken: list[int] = []
    adapter = engine.adapter
    snapshot = adapter.snapshot

    def counted(seq: int, ids: Any) -> Any:
        taken.append(seq)
        return snapshot(seq, ids)

    adapter.snapshot = counted  # type: ignore[method-assign]
    return taken


def test_a_turn_sent_at_once_never_waits_behind_a_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "SNAPSHOT_AFTER_S", 60.0)
    engine = FakeEngine(parallel=2)
    taken = count_snapshots(engine)
    chat = Chat(engine, system="S", params={"temperature": 0.0})
    chat.cache_key = "conversation-a"
    for round_ in range(3):
        chat.send(f"round {round_}")
    assert taken == [] and engine.kv.ram.get("conversation-a") is None
    assert engine.flush()  # before the process ends, or when asked
    assert taken == [0] and engine.kv.ram.get("conversation-a") is not None


def test_an_idle_sequence_is_snapshotted_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "SNAPSHOT_AFTER_S", 0.05)
    engine = FakeEngine(parallel=2)
    taken = count_snapshots(engine)
    chat = Chat(engine, system="S", params={"temperature": 0.0})
    chat.cache_key = "conversation-a"
    chat.send("hello")
    deadline = time.monotonic() + 30
    while engine.kv.ram.get("conversation-a") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    snapshot = engine.kv.ram.get("conversation-a")
    assert snapshot is not None and list(snapshot.ids) == engine.adapter.cells[0]
    assert taken == [0]
    # Then the scheduler has nothing left to do: it waits without a timeout.
    assert engine.scheduler.call(engine.scheduler._snapshot_in) is None


def test_nothing_is_snapshotted_where_the_kv_store_keeps_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "SNAPSHOT_AFTER_S", 0.0)
    engine = FakeEngine(parallel=1, kv_cache_ram=0)
    taken = count_snapshots(engine)
    chats = [Chat(engine, system=f"S{i}", params={"temperature": 0.0}) for i in range(2)]
    for index, chat in enumerate(chats):  # the second evicts the first
        chat.cache_key = f"conversation-{index}"
        chat.send("hello")
    assert engine.flush()
    assert taken == [] and engine.scheduler.call(engine.scheduler._snapshot_in) is None


def test_a_new_conversation_copies_a_popular_personas_prefix() -> None:
    """A conversation that opens with the same system prompt as another takes its evaluated
    prefix from that sequence instead of evaluating it again."""
    engine = FakeEngine(parallel=2)
    persona = "You are a support agent. " + "Policy. " * 60
    first = Chat(engine, system=persona, params={"temperature": 0.0})
    first.cache_key = "conversation-1"
    first.send("My order is late.")
    second = Chat(engine, system=persona, params={"temperature": 0.0})
    second.cache_key = "conversation-2"
    usage = second.send("I want a refund.").usage
    system = len(engine.prompt_ids([Message("system", persona)],
                                   add_generation_prompt=False))
    assert usage.kv_source == "live" and usage.restored_tokens == usage.cached_tokens
    assert usage.cached_tokens >= system  # the persona and the user header
    assert usage.prompt_tokens - usage.cached_tokens < 40
    # Both conversations stay resident.
    names = {s["conversation"] for s in engine.kv_stats()["sequences"]}
    assert names == {"conversation-1", "conversation-2"}


def test_a_conversations_next_request_waits_for_its_running_reply() -> None:
    engine = FakeEngine(parallel=2)
    engine.replies += ["one", "two"]
    with arriving_together(engine):
        first = ask(engine, "q", name="conversation-1")
        second = ask(engine, "q again", name="conversation-1")
    heard: list[int] = []
    second.on_wait = heard.append
    assert "".join(first) == "one" and "".join(second) == "two"
    assert heard == [0]  # it waited for the first, though a sequence was free
    assert max(engine.batches) == 1


def test_every_evaluation_runs_on_the_scheduler_thread() -> None:
    """Prompts, decode steps and the work done while idle (an exact reply evaluated again, the
    next turn's header ahead): all on one thread, whatever thread asked."""
    engine = FakeEngine(parallel=2)
    chat = Chat(engine, params={"temperature": 0.0})
    chat.cache_key = "conversation-1"
    results: list[str] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        "".join(ask(engine, f"thread {i}")))) for i in range(4)]
    for thread in threads:
        thread.start()
    chat.send("main thread")
    for thread in threads:
        thread.join(30)
    engine.flush()
    assert len(results) == 4
    assert engine.adapter.threads == {engine.scheduler._thread.ident}  # type: ignore[attr-defined]


def test_a_prompt_for_a_reply_that_is_not_exact_goes_in_big_batches() -> None:
    """As with llama.cpp: 63 tokens a call keep keys and values canonical, 512 evaluate faster.
    A prompt for a sampled reply alone takes the big batches and is marked not canonical; an
    exact reply to the same text reuses none of it and goes in canonical chunks."""
    engine = FakeEngine(parallel=1, context_length=8192, canonical_decode=True)
    adapter = engine.adapter
    adapter.max_batch = adapter.prompt_chunk = 63
    adapter.loose_batch = 512
    adapter.canonical_batch = 2
    sampled = GenerationParams(temperature=0.9, max_new_tokens=8)
    assert "".join(ask(engine, "w" * 1000, sampled)) == "echo"
    chunks = [e[2] for e in engine.events if e[0] == "prompt"]
    assert chunks[0] == 512 and 1000 < chunks[0] + chunks[1] <= 1024  # then the idle look-ahead
    assert engine.scheduler.slots[0].canonical == 0  # nothing of it is canonical
    engine.events.clear()
    stream = ask(engine, "w" * 1000)
    assert "".join(stream) == "echo"
    assert stream.completion is not None and stream.completion.usage.cached_tokens == 0
    chunks = [e[2] for e in engine.events if e[0] == "prompt"]
    assert max(chunks) == 63 and sum(chunks) > 1000
    assert engine.scheduler.slots[0].canonical >= 1000
