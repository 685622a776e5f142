"""The reference every warm-cache test compares with: a reply evaluated from an empty cache."""

from __future__ import annotations

from typing import Any

from rolechat import Chat, Conversation
from rolechat.engines.local import LocalEngine


def cold_reply(engine: LocalEngine, conversation: Conversation, text: str,
               params: dict[str, Any]) -> str:
    """The reply to ``text`` after ``conversation``, with the engine's cache and snapshots in
    memory emptied first (use an engine with ``kv_cache_ram=0``)."""
    engine.reset_cache()
    reply = Chat(engine, conversation=conversation.copy(), params=params).send(text)
    assert reply.usage.cached_tokens == 0
    return reply.text
