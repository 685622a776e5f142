"""KV snapshots of the transformers engine (real Hugging Face objects, CPU): each layer's keys
and values are copied to host memory and back, in memory and through a file, and interleaved
conversations give the same greedy replies as an empty cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cold import cold_reply
from rolechat import Chat, Conversation, load_engine
from rolechat.engines.kvstore import KVStore
from rolechat.engines.snapshots import DiskTier
from rolechat.engines.transformers import HFKVCache, TransformersEngine

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


def engine_of(tiny_folder: Path, **options: Any) -> TransformersEngine:
    engine = load_engine(tiny_folder, **options)
    assert isinstance(engine, TransformersEngine)
    return engine


def test_snapshot_and_restore_are_exact(tiny_folder: Path) -> None:
    engine = engine_of(tiny_folder)
    Chat(engine, params=GREEDY).send("A first question for the cache.")
    engine.flush()
    kv: HFKVCache = engine.adapter.kv  # type: ignore[attr-defined]
    snapshot = kv.snapshot()
    assert snapshot is not None and len(snapshot) == len(kv.held)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in kv.cache.layers]
    kv.reset()
    kv.restore(snapshot, len(snapshot) - 3)
    assert kv.held == [int(t) for t in snapshot.ids[:-3]]
    for (keys, values), layer in zip(before, kv.cache.layers):
        assert torch.equal(layer.keys, keys[:, :, :-3]) and torch.equal(layer.values,
                                                                        values[:, :, :-3])
    # Through bytes (the disk tier's format) and back.
    again = kv.loads(kv.dumps(snapshot), snapshot.ids)
    for (k1, v1), (k2, v2) in zip(snapshot.state, again.state):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_interleaved_conversations_match_a_cold_cache(tiny_folder: Path) -> None:
    warm, cold = engine_of(tiny_folder), engine_of(tiny_folder, kv_cache_ram=0)
    chats = []
    for index in range(3):
        chat = Chat(warm, system=f"You are assistant {index}.", params=GREEDY)
        chat.cache_key = f"conversation-{index}"
        chats.append(chat)
    for round_ in range(4):
        for index, chat in enumerate(chats):
            text = f"round {round_} for conversation {index}"
            before = chat.conversation.copy()
            reply = chat.send(text)
            assert reply.text == cold_reply(cold, before, text, GREEDY)
            if round_:
                assert reply.usage.kv_source == "ram"
                assert reply.usage.prompt_tokens - reply.usage.restored_tokens < 30


def test_a_new_engine_restores_from_disk(tiny_folder: Path, tmp_path: Path) -> None:
    first = engine_of(tiny_folder, kv_store=KVStore(disk=DiskTier(tmp_path / "kv")))
    chat = Chat(first, system="Be brief.", params=GREEDY)
    chat.cache_key = "conversation-1"
    before = chat.send("Remember this sentence, please.")
    first.flush()
    second = engine_of(tiny_folder, kv_store=KVStore(disk=DiskTier(tmp_path / "kv")))
    resumed = Chat(second, conversation=Conversation.from_dict(chat.conversation.to_dict()),
                   params=GREEDY)
    resumed.cache_key = "conversation-1"
    reply = resumed.send("And now?")
    assert reply.usage.kv_source == "disk"
    # The random model's reply may tokenize differently when read back; its prompt does not.
    assert reply.usage.restored_tokens >= before.usage.prompt_tokens
    second.reset_cache()
    cold = Chat(second, conversation=Conversation.from_dict(chat.conversation.to_dict()),
                params=GREEDY, ).send("And now?")
    assert cold.text == reply.text
