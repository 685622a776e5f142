"""Server-side sessions: stored conversations over HTTP (``/v1/conversations``, ``/v1/personas``).

Contract:
- ``GET /v1/personas``: built-in and user personas.
- ``POST /v1/conversations`` (201), ``GET /v1/conversations`` (newest first, the caller's own),
  ``GET /v1/conversations/{id}`` (with every message and its ``id``, interrupted ones
  included; its ``version`` is also the ``ETag``), ``DELETE /v1/conversations/{id}`` (its KV
  snapshot files too).
- ``POST /v1/conversations/{id}/messages``: one turn, JSON or SSE (``{"delta"}`` events, then
  ``{"done": true, ...}``, then ``[DONE]``; an error mid-stream is ``{"error": {...}}``).
  ``POST /v1/conversations/{id}/retry``: the last turn again (same shapes); if the new reply does
  not complete, the old one stays. ``POST /v1/conversations/{id}/continue`` (Retry's body): the
  last reply goes on where it stopped (a length cut), the added text streamed and appended.
  ``POST /v1/conversations/{id}/undo``: remove the last turn; ``POST .../redo`` puts the turn
  the last undo removed back, as it was, unless the conversation changed since (409).
  A reply names its stored turn (``turn``: the reply's message id). A message may carry
  ``response_format`` (JSON replies) and ``tools`` / ``tool_choice`` / ``parallel_tool_calls``
  as ``/v1/chat/completions`` takes them: a reply that calls tools (``finish_reason``
  ``tool_calls``, ``message.tool_calls``; streamed as ``{"tool_calls": [...]}`` events in
  OpenAI's delta shape) leaves its turn waiting — its message ``pending`` — until a message
  with ``tool_results`` (``[{"tool_call_id", "content"}]``, one per call) answers them; the
  turn is then stored once, its calls and results with its reply (``steps`` in ``GET``). The
  waiting turn lives in the session's chat: a new message instead, or the session leaving the
  LRU or the process, leaves it ``interrupted``.
- Several writers (tabs, REPLs, clients) share a conversation: every write moves its
  ``version``; before it acts or plans, a session takes what other writers stored. Retry and
  undo act on the turn the client names (``{"turn": id}``, the id of the last reply it shows;
  clients should send it) and/or the version it saw (``If-Match: "version"``); left out, they
  act on the last turn, whatever it is. A turn that is no longer the last, or another version,
  is refused with 409 ``conversation_changed`` in OpenAI's error shape, and nothing changes.
- ``PATCH /v1/conversations/{id}``: change its ``title``, ``system`` prompt (an empty system
  prompt means none), ``pins`` (the turns, from 0, always kept) and/or ``memory`` (``none`` or
  ``summary``); fields left out or null stay as they are.
- Request bodies are checked as strictly as completions': JSON types exactly (``"yes"`` is not
  a boolean), no unknown fields, at most 4 stop strings, errors naming the field's path
  (``params.temperature``, ``pins[1]``) and turns as the API numbers them (from 0). A system
  prompt (at ``POST`` or ``PATCH``) must fit the context beside ``max_new_tokens``: else 400,
  saying how many tokens it has room for. Titles lose control characters (NUL, ...) and
  bidirectional-override characters, and runs of whitespace become one space.
- Memory (:mod:`rolechat.memory`): a session's ``params`` may set ``memory`` and
  ``summary_tokens`` (over the persona's ``[window]`` and ``serve --memory``); a message with
  ``"pinned": true`` pins its turn; the plan in every reply and dry run shows the summary, the
  pins and the dropped turns (``rolechat.memory``, ``pinned_turns``).
- ``POST /v1/conversations/{id}/prompt``: a dry run (the exact prompt text and the window's
  plan); nothing is generated or stored. With no ``content`` (or ``""``) it shows the prompt the
  next message would get: the conversation so far and an open, empty user turn
  (``"next_message": true``).
- Each conversation is a :class:`~rolechat.saved.SavedChat` kept in a small LRU, so its window
  stays sticky and its KV state warm. Two requests to one conversation never interleave: its
  :class:`asyncio.Lock` is held from planning until the worker is done with the reply (it is
  released by the job's end, whether or not the response ever streams). A client that leaves
  mid-stream stops its generation and its message is stored ``interrupted`` — unless it sent
  ``"detach": true`` (a message or retry): then the reply goes on, others follow it, and
  ``POST .../stop`` stops it (:mod:`rolechat.server.follow`, with ``GET .../events``). While a
  reply is written its text so far is saved on its pending message every few seconds, so that
  after a crash the next start shows it, interrupted, after the message.
- Models: a create, message or retry body may name a ``model`` (an id ``/v1/models`` lists): the
  server switches to it first, as for ``/v1/chat/completions`` (:mod:`rolechat.server.switch`;
  during another request's switch: 503 ``model_loading`` with ``Retry-After``). Without one, a
  conversation goes on with the model loaded now. Every route that uses the model holds a lease
  on the engine (taken before the conversation's lock); a reply names the model that wrote it
  (``model``). After a switch each conversation's chat is rebuilt from the store on the new
  engine; nothing stored is lost (a turn waiting for tool results is left ``interrupted``).
- ``GET /v1/conversations?q=TEXT`` (``&limit=N``, 1-100 hits, default 20): search, scoped as
  the list is. The conversations whose messages or title hold every term (FTS5 trigram, short
  terms by ``LIKE``: :mod:`rolechat.store_search`), best match first, each with ``hits``
  (``message_id``, null for its title; ``role``; ``snippet``; ``parts``: the snippet as
  ``{"text", "match"}`` pieces). A blank ``q`` or one over 200 characters is a 400.
- With API keys, a conversation belongs to the key that created it (the store keeps the key's
  SHA-256); another key's conversation is invisible (404 ``conversation_not_found``).
- Handlers are module-level functions over the app's :class:`~rolechat.server.state.ServerState`.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..chat import Reply, ReplyStream
from ..conversation import Message, check_text
from ..engines.base import Waiting
from ..engines.snapshots import conversation_snapshot
from ..errors import InvalidInput, InvalidParams, RolechatError, UnknownName
from ..params import GenerationParams
from ..persona import get_persona, load_personas
from ..saved import SavedChat
from ..store import ConversationInfo
from ..store_search import MAX_QUERY
from ..toolcalls import CallDelta, CallStream, ContentDelta, Tools
from ..window import MEMORY_SETTINGS, Window, check_room, summarizes
from .state import ServerState, state_of
from .switch import Lease, leased, take
from .wire import (
    DONE,
    bearer_key,
    check_stops,
    delta_body,
    etag,
    if_match,
    owner_id,
    plan_body,
    response_format,
    rolechat_body,
    sse,
    sse_error,
    usage_body,
)
from .worker import REPLY_HEADER, Event, Job, joined_unless_gone, reply_events

router = APIRouter(prefix="/v1")


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The model to use (an id /v1/models lists); None: the one loaded.
    model: str | None = None
    persona: str | None = None
    system: str | None = None
    params: dict[str, Any] | None = None
    title: str = ""


class ToolResult(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tool_call_id: str
    content: str


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The user's message; or, instead, the results of the calls the last reply made.
    content: str | None = None
    tool_results: list[ToolResult] | None = None
    stream: bool = False
    params: dict[str, Any] | None = None
    #: Pin this turn once it is recorded: the window always keeps it.
    pinned: bool = False
    #: OpenAI's response_format: the reply is JSON (under a schema).
    response_format: dict[str, Any] | None = None
    #: OpenAI's tools: the reply may call them (then its turn waits for tool_results).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    #: The model to reply with (an id /v1/models lists); None: the one loaded.
    model: str | None = None
    #: Go on generating if this client leaves (a reload, a network blip); stop it with
    #: POST .../stop. Followers see it through GET .../events.
    detach: bool = False
    #: This message replaces the user message with this id (one the conversation shows) and
    #: everything after it, which stay as a branch (an edit, or with the same text a
    #: regeneration that keeps the old reply). With If-Match, only at that version.
    edit: int | None = None


class Retry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The model to reply with (an id /v1/models lists); None: the one loaded.
    model: str | None = None
    stream: bool = False
    #: As NewMessage's: the reply outlives its client.
    detach: bool = False
    params: dict[str, Any] | None = None
    #: The turn to retry (the id of the last reply the client shows); None: the last turn.
    turn: int | None = None


class Switch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The branch to show (one a message's "versions" lists).
    branch: int


class Undo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The turn to remove (the id of the last reply the client shows); None: the last turn.
    turn: int | None = None


class PromptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The draft message; "" (nothing typed yet) previews the next message's prompt.
    content: str = ""


class ConversationChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    title: str | None = None
    #: The new system prompt; "" (or blank) removes it.
    system: str | None = None
    #: The turns (from 0) to keep pinned: this list replaces the pins.
    pins: list[int] | None = None
    #: What the window keeps of dropped turns: "none" or "summary".
    memory: Literal["none", "summary"] | None = None
    #: Generation parameters for the next replies: each one given is set, a null one goes
    #: back to where it came from (the persona, the model, rolechat's default).
    params: dict[str, Any] | None = None


class Listing(BaseModel):
    """``GET /v1/conversations``'s query string (lax types: a query string is text)."""
    model_config = ConfigDict(extra="forbid")
    #: Search: the conversations whose messages or title hold every term of this text.
    q: str | None = Field(None, max_length=MAX_QUERY)
    #: At most this many hits (with ``q``).
    limit: int = Field(20, ge=1, le=100)


