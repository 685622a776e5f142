"""The server's state: what every route handler works on, reached through the request.

Contract: :class:`ServerState` holds the engine, the store, the generation worker, the KV disk
tier, whether API keys are required, the served model's id, the sessions' live chats
(:class:`Chats`, a thread-safe LRU over cachetools' ``LRUCache``) and the conversations'
locks (:meth:`ServerState.lock_of`: one :class:`asyncio.Lock` per conversation, kept only
while somebody holds it or waits for it, so the mapping never outgrows the requests in
flight). :func:`state_of` returns it for a request (it lives on ``app.state.rolechat``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import LRUCache
from fastapi import Request

from ..engines import Engine
from ..saved import SavedChat
from ..store import Store
from ..window import Window
from .worker import Worker

#: Conversations whose live chat (and so whose sticky window) stays in memory.
CHAT_CACHE_SIZE = 64


class Chats:
    """The sessions' live chats by conversation id: an LRU of ``size`` entries, safe to use
    from the event loop and from the threads handlers hand blocking work to."""

    def __init__(self, size: int = CHAT_CACHE_SIZE) -> None:
        self._cache: LRUCache[int, SavedChat] = LRUCache(maxsize=size)
        self._guard = threading.Lock()

    def get(self, cid: int, make: Callable[[], SavedChat]) -> SavedChat:
        """The chat of ``cid``, made (outside the guard: it reads the store) and kept if
        missing."""
        with self._guard:
            found = self._cache.get(cid)
        if found is not None:
            return found
        made = make()
        self.put(cid, made)
        return made

    def put(self, cid: int, chat: SavedChat) -> None:
        with self._guard:
            self._cache[cid] = chat

    def pop(self, cid: int) -> None:
        with self._guard:
            self._cache.pop(cid, None)

    def __len__(self) -> int:
        with self._guard:
            return len(self._cache)


@dataclass
class ServerState:
    engine: Engine
    store: Store
    worker: Worker
    #: API keys are required (conversations then belong to the key that made them).
    keyed: bool
    model_id: str
    #: The window new sessions get (``serve --memory``); None: the persona's.
    window: Window | None = None
    chats: Chats = field(default_factory=Chats)
    #: Each conversation's lock, only while a request holds or awaits it (whoever does keeps
    #: the lock alive; when the last lets go, the entry goes with it).
    locks: weakref.WeakValueDictionary[int, asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary)

    def lock_of(self, cid: int) -> asyncio.Lock:
        """The lock of conversation ``cid``: the same object for everybody who holds a
        reference to it; keep that reference until the lock is released."""
        lock = self.locks.get(cid)
        if lock is None:
            lock = self.locks[cid] = asyncio.Lock()
        return lock


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.rolechat
    return state
