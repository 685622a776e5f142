"""KV snapshots with exact token arithmetic: the production scheduler and KV store over the
fake engine's simulated sequences (their "state" is the ids themselves, so every restore is
checked)."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fakes import FakeEngine
from rolechat import Chat, Message
from rolechat.engines.kvcache import KVSnapshot, as_ids, common_prefix
from rolechat.engines.kvstore import KVStore, RamTier
from rolechat.engines.snapshots import MAGIC, DiskTier, delete_conversation_files, parse_size

GREEDY = {"temperature": 0.0, "max_new_tokens": 64}
#: After a reply ends with its end-of-turn token, the engine evaluates the next turn's header
#: ahead ("<|im_end|>\n<|im_start|>user\n"); the next prompt shares all of it, which is the
#: conversation so far ("...<|im_end|>\n") and 6 more tokens ("<|im_start|>user\n").
AHEAD = 6
#: The header's tokens, all of them.
HEADER = 8


def keyed_chat(engine: FakeEngine, name: str) -> Chat:
    chat = Chat(engine, system="You are a test.", params=GREEDY)
    chat.cache_key = name
    return chat


def send(chat: Chat, text: str, reply: str = "fine") -> object:
    chat.engine.replies.append(reply)  # type: ignore[attr-defined]
    result = chat.send(text)
    chat.engine.flush()  # type: ignore[attr-defined]
    return result


def so_far(engine: FakeEngine, chat: Chat) -> int:
    """Tokens of the conversation so far, as the next prompt starts."""
    return len(engine.prompt_ids(chat.conversation.prompt_messages(),
                                 add_generation_prompt=False))


def with_disk(path: Path, **options: object) -> FakeEngine:
    return FakeEngine(kv_store=KVStore(disk=DiskTier(path)), **options)  # type: ignore[arg-type]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2
    assert common_prefix([], [1], 5) == 0
    assert common_prefix(np.array([5, 6]), [5, 6], 5) == 2


def test_interleaved_conversations_restore_from_ram() -> None:
    """One sequence, three conversations taking turns: each switch snapshots the one that
    leaves and restores the one that comes back."""
    engine = FakeEngine()
    chats = [keyed_chat(engine, f"conversation-{i}") for i in range(3)]
    for round_ in range(4):
        for index, chat in enumerate(chats):
            text = f"C{index} round {round_}: " + "x" * 40
            held = so_far(engine, chat) + AHEAD
            usage = send(chat, text).usage  # type: ignore[attr-defined]
            if round_ == 0:
                # Only the shared system prompt comes from another conversation.
                assert usage.cached_tokens < 40
                continue
            # Everything before this turn was restored: the earlier turns, the end of the
            # last reply and the next turn's header, evaluated ahead.
            assert usage.kv_source == "ram"
            assert usage.restored_tokens == usage.cached_tokens == held
            # Evaluated: the new message and the generation prompt.
            assert usage.prompt_tokens - usage.cached_tokens == len(text) + 13
    assert engine.kv.ram.stats()["hits"] == 9


def test_continuing_one_conversation_uses_the_live_cache() -> None:
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    send(chat, "one")
    usage = send(chat, "two").usage  # type: ignore[attr-defined]
    assert usage.kv_source == "live" and usage.restored_tokens == 0
    assert usage.cached_tokens > 0
    assert engine.restores == 0


def test_a_stateless_client_that_alternates_stays_warm() -> None:
    """No names: snapshots are found by the longest token prefix."""
    engine = FakeEngine()
    histories: list[Chat] = [Chat(engine, system=f"Conversation {i}. " + "y" * 50,
                                  params=GREEDY) for i in range(2)]
    for round_ in range(3):
        for chat in histories:
            usage = send(chat, f"message {round_}").usage  # type: ignore[attr-defined]
            if round_:
                assert usage.kv_source == "ram"
                assert usage.prompt_tokens - usage.cached_tokens < 40
    # Each conversation's older snapshots were covered by its newer one and dropped.
    assert len(engine.kv.ram) == 2


def test_the_ram_budget_holds_and_evicts_the_least_recently_used() -> None:
    engine = FakeEngine(kv_cache_ram=4500)  # 8 bytes a token: two ~250-token snapshots fit
    chats = [keyed_chat(engine, f"conversation-{i}") for i in range(4)]
    for chat in chats:
        send(chat, "z" * 200)
        assert engine.kv.ram.bytes <= 4500
    names = [name for name, _ in engine.kv.ram.items()]
    assert names == ["conversation-2", "conversation-3"]  # oldest first out
    assert engine.kv.ram.stats()["evictions"] == 2
    # An evicted conversation is evaluated again, not restored.
    usage = send(chats[0], "again").usage  # type: ignore[attr-defined]
    assert usage.kv_source in ("none", "live") and usage.restored_tokens == 0


def test_a_zero_budget_turns_the_ram_tier_off() -> None:
    engine = FakeEngine(kv_cache_ram=0)
    a, b = keyed_chat(engine, "conversation-1"), keyed_chat(engine, "conversation-2")
    send(a, "hello")
    send(b, "hello")
    usage = send(a, "again").usage  # type: ignore[attr-defined]
    assert usage.restored_tokens == 0 and len(engine.kv.ram) == 0


def test_ram_tier_put_never_exceeds_its_budget() -> None:
    tier = RamTier(100)
    big = KVSnapshot(as_ids(range(10)), b"", 101)
    assert tier.put("a", big) is False and tier.bytes == 0
    for i in range(5):
        tier.put(f"k{i}", KVSnapshot(as_ids([i]), b"", 40))
        assert tier.bytes <= 100
    assert [name for name, _ in tier.items()] == ["k3", "k4"]


def test_a_snapshot_that_fails_to_restore_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()
    a, b = keyed_chat(engine, "conversation-1"), keyed_chat(engine, "conversation-2")
    send(a, "hello there")
    send(b, "something else")
    snapshot = engine.kv.ram.get("conversation-1")
    assert snapshot is not None
    damaged = KVSnapshot(snapshot.ids, np.zeros(len(snapshot.ids), np.int32).tobytes(),
                         snapshot.nbytes, snapshot.canonical)
    engine.kv.ram.put("conversation-1", damaged)
    with caplog.at_level(logging.WARNING, "rolechat.kv"):
        reply = send(a, "and now?", reply="still right")
    assert reply.text == "still right"  # type: ignore[attr-defined]
    assert reply.usage.cached_tokens == 0  # type: ignore[attr-defined]
    assert "could not be restored" in caplog.text


def test_an_exact_reply_reuses_only_what_was_evaluated_as_a_prompt() -> None:
    """Keys and values of decoded tokens are not reused by a greedy or seeded reply: after a
    sampled reply (which is not evaluated again), the next exact reply evaluates the sampled
    reply's tokens itself."""
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    first = chat.send("one", temperature=0.7)
    engine.flush()
    assert engine.evaluated[1:] == [(0, HEADER)]  # only the next turn's header, ahead
    second = send(chat, "two").usage  # type: ignore[attr-defined]
    assert second.cached_tokens == first.usage.prompt_tokens  # the prompt, not the reply
    # A sampled reply reuses every matching token, the decoded ones too.
    third = chat.send("three", temperature=0.7)
    assert third.usage.cached_tokens == second.prompt_tokens + len("fine") + AHEAD + 2


