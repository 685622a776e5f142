"""The generation worker: one local engine, one generation at a time, off the event loop.

Contract: :meth:`Worker.submit` queues a job (a function that returns a
:class:`~rolechat.chat.ReplyStream`) and returns an async iterator of its text chunks; the
reply is available on the job when the iterator ends. One daemon thread runs the jobs in
order, so no async handler ever iterates a blocking generator. Cancelling a job (the client
went away) closes its stream at the next token, which frees the engine within a token's time
and leaves the conversation as it was.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
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
    reply: Reply | None = None

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)


class Worker:
    def __init__(self) -> None:
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rolechat-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job.cancelled.is_set():
                job.put(_DONE)
                continue
            try:
                with job.start() as stream:
                    for chunk in stream:
                        if job.cancelled.is_set():
                            break  # closing the stream stops the engine; nothing is recorded
                        job.put(chunk)
                    job.reply = stream.reply
            except BaseException as exc:  # handed to the request that asked
                job.put(exc)
            job.put(_DONE)

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
