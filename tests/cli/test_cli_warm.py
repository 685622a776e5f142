"""Saved conversations resume warm: the KV snapshot written beside the store by one `rolechat`
process is restored by the next one (real processes, the real embedded model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rolechat import Chat
from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat.store import Store

DOCUMENT = ("Here are my notes on lighthouses. " + "A lighthouse guides ships at night. " * 20
            + "Keep this in mind.")
FOLLOW_UP = "What do lighthouses do?"


def snapshot_files(home: Path) -> list[Path]:
    return sorted((home / "kv").glob("*/*.kv"))


def cold_reply(home: Path, cid: int, text: str, max_new_tokens: int = 16) -> str:
    """The reply to ``text`` after conversation ``cid``, evaluated from an empty cache."""
    store = Store(home / "rolechat.db")
    conversation = store.conversation(cid)
    store.close()
    engine = LlamaCppEngine(n_threads=1, kv_cache_ram=0)
    try:
        chat = Chat(engine, conversation=conversation,
                    params={"temperature": 0.0, "max_new_tokens": max_new_tokens})
        reply = chat.send(text)
        assert reply.usage.cached_tokens == 0
        return reply.text
    finally:
        engine.close()


def test_ask_c_in_a_new_process_restores_from_disk(cli, rolechat_home: Path) -> None:
    first = cli.ask_json(DOCUMENT, *cli.FAST)
    assert first["usage"]["prompt_tokens"] > 150
    (path,) = snapshot_files(rolechat_home)  # written before the first process ended
    assert path.name == f"conversation-{first['conversation_id']}.kv"

    second = cli.ask_json("-c", FOLLOW_UP, *cli.FAST)
    usage = second["usage"]
    assert second["conversation_id"] == first["conversation_id"]
    assert usage["kv_source"] == "disk"
    assert usage["restored_tokens"] == usage["cached_tokens"]
    assert usage["restored_tokens"] >= first["usage"]["prompt_tokens"]
    assert usage["prompt_tokens"] - usage["cached_tokens"] < 40
    # The same greedy reply as an evaluation from an empty cache.
    cid = first["conversation_id"]
    store = Store(rolechat_home / "rolechat.db")
    store.drop_last_turn(cid)  # the conversation as it was before the follow-up
    store.close()
    assert second["response"] == cold_reply(rolechat_home, cid, FOLLOW_UP)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip])
def test_a_damaged_snapshot_is_ignored_with_a_warning(cli, rolechat_home: Path,
                                                      damage: object) -> None:
    first = cli.ask_json(DOCUMENT, *cli.FAST)
    (path,) = snapshot_files(rolechat_home)
    damage(path)  # type: ignore[operator]
    result = cli.ok("ask", "--json", "-c", FOLLOW_UP, *cli.FAST)
    assert "ignoring the KV snapshot" in result.err and "Traceback" not in result.err
    second = result.json()
    assert second["usage"]["cached_tokens"] == 0  # evaluated normally
    cid = first["conversation_id"]
    store = Store(rolechat_home / "rolechat.db")
    store.drop_last_turn(cid)
    store.close()
    assert second["response"] == cold_reply(rolechat_home, cid, FOLLOW_UP)
    assert len(snapshot_files(rolechat_home)) == 1  # the damaged file replaced by a good one


def test_another_context_length_ignores_the_snapshot(cli, rolechat_home: Path) -> None:
    cli.ask_json(DOCUMENT, *cli.FAST)
    result = cli.ok("ask", "--json", "-c", FOLLOW_UP, "--context-length", "4096", *cli.FAST)
    assert "made for another model, context length or library version" in result.err
    assert result.json()["usage"]["cached_tokens"] == 0


def test_deleting_a_conversation_deletes_its_snapshot(cli, rolechat_home: Path) -> None:
    first = cli.ask_json("Hello there.", *cli.FAST)
    other = cli.ask_json("Another one.", *cli.FAST)
    assert len(snapshot_files(rolechat_home)) == 2
    cli.ok("conversations", "delete", str(first["conversation_id"]))
    assert [p.name for p in snapshot_files(rolechat_home)] == [
        f"conversation-{other['conversation_id']}.kv"]


def test_a_zero_disk_budget_writes_nothing(cli, rolechat_home: Path) -> None:
    cli.ask_json("Hello there.", "--kv-cache-disk", "0", *cli.FAST)
    assert snapshot_files(rolechat_home) == []
    data = cli.ask_json("-c", "Again.", "--kv-cache-disk", "0", *cli.FAST)
    assert data["usage"]["restored_tokens"] == 0


def test_a_bad_size_is_a_clear_error(cli) -> None:
    line = cli.fails("ask", "hi", "--kv-cache-ram", "lots", code=2)
    assert "is not a size" in line and "--kv-cache-ram" in line


def test_chat_c_resumes_warm(spawn_repl, rolechat_home: Path) -> None:
    repl = spawn_repl("-t", "0", "--max-new-tokens", "12", "--threads", "1")
    repl.send(DOCUMENT, "tok/s")
    repl.child.sendline("/exit")
    assert repl.finish() == 0
    assert len(snapshot_files(rolechat_home)) == 1
    resumed = spawn_repl("-c", "-t", "0", "--max-new-tokens", "12", "--threads", "1")
    output = resumed.send(FOLLOW_UP, "tok/s")
    assert "restored from disk" in output
    usage = resumed.send("/usage", "KV disk")
    assert "1 restored" in usage
    resumed.child.sendline("/exit")
    assert resumed.finish() == 0