class ConversationNotFound(UnknownName):
    """No such conversation, or one that belongs to another API key (the same to the caller)."""

    def __init__(self, cid: int) -> None:
        self.kind, self.name, self.valid = "conversation", str(cid), []
        RolechatError.__init__(self, f"There is no conversation {cid}.",
                               "List yours with GET /v1/conversations.")


# ----- checks ----------------------------------------------------------------------------------

#: Characters that reorder the text around them (RLO and its kin): never kept in a title.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")


def text_of(value: Any, field: str, what: str, *, allow_blank: bool = False) -> str:
    """:func:`~rolechat.conversation.check_text`, its error naming the body's field."""
    try:
        return check_text(value, what, allow_blank=allow_blank)
    except InvalidInput as exc:
        raise InvalidInput(exc.message, exc.hint, field=field) from None


def clean_title(title: str) -> str:
    """A title as shown in a list: control and bidirectional-override characters removed,
    whitespace runs (newlines, tabs) one space, no space at either end."""
    kept = "".join(" " if c.isspace() else c for c in title
                   if c.isspace() or (unicodedata.category(c) != "Cc"
                                      and c not in BIDI_CONTROLS))
    return " ".join(kept.split())


def in_params(exc: InvalidParams) -> InvalidParams:
    """The same error, each field named by its path in the body (``params.temperature``)."""
    return InvalidParams([(f"params.{field}", why) for field, why in exc.problems])


