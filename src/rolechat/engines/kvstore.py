"""The KV store: the one owner of a local engine's KV snapshots, in RAM and on disk.

Contract:
- A :class:`KVStore` is built once and handed to the engine (``load_engine(...,
  kv_store=...)``); the engine makes its own (RAM only) when none is given. It owns the
  :class:`RamTier` (an LRU of snapshots bounded in bytes), the optional
  :class:`~rolechat.engines.snapshots.DiskTier` (checked files beside the conversation store),
  the one thread that writes files, and deletion. Nothing else reads or writes snapshots.
- Snapshots are named by plain strings: a stored conversation's is ``conversation-<id>``
  (:func:`~rolechat.engines.snapshots.conversation_snapshot`), a stateless request's a
  ``prefix-N`` name its engine gives it.
- :meth:`KVStore.candidates` lists what may hold a prompt's prefix: the name's own snapshot
  (RAM, else its file on disk), then every snapshot in RAM. A candidate's state is read only
  when it is used (:meth:`Candidate.load`), and one that cannot be used is dropped with a
  warning (:meth:`Candidate.drop`) — a snapshot can cost time, never change a reply, because
  it is used only up to where its token ids equal the prompt's.
- :meth:`KVStore.save` keeps a snapshot in RAM and/or queues its file. Files are written by one
  thread once the engine has been quiet for :data:`IDLE_S` (a write takes CPU time a reply
  starting now should not share): the engine reports its work through :attr:`KVStore.quiet`.
  :meth:`KVStore.flush` writes what is queued at once and waits for it.
- :meth:`KVStore.forget` drops a name everywhere: RAM, a queued write and its files for every
  model.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from cachetools import LRUCache

from .base import KVSource
from .kvcache import KVSnapshot
from .snapshots import DamagedSnapshot, DiskEntry, DiskTier, delete_conversation_files

log = logging.getLogger("rolechat.kv")

#: Default budget of the RAM tier (the CLI's --kv-cache-ram).
DEFAULT_RAM_BYTES = 2 * 1024**3
#: Snapshot files are written once the engine has done nothing for this long (seconds).
IDLE_S = 0.5


# ----- RAM -------------------------------------------------------------------------------------

class _Bytes(LRUCache[str, KVSnapshot]):
    """cachetools' LRU bounded by the snapshots' sizes, counting what it evicts."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=lambda s: s.nbytes)
        self.evictions = 0

    def popitem(self) -> tuple[str, KVSnapshot]:
        self.evictions += 1
        return super().popitem()


class RamTier:
    """Snapshots in host memory, least recently used evicted first, never more than
    ``max_bytes`` (a snapshot larger than that is not kept; 0 turns the tier off)."""

    def __init__(self, max_bytes: int = DEFAULT_RAM_BYTES) -> None:
        self.max_bytes = max_bytes
        self._cache = _Bytes(max(max_bytes, 1))
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)

    def put(self, name: str, snapshot: KVSnapshot) -> bool:
        """Keep ``snapshot`` as ``name``'s (replacing the old one); False if it cannot fit.
        Anonymous snapshots (``prefix-N``) whose ids this one starts with are dropped: it
        covers them."""
        with self._lock:
            self._cache.pop(name, None)
            for other, held in list(self._cache.items()):
                if other.startswith("prefix-") and len(held) <= len(snapshot) and \
                        np.array_equal(held.ids, snapshot.ids[:len(held)]):
                    del self._cache[other]
            if not self.max_bytes or snapshot.nbytes > self.max_bytes:
                return False
            self._cache[name] = snapshot
            return True

    def get(self, name: str) -> KVSnapshot | None:
        with self._lock:
            snapshot: KVSnapshot | None = self._cache.get(name)
            if snapshot is None:
                self.misses += 1
            return snapshot

    def items(self) -> list[tuple[str, KVSnapshot]]:
        with self._lock:
            return list(self._cache.items())

    def hit(self, name: str, snapshot: KVSnapshot) -> KVSnapshot:
        """``snapshot`` (``name``'s), counted as restored from this tier and marked recently
        used."""
        with self._lock:
            self.hits += 1
            self._cache.get(name)  # a read moves it to the young end
        return snapshot

    def discard(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
            for other in [n for n in self._cache if n.startswith(name + ".")]:
                del self._cache[other]  # the branches it set aside (copy)

    def copy(self, name: str, new: str) -> bool:
        """Keep ``name``'s snapshot under ``new`` as well (a branch set aside: the snapshot
        stays a candidate for any prompt that shares its prefix); False if there is none."""
        with self._lock:
            snapshot = self._cache.get(name)
            if snapshot is None or not self.max_bytes:
                return False
            self._cache[new] = snapshot
            return True

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._cache), "bytes": int(self._cache.currsize),
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self._cache.evictions}


# ----- quiet moments ---------------------------------------------------------------------------

class Quiet:
    """Whether the engine is working, and how long it has been idle: the file writer waits
    for a quiet moment, a flush does not."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._since = time.monotonic()
        self._hurry = 0

    def busy(self, busy: bool) -> None:
        with self._cond:
            if self._busy and not busy:
                self._since = time.monotonic()
            self._busy = busy
            self._cond.notify_all()

    def wait(self) -> None:
        """Until the engine has been idle for :data:`IDLE_S` (at once while hurrying)."""
        with self._cond:
            while not self._hurry:
                left = IDLE_S - (time.monotonic() - self._since)
                if not self._busy and left <= 0:
                    return
                self._cond.wait(timeout=None if self._busy else left)

    def hurry(self, on: bool) -> None:
        with self._cond:
            self._hurry += 1 if on else -1
            self._cond.notify_all()


# ----- candidates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """A snapshot that may hold a prompt's prefix."""

    ids: np.ndarray
    canonical: int
    source: KVSource
    #: The snapshot itself (a file is read and checked only now).
    load: Callable[[], KVSnapshot]
    #: Throw it away, with a warning saying why.
    drop: Callable[[str], None]


