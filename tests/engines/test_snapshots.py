"""KV snapshots with exact token arithmetic: the production tiers over the fake engine's
simulated cache (its "state" is the ids themselves, so every restore is checked)."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fakes import FakeEngine
from rolechat import Chat, Message
from rolechat.engines.kvcache import KVSnapshot, as_ids, common_prefix
from rolechat.engines.snapshots import (
    MAGIC,
    CacheKey,
    DiskTier,
    MemoryTier,
    delete_conversation_files,
    parse_size,
)

GREEDY = {"temperature": 0.0, "max_new_tokens": 64}


def keyed_chat(engine: FakeEngine, name: str, disk: DiskTier | None = None) -> Chat:
    chat = Chat(engine, system="You are a test.", params=GREEDY)
    chat.cache_key = CacheKey(name, disk)
    return chat


def send(chat: Chat, text: str, reply: str = "fine") -> object:
    chat.engine.replies.append(reply)  # type: ignore[attr-defined]
    result = chat.send(text)
    chat.engine.flush()  # type: ignore[attr-defined]
    return result


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2
    assert common_prefix([], [1], 5) == 0
    assert common_prefix(np.array([5, 6]), [5, 6], 5) == 2


def test_interleaved_conversations_restore_from_memory() -> None:
    engine = FakeEngine()
    chats = [keyed_chat(engine, f"conversation-{i}") for i in range(3)]
    for round_ in range(4):
        for index, chat in enumerate(chats):
            text = f"C{index} round {round_}: " + "x" * 40
            reply = send(chat, text)
            usage = reply.usage  # type: ignore[attr-defined]
            if round_ == 0:
                # Only the shared system prompt comes from another conversation's snapshot.
                assert usage.cached_tokens < 40
                continue
            # Everything before this turn was restored: the earlier turns, up to the end of
            # the last reply (its end-of-turn marker is written by the template, not the cache).
            previous = chat.conversation.prompt_messages()[:-2]
            held = engine.count_tokens(previous, add_generation_prompt=False) - 2
            assert usage.kv_source == "memory"
            assert usage.restored_tokens == usage.cached_tokens == held
            # Evaluated: the end of the last turn, the new message and the generation prompt.
            assert usage.prompt_tokens - usage.cached_tokens == len(text) + 21
    assert engine.memory.stats()["hits"] == 9


def test_continuing_one_conversation_uses_the_live_cache() -> None:
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    send(chat, "one")
    usage = send(chat, "two").usage  # type: ignore[attr-defined]
    assert usage.kv_source == "live" and usage.restored_tokens == 0
    assert usage.cached_tokens > 0
    assert engine.kv.restores == 0


def test_a_stateless_client_that_alternates_stays_warm() -> None:
    """No keys: snapshots are found by the longest token prefix."""
    engine = FakeEngine()
    histories: list[Chat] = [Chat(engine, system=f"Conversation {i}. " + "y" * 50,
                                  params=GREEDY) for i in range(2)]
    for round_ in range(3):
        for chat in histories:
            usage = send(chat, f"message {round_}").usage  # type: ignore[attr-defined]
            if round_:
                assert usage.kv_source == "memory"
                assert usage.prompt_tokens - usage.cached_tokens < 40
    # Each conversation's older snapshots were covered by its newer one and dropped.
    assert len(engine.memory) == 2


def test_the_memory_budget_holds_and_evicts_the_least_recently_used() -> None:
    engine = FakeEngine(kv_cache_ram=4500)  # 8 bytes a token: two 244-token snapshots fit
    chats = [keyed_chat(engine, f"conversation-{i}") for i in range(4)]
    for chat in chats:
        send(chat, "z" * 200)
        assert engine.memory.bytes <= 4500
    names = [key.name for key, _ in engine.memory.entries()]
    assert names == ["conversation-2", "conversation-3"]  # oldest first out
    assert engine.memory.stats()["evictions"] == 2
    # An evicted conversation is evaluated again, not restored.
    usage = send(chats[0], "again").usage  # type: ignore[attr-defined]
    assert usage.kv_source in ("none", "live") and usage.restored_tokens == 0


def test_a_zero_budget_turns_the_memory_tier_off() -> None:
    engine = FakeEngine(kv_cache_ram=0)
    a, b = keyed_chat(engine, "conversation-1"), keyed_chat(engine, "conversation-2")
    send(a, "hello")
    send(b, "hello")
    usage = send(a, "again").usage  # type: ignore[attr-defined]
    assert usage.restored_tokens == 0 and len(engine.memory) == 0


def test_memory_tier_put_never_exceeds_its_budget() -> None:
    tier = MemoryTier(100)
    big = KVSnapshot(as_ids(range(10)), b"", 101)
    assert tier.put(CacheKey("a"), big) is False and tier.bytes == 0
    for i in range(5):
        tier.put(CacheKey(f"k{i}"), KVSnapshot(as_ids([i]), b"", 40))
        assert tier.bytes <= 100
    assert [k.name for k, _ in tier.entries()] == ["k3", "k4"]


def test_a_snapshot_that_fails_to_restore_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()
    a, b = keyed_chat(engine, "conversation-1"), keyed_chat(engine, "conversation-2")
    send(a, "hello there")
    send(b, "something else")
    key, snapshot = next((k, s) for k, s in engine.memory.entries()
                         if k.name == "conversation-1")
    damaged = KVSnapshot(snapshot.ids, np.zeros(len(snapshot.ids), np.int32).tobytes(),
                         snapshot.nbytes, snapshot.canonical)
    engine.memory.put(key, damaged)
    with caplog.at_level(logging.WARNING, "rolechat.kv"):
        reply = send(a, "and now?", reply="still right")
    assert reply.text == "still right"  # type: ignore[attr-defined]
    assert reply.usage.cached_tokens == 0  # type: ignore[attr-defined]
    assert "could not be restored" in caplog.text


def test_an_exact_reply_reuses_only_what_was_evaluated_as_a_prompt() -> None:
    """Keys and values of decoded tokens are not reused by a greedy or seeded reply: after a
    sampled reply (no background re-evaluation), the next exact reply evaluates the sampled
    reply's tokens itself."""
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    first = chat.send("one", temperature=0.7)
    engine.flush()
    assert engine.evaluations == []
    second = send(chat, "two").usage  # type: ignore[attr-defined]
    assert second.cached_tokens == first.usage.prompt_tokens  # the prompt, not the reply
    # A sampled reply reuses every matching token, the decoded ones too.
    third = chat.send("three", temperature=0.7)
    assert third.usage.cached_tokens == second.prompt_tokens + len("fine")


