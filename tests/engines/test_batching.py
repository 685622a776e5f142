"""Continuous batching on the real embedded model: exact replies are the same alone, beside
other sequences and beside a long prompt; cancelling one stream leaves the others unchanged; a
request that finds every sequence busy waits; and a process's fourth reply decodes like its
first (no thread left behind that slows later steps)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from arrivals import arriving_together
from rolechat import GenerationParams, Message
from rolechat.engines.base import Generation
from rolechat.engines.llama_cpp import LlamaCppEngine

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=48)
SEEDED = GenerationParams(temperature=1.0, seed=7, max_new_tokens=48)
QUESTIONS = ("Describe the sea at night.", "How do bees make honey?",
             "Explain why the sky is blue.", "What is a good breakfast?")
LONG = "Here is a long document about many things. " * 170  # ~1,500 tokens


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    loaded = LlamaCppEngine(context_length=2048, parallel=4)
    yield loaded
    loaded.close()


def ask(engine: LlamaCppEngine, text: str, params: GenerationParams) -> Generation:
    return engine.stream([Message("user", text)], params)


def alone(engine: LlamaCppEngine, text: str, params: GenerationParams) -> str:
    engine.reset_cache()
    return "".join(ask(engine, text, params))


@pytest.mark.slow
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_an_exact_reply_is_the_same_in_any_company(engine: LlamaCppEngine,
                                                   params: GenerationParams) -> None:
    expected = [alone(engine, q, params) for q in QUESTIONS]
    assert all(expected) and len(set(expected)) == len(QUESTIONS)

    # Beside three other running sequences: one decode step carries all four.
    engine.reset_cache()
    with arriving_together(engine):
        streams = [ask(engine, q, params) for q in QUESTIONS]
    assert ["".join(s) for s in streams] == expected

    # With a long prompt arriving mid-reply: its chunks go in between the steps.
    engine.reset_cache()
    stream = ask(engine, QUESTIONS[0], params)
    first = next(stream)
    intruder = ask(engine, LONG + "Summarize it.", GenerationParams(max_new_tokens=4))
    assert first + "".join(stream) == expected[0]
    assert "".join(intruder) is not None
    chunks = engine.kv_stats()["prompt_chunks"]
    assert chunks > 3  # the long prompt went in several chunks


def test_cancelling_one_stream_leaves_the_others_unchanged(engine: LlamaCppEngine) -> None:
    expected = [alone(engine, q, GREEDY) for q in QUESTIONS]
    engine.reset_cache()
    before = engine.kv_stats()["cancelled"]
    with arriving_together(engine):
        streams = [ask(engine, q, GREEDY) for q in QUESTIONS]
    next(streams[1])
    streams[1].close()  # the client left after its first words
    kept = [0, 2, 3]
    assert ["".join(streams[i]) for i in kept] == [expected[i] for i in kept]
    stats = engine.kv_stats()
    assert stats["cancelled"] == before + 1
    assert all(s["state"] in ("idle", "free") for s in stats["sequences"])


def test_a_request_that_finds_every_sequence_busy_waits_its_turn() -> None:
    engine = LlamaCppEngine(context_length=1024, parallel=1)
    try:
        expected = [alone(engine, q, GREEDY) for q in QUESTIONS[:3]]
        engine.reset_cache()
        heard: list[list[int]] = [[], [], []]
        with arriving_together(engine):
            streams = [ask(engine, q, GREEDY) for q in QUESTIONS[:3]]
        for index, stream in enumerate(streams):
            stream.on_wait = heard[index].append
        assert ["".join(s) for s in streams] == expected  # nothing corrupted another
        assert heard == [[], [0], [1, 0]]
    finally:
        engine.close()


def voluntary_switches() -> int:
    """Voluntary context switches of every thread of this process (Linux)."""
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            continue
    return total


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_fourth_reply_of_a_process_decodes_like_the_first() -> None:
    """Four fresh conversations, one after the other, each reply followed by the engine's idle
    work (a re-evaluation and a snapshot): every evaluation stays on the scheduler's thread, so
    the process keeps its thread count and its decode steps do not start sleeping and waking.
    (One evaluation from another thread that stays alive — the old defect — took the switches
    from ~5 to ~270 per token and a thread more, measured on 2 cores.)"""
    engine = LlamaCppEngine(context_length=2048, n_threads=2)
    process = psutil.Process()
    try:
        switches, threads = [], []
        for question in QUESTIONS:
            before = voluntary_switches()
            reply = "".join(stream := ask(engine, question, GREEDY))
            assert reply and stream.completion is not None
            tokens = stream.completion.usage.generated_tokens
            switches.append((voluntary_switches() - before) / tokens)
            engine.flush()  # the idle work after the reply
            threads.append(process.num_threads())
        assert threads[-1] == threads[0], threads
        assert switches[-1] <= 3 * switches[0] + 30, switches
    finally:
        engine.close()
