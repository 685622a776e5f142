"""The server's state: what every route handler works on, reached through the request.

Contract: :class:`ServerState` holds the engine, the store, the generation worker, whether API
keys are required, the served model's id, the sessions' live chats (:class:`Chats`, a
thread-safe LRU over cachetools' ``LRUCache``, emptied when the model changes), the
conversations' locks (:meth:`ServerState.lock_of`: one :class:`asyncio.Lock` per conversation,
kept only while somebody holds it or waits for it, so the mapping never outgrows the requests
in flight) and what model switching needs (:class:`Models`: the loader, the model loaded and
the one `serve` started with, the requests using the engine now, the load in progress; the
logic is :mod:`rolechat.server.switch`), the reply being written in each conversation
(``live``, which ``GET .../events`` follows) and whether the server is shutting down
(``closing``: the event streams end). :func:`state_of` returns it for a request (it lives on
``app.state.rolechat``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cachetools import LRUCache
from fastapi import Request

from ..engines import Engine
from ..saved import SavedChat
from ..store import Store
from ..window import Window
from .worker import Job, Worker

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

    def clear(self) -> None:
        """Forget every live chat (they were built on an engine that is gone)."""
        with self._guard:
            self._cache.clear()

    def __len__(self) -> int:
        with self._guard:
            return len(self._cache)


#: Loads a model, given what names it: a name ``/v1/models`` lists, a path, or None (the
#: embedded default); built with the options `serve` was started with.
Loader = Callable[[str | None], Engine]


@dataclass(frozen=True)
class Choice:
    """A model the server can serve: the ``id`` it is listed and asked for by, what the loader
    is given to load it (``load_as``), the other names a request may use for it, and its
    file's facts (``facts``: source, size, quantization...; empty when unknown)."""

    id: str
    load_as: str | None
    aliases: frozenset[str] = frozenset()
    path: Path | None = None
    facts: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Loading:
    """A switch in progress: the model asked for, its size, since when, and whether the
    replies on the old model are still finishing (``draining``) or the new one is loading."""

    choice: Choice
    size: int = 0
    since: float = field(default_factory=time.monotonic)
    phase: Literal["draining", "loading"] = "draining"


@dataclass
class Models:
    """What switching needs. Only the event loop reads and writes it (no lock)."""

    #: None: this server serves one model and never switches.
    loader: Loader | None = None
    #: The model served now, and the one `serve` started with.
    loaded: Choice | None = None
    start: Choice | None = None
    #: Requests using the engine now (planning, or a reply the worker reads); a switch waits
    #: until there are none.
    users: int = 0
    loading: Loading | None = None
    #: No model is loaded (a load failed, and so did loading the previous one again): the next
    #: request loads one.
    empty: bool = False
    #: Switches made since the server started.
    switches: int = 0


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
    models: Models = field(default_factory=Models)
    #: The reply being written in each conversation now (the job that holds its lock).
    live: dict[int, Job] = field(default_factory=dict)
    #: Set when the server starts shutting down: event streams end (listen.py sets it).
    closing: threading.Event = field(default_factory=threading.Event)

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
