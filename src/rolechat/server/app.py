"""The HTTP server: an OpenAI-compatible API over one rolechat engine.

Contract:
- ``POST /v1/chat/completions``: the OpenAI request and response shapes, streaming (SSE, with
  ``stream_options.include_usage``) and not; ``usage`` carries ``prompt_tokens``,
  ``completion_tokens`` and ``prompt_tokens_details.cached_tokens``. A prompt that does not fit
  gets an OpenAI-shaped ``context_length_exceeded`` error, unless the request opts in to
  rolechat's window (``"rolechat": {"window": true}``): then whole turns are dropped, oldest
  first, and the response says which (``rolechat.dropped_turns``).
- ``GET /v1/models`` lists the one model served.
- Every request body is validated by the same schemas as the library (messages through
  :class:`~rolechat.conversation.Conversation`, parameters through
  :class:`~rolechat.params.GenerationParams`); every error is an OpenAI-shaped
  ``{"error": {"message", "type", "param", "code"}}`` with the right status.
- Generation runs on one worker thread (:mod:`rolechat.server.worker`); a client that
  disconnects stops its generation at the next token.
- Stored conversations (sessions) live under ``/v1/conversations`` and ``/v1/personas``: see
  :mod:`rolechat.server.sessions`; they are kept in ``store`` (default: the rolechat home's).
- With API keys, every ``/v1`` route needs ``Authorization: Bearer KEY`` (compared in constant
  time). Bodies over ``max_body_bytes`` are refused (413). CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..chat import Chat, Reply
from ..conversation import Conversation
from ..engines import Engine
from ..engines.snapshots import DiskTier
from ..errors import ContextOverflow, InvalidInput, InvalidParams, RolechatError, UnknownName
from ..params import GenerationParams
from ..store import Store
from ..window import Window, WindowPlan
from .sessions import sessions_router
from .worker import Worker


class RolechatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Drop the oldest whole turns when the conversation does not fit (instead of an error).
    window: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The OpenAI chat-completions body (the fields rolechat honours; others are refused)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[Any]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    n: Literal[1] = 1
    user: str | None = None
    rolechat: RolechatOptions = Field(default_factory=RolechatOptions)

    def params(self) -> GenerationParams:
        return GenerationParams.from_mapping({
            "max_new_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "seed": self.seed, "stop": self.stop, "repetition_penalty": self.repetition_penalty})


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: RolechatError) -> JSONResponse:
    """A library error as the OpenAI error object with the matching status code."""
    if isinstance(exc, ContextOverflow):
        return JSONResponse(error_body(str(exc), param="messages",
                                       code="context_length_exceeded"), status_code=400)
    if isinstance(exc, InvalidParams):
        field = exc.problems[0][0] if exc.problems else None
        field = {"max_new_tokens": "max_tokens"}.get(field or "", field)  # OpenAI's name
        return JSONResponse(error_body(str(exc), param=field, code="invalid_value"), 400)
    if isinstance(exc, InvalidInput):
        return JSONResponse(error_body(str(exc), param=exc.field or "messages",
                                       code="invalid_value"), 400)
    if isinstance(exc, UnknownName):
        return JSONResponse(error_body(str(exc), param=exc.kind, code=f"{exc.kind}_not_found"),
                            404)
    return JSONResponse(error_body(str(exc), type_="server_error"), status_code=500)


def usage_body(reply: Reply) -> dict[str, Any]:
    usage = reply.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def rolechat_body(plan: WindowPlan, reply: Reply | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"dropped_turns": plan.dropped, "kept_turns": plan.kept,
                            "prompt_tokens": plan.prompt_tokens, "budget": plan.budget}
    if reply is not None:
        usage = reply.usage
        body.update(ttft_s=usage.ttft_s, tokens_per_s=usage.tokens_per_s,
                    kv_source=usage.kv_source, restored_tokens=usage.restored_tokens)
        if usage.estimated:
            body["estimated"] = True
    return body


def create_app(engine: Engine, *, api_keys: Sequence[str] = (),
               max_body_bytes: int = 1_000_000, cors_origins: Sequence[str] = (),
               store: Store | None = None, kv_disk: DiskTier | EllipsisType | None = ...
               ) -> FastAPI:
    """The app. ``kv_disk`` is where sessions keep their KV snapshots (default: beside the
    store, with the default budget; None: memory only)."""
    app = FastAPI(title="rolechat", docs_url=None, redoc_url=None)
    worker = Worker()
    store = store if store is not None else Store.default()
    disk = DiskTier(store.kv_root) if kv_disk is ... else kv_disk
    model_id = Path(engine.model).name or engine.model
    keys = [k.encode() for k in api_keys]

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1") and keys:
            header = request.headers.get("authorization", "")
            given = header[7:].encode() if header[:7].lower() == "bearer " else b""
            if not any(hmac.compare_digest(given, key) for key in keys):
                return JSONResponse(error_body("Missing or wrong API key.",
                                               type_="authentication_error",
                                               code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return JSONResponse(error_body(f"The request body is over {max_body_bytes} bytes.",
                                           code="request_too_large"), status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        if "json" not in request.headers.get("content-type", ""):
            message = ("The body must be JSON, sent with the header Content-Type: "
                       "application/json.")
        return JSONResponse(error_body(message, param=where or None, code="invalid_value"), 400)

    @app.exception_handler(RolechatError)
    async def library_error(request: Request, exc: RolechatError) -> JSONResponse:
        return error_response(exc)

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        """The model and what is kept warm: the live KV cache, snapshots in memory and on
        disk (counts, bytes, budgets, hits, evictions)."""
        kv = engine.kv_stats()
        if kv is not None:
            kv = {**kv, "disk": disk.stats() if disk is not None else None}
        return {"object": "status", "model": model_id, "engine": engine.describe(),
                "kv_cache": kv}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "rolechat",
                                            "context_length": engine.context_length}]}

    def prepare(body: ChatRequest) -> tuple[Chat, str, WindowPlan]:
        """Validate and plan (blocking work: tokenization), before anything is generated."""
        if body.model not in (None, model_id, engine.model):
            raise UnknownName("model", body.model, [model_id])
        conversation = Conversation.from_openai(body.messages)
        text = conversation.pending
        if text is None:
            raise InvalidInput("The last message must be a user message.",
                               "End messages with {\"role\": \"user\", ...}.", field="messages")
        conversation.messages.pop()
        chat = Chat(engine, params=body.params(), conversation=conversation)
        plan = chat.plan(text)
        if plan.dropped and not body.rolechat.window:
            full = engine.count_tokens(conversation.prompt_messages(text))
            raise ContextOverflow(prompt_tokens=full, available_tokens=plan.budget,
                                  context_length=engine.context_length,
                                  max_new_tokens=chat.params.max_new_tokens)
        chat.window = Window(low_water=1.0)  # the server is stateless: drop no more than needed
        plan = chat.plan(text)
        return chat, text, plan

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(body: ChatRequest, request: Request) -> Any:
        chat, text, plan = await asyncio.to_thread(prepare, body)
        job, chunks = await worker.submit(lambda: chat.stream(text))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.stream:
            parts = [chunk async for chunk in chunks]
            reply = job.reply
            assert reply is not None
            return {"id": ident, "object": "chat.completion", "created": created,
                    "model": model_id,
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                 "message": {"role": "assistant", "content": "".join(parts)}}],
                    "usage": usage_body(reply), "rolechat": rolechat_body(plan, reply)}

        def event(delta: dict[str, Any], finish: str | None = None,
                  **extra: Any) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            yield event({"role": "assistant", "content": ""})
            try:
                async for chunk in chunks:
                    if await request.is_disconnected():
                        return
                    yield event({"content": chunk})
            except RolechatError as exc:
                yield f"data: {bytes(error_response(exc).body).decode()}\n\n"
                return
            reply = job.reply
            if reply is None:
                return
            yield event({}, reply.finish_reason, rolechat=rolechat_body(plan, reply))
            if body.stream_options is not None and body.stream_options.include_usage:
                data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": model_id, "choices": [], "usage": usage_body(reply)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    app.include_router(sessions_router(engine, store, worker, keyed=bool(keys), kv_disk=disk))

    static = Path(__file__).with_name("static")
    if (static / "index.html").is_file():  # the web chat page
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=static, html=True), name="page")
    return app