#: Turns file bytes back into a snapshot (the engine's adapter knows its state's format).
Loader = Callable[[bytes, np.ndarray], KVSnapshot]


class KVStore:
    """Snapshots in RAM and (optionally) on disk, for one engine."""

    def __init__(self, ram_bytes: int = DEFAULT_RAM_BYTES, disk: DiskTier | None = None) -> None:
        self.ram = RamTier(ram_bytes)
        self.disk = disk
        self.quiet = Quiet()
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="rolechat-kv-writer")
        self._pending: dict[str, tuple[KVSnapshot, dict[str, Any], bytes]] = {}
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()
        _LIVE.add(self)

    # ----- reading -----------------------------------------------------------------------
    def candidates(self, name: str | None, identity: dict[str, Any],
                   loads: Loader) -> Iterator[Candidate]:
        """Snapshots that may hold a prompt's prefix: ``name``'s own (RAM, else its file),
        then every snapshot in RAM."""
        own = self.ram.get(name) if name is not None and self.ram.max_bytes else None
        if own is None and name is not None and self.disk is not None:
            entry = self.disk.open(identity, name)
            if entry is not None:
                yield Candidate(entry.ids, entry.canonical, "disk",
                                partial(self._load_file, entry, loads),
                                partial(self._drop_file, entry))
        for other, snapshot in self.ram.items():
            yield Candidate(snapshot.ids, snapshot.canonical, "ram",
                            partial(self.ram.hit, other, snapshot),
                            partial(self._drop_ram, other))

    def _load_file(self, entry: DiskEntry, loads: Loader) -> KVSnapshot:
        assert self.disk is not None
        snapshot = loads(self.disk.read(entry), entry.ids)
        return KVSnapshot(snapshot.ids, snapshot.state, snapshot.nbytes,
                          min(entry.canonical, len(entry.ids)))

    def _drop_file(self, entry: DiskEntry, why: str) -> None:
        assert self.disk is not None
        self.disk.discard_damaged(entry.path, why)

    def _drop_ram(self, name: str, why: str) -> None:
        log.warning("a KV snapshot in RAM could not be restored (%s); it was dropped, and the "
                    "prompt is evaluated normally", why)
        self.ram.discard(name)

    # ----- writing -----------------------------------------------------------------------
    def keeps(self, *, persistent: bool) -> bool:
        """Whether a snapshot saved now would be kept anywhere (a conversation's also goes to
        its file; a stateless one's only to RAM)."""
        return bool(self.ram.max_bytes) or (persistent and self.disk is not None
                                            and bool(self.disk.max_bytes))

    def save(self, name: str, snapshot: KVSnapshot, identity: dict[str, Any],
             data: bytes | None = None, *, ram: bool = True) -> None:
        """Keep ``snapshot`` as ``name``'s: in RAM (unless ``ram`` is False) and, with the
        file's bytes ``data``, in its file once the engine is quiet (a newer snapshot of the
        same name replaces one not yet written)."""
        if ram:
            self.ram.put(name, snapshot)
        if data is None or self.disk is None or not self.disk.max_bytes:
            return
        with self._lock:
            self._pending[name] = (snapshot, identity, data)
            try:
                future: concurrent.futures.Future[None] | None = self._writer.submit(
                    self._write_when_quiet, name)
            except RuntimeError:  # the interpreter is shutting down: write it now
                future = None
            if future is not None:
                self._futures.add(future)
        if future is None:
            self._write(name)
            return
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("writing a KV snapshot failed", exc_info=future.exception())

    def _write_when_quiet(self, name: str) -> None:
        self.quiet.wait()
        self._write(name)

    def _write(self, name: str) -> None:
        with self._lock:
            entry = self._pending.pop(name, None)
        if entry is None or self.disk is None:
            return  # written already (a newer task took it), or forgotten
        snapshot, identity, data = entry
        self.disk.write(identity, name, snapshot.ids, data, snapshot.canonical)

    def flush(self, timeout: float = 60.0) -> bool:
        """Write every queued file now; False if ``timeout`` passed first."""
        with self._lock:
            futures = set(self._futures)
        if not futures:
            return True
        self.quiet.hurry(True)
        try:
            _, left = concurrent.futures.wait(futures, timeout=timeout)
        finally:
            self.quiet.hurry(False)
        return not left

    # ----- forgetting --------------------------------------------------------------------
    def forget(self, name: str) -> None:
        """Drop ``name``'s snapshots: RAM, a queued write, and its files for every model."""
        self.ram.discard(name)
        with self._lock:
            self._pending.pop(name, None)
        if self.disk is not None:
            delete_conversation_files(self.disk.root, name)

    def stats(self) -> dict[str, Any]:
        return {"ram": self.ram.stats(),
                "disk": self.disk.stats() if self.disk is not None else None}

    def close(self) -> None:
        self.flush(30.0)
        self._writer.shutdown(wait=False)


_LIVE: weakref.WeakSet[KVStore] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Finish writing snapshot files before the process ends (bounded)."""
    deadline = time.monotonic() + 30.0
    try:
        for store in list(_LIVE):
            store.flush(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C: leave now; no file is ever half written
        pass


__all__ = ["DEFAULT_RAM_BYTES", "Candidate", "DamagedSnapshot", "KVSource", "KVStore",
           "RamTier"]
