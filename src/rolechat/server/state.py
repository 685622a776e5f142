"""The server's state: what every route handler works on, reached through the request.

Contract: :class:`ServerState` holds the engine, the store, the generation worker, the KV disk
tier, whether API keys are required, the served model's id, the sessions' live chats (an LRU,
:class:`LRU`) and one :class:`asyncio.Lock` per conversation. :func:`state_of` returns it for a
request (it lives on ``app.state.rolechat``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fastapi import Request

from ..engines import Engine
from ..engines.snapshots import DiskTier
from ..saved import SavedChat
from ..store import Store
from ..window import Window
from .worker import Worker

K = TypeVar("K")
V = TypeVar("V")

#: Conversations whose live chat (and so whose sticky window) stays in memory.
CHAT_CACHE_SIZE = 64


class LRU(Generic[K, V]):
    """A small thread-safe mapping that forgets its least recently used entries."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._guard = threading.Lock()

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The entry for ``key``, made (outside the guard) and kept if missing."""
        with self._guard:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        with self._guard:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        with self._guard:
            self._items.pop(key, None)


@dataclass
class ServerState:
    engine: Engine
    store: Store
    worker: Worker
    kv_disk: DiskTier | None
    #: API keys are required (conversations then belong to the key that made them).
    keyed: bool
    model_id: str
    #: The window new sessions get (``serve --memory``); None: the persona's.
    window: Window | None = None
    chats: LRU[int, SavedChat] = field(default_factory=lambda: LRU(CHAT_CACHE_SIZE))
    locks: dict[int, asyncio.Lock] = field(default_factory=dict)

    def lock_of(self, cid: int) -> asyncio.Lock:
        return self.locks.setdefault(cid, asyncio.Lock())


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.rolechat
    return state
