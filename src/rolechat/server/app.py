"""The HTTP server: an OpenAI-compatible API over one rolechat engine. This module only
assembles the app.

Contract:
- Routes: :mod:`rolechat.server.completions` (``/v1/chat/completions``, ``/v1/models``,
  ``/v1/status``) and :mod:`rolechat.server.sessions` (``/v1/conversations...``,
  ``/v1/personas``), over one :class:`~rolechat.server.state.ServerState`; the web page at ``/``.
- Every request body is validated by the same schemas as the library; every error is an
  OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}`` with the right status
  (:mod:`rolechat.server.wire`).
- Generation runs on one worker thread (:mod:`rolechat.server.worker`); a client that
  disconnects stops its generation at the next token.
- With API keys, every ``/v1`` route needs ``Authorization: Bearer KEY`` (compared in constant
  time). Bodies over ``max_body_bytes`` are refused (413). CORS is off unless origins are given.
- Sessions keep their KV snapshots in ``kv_disk`` (default: beside the store, with the default
  budget; None: memory only); on shutdown the engine finishes writing its snapshot files.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import EllipsisType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..engines import Engine
from ..engines.snapshots import DiskTier
from ..errors import RolechatError
from ..store import Store
from . import completions, sessions
from .completions import model_id
from .state import ServerState
from .wire import bearer_key, error_body, error_response
from .worker import Worker


def create_app(engine: Engine, *, api_keys: Sequence[str] = (),
               max_body_bytes: int = 1_000_000, cors_origins: Sequence[str] = (),
               store: Store | None = None, kv_disk: DiskTier | EllipsisType | None = ...
               ) -> FastAPI:
    app = FastAPI(title="rolechat", docs_url=None, redoc_url=None,
                  lifespan=partial(lifespan, engine))
    store = store if store is not None else Store.default()
    app.state.rolechat = ServerState(
        engine=engine, store=store, worker=Worker(),
        kv_disk=DiskTier(store.kv_root) if kv_disk is ... else kv_disk,
        keyed=bool(api_keys), model_id=model_id(engine.model))
    keys = [k.encode() for k in api_keys]

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1") and keys:
            given = bearer_key(request).encode()
            if not any(hmac.compare_digest(given, key) for key in keys):
                return JSONResponse(error_body("Missing or wrong API key.",
                                               type_="authentication_error",
                                               code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return JSONResponse(error_body(f"The request body is over {max_body_bytes} bytes.",
                                           code="request_too_large"), status_code=413)
        return await call_next(request)

    app.add_exception_handler(RequestValidationError, invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(RolechatError, library_error)  # type: ignore[arg-type]
    app.include_router(completions.router)
    app.include_router(sessions.router)

    static = Path(__file__).with_name("static")
    if (static / "index.html").is_file():  # the web chat page
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=static, html=True), name="page")
    return app


@asynccontextmanager
async def lifespan(engine: Engine, app: FastAPI) -> AsyncIterator[None]:
    """On shutdown, finish writing KV snapshot files (the server may be stopped right after a
    reply, and uvicorn ends the process with the signal it caught, skipping exit handlers)."""
    yield
    await asyncio.to_thread(engine.flush, 30.0)


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
    if "json" not in request.headers.get("content-type", ""):
        message = ("The body must be JSON, sent with the header Content-Type: "
                   "application/json.")
    return JSONResponse(error_body(message, param=where or None, code="invalid_value"), 400)


async def library_error(request: Request, exc: RolechatError) -> JSONResponse:
    return error_response(exc)
