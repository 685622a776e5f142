"""A local stand-in for the Hugging Face Hub and ModelScope, for tests that cannot reach the
network.

:class:`HubStub` is an HTTP server on ``127.0.0.1:<free port>`` (a daemon thread) that serves the
repos you add with :meth:`HubStub.add_repo` on the two APIs the installed clients use,
``huggingface_hub`` 2.4.0 and ``modelscope`` 1.40.2 (whose hub code lives in ``modelscope_hub``
0.5.1). What each client sends, and what the stub answers, was read from those libraries' source
and checked by ``tests/test_hubstub.py``. Every request is logged in :attr:`HubStub.requests`;
anything not listed below is answered 404 (plain text) so a missing endpoint shows up there.

Hugging Face routes (model repos only; ``{rev}`` is the branch ``main`` or the repo's commit sha,
URL-quoted by the client; anything else is ``404 X-Error-Code: RevisionNotFound``)::

    GET  /api/models/{owner}/{name}[/revision/{rev}][?blobs=true]   model_info / repo_info
    GET  /api/models/{owner}/{name}/tree/{rev}[/{path}]?recursive=  list_repo_tree / _files
    POST /api/models/{owner}/{name}/paths-info/{rev}  (form: paths=..&paths=..)  get_paths_info
    HEAD /{owner}/{name}/resolve/{rev}/{file}    hf_hub_download's metadata call
    GET  /{owner}/{name}/resolve/{rev}/{file}    the body; ``Range: bytes=N-`` / ``N-M`` -> 206

``resolve`` answers 200 directly (no CDN redirect) with ``X-Repo-Commit``, ``ETag`` (quoted: the
sha256 for LFS files, the git blob sha1 otherwise), for LFS files also ``X-Linked-Etag`` (sha256)
and ``X-Linked-Size``, ``Content-Length``, ``Accept-Ranges: bytes`` and never any ``X-Xet-*``
header, so huggingface_hub always takes its plain-HTTP path. A file is LFS unless its name ends in
one of :data:`TEXT_SUFFIXES` (override per repo with ``add_repo(lfs=...)``). Tree entries carry
``size``, ``oid`` (git blob sha1) and, for LFS files, ``lfs: {oid: sha256, size, pointerSize}``;
``model_info(files_metadata=True)`` siblings carry ``size``, ``blobId`` and ``lfs.sha256``.
Missing repo: 404 ``X-Error-Code: RepoNotFound`` (-> ``RepositoryNotFoundError``); missing file:
404 ``X-Error-Code: EntryNotFound`` plus ``X-Repo-Commit`` (-> ``RemoteEntryNotFoundError``, a
subclass of ``EntryNotFoundError``; the client then caches the absence under ``.no_exist/``).

ModelScope routes (legacy ``/api/v1`` surface; JSON bodies are the envelope
``{"Code": 200, "Data": ..., "Message": "success", "RequestId": ..., "Success": true}``;
``Revision`` is the branch ``master`` or the commit sha)::

    GET /api/v1/models/{owner}/{name}/revisions[?EndTime=]   Data.RevisionMap.{Branches,Tags}
    GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=   Data.Files[...]
    GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=   the body (Range -> 206)
    GET /api/v1/models/{owner}/{name}                            repo info
    GET /api/v1/repos/internalAccelerationInfo                   "no intra-cloud region"

File entries carry ``Name``, ``Path``, ``Type`` (``blob``, or ``tree`` for folders), ``Size``,
``Sha256``, ``IsLFS``, ``Revision``, ``Id``. The download carries ``Content-Length``,
``Accept-Ranges`` and, for LFS files, ``X-Linked-ETag: "<sha256>"`` (what ModelScope's LFS CDN
sends, and what ``modelscope_hub`` verifies the body against when the caller gave no sha256).
Missing repo/file/revision: HTTP 404 with ``{"Code": 404, "Success": false, "Message": ...}``.

How each library is pointed here, and when it reads its settings
-----------------------------------------------------------------
huggingface_hub reads **all** its environment variables once, into ``huggingface_hub.constants``,
when it is first imported: ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``HF_HUB_DISABLE_XET``, ``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``, ... So a subprocess
started with ``os.environ | hub_env(stub, root)`` just works; in-process code must pass
``endpoint=stub.url`` (``HfApi(endpoint=...)``, ``hf_hub_download(..., endpoint=...)``) and
``cache_dir=`` explicitly (see :func:`hf_kwargs`). Offline switch: ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``), read at import; in-process patch ``huggingface_hub.constants.
HF_HUB_OFFLINE``. Every request then raises ``OfflineModeIsEnabled``; ``hf_hub_download`` still
returns a file already in the cache (via ``refs/<branch>``), else ``LocalEntryNotFoundError``.
The per-call equivalent is ``local_files_only=True``.

modelscope reads ``MODELSCOPE_ENDPOINT`` (full URL, ``http://`` allowed), ``MODELSCOPE_CACHE`` and
``MODELSCOPE_HOME`` (config dir: it writes ``credentials/session`` there) once per process, when
the first ``HubApi`` builds the default ``modelscope_hub.config.HubConfig`` singleton
(``get_default_config()``); its tunables (``MODELSCOPE_DOWNLOAD_MAX_RETRIES``,
``MODELSCOPE_DOWNLOAD_TIMEOUT``, ``MODELSCOPE_API_TIMEOUT``, ...) are read when
``modelscope_hub.constants`` is imported. ``MODELSCOPE_DOMAIN`` is deprecated (FutureWarning; used
only when ``MODELSCOPE_ENDPOINT`` is unset); the old ``modelscope.hub.utils.utils.get_endpoint()``
always prefixes ``https://`` (``MODELSCOPE_URL_SCHEME`` is a constant, not an env variable), so it
cannot reach this stub: don't use it. An explicit endpoint skips the ``.cn``/``.ai`` probe.
In-process: pass ``endpoint=stub.url`` to ``HubApi`` and to ``model_file_download``, *and* install
a default config (:func:`modelscope_config`), because ``model_file_download(revision=None)`` looks
the revision up through a bare ``HubApi()`` (default config) and silently falls back to
``"master"`` on any error. ModelScope has **no offline environment variable**: only the
per-call ``local_files_only=True`` (raises ``modelscope_hub.errors.CacheNotFound`` if not cached)
-- and even then ``model_file_download(revision=None)`` still makes its ``revisions`` request
first (errors swallowed, with API retries/backoff): pass ``revision=`` to stay off the network.
Note ``MODELSCOPE_LOG_LEVEL`` must be numeric (``modelscope.utils.logger`` int()s it at import;
"DEBUG" crashes the import).

What the clients do (checked by tests/test_hubstub.py)
------------------------------------------------------
* ``hf_hub_download`` streams into ``blobs/<etag>.<8 random hex>.incomplete`` and retries a cut
  body itself (``httpx2.RemoteProtocolError``), *within the same call*, 1 s apart, up to 5 times
  in a row without progress. It reads the body as ``iter_bytes(10 MiB)`` chunks and only counts
  whole chunks, so the retry sends ``Range: bytes=<k * 10 MiB>-`` (the bytes of a partial chunk
  are lost; a file under 10 MiB is simply fetched again from byte 0, and such a retry is no
  "progress"). When it gives up it re-raises that ``httpx2.RemoteProtocolError`` and deletes its
  partial file: **nothing survives for a later call to resume**; the next call starts from byte
  0. It checks only the size (``OSError("Consistency check failed ...")``), **never the sha256**:
  a :meth:`corrupt` body lands in the cache (``blobs/<sha256>``, snapshot symlink) as if it were
  fine. ``HfApi(endpoint=).verify_repo_checksums(repo_id, cache_dir=)`` does detect it
  (``FolderVerification.mismatches``); so does hashing the file against ``lfs.sha256``.
* ``modelscope`` ``model_file_download`` first asks ``revisions`` (picks ``master`` when the
  repo has no tags; the cache path is ``<MODELSCOPE_CACHE>/models/Owner--Name/snapshots/<that
  revision>/<file>``), then GETs ``repo?Revision=&FilePath=`` into ``<target>.incomplete``. A cut
  body is resumed with ``Range: bytes=N-`` in the same call (``MODELSCOPE_DOWNLOAD_MAX_RETRIES``,
  default 5; the first retry is immediate). When retries are exhausted it raises
  ``modelscope_hub.errors.NetworkError`` and **keeps** ``<target>.incomplete``; the next call
  resumes from it with a Range request. With an ``X-Linked-ETag`` sha256 (LFS files here) or an
  ``expected_sha256`` it verifies the body: a mismatch is retried 3 times (1 s, 2 s apart) then
  raises ``modelscope_hub.errors.FileIntegrityError`` (also ``modelscope.hub.errors``), leaving
  neither the file nor its ``.incomplete``. Missing repo/file: ``requests.HTTPError`` (converted
  from ``NotExistError`` by the compat layer) from ``model_file_download``; ``NotExistError`` from
  ``HubApi().get_model_files``. Note ``get_model_files`` returns only ``{"Path", "Size"}`` per
  entry (folders included): for ``Sha256`` use ``modelscope_hub.HubApi(...).list_repo_files(
  repo_id, "model", revision=...)`` (``FileInfo.sha256``) -- or ``HubApi().list_repo_files``,
  which the legacy ``modelscope.hub.api.HubApi`` forwards to it.
* Timeouts against :meth:`hang`: ``HfApi.list_repo_tree`` / ``list_repo_files`` /
  ``get_paths_info`` use **no timeout at all** (they hang forever); ``model_info(timeout=)`` has
  one; ``hf_hub_download``'s HEAD uses ``HF_HUB_ETAG_TIMEOUT`` (10 s) but, finding nothing
  cached, retries it with a fixed 60 s timeout and backoff (minutes). modelscope bounds every read
  (``MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS``=15 per listing page, 4 attempts with 1-2-4 s
  backoff; ``MODELSCOPE_DOWNLOAD_TIMEOUT``=60 idle read; API calls ``MODELSCOPE_API_TIMEOUT``=60
  with ``MODELSCOPE_API_MAX_RETRIES``=5 and 0.5 s exponential backoff). Measured in a subprocess
  with ``hub_env(timeout=1, retries=0)``: ``get_model_files`` raises ``RequestTimeoutError`` after
  ~13 s (the listing's own 4 attempts), ``model_file_download`` after ~5 s (2 revision lookups --
  the API retry count cannot go below 1 through the environment -- then 1 download attempt); with
  the default 5 API retries the revision lookup alone takes 6 tries. A caller that must give up
  quickly on a hanging hub needs its own deadline (e.g. run the call in a worker thread).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qs, unquote, urlsplit

#: The commit sha every repo gets unless ``add_repo(revision=...)`` says otherwise.
DEFAULT_REVISION = "3f786850e387550fdab836ed7e6dc881de23001b"
HF_BRANCH = "main"
MS_BRANCH = "master"
#: Files with these endings are regular git blobs; everything else is an LFS file.
TEXT_SUFFIXES = (".md", ".txt", ".json", ".yaml", ".yml", ".py", ".gitattributes", ".gitignore")

_CHUNK = 1 << 20
_CREATED_AT = 1_700_000_000
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}
_SHA256_LOCK = threading.Lock()


def _file_sha256(path: Path) -> str:
    """sha256 of a file on disk, hashed once per process (keyed by path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA256_LOCK:
        cached = _SHA256_CACHE.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(8 * _CHUNK):
                digest.update(block)
        cached = digest.hexdigest()
        with _SHA256_LOCK:
            _SHA256_CACHE[key] = cached
    return cached


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class StubFile:
    """One file of a stub repo, as both hubs describe it."""

    path: str
    size: int
    sha256: str
    lfs: bool
    blob_id: str  # git blob sha1: of the content, or of the LFS pointer for LFS files
    pointer_size: int  # size of the LFS pointer (0 for regular files)
    data: bytes | None = field(default=None, repr=False)
    source: Path | None = None

    @classmethod
    def make(cls, path: str, content: bytes | Path, lfs: bool) -> StubFile:
        data, source = (None, content) if isinstance(content, Path) else (bytes(content), None)
        if source is not None:
            size, sha256 = source.stat().st_size, _file_sha256(source)
        else:
            assert data is not None
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        if lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
            ).encode()
            blob_id, pointer_size = _git_blob_sha1(pointer), len(pointer)
        else:  # a regular git blob: small, so reading it whole is fine
            raw = data if data is not None else Path(str(source)).read_bytes()
            blob_id, pointer_size = _git_blob_sha1(raw), 0
        return cls(path, size, sha256, lfs, blob_id, pointer_size, data, source)

    @property
    def etag(self) -> str:
        """What HF puts in ETag (and names the cached blob after)."""
        return self.sha256 if self.lfs else self.blob_id

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)``, in chunks."""
        if self.data is not None:
            for pos in range(start, end, _CHUNK):
                yield self.data[pos : min(end, pos + _CHUNK)]
            return
        assert self.source is not None
        with self.source.open("rb") as fh:
            fh.seek(start)
            pos = start
            while pos < end:
                block = fh.read(min(_CHUNK, end - pos))
                if not block:
                    return
                pos += len(block)
                yield block


@dataclass
class StubRepo:
    repo_id: str
    revision: str
    files: dict[str, StubFile]

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    def folders(self) -> list[str]:
        found = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        return sorted(found)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    stub: HubStub

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-response are expected here; stay quiet about them."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.stub._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.stub._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.stub._handle(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET


class _Cut(Exception):
    """Raised after a deliberately truncated body: drop the connection."""


class HubStub:
    """The stand-in hub: a context manager (``with HubStub() as stub:``) or ``start()``/``close()``.

    ``requests`` logs ``(method, path with query, Range header or None)`` of every request, in
    arrival order.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self._repos: dict[str, StubRepo] = {}
        self._lock = threading.Lock()
        self._cuts: dict[str, list[int]] = {}
        self._corrupt: set[str] = set()
        self._hanging = False
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="hubstub", daemon=True,
        )
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> HubStub:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def close(self) -> None:
        """Stop serving: releases hung requests, drops open connections, joins the thread."""
        self._closing.set()
        if self._started:
            self._server.shutdown()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._started:
            self._thread.join(timeout=5)
            self._started = False

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- content and faults -------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: Mapping[str, bytes | Path],
                 revision: str = DEFAULT_REVISION, *, lfs: Iterable[str] | None = None) -> None:
        """Serve ``repo_id`` ("Owner/Name") with ``files`` (repo path -> bytes, or a file on disk,
        streamed and hashed once) on both hubs, at commit ``revision`` (40 hex digits; also the
        head of HF's ``main`` and ModelScope's ``master``). ``lfs`` names the LFS files (default:
        all but :data:`TEXT_SUFFIXES`)."""
        if repo_id.count("/") != 1:
            raise ValueError(f"repo_id must be 'Owner/Name', not {repo_id!r}")
        if len(revision) != 40 or any(c not in "0123456789abcdef" for c in revision):
            raise ValueError(f"revision must be a 40-hex commit sha, not {revision!r}")
        lfs_set = set(lfs) if lfs is not None else None
        built = {
            path: StubFile.make(path, content, lfs=(
                path in lfs_set if lfs_set is not None else not path.endswith(TEXT_SUFFIXES)))
            for path, content in files.items()
        }
        with self._lock:
            self._repos[repo_id] = StubRepo(repo_id, revision, built)

    def file(self, repo_id: str, path: str) -> StubFile:
        return self._repos[repo_id].files[path]

    def cut_next(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of that file (on either hub) announce the full Content-Length
        of their response, send ``after_bytes`` bytes of body, then close the connection.
        ``path`` is "Owner/Name/file" or just "file" (any repo)."""
        with self._lock:
            self._cuts.setdefault(path, []).extend([after_bytes] * times)

    def corrupt(self, path: str) -> None:
        """From now on that file's body is served with its first, middle and last bytes flipped
        (same size); sizes, sha256 and ETags stay the real ones."""
        with self._lock:
            self._corrupt.add(path)

    def hang(self) -> None:
        """From now on every request is read, logged and never answered (until :meth:`close`)."""
        self._hanging = True

    def ranges(self, path_fragment: str) -> list[str | None]:
        """The Range headers of the GETs whose path contains ``path_fragment``."""
        return [rng for method, path, rng in self.requests
                if method == "GET" and path_fragment in path]

    # -- plumbing -------------------------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _keys(self, repo: StubRepo, f: StubFile) -> tuple[str, str]:
        return f"{repo.repo_id}/{f.path}", f.path

    def _take_cut(self, repo: StubRepo, f: StubFile) -> int | None:
        with self._lock:
            for key in self._keys(repo, f):
                queue = self._cuts.get(key)
                if queue:
                    return queue.pop(0)
        return None

    def _is_corrupt(self, repo: StubRepo, f: StubFile) -> bool:
        with self._lock:
            return any(key in self._corrupt for key in self._keys(repo, f))

    def _handle(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        if self._hanging or self._closing.is_set():
            self._closing.wait()
            h.close_connection = True
            return
        try:
            self._route(h, body)
        except _Cut:
            h.close_connection = True
            try:
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError:  # the client went away
            h.close_connection = True

    def _route(self, h: _Handler, body: bytes) -> None:
        split = urlsplit(h.path)
        segs = split.path.split("/")[1:]
        query = parse_qs(split.query, keep_blank_values=True)
        if segs[:2] == ["api", "v1"]:
            return self._modelscope(h, segs[2:], query)
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            return self._hf_api(h, segs[2:], query, body)
        if len(segs) >= 5 and segs[2] == "resolve" and h.command in ("GET", "HEAD"):
            return self._hf_resolve(h, f"{segs[0]}/{segs[1]}", unquote(segs[3]),
                                    unquote("/".join(segs[4:])))
        self._send(h, 404, b"Not Found (hubstub has no such endpoint)", "text/plain")

    # -- responses ------------------------------------------------------------------------------
    def _send(self, h: _Handler, status: int, payload: bytes, ctype: str,
              headers: Mapping[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _json(self, h: _Handler, status: int, obj: Any,
              headers: Mapping[str, str] | None = None) -> None:
        self._send(h, status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

    def _send_file(self, h: _Handler, repo: StubRepo, f: StubFile,
                   headers: Mapping[str, str]) -> None:
        start, end, status = 0, f.size, 200
        extra = dict(headers)
        rng = _parse_range(h.headers.get("Range"))
        if rng is not None:
            first, last = rng
            if first >= f.size:
                extra["Content-Range"] = f"bytes */{f.size}"
                return self._send(h, 416, b"", "text/plain", extra)
            start, end, status = first, f.size if last is None else min(last + 1, f.size), 206
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start))
        h.send_header("Accept-Ranges", "bytes")
        for key, value in extra.items():
            h.send_header(key, value)
        h.end_headers()
        if h.command == "HEAD":
            return
        cut = self._take_cut(repo, f)
        budget = end - start if cut is None else min(cut, end - start)
        flips = {0, f.size // 2, f.size - 1} if self._is_corrupt(repo, f) else set()
        pos = start
        for block in f.read(start, end):
            if budget <= 0:
                break
            block = block[:budget]
            hit = [p - pos for p in flips if pos <= p < pos + len(block)]
            if hit:
                mutable = bytearray(block)
                for i in hit:
                    mutable[i] ^= 0xFF
                block = bytes(mutable)
            h.wfile.write(block)
            pos += len(block)
            budget -= len(block)
        if cut is not None:
            raise _Cut

    # -- Hugging Face -----------------------------------------------------------------------------
    def _hf_error(self, h: _Handler, code: str, message: str,
                  commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(h, 404, {"error": message}, headers)

    def _hf_repo(self, h: _Handler, repo_id: str, rev: str | None) -> StubRepo | None:
        repo = self._repos.get(repo_id)
        if repo is None:
            self._hf_error(h, "RepoNotFound", "Repository not found")
            return None
        if rev is not None and rev not in (HF_BRANCH, repo.revision):
            self._hf_error(h, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return repo

    def _hf_api(self, h: _Handler, segs: list[str], query: dict[str, list[str]],
                body: bytes) -> None:
        repo_id, rest = f"{segs[0]}/{segs[1]}", segs[2:]
        if not rest and h.command == "GET":
            repo = self._hf_repo(h, repo_id, None)
            return self._hf_model_info(h, repo, query) if repo else None
        if len(rest) == 2 and rest[0] == "revision" and h.command == "GET":
            repo = self._hf_repo(h, repo_id, unquote(rest[1]))
            return self._hf_model_info(h, repo, query) if repo else None
        if len(rest) >= 2 and rest[0] == "tree" and h.command == "GET":
            repo = self._hf_repo(h, repo_id, unquote(rest[1]))
            if repo is None:
                return None
            root = unquote("/".join(rest[2:])).strip("/")
            recursive = _truthy(query.get("recursive", ["false"])[0])
            if root and root not in repo.files and root not in repo.folders():
                return self._hf_error(h, "EntryNotFound", f"{root} does not exist", repo.revision)
            entries = [e for e in _hf_entries(repo) if _under(e["path"], root, recursive)]
            return self._json(h, 200, entries)
        if len(rest) == 2 and rest[0] == "paths-info" and h.command == "POST":
            repo = self._hf_repo(h, repo_id, unquote(rest[1]))
            if repo is None:
                return None
            wanted = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
            if not wanted and body.startswith(b"{"):
                wanted = list(json.loads(body).get("paths", []))
            by_path = {e["path"]: e for e in _hf_entries(repo)}
            return self._json(h, 200, [by_path[p] for p in wanted if p in by_path])
        self._send(h, 404, b"Not Found (hubstub has no such endpoint)", "text/plain")

    def _hf_model_info(self, h: _Handler, repo: StubRepo, query: dict[str, list[str]]) -> None:
        blobs = _truthy(query.get("blobs", ["false"])[0])
        siblings: list[dict[str, Any]] = []
        for f in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size,
                                      "pointerSize": f.pointer_size}
            siblings.append(sibling)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(_CREATED_AT))
        self._json(h, 200, {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.owner,
            "sha": repo.revision, "lastModified": stamp, "createdAt": stamp,
            "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "library_name": "gguf", "tags": ["gguf"], "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        })

    def _hf_resolve(self, h: _Handler, repo_id: str, rev: str, filename: str) -> None:
        repo = self._hf_repo(h, repo_id, rev)
        if repo is None:
            return
        f = repo.files.get(filename)
        if f is None:
            return self._hf_error(h, "EntryNotFound", f"{filename} does not exist on {rev}",
                                  repo.revision)
        headers = {"X-Repo-Commit": repo.revision, "ETag": f'"{f.etag}"',
                   "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"'}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        self._send_file(h, repo, f, headers)

    # -- ModelScope -------------------------------------------------------------------------------
    def _ms_ok(self, h: _Handler, data: Any) -> None:
        self._json(h, 200, {"Code": 200, "Data": data, "Message": "success",
                            "RequestId": uuid.uuid4().hex, "Success": True})

    def _ms_missing(self, h: _Handler, message: str) -> None:
        self._json(h, 404, {"Code": 404, "Data": None, "Message": message,
                            "RequestId": uuid.uuid4().hex, "Success": False})

    def _modelscope(self, h: _Handler, segs: list[str], query: dict[str, list[str]]) -> None:
        if segs == ["repos", "internalAccelerationInfo"] and h.command == "GET":
            return self._ms_ok(h, {"InternalRegionQueryAddress": ""})
        if len(segs) < 3 or segs[0] != "models" or h.command not in ("GET", "HEAD"):
            return self._send(h, 404, b"Not Found (hubstub has no such endpoint)", "text/plain")
        repo = self._repos.get(f"{segs[1]}/{segs[2]}")
        if repo is None:
            return self._ms_missing(h, "Model does not exist")
        rest = segs[3:]
        if not rest:
            return self._ms_ok(h, {
                "Id": int(repo.revision[:6], 16), "Name": repo.name, "Path": repo.owner,
                "ChineseName": "", "Description": "", "Visibility": 5, "IsPublished": 1,
                "Downloads": 0, "Stars": 0, "CreatedTime": _CREATED_AT,
                "LastUpdatedTime": _CREATED_AT, "ModelRevisions": [MS_BRANCH],
            })
        if rest == ["revisions"]:
            branch = {"Revision": MS_BRANCH, "CommitId": repo.revision, "CreatedAt": _CREATED_AT,
                      "CreatedBy": repo.owner, "Description": ""}
            return self._ms_ok(h, {"RevisionMap": {"Branches": [branch], "Tags": []}})
        revision = query.get("Revision", [MS_BRANCH])[0] or MS_BRANCH
        if revision not in (MS_BRANCH, repo.revision):
            return self._ms_missing(h, f"Revision {revision} does not exist")
        if rest == ["repo", "files"]:
            root = query.get("Root", [""])[0].strip("/")
            recursive = _truthy(query.get("Recursive", ["false"])[0])
            files = [e for e in _ms_entries(repo) if _under(e["Path"], root, recursive)]
            return self._ms_ok(h, {"Files": files})
        if rest == ["repo"]:
            file_path = query.get("FilePath", [""])[0]
            f = repo.files.get(file_path)
            if f is None:
                return self._ms_missing(h, f"File {file_path} does not exist")
            headers = {"Content-Disposition":
                       f'attachment; filename="{file_path.rsplit("/", 1)[-1]}"'}
            if f.lfs:
                headers["X-Linked-ETag"] = f'"{f.sha256}"'
            return self._send_file(h, repo, f, headers)
        self._send(h, 404, b"Not Found (hubstub has no such endpoint)", "text/plain")


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _under(path: str, root: str, recursive: bool) -> bool:
    """Whether a listing of ``root`` (``""`` = repo root) includes ``path``."""
    if root:
        if not path.startswith(root + "/"):
            return False
        path = path[len(root) + 1 :]
    return recursive or "/" not in path


def _hf_entries(repo: StubRepo) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [
        {"type": "directory", "oid": hashlib.sha1(f"tree {d}".encode()).hexdigest(), "size": 0,
         "path": d} for d in repo.folders()
    ]
    for f in repo.files.values():
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        entries.append(entry)
    return sorted(entries, key=lambda e: str(e["path"]))


def _ms_entries(repo: StubRepo) -> list[dict[str, Any]]:
    common = {"Revision": repo.revision, "CommitMessage": "upload", "Committer": repo.owner,
              "CommittedDate": _CREATED_AT}
    entries: list[dict[str, Any]] = [
        {"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Sha256": "",
         "IsLFS": False, "Mode": "40000", "Id": hashlib.sha1(f"tree {d}".encode()).hexdigest(),
         **common} for d in repo.folders()
    ]
    entries += [
        {"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob", "Size": f.size,
         "Sha256": f.sha256, "IsLFS": f.lfs, "Mode": "100644", "Id": f.blob_id, **common}
        for f in repo.files.values()
    ]
    return sorted(entries, key=lambda e: str(e["Path"]))


def _parse_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes=N-`` or ``bytes=N-M`` (one range); anything else is ignored (-> full body)."""
    if not value or not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes="):].strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    if last and int(last) < int(first):
        return None
    return int(first), int(last) if last else None


# -- pointing the clients at a stub ----------------------------------------------------------------
def hub_env(stub: HubStub, cache_root: Path, *, timeout: int | None = None,
            retries: int | None = None) -> dict[str, str]:
    """Environment for a subprocess (``os.environ | hub_env(stub, root)``) whose
    huggingface_hub and modelscope talk to ``stub`` and cache under ``cache_root``:

    * HF cache ``<root>/huggingface/hub`` (``models--Owner--Name/{blobs,refs,snapshots}``);
    * ModelScope cache ``<root>/modelscope`` (``models/Owner--Name/snapshots/<rev>/``) and its
      config dir ``<root>/modelscope-home``.

    ``timeout`` (seconds) shortens every read timeout both libraries let you set through the
    environment; ``retries`` sets ModelScope's download / API retry counts (0 = fail at once).
    """
    hf_home = cache_root / "huggingface"
    env = {
        "HF_ENDPOINT": stub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "0",  # also masks TRANSFORMERS_OFFLINE
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "MODELSCOPE_ENDPOINT": stub.url,
        "MODELSCOPE_CACHE": str(cache_root / "modelscope"),
        "MODELSCOPE_HOME": str(cache_root / "modelscope-home"),
        "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false",
    }
    if timeout is not None:
        seconds = str(max(1, int(timeout)))
        env.update({
            "HF_HUB_ETAG_TIMEOUT": seconds, "HF_HUB_DOWNLOAD_TIMEOUT": seconds,
            "MODELSCOPE_API_TIMEOUT": seconds, "MODELSCOPE_API_CONNECT_TIMEOUT": seconds,
            "MODELSCOPE_DOWNLOAD_TIMEOUT": seconds,
            "MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS": seconds,
        })
    if retries is not None:
        env.update({
            "MODELSCOPE_DOWNLOAD_MAX_RETRIES": str(retries),  # 0 allowed: fail at once
            # modelscope_hub rejects 0 here (warns, falls back to 5), so at least 1:
            "MODELSCOPE_API_MAX_RETRIES": str(max(1, retries)),
        })
    return env


class HfKwargs(TypedDict):
    endpoint: str
    cache_dir: str


def hf_kwargs(stub: HubStub, cache_root: Path) -> HfKwargs:
    """Keyword arguments for in-process ``hf_hub_download`` / ``snapshot_download``: the stub's
    ``endpoint`` and the ``cache_dir`` :func:`hub_env` uses; for ``HfApi`` pass
    ``endpoint=stub.url``."""
    return {"endpoint": stub.url, "cache_dir": str(cache_root / "huggingface" / "hub")}


def ms_cache_dir(cache_root: Path) -> Path:
    """The ModelScope cache root :func:`hub_env` and :func:`modelscope_config` use."""
    return cache_root / "modelscope"


@contextmanager
def modelscope_config(stub: HubStub, cache_root: Path) -> Iterator[Any]:
    """In-process: make ``stub`` modelscope's process-wide default config (endpoint, cache
    ``<root>/modelscope``, config dir ``<root>/modelscope-home``, no token) for the duration,
    so that even the bare ``HubApi()`` inside ``model_file_download`` talks to the stub.
    Yields the ``modelscope_hub.config.HubConfig``; restores the previous default after."""
    from modelscope_hub import config as ms_config

    previous = ms_config._default_config
    installed = ms_config.HubConfig(endpoint=stub.url, cache_dir=ms_cache_dir(cache_root),
                                    config_dir=cache_root / "modelscope-home", token="")
    ms_config.set_default_config(installed)
    try:
        yield installed
    finally:
        ms_config.set_default_config(previous)
