"""Tool calls: OpenAI's ``tools`` checked, the generic prompt format, and replies parsed.

Contract:
- :meth:`Tools.parse` checks a request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``
  as OpenAI does; every problem is an :class:`~rolechat.errors.InvalidInput` whose ``field``
  is the request path (``tools[0].function.name``, ``tool_choice``). No tools: ``None``.
  :meth:`Tools.offered` are the tools a prompt names (none for ``"none"``, the forced one
  alone), in one normalised shape: ``{"type": "function", "function": {"name",
  "description"?, "parameters", "strict"?}}``.
- The *generic format*, for chat templates that know nothing of tools, is the text Qwen2.5's
  template writes, as plain messages: :func:`generic_system` appends Qwen2.5's tools section
  (one ``tojson`` line per tool) to the system prompt; :func:`generic_messages` writes an
  assistant's calls into its content as ``<tool_call>`` blocks and tool results as a user
  message of ``<tool_response>`` blocks (consecutive results in one message). Rendered by plain
  ChatML, that is byte for byte what Qwen2.5's template renders, but for Qwen's default
  persona: without a system prompt the generic format has only the tools section.
- Models reply in both cases with ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`` blocks. :meth:`Tools.grammar` constrains that reply (lazily for ``"auto"``:
  free text until ``<tool_call>``); name before arguments, arguments valid under the named
  tool's schema. :class:`CallStream` parses a reply as it streams, in OpenAI's delta shape,
  and :func:`parse_reply` is the same parser over a finished reply, so both always agree.
- A call's ``arguments`` is the object's text as the model wrote it (what streamed); a call
  whose arguments began streaming stands even if the block is then cut off (``max_new_tokens``,
  as OpenAI's ``finish_reason: "length"``); any other block that is not a call stays content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .conversation import _content_of
from .errors import InvalidInput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
#: The lazy grammar's trigger: the grammar takes over at the first ``<tool_call>``.
TRIGGER = r"[\s\S]*?(<tool_call>)[\s\S]*"
CHOICES = ("none", "auto", "required")
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n"
              "<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name "
              "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_NAME_HINT = "Use 1 to 64 letters, digits, underscores or dashes."
_ID_CHARS = string.ascii_letters + string.digits
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
#: A block's start up to its arguments' opening brace: the call is known from here on.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\<]{1,200})"\s*,\s*"arguments"\s*:\s*\{')


def new_call_id() -> str:
    """``call_`` and 24 random letters and digits, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


class CallIds:
    """The ids of one reply's calls by index, each made once (:func:`new_call_id`): the reply
    parsed as it streams and parsed whole names its calls alike."""

    def __init__(self) -> None:
        self._made: list[str] = []

    def __call__(self, index: int) -> str:
        while len(self._made) <= index:
            self._made.append(new_call_id())
        return self._made[index]


def _invalid(message: str, hint: str, where: str) -> InvalidInput:
    return InvalidInput(message, hint, field=where)


def _loads(text: str) -> Any:
    """The JSON value of ``text``, None if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool: ``arguments`` is JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def from_openai(cls, item: Any, where: str) -> ToolCall:
        """An item of an assistant message's ``tool_calls``. ``arguments`` may be JSON text
        (OpenAI) or an object (transformers' style); a missing ``id`` gets a new one."""
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object, got {type(item).__name__}.",
                           'Use {"id": ..., "type": "function", "function": {"name": ..., '
                           '"arguments": "{...}"}}.', where)
        call_id = item.get("id", new_call_id())
        if not isinstance(call_id, str) or not call_id:
            raise _invalid(f"{where}.id must be a non-empty string.", "Send the call's id.",
                           f"{where}.id")
        if item.get("type", "function") != "function":
            raise _invalid(f"{where}.type must be \"function\", got {item.get('type')!r}.",
                           "Only function calls are supported.", f"{where}.type")
        function = item.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{where}.function is missing or not an object.",
                           'Use {"name": ..., "arguments": "{...}"}.', f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid(f"{where}.function.name must be a non-empty string.",
                           "Name the function that was called.", f"{where}.function.name")
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str) or not isinstance(_loads(arguments), dict):
            raise _invalid(f"{where}.function.arguments must be a JSON object's text.",
                           'Send the arguments as JSON text, e.g. "{\\"city\\": \\"Paris\\"}".',
                           f"{where}.function.arguments")
        return cls(call_id, name, arguments)


