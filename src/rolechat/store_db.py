"""The store's SQLite plumbing: connections, read-only opening, errors, writer identities.

Contract:
- :func:`connect` opens a connection the way the store uses it (autocommit, foreign keys, a
  short busy timeout per try, rows by name, shared by threads under the store's lock).
- :func:`open_read_only` opens an existing file with ``mode=ro`` and never writes: where
  SQLite cannot make the WAL index beside the file (a read-only folder, a full disk) and no
  WAL file holds changes, the file alone is the whole store and is opened ``immutable``. A
  missing file is an empty store in memory. An older schema is brought up to date by the
  ``upgrade`` callback (a read-write open); if that fails, the error says so.
- :func:`store_error` turns a SQLite or OS error into a one-line StoreError; a read-only store
  and a full disk get their own reason and hint (by error code, never by message text).
- :func:`process_id` / :func:`process_alive`: the identity of the process writing a pending
  message (``"pid:start time"``), and whether it still runs (the same start time, not a
  zombie).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import StoreError

#: How long SQLite waits for a lock in one try (seconds); the store's writes try again.
BUSY_STEP_S = 0.25


def connect(target: str, *, uri: bool = False) -> sqlite3.Connection:
    """A connection as the store uses it."""
    db = sqlite3.connect(target, timeout=10, isolation_level=None, uri=uri,
                         check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys = ON")
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_STEP_S * 1000)}")
    return db


def open_read_only(path: Path, migrations: Sequence[str], *,
                   upgrade: Callable[[], None]) -> sqlite3.Connection:
    """A connection that never writes (see the module's contract)."""
    if not path.exists():
        db = connect(":memory:")
        for version, script in enumerate(migrations):
            db.executescript(f"{script}; PRAGMA user_version = {version + 1};")
        return db
    uri = path.resolve().as_uri()
    try:
        db = connect(f"{uri}?mode=ro", uri=True)
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.OperationalError:
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise
        db = connect(f"{uri}?mode=ro&immutable=1", uri=True)
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > len(migrations):
        db.close()
        raise newer_schema(path, version, len(migrations))
    if version < len(migrations):  # an older schema: brought up to date once, if it can be
        db.close()
        try:
            upgrade()
        except StoreError as exc:
            raise StoreError(str(path), f"its schema (version {version}) is older than this "
                             f"rolechat's ({len(migrations)}) and cannot be upgraded here: "
                             f"{exc.reason}", "Open it once where it can be written, or read "
                             "it with the rolechat that wrote it.") from None
        return open_read_only(path, migrations, upgrade=upgrade)
    return db


def newer_schema(path: Path, version: int, known: int) -> StoreError:
    return StoreError(str(path), f"schema version {version} is newer than this rolechat knows "
                      f"({known})", "Upgrade rolechat.")


#: SQLite's primary result codes: a read-only database, an I/O error, a full disk.
SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL = 8, 10, 13


def store_error(path: Path, exc: BaseException) -> StoreError:
    """A StoreError that says what to do: read-only and full disks get their own hint (an
    I/O error counts as a full disk when the folder has less than 1 MiB left)."""
    code = getattr(exc, "sqlite_errorcode", None)
    code = code & 0xFF if isinstance(code, int) else None
    number = getattr(exc, "errno", None)
    if code == SQLITE_READONLY or number in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(str(path), f"it cannot be written ({exc})",
                          "Make the file and its folder writable, or set ROLECHAT_HOME to a "
                          "folder you can write; list, show and export still work.")
    if code == SQLITE_FULL or number == errno.ENOSPC or (code == SQLITE_IOERR
                                                         and _space_left(path) < 2**20):
        return StoreError(str(path), f"the disk is full ({exc})",
                          "Free some space and try again; list, show and export still work.")
    return StoreError(str(path), str(exc))


def _space_left(path: Path) -> int:
    try:
        found = os.statvfs(path.parent)
    except OSError:
        return 2**63
    return found.f_bavail * found.f_frsize


def process_id(pid: int | None = None) -> str:
    """A process's identity that survives pid reuse: ``"pid:start time"``."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return f"{pid}:{psutil.Process(pid).create_time():.2f}"


def process_alive(writer: str | None) -> bool:
    """Whether the process a pending message names still runs: the same pid *and* start time
    (not a reused pid), and not a zombie (killed, not yet reaped by its parent: it generates
    nothing any more, though its pid and start time remain)."""
    import psutil

    if not writer:
        return False
    try:
        process = psutil.Process(int(writer.split(":", 1)[0]))
        if f"{process.pid}:{process.create_time():.2f}" != writer:
            return False
        return process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (ValueError, OSError, psutil.Error):
        return False