def test_after_an_exact_reply_it_is_evaluated_again_while_idle() -> None:
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    first = send(chat, "one", reply="twelve chars").usage  # type: ignore[attr-defined]
    # The reply's tokens (the last one included: it was decoded) and the header, as a prompt.
    assert engine.evaluated[1:] == [(0, len("twelve chars") + HEADER)]
    second = send(chat, "two").usage  # type: ignore[attr-defined]
    assert second.cached_tokens == first.prompt_tokens + len("twelve chars") + HEADER
    snapshot = engine.kv.ram.get("conversation-1")
    assert snapshot is not None and snapshot.canonical == len(snapshot)


def test_a_sampled_reply_is_snapshotted_as_it_is() -> None:
    engine = FakeEngine()
    chat = Chat(engine, system="s", params={"temperature": 0.7})
    chat.cache_key = "conversation-1"
    send(chat, "one")
    assert engine.evaluated[1:] == [(0, HEADER)]
    snapshot = engine.kv.ram.get("conversation-1")
    assert snapshot is not None
    assert snapshot.canonical == len(snapshot) - len("echo") - HEADER


# ----- the disk tier -----------------------------------------------------------------------

def test_resume_in_a_new_process_restores_from_disk(tmp_path: Path) -> None:
    first = with_disk(tmp_path / "kv")
    chat = keyed_chat(first, "conversation-7")
    send(chat, "Remember the number 42.")
    send(chat, "And 43.")
    files = list((tmp_path / "kv").glob("*/conversation-7.kv"))
    assert len(files) == 1
    # A new engine (a new process): nothing in RAM, the file on disk.
    second = with_disk(tmp_path / "kv")
    resumed = Chat(second, conversation=chat.conversation.copy(), params=GREEDY)
    resumed.cache_key = "conversation-7"
    held = so_far(second, chat) + AHEAD
    usage = send(resumed, "Which numbers?").usage  # type: ignore[attr-defined]
    assert usage.kv_source == "disk"
    assert usage.restored_tokens == usage.cached_tokens == held
    assert second.kv.disk is not None and second.kv.disk.hits == 1


def snapshot_file(tmp_path: Path) -> tuple[Path, Chat]:
    chat = keyed_chat(with_disk(tmp_path / "kv"), "conversation-1")
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
    fresh = with_disk(tmp_path / "kv")
    resumed = Chat(fresh, conversation=chat.conversation.copy(), params=GREEDY)
    resumed.cache_key = "conversation-1"
    with caplog.at_level(logging.WARNING, "rolechat.kv"):
        reply = send(resumed, "What did I say?", reply="the right reply")
    assert reply.text == "the right reply"  # type: ignore[attr-defined]
    assert reply.usage.cached_tokens == 0 and reply.usage.kv_source == "none"  # type: ignore[attr-defined]
    assert "ignoring the KV snapshot" in caplog.text
    assert fresh.kv.disk is not None and fresh.kv.disk.damaged == 1
    fresh.flush()
    # The damaged file was removed; the new reply wrote a good one in its place.
    identity = fresh.adapter.identity()
    assert DiskTier(tmp_path / "kv").open(identity, "conversation-1") is not None