def check_pins(saved: SavedChat, pins: list[int]) -> None:
    """Each pin names a completed turn, from 0 (-1: the last), as the API numbers them."""
    total = len(saved.chat.conversation.turns)
    for index, pin in enumerate(pins):
        if not -total <= pin < total:
            raise InvalidInput(f"There is no turn {pin}: the conversation has {total} completed "
                               "turn(s).", "Turns are numbered from 0 (-1 is the last)."
                               if total else "Pin a turn once it has a reply.",
                               field=f"pins[{index}]")


def check_system_fits(state: ServerState, saved: SavedChat, system: str) -> None:
    """The system prompt alone (with an empty message) must leave ``max_new_tokens`` of the
    context: else every message would fail until it changed."""
    engine = state.engine
    max_new = saved.chat.effective_params().max_new_tokens
    budget = engine.context_length - max_new
    needed = engine.count_tokens([Message("system", system), Message("user", "")])
    if needed <= budget:
        return
    own = engine.count_text(system)
    room = max(budget - (needed - own), 0)
    raise InvalidInput(
        f"The system prompt is {own} tokens, but this conversation has room for {room}: the "
        f"context length {engine.context_length} - max_new_tokens {max_new} - "
        f"{needed - own} for the chat template around it.",
        f"Shorten the system prompt to at most {room} tokens, or lower max_new_tokens.",
        field="system")


