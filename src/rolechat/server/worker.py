"""Generation jobs: every reply read on a thread of its own, off the event loop.

Contract: :meth:`Worker.submit` starts a job (a function that returns a
:class:`~rolechat.chat.ReplyStream`) and returns an async iterator of its events: text chunks,
and :class:`~rolechat.engines.base.Waiting` notices while the engine has no sequence for it
(how many requests are ahead). The reply is available on the job when the iterator ends, and
``job.finished`` is set once the job is done (completed, failed or cancelled). Jobs run at the
same time, each on its own thread: the engine's scheduler batches them (a local engine), the
remote server does (the openai engine), or the engine queues them (one sequence). No async
handler ever iterates a blocking generator. Cancelling a job (the client went away) closes its
stream, which frees the engine's sequence at its next step and leaves the conversation as it
was (a session's turn is stored interrupted). A *detached* job (a session reply whose client
asked it to outlive the connection) is not cancelled when its client leaves, only by
:meth:`Job.cancel` (``POST .../stop``); its text so far is :meth:`Job.text`, for whoever
follows the conversation (``GET .../events``), and every :data:`CHECKPOINT_S` it goes to
the job's checkpoint (a session's pending message keeps it against a crash).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat import Reply, ReplyStream
from ..engines.base import Waiting

_DONE = object()
#: Most jobs read at once; more wait here for a reading thread (each is a thread that mostly
#: waits for the engine, which queues what it cannot take yet).
MAX_JOBS = 256
#: How often a job's text so far is handed to its checkpoint (seconds; the environment's
#: ROLECHAT_CHECKPOINT_S sets another, as the crash tests do).
CHECKPOINT_S = float(os.environ.get("ROLECHAT_CHECKPOINT_S") or 2.0)

Event = str | Waiting


#: The response header that names a reply's job (its ``id`` in the follow stream).
REPLY_HEADER = "X-Rolechat-Reply"


@dataclass
class Job:
    start: Callable[[], ReplyStream]
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Set (on the event loop) once the worker is done with the job, however it ended.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    reply: Reply | None = None
    stream: ReplyStream | None = None
    #: The client asked the reply to go on if it leaves (only a stop cancels it).
    detached: bool = False
    #: What the job is ("message", "retry", "tools"), for those who follow it.
    kind: str = "message"
    #: Names the reply to those who follow it (the client that asked gets it in the
    #: ``X-Rolechat-Reply`` header, so it knows its own reply among the live ones).
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    #: The text chunks so far (appended by the job's thread).
    parts: list[str] = field(default_factory=list)
    #: Called with the text so far every :data:`CHECKPOINT_S` while it grows (a session
    #: saves it on its pending message: a crash then loses only the last seconds).
    checkpoint: Callable[[str], Any] | None = None

    def text(self) -> str:
        """The reply's text so far."""
        return "".join(self.parts)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)

    def finish(self) -> None:
        self.put(_DONE)
        self.loop.call_soon_threadsafe(self.finished.set)

    def cancel(self) -> None:
        """The client left: stop generating at the engine's next step."""
        self.cancelled.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()

    def leave(self) -> None:
        """The client left: cancel, unless the job was detached from its client."""
        if not self.detached:
            self.cancel()


class Worker:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            MAX_JOBS, thread_name_prefix="rolechat-job")
        self._lock = threading.Lock()
        #: Jobs being read now; how many ran, and how many were stopped because their client
        #: left (what ``GET /v1/status`` shows).
        self.running = 0
        self.done = 0
        self.cancelled = 0

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "done": self.done, "cancelled": self.cancelled}

    def _run(self, job: Job) -> None:
        with self._lock:
            self.running += 1
        try:
            self._work(job)
        finally:
            with self._lock:
                self.running -= 1
                self.done += 1
                self.cancelled += job.cancelled.is_set() and job.reply is None
            job.finish()

    def _work(self, job: Job) -> None:
        try:
            with job.start() as stream:
                job.stream = stream
                stream.on_wait = lambda ahead: job.put(Waiting(ahead))
                if job.cancelled.is_set():  # the client left before its turn came
                    return  # closing the stream records nothing (a turn is interrupted)
                saved_at = time.monotonic()
                for chunk in stream:
                    if job.cancelled.is_set():
                        break  # closing the stream stops the engine; nothing is recorded
                    if isinstance(chunk, str):
                        job.parts.append(chunk)
                        if (job.checkpoint is not None
                                and time.monotonic() - saved_at >= CHECKPOINT_S):
                            job.checkpoint(job.text())
                            saved_at = time.monotonic()
                    job.put(chunk)
                job.reply = stream.reply
        except BaseException as exc:  # handed to the request that asked
            job.put(exc)

    async def submit(self, start: Callable[[], ReplyStream], *, detached: bool = False,
                     kind: str = "message", checkpoint: Callable[[str], Any] | None = None
                     ) -> tuple[Job, AsyncIterator[Event]]:
        job = Job(start, asyncio.get_running_loop(), detached=detached, kind=kind,
                  checkpoint=checkpoint)
        self._pool.submit(self._run, job)

        async def chunks() -> AsyncIterator[Event]:
            try:
                while True:
                    item = await job.chunks.get()
                    if item is _DONE:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                job.leave()  # a client that left stops its generation (unless detached)

        return job, chunks()


async def reply_events(job: Job,
                       chunks: AsyncIterator[Event]) -> AsyncGenerator[Event | Reply, None]:
    """A job's events, then its :class:`Reply` (none if it did not complete). Closing this
    iterator early (the client left) stops the generation at the next token."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        # At once, without awaiting: inside a cancelled task every await is cancelled too.
        if not job.finished.is_set():
            job.leave()
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    if job.reply is not None:
        yield job.reply


async def joined_unless_gone(request: Any, job: Job,
                             events: AsyncGenerator[Event | Reply, None]) -> tuple[str,
                                                                                   Reply | None]:
    """:func:`joined`, for a client that waits for the whole reply: if it leaves (closes the
    connection, times out), the generation stops within a fraction of a second (a detached
    job goes on)."""
    async def watch() -> None:
        # The body was read: the next thing the connection can say is that it closed.
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.leave()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await joined(events)
    finally:
        watcher.cancel()


async def joined(events: AsyncIterator[Event | Reply]) -> tuple[str, Reply | None]:
    """The whole text and the reply: what a non-streaming response sends."""
    parts: list[str] = []
    reply: Reply | None = None
    async for item in events:
        if isinstance(item, Reply):
            reply = item
        elif isinstance(item, str):
            parts.append(item)
    return "".join(parts), reply
