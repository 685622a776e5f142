"""The listener: uvicorn, with the timeouts and the connection bound a public server needs.

Contract:
- :func:`config` builds the ``uvicorn.Config`` that ``rolechat serve`` runs (and the tests run
  in-process): HTTP/1.1 through h11 with :class:`GuardedH11`, idle keep-alive connections
  closed after ``keep_alive`` seconds.
- A request's headers must arrive whole within ``header_timeout`` seconds of its first byte
  (of the connection, for its first request): else the server answers 408 and closes the
  connection. Half-sent headers, or headers sent a byte at a time, cannot hold a connection.
- A body the app never reads (the response went out first) must still end within
  ``body_timeout`` seconds, or the connection is closed; a body the app reads is timed by the
  guard (:mod:`rolechat.server.guard`), which answers 408.
- At most ``max_connections`` connections are open at once; one more is answered 503 at once,
  before anything of it is read, and closed a second later.
- Answers written here are OpenAI's error shape too, like every error the app writes.
- When the server starts shutting down, the app's ``state.closing`` is set, so that its
  endless responses (``GET /v1/conversations/{id}/events``) end and uvicorn can stop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .wire import error_body

#: Defaults of ``rolechat serve``'s flags.
HEADER_TIMEOUT = 10.0
KEEP_ALIVE = 5
MAX_CONNECTIONS = 100


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection."""
    body = json.dumps(error_body(message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, one for a body
    nobody reads, and a bound on open connections (set by :func:`config`)."""

    header_timeout = HEADER_TIMEOUT
    body_timeout = 20.0
    max_connections = MAX_CONNECTIONS
    #: The deadline running, and what it is for ("headers", "body").
    deadline: asyncio.TimerHandle | None = None
    deadline_for: str | None = None
    #: No request has started on this connection yet.
    fresh = True

    #: Called once the server starts shutting down (the app's event streams end then).
    on_shutdown: Callable[[], None] | None = None

    def shutdown(self) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        super().shutdown()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Nothing of it is read; the answer and the end of the stream go out first, so
            # that a client that sent a request at once reads the 503 before the close.
            transport.pause_reading()
            transport.write(raw_error(
                503, "Service Unavailable",
                f"The server has {self.max_connections} connections open, its limit. Try "
                "again in a moment.", "too_many_connections"))
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(1.0, transport.close)
            return
        self.watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.set_deadline(None)
        super().connection_lost(exc)

    def watch(self) -> None:
        """Keep the one deadline the connection's state calls for."""
        theirs, ours = self.conn.their_state, self.conn.our_state
        if self.transport.is_closing():
            wanted = None
        elif theirs is h11.IDLE and (self.fresh or self.conn.trailing_data[0]):
            wanted = "headers"  # a request has begun (or the connection is new)
        elif theirs is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE):
            wanted = "body"  # answered, and the rest of the body is read by nobody
        else:
            wanted = None
        if theirs is not h11.IDLE:
            self.fresh = False
        if wanted != self.deadline_for:
            self.set_deadline(wanted)

    def set_deadline(self, what: str | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline, self.deadline_for = None, what
        if what == "headers":
            self.deadline = self.loop.call_later(self.header_timeout, self.headers_too_slow)
        elif what == "body":
            self.deadline = self.loop.call_later(self.body_timeout, self.transport.close)

    def headers_too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_error(
                408, "Request Timeout",
                f"The request's headers did not arrive within {self.header_timeout:g} s. Send "
                "the whole request at once (the server's --header-timeout).", "request_timeout"))
            self.transport.close()


def config(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
           header_timeout: float = HEADER_TIMEOUT, body_timeout: float = 20.0,
           keep_alive: int = KEEP_ALIVE, max_connections: int = MAX_CONNECTIONS,
           log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration of ``rolechat serve``. ``body_timeout`` here covers only a body
    the app never reads; give the app (:func:`~rolechat.server.create_app`) the same value."""
    state = getattr(getattr(app, "state", None), "rolechat", None)
    closing = getattr(state, "closing", None)
    protocol = type("GuardedH11", (GuardedH11,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout,
        "max_connections": max_connections,
        "on_shutdown": staticmethod(closing.set) if closing is not None else None})
    return uvicorn.Config(app, host=host, port=port, http=protocol, ws="none",
                          timeout_keep_alive=keep_alive, log_level=log_level,
                          lifespan="on")
