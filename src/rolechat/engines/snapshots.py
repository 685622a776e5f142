"""KV snapshots kept warm: an LRU in memory and files beside the store, both bounded in bytes.

Contract:
- :class:`CacheKey` names whose KV state a snapshot is: a conversation (``conversation-12``)
  and the :class:`DiskTier` it persists in (None: memory only).
- :class:`MemoryTier` is an LRU of snapshots, bounded in bytes: it never holds more than
  ``max_bytes`` (a snapshot larger than that is not kept; ``0`` turns the tier off). It counts
  entries, bytes, hits, misses and evictions.
- :class:`DiskTier` keeps one file per key under ``<root>/<model>/<name>.kv``, where ``<model>``
  is a hash of the model's identity (its file, size and a hash of its header). A file holds a
  header (format version, the cache's full identity: model, context length, layout, library
  versions; the token ids it covers; the state's length and a CRC-32 of ids and state), then
  the ids and the state. Writes go to a temporary file that is renamed into place, so a
  reader never sees half a file; the tier never holds more than ``max_bytes`` of ``.kv`` files
  (all models together), evicting the oldest first. A file that is truncated, corrupt, of an
  older format or of another model or context length is ignored: a warning is logged, the file
  is removed, and the reply is evaluated normally. Temporary files left by a killed process
  are removed when a tier opens the folder.
- :class:`Background` runs snapshot work (copying the live cache, writing files) off the
  reply's path, one task at a time, in order; :meth:`Background.flush` waits for it.
- :func:`delete_conversation_files` removes a conversation's files for every model (the store
  calls it when the conversation is deleted).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .kvcache import KVSnapshot, as_ids

log = logging.getLogger("rolechat.kv")

#: Format of the snapshot files; a file of another format is ignored and removed.
FORMAT = 1
MAGIC = b"RCKV\x00"
SUFFIX = ".kv"
#: Default budgets (the CLI's --kv-cache-ram and --kv-cache-disk).
DEFAULT_RAM_BYTES = 2 * 1024**3
DEFAULT_DISK_BYTES = 4 * 1024**3


def parse_size(text: str | int) -> int:
    """Bytes from ``"512MB"``, ``"2GiB"``, ``"1.5G"``, ``"0"`` or an int; ValueError if not."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative (got {text})")
        return text
    value = text.strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
             "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
             "tb": 1000**4, "tib": 1024**4}
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (use e.g. 512MB, 2GiB or 0)") from None
    if unit not in units or amount < 0 or amount != amount:
        raise ValueError(f"{text!r} is not a size (use e.g. 512MB, 2GiB or 0)")
    return int(amount * units[unit])


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ----- keys ------------------------------------------------------------------------------------

def conversation_snapshot(cid: int) -> str:
    """The snapshot name of stored conversation ``cid``."""
    return f"conversation-{cid}"


@dataclass(frozen=True, eq=False)
class CacheKey:
    """Whose KV state: ``name`` within ``disk`` (None: kept in memory only)."""

    name: str
    disk: DiskTier | None = None

    @property
    def ident(self) -> tuple[str, str]:
        return (str(self.disk.root) if self.disk is not None else "", self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and other.ident == self.ident

    def __hash__(self) -> int:
        return hash(self.ident)


# ----- memory ----------------------------------------------------------------------------------

class MemoryTier:
    """Snapshots in host memory, least recently used evicted first, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_RAM_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[CacheKey, KVSnapshot]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, snapshot: KVSnapshot) -> bool:
        """Keep ``snapshot`` as ``key``'s (replacing the old one); False if it cannot fit.
        Anonymous snapshots whose ids are a prefix of this one's are dropped (it covers them)."""
        with self._lock:
            self._pop(key.ident)
            for ident, (_, held) in list(self._entries.items()):
                if ident[1].startswith("prefix-") and len(held) <= len(snapshot) and \
                        np.array_equal(held.ids, snapshot.ids[:len(held)]):
                    self._pop(ident)
            if snapshot.nbytes > self.max_bytes:
                return False
            while self.bytes + snapshot.nbytes > self.max_bytes and self._entries:
                self._pop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key.ident] = (key, snapshot)
            self.bytes += snapshot.nbytes
            return True

    def get(self, key: CacheKey) -> KVSnapshot | None:
        with self._lock:
            entry = self._entries.get(key.ident)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key.ident)
            return entry[1]

    def entries(self) -> list[tuple[CacheKey, KVSnapshot]]:
        with self._lock:
            return list(self._entries.values())

    def hit(self, key: CacheKey, snapshot: KVSnapshot) -> KVSnapshot:
        """``snapshot`` (``key``'s), counted as restored from this tier and marked recently
        used."""
        with self._lock:
            self.hits += 1
            if key.ident in self._entries:
                self._entries.move_to_end(key.ident)
        return snapshot

    def discard(self, key: CacheKey) -> None:
        with self._lock:
            self._pop(key.ident)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _pop(self, ident: tuple[str, str]) -> None:
        entry = self._entries.pop(ident, None)
        if entry is not None:
            self.bytes -= entry[1].nbytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}


