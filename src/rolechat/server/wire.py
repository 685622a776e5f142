"""Wire formats at the edge: everything OpenAI-shaped the server writes, in one place.

Contract:
- :func:`error_body` / :func:`error_response`: the OpenAI error object
  ``{"error": {"message", "type", "param", "code"}}``; a library error maps to its status and
  code by its class (never by its text).
- :func:`usage_body` (OpenAI ``usage`` with ``prompt_tokens_details.cached_tokens``) and
  :func:`rolechat_body` (rolechat's own extension: the window plan and where reused tokens came
  from).
- :func:`sse`: one Server-Sent Events ``data:`` frame; :data:`DONE` ends a stream.
- :func:`bearer_key`: the key of an ``Authorization: Bearer KEY`` header; :func:`owner_id`: the
  SHA-256 an owner is stored under.
- :func:`openai_messages` is how OpenAI messages are read (``developer`` is ``system``, system
  messages anywhere join the system prompt, consecutive same-role messages are joined);
  :func:`openai_names` puts the client's parameter names back into an error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..chat import Reply
from ..errors import ContextOverflow, InvalidInput, InvalidParams, RolechatError, UnknownName
from ..window import WindowPlan

#: The last frame of every stream.
DONE = "data: [DONE]\n\n"
#: GenerationParams names → the OpenAI names a client sent.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_status(exc: RolechatError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of a library error."""
    if isinstance(exc, ContextOverflow):
        return 400, error_body(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidParams):
        field = exc.problems[0][0] if exc.problems else None
        return 400, error_body(str(exc), param=OPENAI_NAMES.get(field or "", field),
                               code="invalid_value")
    if isinstance(exc, InvalidInput):
        return 400, error_body(str(exc), param=exc.field or "messages", code="invalid_value")
    if isinstance(exc, UnknownName):
        return 404, error_body(str(exc), param=exc.kind, code=f"{exc.kind}_not_found")
    return 500, error_body(str(exc), type_="server_error")


class ErrorJSON(JSONResponse):
    """JSON in ASCII, so an error that quotes any text (even text that is not valid UTF-8)
    always renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(exc: RolechatError) -> JSONResponse:
    status, body = error_status(exc)
    return ErrorJSON(body, status_code=status)


def openai_names(exc: InvalidParams) -> InvalidParams:
    """The same error with the parameter names an OpenAI client sent."""
    renamed = [(OPENAI_NAMES.get(field, field), why.replace("max_new_tokens", "max_tokens"))
               for field, why in exc.problems]
    return InvalidParams(renamed)


def openai_messages(messages: Any) -> Any:
    """OpenAI messages the way rolechat reads them (a documented policy): ``developer`` is
    ``system``; every system message, wherever it is, joins the one system prompt (in order,
    blank line between); consecutive messages of the same role are joined the same way. Other
    shapes are left for :class:`~rolechat.conversation.Conversation` to refuse with a clear
    error."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return messages
    system: list[Any] = []
    merged: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message.get("role") == "developer" else message.get("role")
        item = {**message, "role": role}
        if role == "system":
            system.append(item)
        elif merged and merged[-1].get("role") == role and role in ("user", "assistant") and \
                isinstance(merged[-1].get("content"), str) and isinstance(item.get("content"),
                                                                          str):
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" +
                          item["content"]}
        else:
            merged.append(item)
    if len(system) > 1 and all(isinstance(m.get("content"), str) for m in system):
        system = [{"role": "system", "content": "\n\n".join(m["content"] for m in system)}]
    return system + merged


def usage_body(reply: Reply) -> dict[str, Any]:
    usage = reply.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def plan_body(plan: WindowPlan) -> dict[str, Any]:
    """The window's plan: which turns the prompt keeps and drops, and its token count."""
    body = {"dropped_turns": plan.dropped, "kept_turns": plan.kept,
            "prompt_tokens": plan.prompt_tokens, "budget": plan.budget,
            "context_length": plan.context_length, "max_new_tokens": plan.max_new_tokens}
    if plan.estimated:
        body["estimated"] = True
    body["pinned_turns"] = list(plan.pinned)
    if plan.memory_summary is not None or plan.summarize or plan.memory_note:
        usage = plan.summary_usage
        body["memory"] = {"summary": plan.memory_summary, "summarized_turns": list(
            plan.summarized), "summarize_turns": list(plan.summarize), "note": plan.memory_note,
            "usage": usage.to_dict() if usage is not None else None}
    return body


def rolechat_body(plan: WindowPlan, reply: Reply | None = None) -> dict[str, Any]:
    """rolechat's extension of a response: the plan, and the reply's speed and KV reuse."""
    body = plan_body(plan)
    if reply is not None:
        usage = reply.usage
        body.update(ttft_s=usage.ttft_s, tokens_per_s=usage.tokens_per_s,
                    kv_source=usage.kv_source, restored_tokens=usage.restored_tokens)
        if reply.params is not None and reply.params_from is not None:
            # The parameters the reply used, and where each came from (you, the persona, the
            # model's generation config, rolechat's default).
            body["params"] = {name: {"value": getattr(reply.params, name), "from": source}
                              for name, source in reply.params_from.items()}
    return body


def sse(data: dict[str, Any]) -> str:
    """One Server-Sent Events frame."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(exc: RolechatError) -> str:
    """A library error as the last frame of a stream."""
    return sse(error_status(exc)[1])


def bearer_key(request: Request) -> str:
    """The key in ``Authorization: Bearer KEY`` ('' when there is none)."""
    header = request.headers.get("authorization", "")
    return header[7:] if header[:7].lower() == "bearer " else ""


def owner_id(key: str) -> str:
    """How a conversation's owner (an API key) is stored: its SHA-256, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()