def _function(tool: Any, where: str) -> dict[str, Any]:
    """One item of ``tools``, checked and normalised."""
    from .schemas import check_schema

    shape = 'Use {"type": "function", "function": {"name": ..., "parameters": {...}}}.'
    if not isinstance(tool, dict):
        raise _invalid(f"{where} must be an object, got {type(tool).__name__}.", shape, where)
    if tool.get("type") != "function":
        raise _invalid(f"{where}.type must be \"function\", got {tool.get('type')!r}.",
                       "Only function tools are supported.", f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _invalid(f"{where}.function is missing or not an object.", shape,
                       f"{where}.function")
    for key in function:
        if key not in _FUNCTION_KEYS:
            raise _invalid(f"{where}.function has an unknown field {key!r}.",
                           f"Valid fields: {', '.join(_FUNCTION_KEYS)}.", f"{where}.function.{key}")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        what = "is missing" if name is None else f"{name!r} is not a valid function name"
        raise _invalid(f"{where}.function.name {what}.", _NAME_HINT, f"{where}.function.name")
    for key, kind, what in (("description", str, "a string"), ("strict", bool, "a boolean")):
        if key in function and not isinstance(function[key], kind):
            raise _invalid(f"{where}.function.{key} must be {what}.", f"Send {what}, or leave "
                           "it out.", f"{where}.function.{key}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise _invalid(f"{where}.function.parameters must be a JSON Schema of an object.",
                       'Use {"type": "object", "properties": {...}}.',
                       f"{where}.function.parameters")
    checked = {**function, "parameters": check_schema(parameters,
                                                      field=f"{where}.function.parameters")}
    out = {key: checked[key] for key in _FUNCTION_KEYS if key in checked}
    return {"type": "function", "function": out}


@dataclass(frozen=True)
class Tools:
    """A request's tools, checked. ``choice`` is ``"none"``, ``"auto"``, ``"required"`` or, with
    ``forced``, the name of the one function the reply must call."""

    functions: tuple[dict[str, Any], ...]
    choice: str = "auto"
    parallel: bool = True
    forced: bool = False

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any = None,
              parallel_tool_calls: Any = None) -> Tools | None:
        """The request's fields checked; ``None`` when it has no tools (``tools`` absent or
        empty). ``tool_choice`` defaults to ``"auto"``, ``parallel_tool_calls`` to true."""
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise _invalid(f"parallel_tool_calls must be true or false, got "
                           f"{parallel_tool_calls!r}.", "Send a boolean, or leave it out.",
                           "parallel_tool_calls")
        if tools is None or tools == []:
            if tool_choice is not None:
                raise _invalid("tool_choice is only allowed when tools are given.",
                               "Send tools, or leave tool_choice out.", "tool_choice")
            return None
        if not isinstance(tools, list):
            raise _invalid(f"tools must be a list, got {type(tools).__name__}.",
                           'Send [{"type": "function", "function": {...}}, ...].', "tools")
        functions = tuple(_function(tool, f"tools[{i}]") for i, tool in enumerate(tools))
        names = [f["function"]["name"] for f in functions]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _invalid(f"tools[{i}].function.name {name!r} is already the name of "
                               f"tools[{names.index(name)}].", "Give every tool its own name.",
                               f"tools[{i}].function.name")
        forced = isinstance(tool_choice, dict)
        if tool_choice is None:
            choice = "auto"
        elif tool_choice in CHOICES:
            choice = tool_choice
        elif (forced and tool_choice.get("type") == "function"
              and isinstance(tool_choice.get("function"), dict)
              and tool_choice["function"].get("name") in names):
            choice = tool_choice["function"]["name"]
        else:
            raise _invalid(f"tool_choice {tool_choice!r} is not valid.",
                           f"Use \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                           f"\"function\": {{\"name\": N}}}} with N one of: {', '.join(names)}.",
                           "tool_choice")
        return cls(functions, choice, parallel_tool_calls is not False, forced)

    def offered(self) -> list[dict[str, Any]]:
        """The tools the model is told about: none for ``"none"``, the forced one alone."""
        if self.choice == "none" and not self.forced:
            return []
        if self.forced:
            return [f for f in self.functions if f["function"]["name"] == self.choice]
        return list(self.functions)

    def grammar(self) -> tuple[str, tuple[str, ...]] | None:
        """``(GBNF, lazy triggers)`` for the reply: ``<tool_call>`` blocks, one or (with
        ``parallel``) several on their own lines, each ``{"name": "N", "arguments": A}`` with A
        valid under N's parameters. Lazy (free text first) for ``"auto"``, strict from the
        first token for ``"required"`` and a forced function; ``None`` for ``"none"``."""
        offered = self.offered()
        if not offered:
            return None
        from .schemas import rule_grammar

        rules, calls = [], []
        for i, tool in enumerate(offered):
            function = tool["function"]
            head = json.dumps(f'{{"name": "{function["name"]}", "arguments": ')
            schema = {"type": "object", **function["parameters"]}  # an object, never "any"
            rules.append(f'tool-call-{i} ::= {head} tool-{i}-arguments "}}"')
            rules.append(rule_grammar(schema, f"tool-{i}-arguments").strip())
            calls.append(f"tool-call-{i}")
        root = 'root ::= tool-block ("\\n" tool-block)*' if self.parallel else \
            "root ::= tool-block"
        block = f'tool-block ::= "<tool_call>\\n" ({" | ".join(calls)}) "\\n</tool_call>"'
        lazy = self.choice == "auto" and not self.forced
        return "\n".join([root, block, *rules]) + "\n", (TRIGGER,) if lazy else ()