# ----- helpers ---------------------------------------------------------------------------------

def owner_of(request: Request) -> str | None:
    """The caller's owner id (None when the server has no keys; the middleware checked it)."""
    return owner_id(bearer_key(request)) if state_of(request).keyed else None


def owned(state: ServerState, cid: int, owner: str | None) -> ConversationInfo:
    try:
        return state.store.info(cid, owner=owner)
    except RolechatError as exc:
        if getattr(exc, "missing", False):
            raise ConversationNotFound(cid) from None
        raise


def saved_chat(state: ServerState, cid: int, owner: str | None) -> SavedChat:
    """The conversation's SavedChat (kept between requests: its window stays sticky), up to
    date with what other writers (a REPL, another server) stored, on the engine loaded now
    (the caller holds a lease on it)."""
    owned(state, cid, owner)

    def make() -> SavedChat:
        return SavedChat.resume(state.engine, state.store, cid)

    saved = state.chats.get(cid, make)
    if saved.chat.engine is not state.engine:  # made on a model the server has let go
        state.chats.pop(cid)
        saved = state.chats.get(cid, make)
    saved.refresh()
    return saved


def overrides_of(state: ServerState, data: dict[str, Any] | None) -> dict[str, Any]:
    check_stops((data or {}).get("stop"), "params.stop")
    try:
        params = GenerationParams.from_mapping(data)
        if "max_new_tokens" in params.explicit():
            check_room(params, state.engine.context_length)
    except InvalidParams as exc:
        raise in_params(exc) from None
    return params.explicit()


def window_of(state: ServerState, data: dict[str, Any] | None,
              persona: str | None) -> tuple[Window | None, dict[str, Any] | None]:
    """The window a new session asks for (``memory``/``summary_tokens`` in its params, over the
    persona's ``[window]`` and the server's ``--memory``), and the generation params left."""
    data = dict(data or {})
    given = {name: data.pop(name) for name in MEMORY_SETTINGS if name in data}
    if not given and state.window is None:
        return None, data
    try:
        return get_persona(persona).window_for(given, state.window), data
    except InvalidParams as exc:
        raise in_params(exc) from None


def conversation_body(state: ServerState, info: ConversationInfo, *,
                      messages: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": info.id, "title": info.title, "persona": info.persona,
                            "model": info.model, "system": info.system, "params": info.params,
                            "memory": info.memory,
                            "created_at": info.created_at, "updated_at": info.updated_at,
                            "turns": info.turns, "version": info.version}
    if messages:
        versions = state.store.versions(info.id)
        body["messages"] = [{"id": m.id, "role": m.role, "content": m.content,
                             "status": m.status, "tokens": m.tokens, "usage": m.usage,
                             **({"steps": [s.to_openai() for s in m.steps]} if m.steps else {}),
                             **({"versions": versions[m.id]} if m.id in versions else {})}
                            for m in state.store.messages(info.id)]
    return body


# ----- routes ----------------------------------------------------------------------------------

@router.get("/personas")
def personas() -> dict[str, Any]:
    found, _broken = load_personas()
    default = get_persona(None).name  # what a conversation without one gets
    return {"object": "list",
            "data": [{"name": p.name, "description": p.description, "system": p.system,
                      "params": p.params.explicit(), "default": p.name == default}
                     for p in found.values()]}


@router.post("/conversations", status_code=201)
async def create(body: NewConversation, request: Request) -> dict[str, Any]:
    state = state_of(request)
    system = None if body.system is None else text_of(body.system, "system", "system prompt")
    title = clean_title(text_of(body.title, "title", "title", allow_blank=True))
    owner = owner_of(request)
    async with leased(state, body.model) as lease:
        return await asyncio.to_thread(created, state, lease, body, system, title, owner)


