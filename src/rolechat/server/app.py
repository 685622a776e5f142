"""The HTTP server: an OpenAI-compatible API over one rolechat engine. This module only
assembles the app.

Contract:
- Routes: :mod:`rolechat.server.completions` (``/v1/chat/completions``, ``/v1/models``,
  ``/v1/status``) and :mod:`rolechat.server.sessions` (``/v1/conversations...``,
  ``/v1/personas``), over one :class:`~rolechat.server.state.ServerState`; the web page at ``/``.
- Every request body is validated by the same schemas as the library; every error is an
  OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}`` with the right status
  (:mod:`rolechat.server.wire`).
- Every reply is read on a thread of its own (:mod:`rolechat.server.worker`) while the engine
  generates them together (a local engine's scheduler batches them); a client that disconnects
  stops its generation at the next step.
- With API keys, every ``/v1`` route needs ``Authorization: Bearer KEY`` (compared in constant
  time; one such header, parsed once, for the check and for ownership); bodies over
  ``max_body_bytes`` are refused (413) whatever their transfer encoding, and bodies slower than
  ``body_timeout`` seconds get 408 (:mod:`rolechat.server.guard`). Slow headers and the number
  of connections are the listener's (:mod:`rolechat.server.listen`). CORS is off unless origins
  are given.
- Nothing redirects: a ``/v1`` path with a trailing slash is served as the path without it.
- Under ``/v1``, every error — 400, 401, 404, 405, 408, 413, 500 — is OpenAI's
  ``{"error": {...}}`` whose ``param`` is the field's path as the client sent it
  (``messages[0].content``); the page's files are served at every other path.
- Sessions keep their KV state in the engine's KV store (``rolechat serve`` gives it the files
  beside the store); on shutdown the engine finishes writing its snapshot files.
- With a ``loader`` (``rolechat serve`` gives one for a GGUF model unless ``--no-switch``),
  requests may name any model on this machine and the server switches to it, one loaded at a
  time (:mod:`rolechat.server.switch`); ``model_name`` is what named the engine's model at
  start (``--model``), whose id it keeps.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from ..engines import Engine
from ..errors import RolechatError
from ..store import Store
from ..window import Window
from . import completions, follow, sessions
from .guard import Guard
from .state import Loader, ServerState
from .switch import model_id, setup
from .wire import ErrorJSON, error_body, error_response, field_path
from .worker import REPLY_HEADER, Worker

log = logging.getLogger("rolechat.server")

#: Seconds a request's whole body may take to arrive (``serve --body-timeout``).
BODY_TIMEOUT = 20.0
#: What pydantic puts in an error's location for the member of a union it tried (``str``,
#: ``list[str]``, a model's name): not part of the client's field path.
UNION_TAG = re.compile(r"^(str|int|float|bool|none|bytes|[a-z]+(-[a-z]+)*\[.*\]|[A-Z]\w*)$")


def create_app(engine: Engine, *, api_keys: Sequence[str] = (),
               max_body_bytes: int = 1_000_000, body_timeout: float = BODY_TIMEOUT,
               cors_origins: Sequence[str] = (), store: Store | None = None,
               window: Window | None = None, loader: Loader | None = None,
               model_name: str | None = None) -> FastAPI:
    app = FastAPI(title="rolechat", docs_url=None, redoc_url=None, redirect_slashes=False,
                  lifespan=lifespan)
    store = store if store is not None else Store.default()
    app.state.rolechat = ServerState(
        engine=engine, store=store, worker=Worker(),
        keyed=bool(api_keys), model_id=model_id(engine.model), window=window)
    setup(app.state.rolechat, loader, model_name)
    app.add_middleware(Guard, api_keys=list(api_keys), max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=[REPLY_HEADER])
    app.add_exception_handler(RequestValidationError, invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(RolechatError, library_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_error)
    app.include_router(completions.router)
    app.include_router(sessions.router)
    app.include_router(follow.router)

    static = Path(__file__).with_name("static")
    if (static / "index.html").is_file():  # the web chat page, at every path but /v1
        from fastapi.staticfiles import StaticFiles

        app.router.routes.append(PageMount("/", StaticFiles(directory=static, html=True),
                                           name="page"))
    return app


class PageMount(Mount):
    """The page's files: every path but ``/v1``, whose misses are the API's own 404 and 405."""

    def matches(self, scope: Any) -> tuple[Match, Any]:
        if str(scope.get("path", "")).startswith("/v1"):
            return Match.NONE, {}
        return super().matches(scope)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On shutdown, finish writing the loaded engine's KV snapshot files (the server may be
    stopped right after a reply, and uvicorn ends the process with the signal it caught,
    skipping exit handlers)."""
    yield
    state: ServerState = app.state.rolechat
    if not state.models.empty:
        await asyncio.to_thread(state.engine.flush, 30.0)


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request that does not fit the schema: the first problem, said plainly, naming the
    field as the client sent it."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [part for part in first.get("loc", ()) if not UNION_TAG.match(str(part))]
    where_in, field = (str(loc[0]), field_path(loc[1:])) if loc else ("body", "")
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not valid JSON")
        message = f"The body is not valid JSON: {reason}."
        field = ""
    elif where_in == "body" and "json" not in request.headers.get("content-type", ""):
        message = ("The body must be JSON, sent with the header Content-Type: "
                   "application/json.")
    else:
        what = {"path": "in the URL", "query": "in the query string"}.get(where_in, "")
        name = f"{field} {what}".strip() or "body"
        got = first.get("input", None)
        shown = f" (got {got!r:.80})" if where_in != "body" or field else ""
        message = f"{name}: {first.get('msg', 'invalid value')}{shown}."
    return ErrorJSON(error_body(message, param=field or None, code="invalid_value"), 400)


async def library_error(request: Request, exc: RolechatError) -> JSONResponse:
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """404, 405, 413 and the like: OpenAI's error shape under ``/v1``."""
    if not request.url.path.startswith("/v1"):
        return await http_exception_handler(request, exc)
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        message, code = (f"There is no {method} {path}.",
                         "unknown_url")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message, code = f"{method} is not allowed on {path} (use {allowed}).", "method_not_allowed"
    elif exc.status_code == 413:
        message, code = str(exc.detail), "request_too_large"
    elif exc.status_code == 408:
        message, code = str(exc.detail), "request_timeout"
    elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        message, code = ("The body's JSON is nested too deeply to read. Send flatter JSON "
                         "(a chat request needs only a few levels)."), "invalid_value"
    elif exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        message, code = "The body is not valid UTF-8. Send JSON encoded as UTF-8.", "invalid_value"
    elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
        message, code = "The body could not be read as JSON. Send a JSON object.", "invalid_value"
    else:
        message, code = str(exc.detail), None
    return ErrorJSON(error_body(message, code=code), status_code=exc.status_code,
                     headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: a 500 in OpenAI's shape (the traceback goes to the log)."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return ErrorJSON(error_body(f"Internal error: {type(exc).__name__}.", type_="server_error"),
                     status_code=500)