def generic_system(system: str | None, tools: Sequence[dict[str, Any]]) -> str:
    """The system prompt with Qwen2.5's tools section after it (alone without a prompt)."""
    if not tools:
        return system or ""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (system + "\n\n" if system else "") + TOOLS_HEAD + lines + TOOLS_TAIL


def call_block(name: str, arguments: str) -> str:
    """One call as Qwen2.5's template writes it (the arguments through ``tojson``)."""
    args = json.dumps(json.loads(arguments), ensure_ascii=False)
    return f'{OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{CLOSE}'


def generic_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages (assistant ``tool_calls``, ``tool`` results) as plain ``{"role",
    "content"}`` messages in Qwen2.5's layout, for a template without tool support."""
    out: list[dict[str, str]] = []
    last_tool = False
    for index, item in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object with role and content.",
                           'Use {"role": "user", "content": "..."}.', where)
        role, text = item.get("role"), _content_of(item, where)
        if not isinstance(text, str | None):
            raise _invalid(f"{where}.content must be a string, got {type(text).__name__}.",
                           "Send text content.", f"{where}.content")
        text = text or ""
        if role == "tool":
            response = f"<tool_response>\n{text}\n</tool_response>"
            if last_tool:
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
        elif role == "assistant" and item.get("tool_calls"):
            raw = item["tool_calls"]
            if not isinstance(raw, list):
                raise _invalid(f"{where}.tool_calls must be a list.", "Send a list of calls.",
                               f"{where}.tool_calls")
            calls = [ToolCall.from_openai(c, f"{where}.tool_calls[{i}]")
                     for i, c in enumerate(raw)]
            parts = ([text] if text else []) + [call_block(c.name, c.arguments) for c in calls]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": str(role), "content": text})
        last_tool = role == "tool"
    return out


@dataclass(frozen=True)
class ContentDelta:
    """Reply text outside tool calls."""

    text: str


@dataclass(frozen=True)
class CallDelta:
    """A piece of tool call ``index``: the first carries ``id`` and ``name``, the rest (``id``
    and ``name`` None) the next fragment of ``arguments``."""

    index: int
    id: str | None
    name: str | None
    arguments: str


Delta = ContentDelta | CallDelta