def created(state: ServerState, lease: Lease, body: NewConversation, system: str | None,
            title: str, owner: str | None) -> dict[str, Any]:
    """A new conversation on the leased engine (blocking: counts tokens, writes the store)."""
    window, rest = window_of(state, body.params, body.persona)
    params = GenerationParams.from_mapping(overrides_of(state, rest))
    saved = SavedChat.new(lease.engine, store=state.store, persona=body.persona,
                          system=system, params=params, title=title, owner=owner,
                          window=window)
    if saved.chat.system is not None:
        check_system_fits(state, saved, saved.chat.system)  # the persona's too
    saved.ensure()
    assert saved.cid is not None
    state.chats.put(saved.cid, saved)
    return conversation_body(state, state.store.info(saved.cid))


@router.get("/conversations")
def listing(request: Request, query: Annotated[Listing, Query()]) -> dict[str, Any]:
    state, owner = state_of(request), owner_of(request)
    if query.q is not None:
        return found(state, query.q, owner, query.limit)
    infos = state.store.recent(1000, owner=owner)
    return {"object": "list",
            "data": [conversation_body(state, info, messages=False) for info in infos]}


def found(state: ServerState, q: str, owner: str | None, limit: int) -> dict[str, Any]:
    """``?q=``: the owner's conversations whose messages or title hold every term, grouped in
    the order of their best hit, each with its ``hits`` (message id, role, marked snippet)."""
    conversations: dict[int, dict[str, Any]] = {}
    for hit in state.store.search(q, owner=owner, limit=limit):
        if hit.conversation_id not in conversations:
            try:
                info = state.store.info(hit.conversation_id, damaged_ok=True)
            except RolechatError:  # deleted meanwhile
                continue
            conversations[hit.conversation_id] = {
                **conversation_body(state, info, messages=False), "hits": []}
        conversations[hit.conversation_id]["hits"].append(hit.to_json())
    return {"object": "list", "query": q, "data": list(conversations.values())}


@router.get("/conversations/{cid}")
def get(cid: int, request: Request, response: Response) -> dict[str, Any]:
    state = state_of(request)
    body = conversation_body(state, owned(state, cid, owner_of(request)))
    response.headers["ETag"] = etag(body["version"])
    return body


@router.delete("/conversations/{cid}")
async def delete(cid: int, request: Request) -> dict[str, Any]:
    state, owner = state_of(request), owner_of(request)
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state) as lease, state.lock_of(cid):  # not under a reply being written
        await asyncio.to_thread(owned, state, cid, owner)
        state.chats.pop(cid)
        await asyncio.to_thread(state.store.delete, cid)
        # Its KV state: the sequence, the snapshots in RAM and its files (every model's).
        await asyncio.to_thread(lease.engine.forget, conversation_snapshot(cid))
    return {"id": cid, "deleted": True}


@router.patch("/conversations/{cid}")
async def change(cid: int, body: ConversationChange, request: Request) -> dict[str, Any]:
    """Rename the conversation and/or change its system prompt (the next reply uses it)."""
    state, owner = state_of(request), owner_of(request)
    title = None if body.title is None else text_of(body.title, "title", "title",
                                                    allow_blank=True)
    system = None if body.system is None else text_of(body.system, "system", "system prompt",
                                                      allow_blank=True)
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state), state.lock_of(cid):  # not while a reply is planned or written
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        if body.pins is not None:
            check_pins(saved, body.pins)
        params = None if body.params is None else changed_params(state, saved, body.params)
        if system is not None and system.strip():
            await asyncio.to_thread(check_system_fits, state, saved, system)
        if params is not None:
            await asyncio.to_thread(saved.set_params, params)
        if body.pins is not None:
            await asyncio.to_thread(saved.set_pins, body.pins)
        if body.memory is not None:
            await asyncio.to_thread(saved.set_summarize, summarizes(body.memory))
        if system is not None:
            await asyncio.to_thread(saved.set_system, system if system.strip() else None)
        if title is not None:
            await asyncio.to_thread(state.store.update, cid, title=clean_title(title))
        info = await asyncio.to_thread(owned, state, cid, owner)
    return conversation_body(state, info)