def test_the_next_exact_reply_does_not_wait_on_the_background() -> None:
    """Whether the background checkpoint or the next exact reply gets the engine first, the
    next reply reuses the whole last turn."""
    engine = FakeEngine()
    engine._background.submit = lambda task: None  # type: ignore[method-assign]
    chat = keyed_chat(engine, "conversation-1")
    first = send(chat, "one", reply="a reply").usage  # type: ignore[attr-defined]
    second = send(chat, "two").usage  # type: ignore[attr-defined]
    assert second.cached_tokens == first.prompt_tokens + len("a reply")
    assert engine.evaluations == [len("a reply")]


def test_after_an_exact_reply_the_checkpoint_evaluates_it_again() -> None:
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    first = send(chat, "one", reply="twelve chars").usage  # type: ignore[attr-defined]
    assert engine.evaluations == [len("twelve chars")]
    second = send(chat, "two").usage  # type: ignore[attr-defined]
    assert second.cached_tokens == first.prompt_tokens + len("twelve chars")
    (_, snapshot), = engine.memory.entries()
    assert snapshot.canonical == len(snapshot)


def test_a_sampled_reply_is_snapshotted_as_it_is() -> None:
    engine = FakeEngine()
    chat = Chat(engine, system="s", params={"temperature": 0.7})
    chat.cache_key = CacheKey("conversation-1")
    send(chat, "one")
    assert engine.evaluations == []
    (_, snapshot), = engine.memory.entries()
    assert snapshot.canonical == len(snapshot) - len("echo")


