"""The OpenAI-compatible routes: ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /v1/status``.

Contract:
- ``/v1/chat/completions`` takes the OpenAI request (:class:`ChatRequest`, OpenAI's types and
  ranges); it uses exactly the request's messages and parameters — no persona file applies
  unless the request names one (``"rolechat": {"persona": "expert"}``). Fields rolechat does
  not act on are accepted when neutral (penalties are real; ``n`` 1 or null, ``logprobs``
  false, ``tools`` empty, ``response_format`` text, ``metadata``, ``store``,
  ``service_tier``, ``user``, ``prompt_cache_key``, ``prompt_cache_retention``,
  ``safety_identifier`` are ignored, and so are ``reasoning_effort`` and ``verbosity``: the
  models rolechat serves do not reason) and refused with a 400 naming the field otherwise.
  Messages are checked where the client put them, then read by
  :func:`~rolechat.server.wire.openai_messages`. Errors name the parameters as the client did
  (``max_tokens``, ``messages[0].content``). Streaming sends OpenAI chunks (with
  ``stream_options.include_usage``); the non-streaming response is a join over the same
  events. A prompt that does not fit gets ``context_length_exceeded``, unless the request opts
  in to the window (``"rolechat": {"window": true}``): then whole turns are dropped, oldest
  first, and the response says which.
- ``/v1/models`` lists the models the server can serve, the loaded one first (``loaded``:
  true), each with its facts (``context_length``, ``size``, ``quantization``, ``architecture``,
  ``source``, ``location``...; :func:`~rolechat.server.switch.model_body`);
  ``/v1/models/{id}`` is any of them (another id: 404 ``model_not_found`` naming them). A
  request's ``model`` may name any of them: the server switches to it first
  (:mod:`rolechat.server.switch`: one model loaded at a time; during a switch other requests
  get 503 ``model_loading`` with ``Retry-After``). A response's ``model`` is the model that
  wrote it. ``/v1/status`` shows the model, the switch under way if any, the engine and what
  it keeps warm (live KV cache, snapshots in memory and on disk).
- Handlers are module-level functions over the app's :class:`~rolechat.server.state.ServerState`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..chat import Chat, Reply, ReplyStream
from ..conversation import Conversation, Message
from ..engines.base import Waiting
from ..errors import ContextOverflow, InvalidInput, InvalidParams, RolechatError
from ..params import GenerationParams
from ..persona import Persona, get_persona
from ..toolcalls import CallStream, Tools
from ..window import Window
from .state import ServerState, state_of
from .switch import choices, find, leased, model_body, status_body, take
from .wire import (
    DONE,
    check_openai_messages,
    check_stops,
    delta_body,
    openai_messages,
    openai_names,
    response_format,
    rolechat_body,
    sse,
    sse_error,
    usage_body,
)
from .worker import Event, joined_unless_gone, reply_events

router = APIRouter(prefix="/v1")

#: A stateless request's role when it names no persona: nothing but its own messages.
NO_PERSONA = Persona("none", "", "Only what the request says.")


class RolechatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: Drop the oldest whole turns when the conversation does not fit (instead of an error).
    window: bool = False
    #: A persona whose parameters (and system prompt, if the messages have none) apply.
    persona: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    #: Random padding against length side channels; rolechat's streams carry none.
    include_obfuscation: bool | None = None


class ChatRequest(BaseModel):
    """The OpenAI chat-completions body, with OpenAI's types and ranges (strict: ``"0.5"`` is
    not a number). Fields rolechat does not act on are accepted when their value asks for
    nothing (see :meth:`check_neutral`) and refused with a clear error otherwise."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    messages: list[Any]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = None
    n: int | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = None
    # For reasoning models; the models rolechat serves do not reason, so they change nothing:
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    # Accepted when they ask for nothing rolechat would have to do:
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    rolechat: RolechatOptions = Field(default_factory=RolechatOptions)

    def check_neutral(self) -> None:
        """Refuse, naming the field, what asks for something rolechat does not do."""
        refused: list[tuple[str, str]] = []
        if self.n not in (None, 1):
            refused.append(("n", "only one choice per request (n = 1)"))
        if self.logprobs or self.top_logprobs:
            refused.append(("logprobs", "log probabilities are not returned"))
        if self.logit_bias:
            refused.append(("logit_bias", "logit biases are not supported"))
        if self.modalities is not None and set(self.modalities) - {"text"}:
            refused.append(("modalities", "only text"))
        if refused:
            field, why = refused[0]
            raise InvalidInput(f"{field}: {why}; rolechat cannot do that.",
                               f"Leave {field} out (or at its default).", field=field)
        check_stops(self.stop)

    def params(self) -> GenerationParams:
        try:
            return GenerationParams.from_mapping({
                "max_new_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": self.stop,
                "repetition_penalty": self.repetition_penalty,
                "frequency_penalty": self.frequency_penalty,
                "presence_penalty": self.presence_penalty})
        except InvalidParams as exc:
            raise openai_names(exc) from None


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = state_of(request)
    listed = await asyncio.to_thread(choices, state)
    return {"object": "list", "data": [model_body(state, choice) for choice in listed]}