def changed_params(state: ServerState, saved: SavedChat,
                   change: dict[str, Any]) -> GenerationParams:
    """The conversation's own parameters with ``change`` applied (null: unset), checked as a
    message's are (errors name ``params.FIELD``)."""
    own = saved.chat.params.explicit()
    for name, value in change.items():
        if value is None:
            own.pop(name, None)
        else:
            own[name] = value
    persona = saved.chat.persona.params.explicit()
    for name in change:  # an unset persona value is the persona's again
        if change[name] is None and name in persona:
            own[name] = persona[name]
    return GenerationParams.from_mapping(overrides_of(state, own))


@router.get("/conversations/{cid}/params")
async def params(cid: int, request: Request) -> dict[str, Any]:
    """What the next reply uses: the persona, the system prompt and every generation parameter
    with where its value comes from (``you``, ``persona``, ``model``, ``rolechat``)."""
    state, owner = state_of(request), owner_of(request)
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state), state.lock_of(cid):
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        chat = saved.chat
        effective = chat.effective_params()
        sources = chat.params_from(effective)
    values = effective.model_dump(mode="json")
    return {"persona": chat.persona.name, "system": chat.system,
            "params": {name: {"value": values[name], "source": sources[name]}
                       for name in GenerationParams.model_fields}}


@router.post("/conversations/{cid}/prompt")
async def prompt(cid: int, body: PromptRequest, request: Request) -> dict[str, Any]:
    state, owner = state_of(request), owner_of(request)
    next_message = body.content == ""
    text = "" if next_message else text_of(body.content, "content", "content")
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state) as lease, state.lock_of(cid):
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        if next_message:
            plan = await asyncio.to_thread(saved.chat.next_plan)
        else:
            plan = await asyncio.to_thread(saved.plan, text)
        rendered = await asyncio.to_thread(lease.engine.render, plan.messages)
    return {"prompt": rendered, "plan": plan_body(plan), "next_message": next_message}


@router.post("/conversations/{cid}/undo")
async def undo(cid: int, request: Request, body: Undo | None = None) -> dict[str, Any]:
    """Remove the last turn: the one ``turn`` names and/or at the version ``If-Match`` names
    (else 409 and nothing changes); without either, whatever the last turn is."""
    state, owner = state_of(request), owner_of(request)
    named, version = (body or Undo()).turn, if_match(request)
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state), state.lock_of(cid):
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        turn = await asyncio.to_thread(saved.undo, named, version=version)
        info = await asyncio.to_thread(owned, state, cid, owner)
    removed = None if turn is None else {"user": turn.user, "assistant": turn.assistant}
    return {"removed": removed, "conversation": conversation_body(state, info)}


@router.post("/conversations/{cid}/branch")
async def branch(cid: int, body: Switch, request: Request) -> dict[str, Any]:
    """Show another version (branch) of the conversation; what it replaces stays as one. With
    If-Match, only at that version (else 409)."""
    state, owner = state_of(request), owner_of(request)
    version = if_match(request)
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state), state.lock_of(cid):
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        await asyncio.to_thread(set_aside, state, cid)
        await asyncio.to_thread(state.store.switch_branch, cid, body.branch, version=version)
        await asyncio.to_thread(saved.refresh)
        info = await asyncio.to_thread(owned, state, cid, owner)
    return conversation_body(state, info)


@router.post("/conversations/{cid}/redo")
async def redo(cid: int, request: Request) -> dict[str, Any]:
    """Put back the turn the last undo (through this server) removed, as it was, if the
    conversation has not changed since (else 409 and nothing changes)."""
    state, owner = state_of(request), owner_of(request)
    await asyncio.to_thread(owned, state, cid, owner)
    async with leased(state), state.lock_of(cid):
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        turn = await asyncio.to_thread(saved.redo)
        if turn is None:
            raise InvalidInput("There is nothing to redo.",
                               "Redo puts back the turn the last undo removed.")
        info = await asyncio.to_thread(owned, state, cid, owner)
    return {"restored": {"user": turn.user, "assistant": turn.assistant},
            "conversation": conversation_body(state, info)}


