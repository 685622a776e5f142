"""The generation worker: one local engine, one generation at a time, off the event loop.

Contract: :meth:`Worker.submit` queues a job (a function that returns a
:class:`~rolechat.chat.ReplyStream`) and returns an async iterator of its text chunks; the
reply is available on the job when the iterator ends, and ``job.finished`` is set once the
worker is done with it (completed, failed or cancelled). One daemon thread runs the jobs in
order, so no async handler ever iterates a blocking generator. Cancelling a job (the client
went away) closes its stream at the next token, which frees the engine within a token's time
and leaves the conversation as it was.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat import Reply, ReplyStream

_DONE = object()


@dataclass
class Job:
    start: Callable[[], ReplyStream]
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Set (on the event loop) once the worker is done with the job, however it ended.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    reply: Reply | None = None

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)

    def finish(self) -> None:
        self.put(_DONE)
        self.loop.call_soon_threadsafe(self.finished.set)


class Worker:
    def __init__(self) -> None:
        self._jobs: queue.Queue[Job] = queue.Queue()
        #: True while a job runs; how many jobs ran, and how many were stopped because their
        #: client left (what ``GET /v1/status`` shows).
        self.busy = False
        self.done = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="rolechat-worker", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        return {"busy": self.busy, "queued": self._jobs.qsize(), "done": self.done,
                "cancelled": self.cancelled}

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            self.busy = True
            try:
                self._work(job)
            finally:
                self.done += 1
                self.cancelled += job.cancelled.is_set() and job.reply is None
                self.busy = False
                job.finish()

    def _work(self, job: Job) -> None:
        try:
            with job.start() as stream:
                if job.cancelled.is_set():  # the client left before its turn came
                    return  # closing the stream records nothing (a turn is interrupted)
                for chunk in stream:
                    if job.cancelled.is_set():
                        break  # closing the stream stops the engine; nothing is recorded
                    job.put(chunk)
                job.reply = stream.reply
        except BaseException as exc:  # handed to the request that asked
            job.put(exc)

    async def submit(self, start: Callable[[], ReplyStream]) -> tuple[Job, AsyncIterator[str]]:
        job = Job(start, asyncio.get_running_loop())
        self._jobs.put(job)

        async def chunks() -> AsyncIterator[str]:
            try:
                while True:
                    item = await job.chunks.get()
                    if item is _DONE:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                job.cancelled.set()  # a client that left stops its generation

        return job, chunks()


async def reply_events(job: Job,
                       chunks: AsyncIterator[str]) -> AsyncGenerator[str | Reply, None]:
    """A job's text chunks, then its :class:`Reply` (none if it did not complete). Closing
    this iterator early (the client left) stops the generation at the next token."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        # At once, without awaiting: inside a cancelled task every await is cancelled too.
        if not job.finished.is_set():
            job.cancelled.set()
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    if job.reply is not None:
        yield job.reply


async def joined_unless_gone(request: Any, job: Job,
                             events: AsyncGenerator[str | Reply, None]) -> tuple[str,
                                                                                 Reply | None]:
    """:func:`joined`, for a client that waits for the whole reply: if it leaves (closes the
    connection, times out), the generation stops within a fraction of a second."""
    async def watch() -> None:
        while not job.finished.is_set():
            if await request.is_disconnected():
                job.cancelled.set()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await joined(events)
    finally:
        watcher.cancel()


async def joined(events: AsyncIterator[str | Reply]) -> tuple[str, Reply | None]:
    """The whole text and the reply: what a non-streaming response sends."""
    parts: list[str] = []
    reply: Reply | None = None
    async for item in events:
        if isinstance(item, Reply):
            reply = item
        else:
            parts.append(item)
    return "".join(parts), reply
