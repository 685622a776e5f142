"""Server-side sessions: stored conversations over HTTP (``/v1/conversations``, ``/v1/personas``).

Contract:
- ``GET /v1/personas``: built-in and user personas.
- ``POST /v1/conversations`` (201), ``GET /v1/conversations`` (newest first, the caller's own),
  ``GET /v1/conversations/{id}`` (with every message, interrupted ones included),
  ``DELETE /v1/conversations/{id}``.
- ``POST /v1/conversations/{id}/messages``: one turn, JSON or SSE (``{"delta"}`` events, then
  ``{"done": true, ...}``, then ``[DONE]``; an error mid-stream is ``{"error": {...}}``). The
  window always applies and is sticky per conversation: one :class:`~rolechat.chat.Chat` per
  conversation stays in memory (a small LRU). Two requests to one conversation never
  interleave (an :class:`asyncio.Lock` per conversation, held from planning until the reply is
  recorded); generation goes through the server's one :class:`~rolechat.server.worker.Worker`.
  A client that leaves mid-stream stops its generation and its message is stored
  ``interrupted``.
- ``POST /v1/conversations/{id}/prompt``: a dry run (the exact prompt text and the window's
  plan); nothing is generated or stored.
- With API keys, a conversation belongs to the key that created it (the store keeps the
  key's SHA-256); another key's conversation is invisible (404 ``conversation_not_found``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..chat import Chat
from ..conversation import check_text
from ..engines import Engine
from ..engines.snapshots import CacheKey, DiskTier, conversation_snapshot
from ..errors import RolechatError, UnknownName
from ..params import GenerationParams
from ..persona import load_personas
from ..store import ConversationInfo, Store, StoreLog, open_chat
from ..window import check_room
from .worker import Worker

#: Conversations whose Chat (and so whose sticky window) stays in memory.
CHAT_CACHE_SIZE = 64


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona: str | None = None
    system: str | None = None
    params: dict[str, Any] | None = None
    title: str = ""


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str
    stream: bool = False
    params: dict[str, Any] | None = None


class PromptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str


class ConversationNotFound(UnknownName):
    """No such conversation, or one that belongs to another API key (the same to the caller)."""

    def __init__(self, cid: int) -> None:
        self.kind, self.name, self.valid = "conversation", str(cid), []
        RolechatError.__init__(self, f"There is no conversation {cid}.",
                               "List yours with GET /v1/conversations.")


def owner_of(request: Request, keyed: bool) -> str | None:
    """The caller's owner id: the SHA-256 of its bearer key (the middleware checked the key)."""
    if not keyed:
        return None
    header = request.headers.get("authorization", "")
    key = header[7:] if header[:7].lower() == "bearer " else ""
    return hashlib.sha256(key.encode()).hexdigest()


def conversation_body(store: Store, info: ConversationInfo, *,
                      messages: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": info.id, "title": info.title, "persona": info.persona,
                            "system": info.system, "params": info.params,
                            "created_at": info.created_at, "updated_at": info.updated_at,
                            "turns": info.turns}
    if messages:
        body["messages"] = [{"role": m.role, "content": m.content, "status": m.status,
                             "tokens": m.tokens, "usage": m.usage}
                            for m in store.messages(info.id)]
    return body