@router.post("/conversations/{cid}/messages", response_model=None)
async def message(cid: int, body: NewMessage, request: Request) -> Any:
    state = state_of(request)
    if (body.content is None) == (body.tool_results is None):
        raise InvalidInput("Send either content (a message) or tool_results (the results of "
                           "the calls the last reply made).", "Send one of the two.",
                           field="content")
    overrides = overrides_of(state, body.params)
    shape = {**response_format(body.response_format), "tools": body.tools,
             "tool_choice": body.tool_choice, "parallel_tool_calls": body.parallel_tool_calls}
    Tools.parse(body.tools, body.tool_choice, body.parallel_tool_calls)  # before anything
    if body.tool_results is not None:
        results = [(r.tool_call_id, r.content) for r in body.tool_results]
        return await reply(request, cid, body.stream,
                           lambda saved: saved.answer_tools(results, **shape, **overrides),
                           calls=bool(body.tools), model=body.model, detach=body.detach,
                           kind="tools")
    text = text_of(body.content, "content", "content")
    edit, version = body.edit, if_match(request)

    def start(saved: SavedChat) -> ReplyStream:
        if edit is not None:  # the old version stays as a branch
            edited(state, saved, edit, version)
        return saved.stream(text, pinned=body.pinned, **shape, **overrides)

    return await reply(request, cid, body.stream, start, calls=bool(body.tools),
                       model=body.model, detach=body.detach)


def edited(state: ServerState, saved: SavedChat, message_id: int, version: int | None) -> None:
    """Branch off at user message ``message_id`` (blocking, under the conversation's lock): it
    and what follows stay as a branch, and the chat goes on from the message before it."""
    assert saved.cid is not None
    left = state.store.version_of(saved.cid)
    try:
        state.store.fork(saved.cid, message_id, version=version, role="user")
    except InvalidInput:
        raise InvalidInput(f"Message {message_id} is not a user message this conversation "
                           "shows.", "Edit a user message GET /v1/conversations/{id} lists.",
                           field="edit") from None
    set_aside(state, saved.cid, left)
    saved.refresh()


def set_aside(state: ServerState, cid: int, version: int | None = None) -> None:
    """Keep the warm state of the branch the conversation leaves (an edit, a switch), named
    by the version that showed it (default: the stored one), so that switching back restores
    it (blocking; under the conversation's lock)."""
    if version is None:
        version = state.store.version_of(cid)
    state.engine.set_aside(conversation_snapshot(cid), f"v{version}")


@router.post("/conversations/{cid}/retry", response_model=None)
async def retry(cid: int, body: Retry, request: Request) -> Any:
    overrides = overrides_of(state_of(request), body.params)
    version = if_match(request)
    return await reply(request, cid, body.stream,
                       lambda saved: saved.retry(body.turn, version=version, **overrides),
                       model=body.model, detach=body.detach, kind="retry")


@router.post("/conversations/{cid}/continue", response_model=None)
async def continued(cid: int, body: Retry, request: Request) -> Any:
    """Go on with the last reply where it stopped (cut at ``max_new_tokens``, or stopped: a
    ``turn`` naming the interrupted reply after an interrupted message makes that pair a
    complete turn first): the text added is streamed as ``delta``s and appended to the stored
    reply, which keeps its turn's place (a new id: ``turn``); one that does not complete
    changes nothing more."""
    state = state_of(request)
    overrides = overrides_of(state, body.params)
    version = if_match(request)

    def start(saved: SavedChat) -> ReplyStream:
        if body.turn is not None and saved.cid is not None:  # a stopped reply goes on too
            revived = state.store.revive_stopped(saved.cid, body.turn)
            if revived is not None:
                saved.refresh()
                return saved.continue_reply(body.turn, **overrides)
        return saved.continue_reply(body.turn, version=version, **overrides)

    return await reply(request, cid, body.stream, start, model=body.model, detach=body.detach,
                       kind="continue")


