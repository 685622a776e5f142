"""The server's gate, as a pure ASGI middleware: API keys, the body limit and the body timeout,
and one spelling of every ``/v1`` path.

Contract:
- A request's ``Authorization`` header is parsed once, here
  (:func:`~rolechat.server.wire.parse_authorization`); two or more are refused (400
  ``duplicate_authorization``), whatever the server's keys. The key found is put in the ASGI
  scope, where the routes read it (:func:`~rolechat.server.wire.bearer_key`): the key checked
  is the key whose conversations are read.
- With API keys, every ``/v1`` request needs ``Authorization: Bearer KEY`` (compared in
  constant time): else 401 ``invalid_api_key``.
- A ``/v1`` path with a trailing slash is the same path without it (``/v1/models/`` is
  ``/v1/models``): no redirect, so nothing is built from the ``Host`` header.
- A request body over ``max_body_bytes`` gets 413 ``request_too_large``, whatever its transfer
  encoding: a ``Content-Length`` over the limit is refused before any byte is read, and a body
  without one (chunked) is counted while it is read and refused the moment it passes the limit.
  A body that has not arrived whole ``body_timeout`` seconds after the request's headers gets
  408 ``request_timeout``. A refused body is not read any further: the response closes the
  connection. (Slow or half-sent headers are the listener's: :mod:`rolechat.server.listen`.)
- Errors are OpenAI-shaped (:mod:`rolechat.server.wire`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException

from .wire import API_KEY_SCOPE, DuplicateAuthorization, error_body, parse_authorization

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyRefused(HTTPException):
    """Raised inside the app while the body is read (an HTTPException, so that FastAPI's body
    parsing lets it through to the error handler); the response closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers={"Connection": "close"})


class BodyTooLarge(BodyRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


class BodyTimeout(BodyRefused):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, timeout_message(seconds))


def too_large_message(limit: int) -> str:
    return (f"The request body is over {limit} bytes. Send a smaller body (the server's "
            "--max-body-bytes).")


def timeout_message(seconds: float) -> str:
    return (f"The request body did not arrive within {seconds:g} s. Send the whole body at "
            "once (the server's --body-timeout).")


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
    """API keys, the body's size and time, and ``/v1`` paths, in front of the app."""

    def __init__(self, app: ASGIApp, *, api_keys: Sequence[str] = (),
                 max_body_bytes: int = 1_000_000, body_timeout: float = 20.0) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = str(scope.get("path", "")).startswith("/v1")
        try:
            key = parse_authorization(scope.get("headers", []))
        except DuplicateAuthorization:
            await send_error(send, 400, error_body(
                "The request has more than one Authorization header. Send exactly one: "
                "Authorization: Bearer KEY.", code="duplicate_authorization"), close=True)
            return
        scope[API_KEY_SCOPE] = key
        if self.keys and api and not any(hmac.compare_digest(key.encode("latin-1"), k)
                                         for k in self.keys):
            await send_error(send, 401, error_body(
                "Missing or wrong API key. Send Authorization: Bearer KEY with a key the "
                "server was started with (--api-key).", type_="authentication_error",
                code="invalid_api_key"))
            return
        if api:
            same_path(scope)
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await send_error(send, 413, error_body(too_large_message(self.max_body_bytes),
                                                   code="request_too_large"), close=True)
            return
        await self.guarded(scope, receive, send)

    async def guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with the body counted and timed while it is read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received, whole, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, whole
            if whole:  # after the body: waiting for a disconnect is not timed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                whole = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyRefused as exc:  # only if the app's own error handler did not answer
            if not started:
                code = "request_too_large" if exc.status_code == 413 else "request_timeout"
                await send_error(send, exc.status_code, error_body(str(exc.detail), code=code),
                                 close=True)


def header(scope: Scope, name: bytes) -> str | None:
    """The last value of header ``name`` (lowercase), or None."""
    value = None
    for key, raw in scope.get("headers", []):
        if key.lower() == name:
            value = raw.decode("latin-1")
    return value


def same_path(scope: Scope) -> None:
    """``/v1/models/`` is ``/v1/models``: trailing slashes go, in place of a redirect."""
    path = str(scope["path"])
    if len(path) > 3 and path.endswith("/"):
        scope["path"] = path.rstrip("/") or "/"
        raw = scope.get("raw_path")
        if isinstance(raw, bytes):
            scope["raw_path"] = raw.rstrip(b"/") or b"/"
