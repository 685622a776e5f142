"""Following a conversation: its changes as they happen, and stopping the reply it is writing.

Contract:
- ``GET /v1/conversations/{id}/events`` is an endless Server-Sent Events stream, owned as the
  conversation is (another key's is a 404). Its first event is ``{"version": V, "live": L}``;
  after it, ``{"version": V}`` whenever the stored conversation changes (any writer: another
  tab, a REPL, another server on the same store; read every :data:`VERSION_EVERY_S`), and
  ``{"live": L}`` whenever the reply being written here changes. ``L`` is null (no reply is
  being written) or ``{"kind": "message" | "retry" | "tools", "text": the text so far,
  "id": the reply's id}`` (sent whole, at most every :data:`LIVE_EVERY_S`). The client that
  asked for a reply gets its id in the ``X-Rolechat-Reply`` header of its response, so it
  knows its own reply when it follows the conversation too. When the reply ends, ``{"live": null}``
  comes, then the new version. ``{"deleted": true}`` ends the stream when the conversation is
  deleted. A comment line every :data:`HEARTBEAT_S` keeps proxies from closing it, and the
  stream ends when the server shuts down (a client reconnects).
- ``POST /v1/conversations/{id}/stop`` stops the reply being written (its turn is stored
  interrupted, its text so far kept, as when a client that did not detach leaves), waits for
  it to be recorded, and answers ``{"stopped": bool, "conversation": ...}`` (``stopped``:
  false when no reply was being written).
- A message or retry sent with ``"detach": true`` goes on when its client leaves (a page
  reload, a network blip); the page sends it, then follows the reply here after a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import RolechatError
from .sessions import conversation_body, owned, owner_of
from .state import ServerState, state_of
from .wire import sse
from .worker import Job

router = APIRouter(prefix="/v1")

#: How often the stored version is read (other processes' writes are seen this late).
VERSION_EVERY_S = 0.5
#: How often a running reply's text is sent, at most.
LIVE_EVERY_S = 0.1
#: A comment line this often keeps an idle stream open through proxies.
HEARTBEAT_S = 15.0
#: How long a stop waits for the reply to be recorded.
STOP_WAIT_S = 30.0


def live_body(job: Job | None) -> dict[str, Any] | None:
    return None if job is None else {"kind": job.kind, "text": job.text(), "id": job.id}


def current_version(state: ServerState, cid: int) -> int | None:
    """The stored version (None: the conversation is gone)."""
    try:
        return state.store.version_of(cid)
    except RolechatError as exc:
        if getattr(exc, "missing", False):
            return None
        raise


@router.get("/conversations/{cid}/events")
async def events(cid: int, request: Request) -> StreamingResponse:
    state = state_of(request)
    await asyncio.to_thread(owned, state, cid, owner_of(request))
    return StreamingResponse(changes(state, cid), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})


async def changes(state: ServerState, cid: int) -> AsyncIterator[str]:
    """The stream's frames, until the conversation is deleted or the server shuts down (a
    client that leaves cancels this generator)."""
    version = await asyncio.to_thread(current_version, state, cid)
    if version is None:
        yield sse({"deleted": True})
        return
    job = state.live.get(cid)
    shown = live_body(job)
    yield sse({"version": version, "live": shown})
    now = time.monotonic()
    read_at = beat_at = now
    while not state.closing.is_set():
        await asyncio.sleep(LIVE_EVERY_S)
        now = time.monotonic()
        running = state.live.get(cid)
        live = live_body(running)
        ended = job is not None and running is not job
        started = running is not None and running is not job
        if ended and job is not None and live_body(job) != shown:
            yield sse({"live": live_body(job)})  # its last words, before it is gone
        if started:  # its message is stored (pending): the version first, then its text
            read_at = 0.0
        elif live != shown:
            shown, job = live, running
            beat_at = now
            yield sse({"live": live})
        if ended or started or now - read_at >= VERSION_EVERY_S:
            read_at = now
            latest = await asyncio.to_thread(current_version, state, cid)
            if latest is None:
                yield sse({"deleted": True})
                return
            if latest != version:
                version, beat_at = latest, now
                yield sse({"version": version})
            if started:
                shown, job = live, running
                yield sse({"live": live})
        if now - beat_at >= HEARTBEAT_S:
            beat_at = now
            yield ": keep-alive\n\n"


@router.post("/conversations/{cid}/stop")
async def stop(cid: int, request: Request) -> dict[str, Any]:
    state, owner = state_of(request), owner_of(request)
    await asyncio.to_thread(owned, state, cid, owner)
    job = state.live.get(cid)
    if job is not None:
        job.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.finished.wait(), STOP_WAIT_S)
    info = await asyncio.to_thread(owned, state, cid, owner)
    return {"stopped": job is not None, "conversation": conversation_body(state, info)}