# ----- the disk tier -----------------------------------------------------------------------

def test_resume_in_a_new_process_restores_from_disk(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv")
    first = FakeEngine()
    chat = keyed_chat(first, "conversation-7", disk)
    send(chat, "Remember the number 42.")
    send(chat, "And 43.")
    files = list((tmp_path / "kv").glob("*/conversation-7.kv"))
    assert len(files) == 1
    # A new engine (a new process): nothing in memory, the file on disk.
    second = FakeEngine()
    resumed = Chat(second, conversation=chat.conversation.copy(), params=GREEDY)
    resumed.cache_key = CacheKey("conversation-7", DiskTier(tmp_path / "kv"))
    usage = send(resumed, "Which numbers?").usage  # type: ignore[attr-defined]
    held = second.count_tokens(chat.conversation.prompt_messages(), add_generation_prompt=False)
    assert usage.kv_source == "disk"
    assert usage.restored_tokens == usage.cached_tokens == held - 2  # up to the reply's end
    assert resumed.cache_key.disk is not None and resumed.cache_key.disk.hits == 1


def snapshot_file(tmp_path: Path) -> tuple[Path, Chat]:
    disk = DiskTier(tmp_path / "kv")
    chat = keyed_chat(FakeEngine(), "conversation-1", disk)
    send(chat, "Write this down: " + "w" * 100)
    (path,) = (tmp_path / "kv").glob("*/conversation-1.kv")
    return path, chat


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def old_format(path: Path) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    header["format"] = 0
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(raw)) + raw + data[len(MAGIC) + 4 + length:])


def not_a_snapshot(path: Path) -> None:
    path.write_bytes(b"hello")