@dataclass
class CallStream:
    """Incremental parsing of a reply with ``<tool_call>`` blocks, for streaming.

    Text that may be the start of ``<tool_call>`` is held back until it is or is not. In a
    block, once ``{"name": "N", "arguments": {`` has come the call is known: its first delta
    (id, name, no arguments), then the arguments object's text as it arrives (strings, escapes
    and nesting tracked, so its closing brace ends it; whitespace outside strings passes once
    more text follows it). The rest of the block, up to ``</tool_call>``, is dropped. A block
    in another shape (arguments first) is parsed whole at ``</tool_call>``: a call in one
    delta, or content if it is none. Content is stripped at both ends, and whitespace between
    calls dropped, as its whitespace is held until text follows it.
    """

    #: The calls so far (one cut off by the end of the reply included, by :meth:`finish`).
    calls: list[ToolCall] = field(default_factory=list)
    #: Names the reply's calls by index (share one between two parsers of the same reply).
    ids: Callable[[int], str] = field(default_factory=lambda: CallIds())
    _mode: str = "text"  # text | head (a block's start) | args | tail (after the arguments)
    _pending: str = ""
    _space: str = ""  # content whitespace held back
    _started: bool = False  # content shown
    _out: list[Delta] = field(default_factory=list)
    _call: tuple[str, str] = ("", "")  # the id and name of the call whose arguments stream
    _args: list[str] = field(default_factory=list)
    _depth: int = 0
    _quoted: bool = False
    _escaped: bool = False
    _gap: str = ""  # whitespace in the arguments held back
    _scan: int = 0  # where a block's search for its end goes on

    def feed(self, text: str) -> list[Delta]:
        """The deltas that ``text``, the reply's next piece, completes."""
        self._pending += text
        while self._step():
            pass
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Delta]:
        """The end of the reply: held text given back, an unfinished block as content (or, if
        its arguments had begun, the call as it stands)."""
        if self._mode == "text":
            self._content(self._pending)
        elif self._mode == "head":
            self._content(OPEN + self._pending)
        elif self._mode == "args":
            self._end_call()
        self._pending, self._mode = "", "text"
        out, self._out = self._out, []
        return out

    def _step(self) -> bool:
        """Consume what the current mode can of the pending text; True to go on."""
        pending = self._pending
        if self._mode == "text":
            at = pending.find(OPEN)
            if at < 0:
                keep = next((k for k in range(len(OPEN) - 1, 0, -1)
                             if pending.endswith(OPEN[:k])), 0)
                self._content(pending[:len(pending) - keep])
                self._pending = pending[len(pending) - keep:]
                return False
            self._content(pending[:at])
            self._pending, self._mode, self._scan = pending[at + len(OPEN):], "head", 0
            return True
        if self._mode == "head":
            head = _HEAD.match(pending)
            if head:
                self._call, self._args = (self.ids(len(self.calls)), head.group(1)), []
                self._depth, self._quoted, self._escaped, self._gap = 0, False, False, ""
                self._out.append(CallDelta(len(self.calls), *self._call, ""))
                self._pending, self._mode = pending[head.end() - 1:], "args"
                return True
            at = pending.find(CLOSE, self._scan)
            if at < 0:  # long junk is searched once, not again at every piece
                self._scan = max(0, len(pending) - len(CLOSE) + 1)
                return False
            self._whole(pending[:at])
            self._pending, self._mode = pending[at + len(CLOSE):], "text"
            return True
        if self._mode == "args":
            return self._arguments(pending)
        at = pending.find(CLOSE)  # tail
        if at < 0:
            self._pending = pending[-(len(CLOSE) - 1):]
            return False
        self._pending, self._mode = pending[at + len(CLOSE):], "text"
        return True

    def _arguments(self, pending: str) -> bool:
        taken: list[str] = []
        done = None
        for at, char in enumerate(pending):
            if self._quoted:
                taken.append(char)
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._quoted = False
            elif char in " \t\r\n":
                self._gap += char
            elif char == "<":  # never in JSON outside a string: the block goes on unfinished
                done = at
                break
            else:
                taken.append(self._gap + char)
                self._gap = ""
                if char == '"':
                    self._quoted = True
                elif char in "{[":
                    self._depth += 1
                elif char in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        done = at + 1
                        break
        fragment = "".join(taken)
        if fragment:
            self._args.append(fragment)
            self._out.append(CallDelta(len(self.calls), None, None, fragment))
        if done is None:
            self._pending = ""
            return False
        self._end_call()
        self._pending, self._mode = pending[done:], "tail"
        return True

    def _end_call(self) -> None:
        self.calls.append(ToolCall(*self._call, "".join(self._args)))

    def _whole(self, block: str) -> None:
        """A block in another shape than name first, at its end."""
        parsed = _loads(block)
        if (isinstance(parsed, dict) and isinstance(parsed.get("name"), str) and parsed["name"]
                and isinstance(parsed.get("arguments"), dict)):
            call = ToolCall(self.ids(len(self.calls)), parsed["name"],
                            json.dumps(parsed["arguments"], ensure_ascii=False))
            self._out.append(CallDelta(len(self.calls), call.id, call.name, call.arguments))
            self.calls.append(call)
        else:
            self._content(OPEN + block + CLOSE)

    def _content(self, text: str) -> None:
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            self._out.append(ContentDelta(self._space + body))
            self._started, self._space = True, text[len(body):]
        else:
            self._space += text


def parse_reply(text: str, ids: Callable[[int], str] | None = None
                ) -> tuple[str, list[ToolCall]]:
    """A finished reply: its content without the call blocks (stripped), and its calls; the
    same result as :class:`CallStream` fed the reply in any pieces (the same ids too, given
    the same ``ids``)."""
    stream = CallStream() if ids is None else CallStream(ids=ids)
    deltas = stream.feed(text) + stream.finish()
    return "".join(d.text for d in deltas if isinstance(d, ContentDelta)), stream.calls
