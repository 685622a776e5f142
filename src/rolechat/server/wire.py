"""Wire formats at the edge: everything OpenAI-shaped the server writes, in one place.

Contract:
- :func:`error_body` / :func:`error_response`: the OpenAI error object
  ``{"error": {"message", "type", "param", "code"}}``; a library error maps to its status and
  code by its class (never by its text).
- :func:`usage_body` (OpenAI ``usage`` with ``prompt_tokens_details.cached_tokens``) and
  :func:`rolechat_body` (rolechat's own extension: the window plan and where reused tokens came
  from).
- :func:`sse`: one Server-Sent Events ``data:`` frame; :data:`DONE` ends a stream.
- Auth parsing: :func:`parse_authorization` reads a request's ``Authorization`` headers once
  (the guard calls it; more than one header is refused); the key it found travels in the ASGI
  scope, where :func:`bearer_key` reads it for the routes, so the key that was checked is the
  key that owns. :func:`owner_id`: the SHA-256 an owner is stored under.
- :class:`Unavailable`: the server cannot answer now but will soon (a model is loading): 503,
  its ``code``, and a ``Retry-After`` header in seconds. A model that fails to load
  (:class:`~rolechat.errors.ModelLoadError`) is 500 ``model_load_failed``.
- A stale action (:class:`~rolechat.errors.ConversationChanged`) is 409
  ``conversation_changed``, its ``param`` the field that named what changed (``turn`` or the
  ``If-Match`` header). A conversation's ``ETag`` is its version in quotes (:func:`etag`);
  :func:`if_match` reads the version a request names (``If-Match: "7"``; ``*`` or none: any).
- :func:`field_path`: a validation error's location as the client's field path
  (``messages[0].content``), the form every error's ``param`` takes.
- :func:`openai_messages` is how OpenAI messages are read (``developer`` is ``system``, system
  messages anywhere join the system prompt, consecutive same-role messages are joined), after
  :func:`check_openai_messages` checked each one where the client put it;
  :func:`openai_names` puts the client's parameter names back into an error.
- :func:`delta_body`: a piece of a reply with tools as OpenAI's streamed ``delta`` (content,
  or a tool call's first piece with its index, id, type and name, then argument fragments).
- :func:`response_format` reads OpenAI's ``response_format`` (``text``, ``json_object``,
  ``json_schema`` with its ``name``, ``schema`` and ``strict``; llama-cpp-python's
  ``json_object`` with a ``schema`` too) into what the chat takes (``schema=`` / ``json=``);
  a bad or unsupported schema is a 400 whose ``param`` is the field that holds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..chat import Reply
from ..conversation import check_text
from ..errors import (
    ContextOverflow,
    ConversationChanged,
    InvalidInput,
    InvalidParams,
    ModelLoadError,
    RolechatError,
    UnknownName,
)
from ..schemas import check_schema
from ..toolcalls import CallDelta, ContentDelta
from ..window import WindowPlan

#: The last frame of every stream.
DONE = "data: [DONE]\n\n"
#: GenerationParams names → the OpenAI names a client sent.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}
#: Where the guard leaves the bearer key it checked, for the routes (an ASGI scope key).
API_KEY_SCOPE = "rolechat.api_key"
#: OpenAI's limit on stop sequences, for completions and sessions alike.
MAX_STOPS = 4


def delta_body(delta: ContentDelta | CallDelta) -> dict[str, Any]:
    """One parsed piece of a reply with tools as OpenAI's ``delta``."""
    if isinstance(delta, ContentDelta):
        return {"content": delta.text}
    call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id is not None:
        call.update(id=delta.id, type="function")
        call["function"]["name"] = delta.name
    return {"tool_calls": [call]}


def response_format(value: Any, field: str = "response_format") -> dict[str, Any]:
    """The keyword arguments of ``Chat.stream`` for a request's ``response_format``."""
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    hint = ('Send {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, '
            '{"type": "json_object"} or {"type": "text"}.')
    if kind == "text":
        return {}
    if kind == "json_object":
        schema = value.get("schema")
        if schema is None:
            return {"json": True}
        return {"schema": check_schema(schema, field=f"{field}.schema")}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidInput(f"{field}.json_schema must be an object holding the schema.",
                               hint, field=f"{field}.json_schema")
        if "schema" not in spec:
            raise InvalidInput(f"{field}.json_schema has no schema.", hint,
                               field=f"{field}.json_schema.schema")
        return {"schema": check_schema(spec["schema"], field=f"{field}.json_schema.schema")}
    raise InvalidInput(f"{field}.type must be text, json_object or json_schema, got {kind!r}.",
                       hint, field=f"{field}.type")


class Unavailable(RolechatError):
    """Not now, soon: 503 with ``code`` (``model_loading``...) and ``Retry-After``."""

    def __init__(self, message: str, hint: str, *, code: str, retry_after: int,
                 param: str | None = "model") -> None:
        super().__init__(message, hint)
        self.code, self.retry_after, self.param = code, max(1, retry_after), param


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def field_path(loc: Sequence[str | int]) -> str:
    """``("messages", 0, "content")`` → ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def error_status(exc: RolechatError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of a library error."""
    if isinstance(exc, ContextOverflow):
        return 400, error_body(overflow_message(exc), param="messages",
                               code="context_length_exceeded")
    if isinstance(exc, InvalidParams):
        field = exc.problems[0][0] if exc.problems else None
        return 400, error_body(str(exc), param=OPENAI_NAMES.get(field or "", field),
                               code="invalid_value")
    if isinstance(exc, InvalidInput):
        return 400, error_body(str(exc), param=exc.field or "messages", code="invalid_value")
    if isinstance(exc, UnknownName):
        return 404, error_body(str(exc), param=exc.kind, code=f"{exc.kind}_not_found")
    if isinstance(exc, ModelLoadError):  # a model asked for by name did not load
        return 500, error_body(str(exc), type_="server_error", param="model",
                               code="model_load_failed")
    if isinstance(exc, Unavailable):
        return 503, error_body(str(exc), type_="server_error", param=exc.param, code=exc.code)
    if isinstance(exc, ConversationChanged):
        return 409, error_body(changed_message(exc), code="conversation_changed",
                               param="If-Match" if exc.version not in (None, exc.current)
                               else "turn")
    return 500, error_body(str(exc), type_="server_error")


