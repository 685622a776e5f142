"""The server's gate, as a pure ASGI middleware: API keys and the body limit.

Contract:
- With API keys, every ``/v1`` request needs ``Authorization: Bearer KEY`` (compared in
  constant time): else 401 ``invalid_api_key``.
- A request body over ``max_body_bytes`` gets 413 ``request_too_large``, whatever its transfer
  encoding: a ``Content-Length`` over the limit is refused before any byte is read, and a body
  without one (chunked) is counted while it is read and refused the moment it passes the limit.
  A refused body is not read any further: the response closes the connection.
- Errors are OpenAI-shaped (:mod:`rolechat.server.wire`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException

from .wire import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised inside the app when the body being read passes the limit (an HTTPException, so
    that FastAPI's body parsing lets it through to the error handler as a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is over {limit} bytes.",
                         headers={"Connection": "close"})


async def send_error(send: Send, status: int, body: dict[str, Any], *,
                     close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """API keys and the body limit, in front of the app."""

    def __init__(self, app: ASGIApp, *, api_keys: Sequence[str] = (),
                 max_body_bytes: int = 1_000_000) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes

    def too_large(self) -> dict[str, Any]:
        return error_body(f"The request body is over {self.max_body_bytes} bytes.",
                          code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.keys and str(scope.get("path", "")).startswith("/v1"):
            header = headers.get("authorization", "")
            given = header[7:].encode() if header[:7].lower() == "bearer " else b""
            if not any(hmac.compare_digest(given, key) for key in self.keys):
                await send_error(send, 401, error_body(
                    "Missing or wrong API key.", type_="authentication_error",
                    code="invalid_api_key"))
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await send_error(send, 413, self.too_large(), close=True)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await send_error(send, 413, self.too_large(), close=True)