@pytest.mark.parametrize("other", [{"model": "another-model"}, {"context_length": 4096}])
def test_a_file_of_another_model_or_context_is_ignored(tmp_path: Path, other: dict[str, object],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path, chat = snapshot_file(tmp_path)
    fresh = with_disk(tmp_path / "kv", **other)
    target = DiskTier(tmp_path / "kv").path(fresh.adapter.identity(), "conversation-1")
    if target != path:  # another model has its own folder: put the foreign file there
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    resumed = Chat(fresh, conversation=chat.conversation.copy(), params=GREEDY)
    resumed.cache_key = "conversation-1"
    with caplog.at_level(logging.WARNING, "rolechat.kv"):
        reply = send(resumed, "Again?", reply="correct")
    assert reply.text == "correct" and reply.usage.cached_tokens == 0  # type: ignore[attr-defined]
    assert "made for another model, context length or library version" in caplog.text


def test_the_disk_budget_holds_and_evicts_the_oldest(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv", max_bytes=4000)
    engine = FakeEngine(kv_store=KVStore(disk=disk))
    for i in range(5):
        send(keyed_chat(engine, f"conversation-{i}"), "d" * 150)
        time.sleep(0.01)  # distinct modification times
        assert disk.stats()["bytes"] <= 4000
    names = sorted(p.stem for p in (tmp_path / "kv").glob("*/*.kv"))
    assert names == ["conversation-3", "conversation-4"]
    assert disk.evictions == 3


def test_deleting_a_conversation_deletes_its_files(tmp_path: Path) -> None:
    send(keyed_chat(with_disk(tmp_path / "kv"), "conversation-3"), "keep me")
    send(keyed_chat(with_disk(tmp_path / "kv", model="other"), "conversation-3"), "me too")
    send(keyed_chat(with_disk(tmp_path / "kv"), "conversation-4"), "not me")
    assert delete_conversation_files(tmp_path / "kv", "conversation-3") == 2
    assert [p.stem for p in (tmp_path / "kv").glob("*/*.kv")] == ["conversation-4"]


def test_forgetting_a_conversation_drops_it_everywhere(tmp_path: Path) -> None:
    engine = with_disk(tmp_path / "kv")
    chat = keyed_chat(engine, "conversation-5")
    send(chat, "forget me")
    assert list((tmp_path / "kv").glob("*/conversation-5.kv"))
    engine.forget("conversation-5")
    assert engine.kv.ram.get("conversation-5") is None
    assert not list((tmp_path / "kv").glob("*/conversation-5.kv"))
    assert all(s["conversation"] != "conversation-5" for s in engine.kv_stats()["sequences"])


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
    """The reply returns before its snapshot is taken: the snapshot waits for the engine to be
    idle, and the reply does not wait for the snapshot."""
    engine = FakeEngine()
    chat = keyed_chat(engine, "conversation-1")
    started, release = threading.Event(), threading.Event()
    real = engine.adapter.snapshot

    def held_snapshot(seq: int, ids: np.ndarray) -> KVSnapshot | None:
        started.set()
        release.wait(30)
        return real(seq, ids)

    engine.adapter.snapshot = held_snapshot  # type: ignore[method-assign]
    engine.replies.append("hi")
    reply = chat.send("hello")  # returns although the snapshot cannot finish yet
    assert reply.text == "hi"
    assert started.wait(30) and not release.is_set()
    assert engine.kv.ram.get("conversation-1") is None
    release.set()
    assert engine.flush(timeout=30)
    assert engine.kv.ram.get("conversation-1") is not None


def test_reading_the_stats_does_not_hold_back_the_file_writer(tmp_path: Path) -> None:
    """The file is written once the engine has been quiet for a moment; a client reading the
    status all the while (a dashboard, GET /v1/status) does not make it busy."""
    engine = with_disk(tmp_path / "kv")
    engine.replies.append("hi")
    keyed_chat(engine, "conversation-1").send("hello")
    deadline = time.monotonic() + 30
    while not list((tmp_path / "kv").glob("*/conversation-1.kv")):
        assert time.monotonic() < deadline, "the file was never written"
        engine.kv_stats()
        time.sleep(0.05)
    assert engine.kv_stats()["disk"]["files"] == 1


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
    engine = FakeEngine(context_length=400, kv_store=KVStore(disk=disk))
    chat = Chat(engine, system="S.", params={"temperature": 0.7, "max_new_tokens": 16})
    chat.cache_key = "conversation-1"
    slid = False
    for turn in range(8):
        reply = send(chat, f"T{turn} " + "w" * 60)
        (_, snapshot), = engine.kv.ram.items()
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
    entry = disk.open(engine.adapter.identity(), "conversation-1")
    assert entry is not None and np.array_equal(entry.ids, snapshot.ids)