def overflow_message(exc: ContextOverflow) -> str:
    """A prompt that does not fit, said as the API numbers turns (from 0)."""
    if not exc.pinned:
        return str(exc)
    names = ", ".join(str(p) for p in exc.pinned)
    return (f"The prompt needs {exc.prompt_tokens} tokens with the pinned turn(s) {names}, but "
            f"only {exc.available_tokens} are available (context length {exc.context_length} - "
            f"max_new_tokens {exc.max_new_tokens}). Unpin a turn (PATCH the conversation's "
            "pins), shorten the message, or lower max_new_tokens.")


def changed_message(exc: ConversationChanged) -> str:
    """A stale action, said as the API names things."""
    return (f"{exc.message} Load it again (GET /v1/conversations/{exc.cid}: each message's id, "
            "and its version, also the ETag) and send the id of the last reply you show as "
            "\"turn\".")


def etag(version: int) -> str:
    """A conversation's ETag: its version, in quotes."""
    return f'"{version}"'


def if_match(request: Request) -> int | None:
    """The version a request's ``If-Match`` header names (None: no header, or ``*``)."""
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    text = header.strip()
    text = text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
    if not text.isdigit() or len(text) > 18:
        raise InvalidInput(f"If-Match must be a conversation's ETag, its version in quotes "
                           f"(such as \"7\"), got {header[:40]!r}.",
                           "Send the ETag of GET /v1/conversations/{id}, or leave If-Match out.",
                           field="If-Match")
    return int(text)


def check_stops(stop: Any, param: str = "stop") -> None:
    """At most :data:`MAX_STOPS` stop sequences (OpenAI's rule, for every route)."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, (list, tuple)) else []
    if len(stops) > MAX_STOPS:
        raise InvalidInput(f"{param}: at most {MAX_STOPS} stop sequences (got {len(stops)}).",
                           f"Send {MAX_STOPS} or fewer.", field=param)


class ErrorJSON(JSONResponse):
    """JSON in ASCII, so an error that quotes any text (even text that is not valid UTF-8)
    always renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(exc: RolechatError) -> JSONResponse:
    status, body = error_status(exc)
    headers = ({"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable)
               else None)
    return ErrorJSON(body, status_code=status, headers=headers)


def openai_names(exc: InvalidParams) -> InvalidParams:
    """The same error with the parameter names an OpenAI client sent."""
    renamed = [(OPENAI_NAMES.get(field, field), why.replace("max_new_tokens", "max_tokens"))
               for field, why in exc.problems]
    return InvalidParams(renamed)


#: The roles a client may send (``developer`` is read as ``system``).
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_openai_messages(messages: Any) -> None:
    """Each message as the client sent it (before :func:`openai_messages` merges any): an
    object with a known role and text content; an error's field is the path to the bad part
    (``messages[2].content``)."""
    if not isinstance(messages, list):
        return  # Conversation.from_openai says what messages must be
    for index, item in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be an object with role and content.",
                               'Use {"role": "user", "content": "..."}.', field=where)
        role = item.get("role")
        if role not in OPENAI_ROLES:
            raise InvalidInput(f"{where} has unknown role {role!r}.",
                               f"Use one of: {', '.join(OPENAI_ROLES)}.", field=f"{where}.role")
        content = item.get("content")
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise InvalidInput(f"{where}.content[{part_index}]: only text content "
                                       "parts are supported.",
                                       'Use {"type": "text", "text": "..."} parts.',
                                       field=f"{where}.content[{part_index}]")
            content = "".join(part["text"] for part in content)
        if content is None and role == "assistant" and item.get("tool_calls"):
            continue  # a reply that only calls tools
        try:
            check_text(content, f"{role} message ({where})",
                       allow_blank=role in ("assistant", "tool"))
        except InvalidInput as exc:
            raise InvalidInput(exc.message, exc.hint, field=f"{where}.content") from None


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
                                                                          str) and \
                not merged[-1].get("tool_calls") and not item.get("tool_calls"):
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


class DuplicateAuthorization(ValueError):
    """A request with more than one ``Authorization`` header (which one would count?)."""


def parse_authorization(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The key in a request's one ``Authorization: Bearer KEY`` header ('' when there is none
    or it is not a bearer key). Raises :class:`DuplicateAuthorization` for two or more."""
    found = [value for name, value in headers if name.lower() == b"authorization"]
    if len(found) > 1:
        raise DuplicateAuthorization(len(found))
    header = found[0].decode("latin-1") if found else ""
    return header[7:] if header[:7].lower() == "bearer " else ""


def bearer_key(request: Request) -> str:
    """The bearer key the guard checked for this request ('' when there is none)."""
    key = request.scope.get(API_KEY_SCOPE)
    if key is None:  # no guard in front (an app assembled without it): parse it here
        key = parse_authorization(request.scope.get("headers", []))
    return str(key)


def owner_id(key: str) -> str:
    """How a conversation's owner (an API key) is stored: its SHA-256, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()