async def reply(request: Request, cid: int, stream: bool,
                start: Callable[[SavedChat], ReplyStream], *, calls: bool = False,
                model: str | None = None, detach: bool = False, kind: str = "message") -> Any:
    """Start a reply on ``model`` (None: the loaded one) under the conversation's lock (errors
    found before generating get their HTTP status), hand it to the worker, and answer with
    JSON or SSE (``calls``: tools were offered, the stream's text goes through a tool-call
    parser). The lease on the engine and the lock are held until the worker is done; until
    then the job is the conversation's ``live`` reply (``detach``: it outlives its client)."""
    state, owner = state_of(request), owner_of(request)
    await asyncio.to_thread(owned, state, cid, owner)
    lease = await take(state, model)
    lock = state.lock_of(cid)
    try:
        await lock.acquire()
    except BaseException:
        lease.release()
        raise
    try:
        saved = await asyncio.to_thread(saved_chat, state, cid, owner)
        replying = await asyncio.to_thread(start, saved)
        handle = replying.handle
        keep = (partial(state.store.save_partial, handle)
                if isinstance(handle, int) and not replying.continues else None)
        job, chunks = await state.worker.submit(lambda: replying, detached=detach, kind=kind,
                                                checkpoint=keep)
    except BaseException:
        lock.release()
        lease.release()
        raise
    state.live[cid] = job
    asyncio.get_running_loop().create_task(release_when_finished(state, cid, lock, job))
    lease.release_after(job)
    events = reply_events(job, chunks)
    if not stream:
        text, done = await joined_unless_gone(request, job, events)
        if done is None:
            raise RolechatError("The reply was interrupted.", "Try again.")
        return JSONResponse(done_body(text, done, lease.model_id),
                            headers={REPLY_HEADER: job.id})
    parser = CallStream(ids=replying.call_ids) if calls else None
    return StreamingResponse(session_stream(events, parser, lease.model_id),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", REPLY_HEADER: job.id})


def delta_event(delta: ContentDelta | CallDelta) -> dict[str, Any]:
    """A parsed piece of a session reply with tools: ``delta`` text or ``tool_calls``."""
    if isinstance(delta, ContentDelta):
        return {"delta": delta.text}
    return delta_body(delta)


async def release_when_finished(state: ServerState, cid: int, lock: asyncio.Lock,
                                job: Job) -> None:
    await job.finished.wait()
    if state.live.get(cid) is job:
        del state.live[cid]
    lock.release()


def done_body(text: str, reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reply.tool_calls:  # the turn waits for their results (tool_results)
        message.update(content=reply.text,
                       tool_calls=[call.to_openai() for call in reply.tool_calls])
    return {"message": message, "turn": reply.turn, "model": model,
            "finish_reason": reply.finish_reason, "usage": usage_body(reply),
            "rolechat": rolechat_body(reply.plan, reply)}


async def session_stream(events: AsyncGenerator[Event | Reply, None],
                         calls: CallStream | None, model: str) -> AsyncIterator[str]:
    """A session reply's events: ``delta`` text, ``waiting`` notices, then ``done`` with the
    whole message and the ``model`` that wrote it. With ``calls`` (tools offered) the text
    outside tool calls comes as ``delta`` and the calls as ``tool_calls`` events in OpenAI's
    delta shape."""
    parts: list[str] = []
    reply: Reply | None = None
    try:
        async for item in events:
            if isinstance(item, Reply):
                reply = item
            elif isinstance(item, Waiting):  # every sequence is busy: how many are ahead
                yield sse({"waiting": {"ahead": item.ahead}})
            elif calls is not None:
                parts.append(item)
                for delta in calls.feed(item):
                    yield sse(delta_event(delta))
            else:
                parts.append(item)
                yield sse({"delta": item})
        for delta in calls.finish() if calls is not None else ():
            yield sse(delta_event(delta))
    except RolechatError as exc:
        yield sse_error(exc)
        return
    except Exception as exc:
        yield sse({"error": {"message": str(exc), "type": "server_error", "param": None,
                             "code": None}})
        return
    finally:
        await events.aclose()  # a client that left stops its generation now
    if reply is not None:
        yield sse({"done": True, **done_body("".join(parts), reply, model)})
        yield DONE