@pytest.mark.parametrize("damage", [truncate, flip, old_format, not_a_snapshot])
def test_a_damaged_file_is_ignored_and_removed(tmp_path: Path, damage: object,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path, chat = snapshot_file(tmp_path)
    damage(path)  # type: ignore[operator]
    fresh = FakeEngine()
    resumed = Chat(fresh, conversation=chat.conversation.copy(), params=GREEDY)
    resumed.cache_key = CacheKey("conversation-1", DiskTier(tmp_path / "kv"))
    with caplog.at_level(logging.WARNING, "rolechat.kv"):
        reply = send(resumed, "What did I say?", reply="the right reply")
    assert reply.text == "the right reply"  # type: ignore[attr-defined]
    assert reply.usage.cached_tokens == 0 and reply.usage.kv_source == "none"  # type: ignore[attr-defined]
    assert "ignoring the KV snapshot" in caplog.text
    assert resumed.cache_key.disk is not None and resumed.cache_key.disk.damaged == 1
    fresh.flush()
    # The damaged file was removed; the new reply wrote a good one in its place.
    assert DiskTier(tmp_path / "kv").open(fresh.kv.identity(), "conversation-1") is not None


@pytest.mark.parametrize("other", [{"model": "another-model"}, {"context_length": 4096}])
def test_a_file_of_another_model_or_context_is_ignored(tmp_path: Path, other: dict[str, object],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path, chat = snapshot_file(tmp_path)
    fresh = FakeEngine(**other)  # type: ignore[arg-type]
    target = DiskTier(tmp_path / "kv").path(fresh.kv.identity(), "conversation-1")
    if target != path:  # another model has its own folder: put the foreign file there
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    resumed = Chat(fresh, conversation=chat.conversation.copy(), params=GREEDY)
    resumed.cache_key = CacheKey("conversation-1", DiskTier(tmp_path / "kv"))
    with caplog.at_level(logging.WARNING, "rolechat.kv"):
        reply = send(resumed, "Again?", reply="correct")
    assert reply.text == "correct" and reply.usage.cached_tokens == 0  # type: ignore[attr-defined]
    assert "made for another model, context length or library version" in caplog.text


def test_the_disk_budget_holds_and_evicts_the_oldest(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv", max_bytes=4000)
    engine = FakeEngine()
    for i in range(5):
        send(keyed_chat(engine, f"conversation-{i}", disk), "d" * 150)
        time.sleep(0.01)  # distinct modification times
        assert disk.stats()["bytes"] <= 4000
    names = sorted(p.stem for p in (tmp_path / "kv").glob("*/*.kv"))
    assert names == ["conversation-3", "conversation-4"]
    assert disk.evictions == 3


def test_deleting_a_conversation_deletes_its_files(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv")
    send(keyed_chat(FakeEngine(), "conversation-3", disk), "keep me")
    send(keyed_chat(FakeEngine(model="other"), "conversation-3", disk), "me too")
    send(keyed_chat(FakeEngine(), "conversation-4", disk), "not me")
    assert delete_conversation_files(tmp_path / "kv", 3) == 2
    assert [p.stem for p in (tmp_path / "kv").glob("*/*.kv")] == ["conversation-4"]


def test_sigkill_while_writing_leaves_no_usable_half_file(tmp_path: Path) -> None:
    """A process killed in the middle of a write: its temporary file is never read, and the
    next tier that opens the folder removes it."""
    root = tmp_path / "kv"
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from rolechat.engines import snapshots
        real_fsync = os.fsync
        def slow_fsync(fd):
            print("writing", flush=True)
            import time; time.sleep(60)
        os.fsync = slow_fsync
        disk = snapshots.DiskTier(__import__("pathlib").Path({str(root)!r}))
        disk.write({{"model": {{"path": "fake"}}}}, "conversation-1",
                   np.arange(1000, dtype=np.int32), b"x" * 5_000_000)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env,
                             text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    temporaries = list(root.glob("*/.*.tmp-*"))
    assert len(temporaries) == 1 and temporaries[0].stat().st_size > 5_000_000
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not list(root.glob("*/*.kv"))  # the half-written file never took the real name
    disk = DiskTier(root)
    assert disk.open({"model": {"path": "fake"}}, "conversation-1") is None
    assert not list(root.glob("*/.*.tmp-*"))  # cleaned up


def test_snapshots_are_taken_off_the_reply_path() -> None:
    """The reply returns before its snapshot is taken; the next reply waits for it."""
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    started = []
    real = engine.kv.snapshot

    def slow_snapshot() -> KVSnapshot | None:
        started.append(time.monotonic())
        time.sleep(0.5)
        return real()

    engine.kv.snapshot = slow_snapshot  # type: ignore[method-assign]
    engine.replies.append("hi")
    begin = time.monotonic()
    chat.send("hello")
    returned = time.monotonic()
    assert returned - begin < 0.4  # not delayed by the snapshot
    assert engine.flush(timeout=10)
    assert started and len(engine.memory) == 1


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("512MB", 512_000_000),
                                            ("2GiB", 2 * 1024**3), ("1.5k", 1500), (7, 7)])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "5 parsecs", ""])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_window_slide_replaces_the_snapshot_with_the_new_prefix(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv")
    engine = FakeEngine(context_length=400)
    chat = Chat(engine, system="S.", params={"temperature": 0.7, "max_new_tokens": 16})
    chat.cache_key = CacheKey("conversation-1", disk)
    slid = False
    for turn in range(8):
        reply = send(chat, f"T{turn} " + "w" * 60)
        (_, snapshot), = engine.memory.entries()
        kept = reply.plan.first_turn  # type: ignore[attr-defined]
        # The snapshot is this reply's prompt and reply: it starts with the kept turns.
        first_kept = chat.conversation.turns[kept].user
        system = chat.conversation.prompt_messages()[0]
        prefix = engine.prompt_ids([system, Message("user", first_kept)],
                                   add_generation_prompt=False)
        assert list(snapshot.ids[:len(prefix) - 2]) == prefix[:-2]
        slid = slid or kept > 0
    assert slid
    # On disk too: the file holds the newest prefix.
    entry = disk.open(engine.kv.identity(), "conversation-1")
    assert entry is not None and np.array_equal(entry.ids, snapshot.ids)
