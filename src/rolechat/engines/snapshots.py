"""KV snapshot files beside the conversation store: the disk tier, bounded in bytes.

Contract:
- :class:`DiskTier` keeps one file per snapshot name under ``<root>/<model>/<name>.kv``, where
  ``<model>`` is a hash of the model's identity (its file, size and a hash of its header). A file
  holds a header (format version, the cache's full identity: model, context length, layout,
  library versions; the token ids it covers; the state's length and a CRC-32 of ids and state),
  then the ids and the state. Writes go to a temporary file that is renamed into place, so a
  reader never sees half a file; the tier never holds more than ``max_bytes`` of ``.kv`` files
  (all models together), evicting the oldest first. A file that is truncated, corrupt, of an
  older format or of another model or context length is ignored: a warning is logged, the file
  is removed, and the reply is evaluated normally. Temporary files left by a killed process
  are removed when a tier opens the folder.
- Names: a stored conversation's snapshot is ``conversation-<id>``
  (:func:`conversation_snapshot`); :func:`delete_conversation_files` removes a name's files for
  every model. The engine's :class:`~rolechat.engines.kvstore.KVStore` is the one owner of the
  tier: it decides what is read, written and deleted.
- Sizes are read with pydantic's ``ByteSize`` (:func:`parse_size`: ``512MB``, ``2GiB``, ``0``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ByteSize, TypeAdapter, ValidationError

from .kvcache import as_ids

log = logging.getLogger("rolechat.kv")

#: Format of the snapshot files; a file of another format is ignored and removed.
FORMAT = 2
MAGIC = b"RCKV\x00"
SUFFIX = ".kv"
#: Default budget of the disk tier (the CLI's --kv-cache-disk).
DEFAULT_DISK_BYTES = 4 * 1024**3
_SIZE = TypeAdapter(ByteSize)


def parse_size(text: str | int) -> int:
    """Bytes from ``"512MB"``, ``"2GiB"``, ``"1.5G"``, ``"0"`` or an int; ValueError if not."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative (got {text})")
        return text
    try:
        return int(_SIZE.validate_python(text.strip()))
    except ValidationError:
        raise ValueError(f"{text!r} is not a size (use e.g. 512MB, 2GiB or 0)") from None


def format_size(n: int) -> str:
    return ByteSize(n).human_readable(separator=" ")


# ----- keys ------------------------------------------------------------------------------------

def conversation_snapshot(cid: int) -> str:
    """The snapshot name of stored conversation ``cid``."""
    return f"conversation-{cid}"


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


def delete_conversation_files(root: Path, name: str) -> int:
    """Remove the snapshot files named ``name`` under ``root`` (every model); how many."""
    removed = 0
    if root.is_dir():
        for path in root.glob(f"*/{name}{SUFFIX}"):
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


def iter_files(root: Path) -> Iterator[Path]:
    """Every snapshot file under ``root``."""
    if root.is_dir():
        yield from sorted(root.glob(f"*/*{SUFFIX}"))