def _params(data: dict[str, Any] | None, engine: Engine) -> GenerationParams:
    params = GenerationParams.from_mapping(data)
    if "max_new_tokens" in params.explicit():
        check_room(params, engine.context_length)
    return params


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sessions_router(engine: Engine, store: Store, worker: Worker, *,
                    keyed: bool, kv_disk: DiskTier | None = None) -> APIRouter:
    router = APIRouter(prefix="/v1")
    chats: OrderedDict[int, Chat] = OrderedDict()
    chats_guard = threading.Lock()
    locks: dict[int, asyncio.Lock] = {}

    def lock_of(cid: int) -> asyncio.Lock:
        return locks.setdefault(cid, asyncio.Lock())

    def owned(cid: int, owner: str | None) -> ConversationInfo:
        try:
            return store.info(cid, owner=owner)
        except RolechatError as exc:
            if getattr(exc, "missing", False):
                raise ConversationNotFound(cid) from None
            raise

    def chat_of(cid: int, owner: str | None) -> Chat:
        """The conversation's Chat (kept between requests so its window stays sticky)."""
        owned(cid, owner)
        with chats_guard:
            chat = chats.get(cid)
            if chat is not None:
                chats.move_to_end(cid)
                return chat
        chat = open_chat(store, engine, cid=cid, kv_disk=kv_disk)
        with chats_guard:
            chats[cid] = chat
            while len(chats) > CHAT_CACHE_SIZE:
                chats.popitem(last=False)
        return chat

    def forget(cid: int) -> None:
        with chats_guard:
            chats.pop(cid, None)

    @router.get("/personas")
    def personas() -> dict[str, Any]:
        found, _broken = load_personas()
        return {"object": "list",
                "data": [{"name": p.name, "description": p.description, "system": p.system,
                          "params": p.params.explicit()} for p in found.values()]}

    @router.post("/conversations", status_code=201)
    def create(body: NewConversation, request: Request) -> dict[str, Any]:
        params = _params(body.params, engine)
        chat = open_chat(store, engine, persona=body.persona, system=body.system,
                         params=params, title=body.title, owner=owner_of(request, keyed),
                         kv_disk=kv_disk)
        assert isinstance(chat.log, StoreLog)
        cid = chat.log.cid
        with chats_guard:
            chats[cid] = chat
            while len(chats) > CHAT_CACHE_SIZE:
                chats.popitem(last=False)
        return conversation_body(store, store.info(cid))

    @router.get("/conversations")
    def listing(request: Request) -> dict[str, Any]:
        infos = store.recent(1000, owner=owner_of(request, keyed))
        return {"object": "list",
                "data": [conversation_body(store, info, messages=False) for info in infos]}

    @router.get("/conversations/{cid}")
    def get(cid: int, request: Request) -> dict[str, Any]:
        return conversation_body(store, owned(cid, owner_of(request, keyed)))

    @router.delete("/conversations/{cid}")
    async def delete(cid: int, request: Request) -> dict[str, Any]:
        owner = owner_of(request, keyed)
        await asyncio.to_thread(owned, cid, owner)
        async with lock_of(cid):  # not under a reply that is being written
            await asyncio.to_thread(owned, cid, owner)
            forget(cid)
            await asyncio.to_thread(store.delete, cid)  # its snapshot files too
            key = CacheKey(conversation_snapshot(cid), kv_disk)
            await asyncio.to_thread(engine.forget, key)
        locks.pop(cid, None)
        return {"id": cid, "deleted": True}

    @router.post("/conversations/{cid}/prompt")
    async def prompt(cid: int, body: PromptRequest, request: Request) -> dict[str, Any]:
        owner = owner_of(request, keyed)
        text = check_text(body.content, "content")
        await asyncio.to_thread(owned, cid, owner)
        async with lock_of(cid):
            chat = await asyncio.to_thread(chat_of, cid, owner)
            plan = await asyncio.to_thread(chat.plan, text)
            rendered = await asyncio.to_thread(engine.render, plan.messages)
        return {"prompt": rendered,
                "plan": {"dropped_turns": plan.dropped, "kept_turns": plan.kept,
                         "prompt_tokens": plan.prompt_tokens, "budget": plan.budget,
                         "context_length": plan.context_length,
                         "max_new_tokens": plan.max_new_tokens}}

    @router.post("/conversations/{cid}/messages", response_model=None)
    async def message(cid: int, body: NewMessage, request: Request) -> Any:
        from .app import rolechat_body, usage_body

        owner = owner_of(request, keyed)
        text = check_text(body.content, "content")
        overrides = _params(body.params, engine).explicit()
        await asyncio.to_thread(owned, cid, owner)
        lock = lock_of(cid)

        if not body.stream:
            async with lock:
                chat = await asyncio.to_thread(chat_of, cid, owner)
                await asyncio.to_thread(chat.plan, text, **overrides)  # validate first
                job, chunks = await worker.submit(lambda: chat.stream(text, **overrides))
                parts = [chunk async for chunk in chunks]
                reply = job.reply
            if reply is None:
                return JSONResponse({"error": {"message": "The reply was interrupted.",
                                               "type": "server_error", "param": None,
                                               "code": None}}, status_code=500)
            return {"message": {"role": "assistant", "content": "".join(parts)},
                    "finish_reason": reply.finish_reason, "usage": usage_body(reply),
                    "rolechat": rolechat_body(reply.plan, reply)}

        # Errors found before anything is generated get their HTTP status.
        async with lock:
            chat = await asyncio.to_thread(chat_of, cid, owner)
            await asyncio.to_thread(chat.plan, text, **overrides)

        async def sse() -> AsyncIterator[str]:
            # The lock is taken here, not in the handler: a response that never starts
            # streaming must not leave the conversation locked.
            async with lock:
                try:
                    current = await asyncio.to_thread(chat_of, cid, owner)
                    job, chunks = await worker.submit(lambda: current.stream(text, **overrides))
                except RolechatError as exc:
                    yield _error(exc)
                    return
                parts: list[str] = []
                try:
                    async for chunk in chunks:
                        if await request.is_disconnected():
                            return
                        parts.append(chunk)
                        yield _sse({"delta": chunk})
                except RolechatError as exc:
                    yield _error(exc)
                    return
                except Exception as exc:
                    yield _sse({"error": {"message": str(exc), "type": "server_error",
                                          "param": None, "code": None}})
                    return
                finally:
                    close = getattr(chunks, "aclose", None)
                    if close is not None:
                        await close()  # a client that left stops its generation now
                reply = job.reply
            if reply is None:
                return
            yield _sse({"done": True, "message": {"role": "assistant", "content": "".join(parts)},
                        "finish_reason": reply.finish_reason, "usage": usage_body(reply),
                        "rolechat": rolechat_body(reply.plan, reply)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return router


def _error(exc: RolechatError) -> str:
    from .app import error_response

    return f"data: {bytes(error_response(exc).body).decode()}\n\n"