# ----- disk ------------------------------------------------------------------------------------

def model_folder(identity: dict[str, Any]) -> str:
    """The folder name for a model: a hash of the model part of a cache identity."""
    blob = json.dumps(identity.get("model", identity), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class DamagedSnapshot(Exception):
    """A snapshot file that cannot be used (the message says why)."""


@dataclass
class DiskEntry:
    """A snapshot file whose header and ids have been read; :meth:`read` loads the state."""

    path: Path
    ids: np.ndarray
    canonical: int
    offset: int
    length: int
    crc: int

    def read(self) -> bytes:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise DamagedSnapshot(f"truncated ({len(data)} of {self.length} state bytes)")
        if zlib.crc32(data, zlib.crc32(self.ids.tobytes())) != self.crc:
            raise DamagedSnapshot("checksum mismatch")
        return data


def delete_conversation_files(root: Path, cid: int) -> int:
    """Remove conversation ``cid``'s snapshot files under ``root`` (every model); how many."""
    removed = 0
    if root.is_dir():
        for path in root.glob(f"*/{conversation_snapshot(cid)}{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


class DiskTier:
    """Snapshot files under ``root``, bounded in bytes (oldest evicted first)."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.hits = self.misses = self.writes = self.evictions = self.damaged = 0
        self._lock = threading.Lock()
        self._clean_temporaries()

    # -- files ----------------------------------------------------------------------------
    def path(self, identity: dict[str, Any], name: str) -> Path:
        return self.root / model_folder(identity) / f"{name}{SUFFIX}"

    def _files(self) -> list[tuple[float, int, Path]]:
        found = []
        if self.root.is_dir():
            for path in self.root.glob(f"*/*{SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def _clean_temporaries(self) -> None:
        """Remove temporary files of processes that no longer run (killed mid-write)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob("*/.*.tmp-*"):
            try:
                pid = int(path.name.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                pid = -1
            if pid != os.getpid() and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # -- write ----------------------------------------------------------------------------
    def write(self, identity: dict[str, Any], name: str, ids: np.ndarray, data: bytes,
              canonical: int = 0) -> bool:
        """Write a snapshot file atomically; False if it cannot fit in the budget."""
        ids = np.ascontiguousarray(ids, dtype="<i4")
        header = json.dumps({"format": FORMAT, "identity": identity, "name": name,
                             "tokens": len(ids), "canonical": canonical,
                             "state_bytes": len(data),
                             "crc32": zlib.crc32(data, zlib.crc32(ids.tobytes())),
                             "written_at": time.time()}).encode()
        size = len(MAGIC) + 4 + len(header) + ids.nbytes + len(data)
        if size > self.max_bytes:
            return False
        target = self.path(identity, name)
        with self._lock:
            self._make_room(size, replacing=target)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            try:
                with temporary.open("wb") as f:
                    f.write(MAGIC + struct.pack("<I", len(header)) + header)
                    f.write(ids.tobytes())
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, target)
            except OSError as exc:
                log.warning("could not write the KV snapshot %s: %s", target, exc)
                with contextlib.suppress(OSError):
                    temporary.unlink()
                return False
            self.writes += 1
            return True

    def _make_room(self, size: int, *, replacing: Path) -> None:
        files = self._files()
        total = sum(s for _, s, p in files if p != replacing)
        for _, file_size, path in files:
            if total + size <= self.max_bytes:
                break
            if path == replacing:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                self.evictions += 1
            total -= file_size

    # -- read -----------------------------------------------------------------------------
    def open(self, identity: dict[str, Any], name: str) -> DiskEntry | None:
        """The file for ``name`` if there is a usable one (header and ids checked; the state is
        checked when it is read). A damaged or foreign file is logged and removed."""
        path = self.path(identity, name)
        try:
            entry = self._read_header(path, identity)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (DamagedSnapshot, OSError, ValueError) as exc:
            self.discard_damaged(path, str(exc))
            return None
        return entry

    def _read_header(self, path: Path, identity: dict[str, Any]) -> DiskEntry:
        with path.open("rb") as f:
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
                raise DamagedSnapshot("not a rolechat KV snapshot")
            (length,) = struct.unpack("<I", head[len(MAGIC):])
            raw = f.read(length)
            if len(raw) != length:
                raise DamagedSnapshot("truncated header")
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise DamagedSnapshot("unreadable header") from None
            found = header.get("format") if isinstance(header, dict) else None
            if found != FORMAT:
                raise DamagedSnapshot(f"format {found} (this rolechat reads format {FORMAT})")
            if header.get("identity") != identity:
                raise DamagedSnapshot("made for another model, context length or library "
                                      f"version ({_difference(header.get('identity'), identity)})")
            try:
                tokens = int(header["tokens"])
                int(header["state_bytes"]), int(header["crc32"])
            except (KeyError, TypeError, ValueError):
                raise DamagedSnapshot("incomplete header") from None
            raw_ids = f.read(4 * tokens)
            if len(raw_ids) != 4 * tokens:
                raise DamagedSnapshot("truncated token ids")
        ids = as_ids(np.frombuffer(raw_ids, dtype="<i4"))
        offset = len(MAGIC) + 4 + length + 4 * tokens
        return DiskEntry(path, ids, int(header.get("canonical", 0)), offset,
                         int(header["state_bytes"]), int(header["crc32"]))

    def read(self, entry: DiskEntry) -> bytes:
        """The state of ``entry``, checked; counted as restored from this tier."""
        data = entry.read()
        self.hits += 1
        return data

    def discard_damaged(self, path: Path, why: str) -> None:
        self.damaged += 1
        log.warning("ignoring the KV snapshot %s: %s; it was removed, and the reply is "
                    "evaluated normally", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    def delete(self, identity: dict[str, Any], name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(identity, name).unlink()

    def stats(self) -> dict[str, Any]:
        files = self._files()
        return {"folder": str(self.root), "files": len(files),
                "bytes": sum(s for _, s, _ in files), "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "writes": self.writes,
                "evictions": self.evictions, "damaged": self.damaged}


def _difference(found: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(found, dict):
        return "no identity"
    keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} here, {wanted.get(k)!r} now" for k in keys[:3])


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----- background work -------------------------------------------------------------------------

class Background:
    """One daemon thread that runs snapshot tasks in order, off the reply's path."""

    def __init__(self, name: str = "rolechat-kv") -> None:
        self._name = name
        #: Set while flushing: tasks that wait for a quiet moment should not wait.
        self.hurry = False
        self._tasks: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        _LIVE.add(self)

    def submit(self, task: Callable[[], object]) -> None:
        with self._guard:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._tasks.put(task)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is not None:
                    task()
            except Exception:  # a failed snapshot must never take the engine down
                log.exception("a KV snapshot task failed")
            finally:
                self._tasks.task_done()

    @property
    def busy(self) -> bool:
        return self._tasks.unfinished_tasks > 0

    def flush(self, timeout: float = 60.0, *, hurry: bool = False) -> bool:
        """Wait until every submitted task has run; False if ``timeout`` passed first. With
        ``hurry``, tasks that wait for a quiet moment run at once."""
        deadline = time.monotonic() + timeout
        self.hurry = self.hurry or hurry
        try:
            while self._tasks.unfinished_tasks:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
            return True
        finally:
            if hurry:
                self.hurry = False


_LIVE: weakref.WeakSet[Background] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Finish writing snapshots before the process ends (bounded)."""
    deadline = time.monotonic() + 30.0
    try:
        # One task may submit another (a checkpoint queues its file write): until all are idle.
        while any(b.busy for b in list(_LIVE)) and time.monotonic() < deadline:
            for background in list(_LIVE):
                background.flush(timeout=max(0.0, deadline - time.monotonic()), hurry=True)
    except KeyboardInterrupt:  # a second Ctrl-C: leave now; no file is ever half written
        pass


def iter_files(root: Path) -> Iterator[Path]:
    """Every snapshot file under ``root``."""
    if root.is_dir():
        yield from sorted(root.glob(f"*/*{SUFFIX}"))