@router.get("/models/{model:path}")
async def model(model: str, request: Request) -> dict[str, Any]:
    """A model ``/v1/models`` lists, by its id (or another of its names)."""
    state = state_of(request)
    return model_body(state, await asyncio.to_thread(find, state, model))


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """The model (and the switch under way, if any); the engine's sequences (which
    conversation each holds, its tokens, its state: free, idle, queued, prompt or decode) and
    its queue; and what is kept warm: snapshots in RAM and on disk (counts, bytes, budgets,
    hits, evictions). During a switch the engine's part is null."""
    state = state_of(request)
    engine = stats = None
    if state.models.loading is None and not state.models.empty:
        async with leased(state) as lease:
            engine = lease.engine.describe()
            stats = await asyncio.to_thread(lease.engine.kv_stats)
    scheduler = kv = None
    if stats is not None:
        kv = {"ram": stats.pop("ram"), "disk": stats.pop("disk")}
        scheduler = stats
    return {"object": "status", "model": state.model_id, "models": status_body(state),
            "engine": engine, "jobs": state.worker.stats(), "scheduler": scheduler,
            "kv_cache": kv}


def start(state: ServerState, body: ChatRequest) -> tuple[ReplyStream, Chat]:
    """Validate, plan and start the reply (blocking work: tokenization), before anything is
    generated: every error here gets its HTTP status. The caller holds a lease on the
    engine."""
    engine = state.engine
    body.check_neutral()
    check_openai_messages(body.messages)
    conversation = Conversation.from_openai(openai_messages(body.messages))
    opened = conversation.pop_open()
    if opened is None:
        raise InvalidInput("The last message must be a user message (or the results of the "
                           "tools the last reply called).",
                           "End messages with {\"role\": \"user\", ...}.", field="messages")
    text, steps = opened
    persona = NO_PERSONA if body.rolechat.persona is None else get_persona(body.rolechat.persona)
    if conversation.system is None and persona.system:
        conversation.system = persona.system
    # The server is stateless: drop no more than needed (no low-water mark).
    chat = Chat(engine, persona=persona, params=body.params(), conversation=conversation,
                window=Window(low_water=1.0))
    shape = response_format(body.response_format)
    # "none" and "auto" without tools ask for nothing (clients send them): left out.
    choice = None if not body.tools and body.tool_choice in ("none", "auto") else \
        body.tool_choice
    tools = Tools.parse(body.tools, choice, body.parallel_tool_calls)
    offered = tools.offered() if tools is not None else []
    try:
        plan = chat.plan(text, steps=steps, tools=offered)
    except InvalidParams as exc:
        raise openai_names(exc) from None
    if plan.dropped and not body.rolechat.window:
        everything = [*conversation.prompt_messages(text), *steps]
        if offered:
            system = conversation.system or ""
            everything = [Message("system", system, tools=tuple(offered)),
                          *everything[1 if conversation.system is not None else 0:]]
        full = engine.count_tokens(everything)
        raise ContextOverflow(prompt_tokens=full, available_tokens=plan.budget,
                              context_length=engine.context_length,
                              max_new_tokens=chat.params.max_new_tokens)
    return chat.stream(text, tools=body.tools, tool_choice=choice,
                       parallel_tool_calls=body.parallel_tool_calls, steps=steps,
                       **shape), chat


@router.post("/chat/completions", response_model=None)
async def completions(body: ChatRequest, request: Request) -> Any:
    state = state_of(request)
    lease = await take(state, body.model)
    try:
        stream, _ = await asyncio.to_thread(start, state, body)
        job, chunks = await state.worker.submit(lambda: stream)
    except BaseException:
        lease.release()
        raise
    lease.release_after(job)
    events = reply_events(job, chunks)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "created": created, "model": lease.model_id}
    if not body.stream:
        text, reply = await joined_unless_gone(request, job, events)
        if reply is None:
            raise RolechatError("The reply was interrupted.", "Try again.")
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if body.tools:  # the text without its call blocks, and the calls
            message["content"] = reply.text or (None if reply.tool_calls else "")
            if reply.tool_calls:
                message["tool_calls"] = [call.to_openai() for call in reply.tool_calls]
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                             "message": message}],
                "usage": usage_body(reply), "rolechat": rolechat_body(reply.plan, reply)}
    usage = body.stream_options is not None and body.stream_options.include_usage
    calls = CallStream(ids=stream.call_ids) if body.tools else None
    return StreamingResponse(openai_stream(head, events, usage, calls),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def openai_stream(head: dict[str, Any], events: AsyncGenerator[Event | Reply, None],
                        include_usage: bool, calls: CallStream | None = None
                        ) -> AsyncIterator[str]:
    """The events of one reply as OpenAI ``chat.completion.chunk`` frames. While the reply
    waits for the engine, SSE comments say how many requests are ahead (``: waiting, 2
    ahead``): clients show them or skip them, as SSE says. With ``calls`` (the request offered
    tools) the text goes through it: content deltas, and each tool call as OpenAI streams one
    (its index, id, type and name first, then fragments of its arguments)."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return sse({**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    reply: Reply | None = None
    try:
        async for item in events:
            if isinstance(item, Reply):
                reply = item
            elif isinstance(item, Waiting):
                yield f": waiting, {item.ahead} ahead\n\n"
            elif calls is None:
                yield chunk({"content": item})
            else:
                for delta in calls.feed(item):
                    yield chunk(delta_body(delta))
    except RolechatError as exc:
        yield sse_error(exc)
        return
    finally:
        await events.aclose()  # a client that left stops its generation now
    if reply is None:
        return
    finish = reply.finish_reason
    if calls is not None:
        for delta in calls.finish():
            yield chunk(delta_body(delta))
        if calls.calls and finish == "stop":
            finish = "tool_calls"
    yield chunk({}, finish, rolechat=rolechat_body(reply.plan, reply))
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                   "usage": usage_body(reply)})
    yield DONE
