"""Conversation: a system prompt plus ordered user/assistant messages. Plain data.

Contract:
- Messages alternate ``user``, ``assistant``, ``user``, ... starting with ``user``; the list may
  end with a user message that has no reply yet (``pending``). A *turn* is one user message and
  the assistant's reply to it.
- Tool calls: between a user message and the reply may stand *steps*, each an assistant
  message with ``tool_calls`` followed by one ``tool`` message per call (its ``tool_call_id``),
  as OpenAI's messages have them; they belong to the turn (``Turn.steps``), so whatever keeps
  or drops whole turns keeps a call with its results. A turn whose steps end with results and
  no reply yet is open (``pending`` is its user message, ``open_steps`` its steps). A tool
  message that answers no call, a call left without its result, and a reply with
  ``tool_calls`` that end a conversation are refused, naming the message.
- Every way in validates and raises :class:`~rolechat.errors.InvalidInput` naming the bad item:
  the seed's tuple history ``[(user, assistant), ...]``, the OpenAI ``[{"role", "content"}]``
  list, and rolechat's own JSON ``{"system": ..., "messages": [...]}``.
- User messages must be non-blank strings; a reply may be empty (a model can say nothing).
- A message in a file may carry ``"status": "interrupted"`` (rolechat's exports mark so a
  message whose reply was cut off, and that reply so far): :func:`read_messages` reads and
  checks such messages, but they are never part of the conversation's turns.
- Markdown (:func:`render_markdown`) labels interrupted messages and closes a code fence a
  message leaves open, so one cut-off reply cannot turn the rest of the file into code.
- It never knows about tokens; the window and the engine do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidInput

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
#: A message's status in a file or the store. Only ``complete`` messages make turns; a file's
#: ``pending`` message (exported while its reply was generating) is read as ``interrupted``.
STATUSES = ("complete", "interrupted", "pending")


def check_text(value: Any, what: str, *, allow_blank: bool = False) -> str:
    """Return ``value`` if it is a usable message text, else raise InvalidInput. This is the
    one text check: every way text comes in (library, CLI, HTTP) goes through it."""
    if not isinstance(value, str):
        raise InvalidInput(f"The {what} must be a string, got {type(value).__name__}.",
                           "Pass text (str).", field=what)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as Python keeps it
            found = f"the byte {code - 0xDC00:#04x}, which is not UTF-8,"
        else:
            found = f"a lone surrogate (U+{code:04X}), which UTF-8 cannot encode,"
        raise InvalidInput(f"The {what} is not valid text: it holds {found} at character "
                           f"{exc.start}.", "Send UTF-8 text.", field=what) from None
    if not allow_blank and not value.strip():
        hint = ("Write a system prompt, or leave it out." if "system" in what
                else "Type some text to send.")
        raise InvalidInput(f"The {what} is empty.", hint, field=what)
    return value


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    #: An assistant message's tool calls (:class:`~rolechat.toolcalls.ToolCall`).
    tool_calls: tuple[Any, ...] = ()
    #: A tool message: the call it answers.
    tool_call_id: str | None = None
    #: A system message: the tools a prompt offers the model (OpenAI's ``tools`` items). A
    #: system message with blank content and tools stands for "no system prompt" (the
    #: template renders none).
    tools: tuple[dict[str, Any], ...] = field(default=(), hash=False)

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str
    #: The tool calls and their results between the user's message and the reply.
    steps: tuple[Message, ...] = ()

    def messages(self) -> list[Message]:
        return [Message("user", self.user), *self.steps, Message("assistant", self.assistant)]


def _turn_ends(messages: Sequence[Message], where: Callable[[int], str]) -> list[int]:
    """Check the order of ``messages`` (user, steps, reply, ...; see the module's contract);
    the index of each turn's user message, and ``len(messages)`` last. ``where(i)`` names
    message ``i`` in errors."""
    starts, i, n = [], 0, len(messages)
    while i < n:
        if messages[i].role != "user":
            got = messages[i].role
            why = ("a tool message must follow the assistant message whose call it answers"
                   if got == "tool" else f"should be a user message, got {got}")
            raise InvalidInput(f"{where(i)} {why}.", "Messages must alternate user, assistant, "
                               "user, ... starting with user; tool results follow their call.",
                               field=where(i))
        starts.append(i)
        i += 1
        while i < n and messages[i].role == "assistant" and messages[i].tool_calls:
            call_at, ids = i, [c.id for c in messages[i].tool_calls]
            i += 1
            answered: list[str] = []
            while i < n and messages[i].role == "tool":
                if messages[i].tool_call_id not in ids or messages[i].tool_call_id in answered:
                    raise InvalidInput(
                        f"{where(i)} answers no call of the assistant message before it "
                        f"(tool_call_id {messages[i].tool_call_id!r}; calls: "
                        f"{', '.join(ids)}).", "Set tool_call_id to the id of the call it "
                        "answers, once per call.", field=f"{where(i)}.tool_call_id")
                answered.append(str(messages[i].tool_call_id))
                i += 1
            if len(answered) < len(ids):
                missing = ", ".join(c for c in ids if c not in answered)
                raise InvalidInput(f"{where(call_at)}'s tool calls have no results ({missing}).",
                                   "Send one tool message per call, with its tool_call_id, "
                                   "right after it.", field=where(call_at))
        if i < n:
            if messages[i].role != "assistant":
                why = ("a tool message must follow the assistant message whose call it "
                       "answers" if messages[i].role == "tool"
                       else f"should be an assistant message, got {messages[i].role}")
                raise InvalidInput(f"{where(i)} {why}.", "Messages must alternate user, "
                                   "assistant, user, ... starting with user; tool results "
                                   "follow their call.", field=where(i))
            i += 1
    return [*starts, n]


def _content_of(item: Mapping[str, Any], where: str) -> Any:
    """OpenAI content may be a string or a list of ``{"type": "text", "text": ...}`` parts."""
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidInput(f"{where}: only text content parts are supported.",
                                   'Use {"type": "text", "text": "..."} parts.', field=where)
            texts.append(part["text"])
        return "".join(texts)
    return content


@dataclass
class Conversation:
    """The system prompt and the alternating user/assistant messages."""

    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system is not None:
            check_text(self.system, "system prompt")
        self.messages = list(self.messages)
        for index, message in enumerate(self.messages):
            if not isinstance(message, Message) or message.role == "system":
                got = message.role if isinstance(message, Message) else type(message).__name__
                raise InvalidInput(f"messages[{index}] should be a user or assistant message, "
                                   f"got {got}.", "Pass the system prompt as system=.",
                                   field=f"messages[{index}]")
            check_text(message.content, f"{message.role} message {index}",
                       allow_blank=message.role != "user")
        self._starts = _turn_ends(self.messages, lambda i: f"messages[{i}]")
        if self.messages and self.messages[-1].tool_calls:
            raise InvalidInput(f"messages[{len(self.messages) - 1}]'s tool calls have no "
                               "results.", "Send one tool message per call after it.",
                               field=f"messages[{len(self.messages) - 1}]")

    # ----- views ---------------------------------------------------------------------------
    def _spans(self) -> list[list[Message]]:
        self._starts = _turn_ends(self.messages, lambda i: f"messages[{i}]")
        return [self.messages[a:b] for a, b in zip(self._starts, self._starts[1:])]

    @property
    def turns(self) -> list[Turn]:
        """Completed turns, oldest first."""
        return [Turn(span[0].content, span[-1].content, tuple(span[1:-1]))
                for span in self._spans() if len(span) > 1 and span[-1].role == "assistant"]

    @property
    def pending(self) -> str | None:
        """The last user message if it has no reply yet (its turn may hold tool calls and
        their results already: :attr:`open_steps`)."""
        spans = self._spans()
        if spans and spans[-1][-1].role != "assistant":
            return spans[-1][0].content
        return None

    @property
    def open_steps(self) -> tuple[Message, ...]:
        """The tool calls and results of the turn that has no reply yet."""
        spans = self._spans()
        if spans and spans[-1][-1].role != "assistant":
            return tuple(spans[-1][1:])
        return ()

    def prompt_messages(self, user: str | None = None, *, first_turn: int = 0) -> list[Message]:
        """System prompt, completed turns from ``first_turn`` on, then ``user`` (or the
        pending message and its steps)."""
        out = [Message("system", self.system)] if self.system is not None else []
        for turn in self.turns[first_turn:]:
            out += turn.messages()
        if user is not None:
            out.append(Message("user", user))
        elif self.pending is not None:
            out += [Message("user", self.pending), *self.open_steps]
        return out

    # ----- changes -------------------------------------------------------------------------
    def append_turn(self, user: str, assistant: str, steps: Sequence[Message] = ()) -> None:
        if self.pending is not None:
            raise InvalidInput("The conversation already ends with a user message.",
                               "Answer or remove the pending message first.")
        check_text(user, "user message")
        check_text(assistant, "assistant message", allow_blank=True)
        added = [Message("user", user), *steps, Message("assistant", assistant)]
        _turn_ends(added, lambda i: f"the turn's message {i}")
        self.messages += added

    def pop_open(self) -> tuple[str, tuple[Message, ...]] | None:
        """Remove the turn that has no reply yet; its user message and steps (None: none)."""
        user, steps = self.pending, self.open_steps
        if user is None:
            return None
        del self.messages[len(self.messages) - 1 - len(steps):]
        return user, steps

    def pop_turn(self) -> Turn | None:
        """Remove and return the last completed turn (dropping any pending message first)."""
        self.pop_open()
        if not self.messages:
            return None
        turn = self.turns[-1]
        del self.messages[len(self.messages) - 2 - len(turn.steps):]
        return turn

    def copy(self) -> Conversation:
        return Conversation(self.system, list(self.messages))

    # ----- conversions ---------------------------------------------------------------------
    @classmethod
    def from_tuples(cls, history: Iterable[Sequence[str]] | None,
                    system: str | None = None) -> Conversation:
        """The seed's history: ``[(user0, assistant0), (user1, assistant1), ...]``."""
        if history is None:
            history = []
        if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Iterable):
            raise InvalidInput(f"history must be a list of (user, assistant) pairs, got "
                               f"{type(history).__name__}.", "Pass [] to start a new chat.",
                               field="history")
        messages: list[Message] = []
        for index, pair in enumerate(history):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise InvalidInput(f"history[{index}] must be a (user, assistant) pair, got "
                                   f"{pair!r:.80}.", "Each item is a 2-tuple of strings.",
                                   field=f"history[{index}]")
            user = check_text(pair[0], f"user message in history[{index}]")
            reply = check_text(pair[1], f"assistant message in history[{index}]",
                               allow_blank=True)
            messages += [Message("user", user), Message("assistant", reply)]
        return cls(system, messages)

    def to_tuples(self) -> list[tuple[str, str]]:
        return [(t.user, t.assistant) for t in self.turns]

    @classmethod
    def from_openai(cls, messages: Any) -> Conversation:
        """``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; messages marked
        ``"status": "interrupted"`` are checked and left out (see :func:`read_messages`)."""
        system, entries = read_messages(messages)
        return cls(system, [message for message, status in entries if status == "complete"])

    def to_openai(self) -> list[dict[str, str]]:
        return [m.to_openai() for m in self.prompt_messages()]

    def to_markdown(self, title: str = "Conversation") -> str:
        """A readable export: the system prompt, then each turn under "You" / "Assistant"."""
        open_turn = 1 + len(self.open_steps) if self.pending is not None else 0
        complete = self.messages[:len(self.messages) - open_turn]  # an open turn is no turn yet
        return render_markdown(title, self.system, [(m, "complete") for m in complete])

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [m.to_openai() for m in self.messages]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        """rolechat's own ``{"system", "messages"}`` object, or an OpenAI message list (its
        interrupted messages left out)."""
        system, entries = read_transcript(data)
        return cls(system, [message for message, status in entries if status == "complete"])

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        return cls.from_dict(parse_json(text))


def parse_json(text: str) -> Any:
    """``json.loads`` with its failures as one InvalidInput (nesting too deep included)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"Not valid JSON: {exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}.", "Check the file.") from None
    except RecursionError:
        raise InvalidInput("The JSON is nested too deeply to be a conversation.",
                           "Check the file: a conversation is a list of messages, or an "
                           'object with "messages".') from None


def read_transcript(data: Any) -> tuple[str | None, list[tuple[Message, str]]]:
    """rolechat's own ``{"system", "messages"}`` object or an OpenAI message list, read by
    :func:`read_messages`: the system prompt and every message with its status."""
    if isinstance(data, list):
        return read_messages(data)
    if not isinstance(data, Mapping) or "messages" not in data:
        raise InvalidInput("A conversation must be a JSON list of messages or an object "
                           'with "messages".', "See `rolechat prompt --help`.")
    system, entries = read_messages(data["messages"] if data["messages"] is not None else [])
    given = data.get("system")
    if given is not None:
        if system is not None:
            raise InvalidInput("The conversation has two system prompts.",
                               'Keep either "system" or the system message.')
        system = check_text(given, "system prompt")
    return system, entries


def read_messages(messages: Any) -> tuple[str | None, list[tuple[Message, str]]]:
    """Every message of an OpenAI-style list, checked, in order, with its status: the system
    prompt apart, then ``(message, status)`` pairs. Complete messages alternate user,
    assistant, ... (with tool calls and their results between; see the module's contract); an
    ``interrupted`` user message may stand between turns, followed by its ``interrupted`` reply
    so far (as the store keeps them). A ``pending`` message is read as ``interrupted``. Errors
    name the item by its place in ``messages``."""
    if not isinstance(messages, list):
        raise InvalidInput(f"messages must be a list, got {type(messages).__name__}.",
                           'Pass [{"role": "user", "content": "..."}].', field="messages")
    system: str | None = None
    entries: list[tuple[Message, str]] = []
    places: list[int] = []  # where each complete message stands in ``messages``
    for index, item in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidInput(f"{where} must be an object with role and content.",
                               'Use {"role": "user", "content": "..."}.', field=where)
        role = item.get("role")
        if role not in ROLES:
            raise InvalidInput(f"{where} has unknown role {role!r}.",
                               f"Use one of: {', '.join(ROLES)}.", field=where)
        content = _content_of(item, where)
        if role == "system":
            if index != 0:
                raise InvalidInput(f"{where}: a system message may only come first.",
                                   "Put the system prompt at the start.", field=where)
            system = check_text(content, f"system prompt ({where})")
            continue
        status = item.get("status", "complete")
        if status not in STATUSES:
            raise InvalidInput(f"{where} has unknown status {status!r}.",
                               "Use complete or interrupted, or leave status out.", field=where)
        message = _tool_message(item, role, content, where)
        if status == "complete":
            entries.append((message, status))
            places.append(index)
            continue
        status = "interrupted"
        complete = [m for m, s in entries if s == "complete"]
        between_turns = not complete or (complete[-1].role == "assistant"
                                         and not complete[-1].tool_calls)
        follows_cut_user = (bool(entries) and entries[-1][1] == "interrupted"
                            and entries[-1][0].role == "user")
        if message.tool_calls or role == "tool" or (role == "user" and not between_turns) or (
                role == "assistant" and not follows_cut_user):
            raise InvalidInput(
                f"{where}: an interrupted {role} message cannot stand here.",
                "An interrupted user message comes between turns, and its interrupted "
                "reply right after it.", field=where)
        entries.append((message, status))
    complete = [m for m, s in entries if s == "complete"]
    _turn_ends(complete, lambda i: f"messages[{places[i]}]")
    if complete and complete[-1].tool_calls:
        raise InvalidInput(f"messages[{places[-1]}]'s tool calls have no results.",
                           "Send one tool message per call, with its tool_call_id, after it.",
                           field=f"messages[{places[-1]}]")
    return system, entries


def _tool_message(item: Mapping[str, Any], role: Role, content: Any, where: str) -> Message:
    """One user, assistant or tool message, its tool fields checked."""
    from .toolcalls import ToolCall

    calls = item.get("tool_calls")
    if calls is not None and role != "assistant":
        raise InvalidInput(f"{where}: only an assistant message has tool_calls.",
                           "Leave tool_calls out.", field=f"{where}.tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise InvalidInput(f"{where}.tool_calls must be a list.", "Send a list of calls.",
                           field=f"{where}.tool_calls")
    parsed = tuple(ToolCall.from_openai(call, f"{where}.tool_calls[{k}]")
                   for k, call in enumerate(calls or []))
    if parsed and content is None:
        content = ""
    call_id = item.get("tool_call_id")
    if role == "tool" and (not isinstance(call_id, str) or not call_id):
        raise InvalidInput(f"{where}: a tool message needs the tool_call_id of the call it "
                           "answers.", "Send the call's id as tool_call_id.",
                           field=f"{where}.tool_call_id")
    text = check_text(content, f"{role} message ({where})", allow_blank=role != "user")
    return Message(role, text, parsed, call_id if role == "tool" else None)


def is_step(message: Message) -> bool:
    """Whether a message is part of a turn's tool steps (a call or a result)."""
    return message.role == "tool" or bool(message.tool_calls)


def steps_to_json(steps: Sequence[Message]) -> str | None:
    """A turn's steps as the store keeps them (OpenAI messages, JSON); None for none."""
    return json.dumps([m.to_openai() for m in steps], ensure_ascii=False) if steps else None


def steps_from_json(text: str | None) -> tuple[Message, ...]:
    """A turn's steps from :func:`steps_to_json`, checked (calls, then their results);
    InvalidInput if they are not."""
    if not text:
        return ()
    items = parse_json(text)
    if not isinstance(items, list) or not items:
        raise InvalidInput("A turn's tool steps must be a list of messages.",
                           "Check the stored conversation.")
    steps: list[Message] = []
    for i, item in enumerate(items):
        role = item.get("role") if isinstance(item, Mapping) else None
        if role not in ("assistant", "tool"):
            raise InvalidInput(f"steps[{i}] is not a tool call or result.",
                               "Check the stored conversation.")
        steps.append(_tool_message(item, role, _content_of(item, f"steps[{i}]"), f"steps[{i}]"))
    if not all(is_step(m) for m in steps) or steps[-1].role != "tool":
        raise InvalidInput("A turn's tool steps must be calls followed by their results.",
                           "Check the stored conversation.")
    _turn_ends([Message("user", "-"), *steps], lambda i: f"steps[{i - 1}]")
    return tuple(steps)


def with_steps(entries: Sequence[tuple[Message, str]]
               ) -> list[tuple[Message, str, tuple[Message, ...]]]:
    """Messages read from a file (:func:`read_messages`) with each complete reply carrying the
    calls and results before it (``steps``) instead of standing apart; steps of a turn left
    without a reply are dropped (the turn is no turn yet)."""
    out: list[tuple[Message, str, tuple[Message, ...]]] = []
    pending: list[Message] = []
    for message, status in entries:
        if status == "complete" and is_step(message):
            pending.append(message)
            continue
        steps = tuple(pending) if message.role == "assistant" and status == "complete" else ()
        pending = []
        out.append((message, status, steps))
    return out


#: A fence line: up to three spaces, three or more backticks or tildes, then the rest.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def close_fences(text: str) -> str:
    """``text`` with the code fence it leaves open closed at its end. CommonMark's rules: a
    backtick fence's info string holds no backtick; a fence closes with the same character,
    at least as many of them, and nothing else on the line; inside a fence, other fences are
    text."""
    open_fence = ""
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match is None:
            continue
        fence, rest = match.groups()
        if not open_fence:
            if not (fence[0] == "`" and "`" in rest):
                open_fence = fence
        elif fence[0] == open_fence[0] and len(fence) >= len(open_fence) and not rest.strip():
            open_fence = ""
    if not open_fence:
        return text
    return text + ("" if text.endswith("\n") else "\n") + open_fence


def render_markdown(title: str, system: str | None,
                    entries: Iterable[tuple[Message, str]]) -> str:
    """The Markdown export: the title, the system prompt, then every message under "You" /
    "Assistant"; interrupted ones are labelled so, and a message's open code fence is closed."""
    lines = [f"# {title}", ""]
    if system:
        lines += [f"**System:** {close_fences(system)}", ""]
    entries = list(entries)
    for index, (message, status) in enumerate(entries):
        label = "You" if message.role == "user" else "Assistant"
        if message.role == "tool":
            lines += [f"### Tool result ({message.tool_call_id})", "", "```",
                      message.content.replace("```", "` ` `"), "```", ""]
            continue
        if message.tool_calls:
            calls = [f"- `{c.name}({c.arguments})` ({c.id})" for c in message.tool_calls]
            lines += ["### Assistant calls tools", "",
                      *([close_fences(message.content), ""] if message.content else []),
                      *calls, ""]
            continue
        if status == "pending":
            label += " (pending: its reply is being written)"
        elif status != "complete" and message.role == "assistant":
            label += " (interrupted: the reply was cut off here)"
        elif status != "complete":
            answered = index + 1 < len(entries) and entries[index + 1][0].role == "assistant"
            label += " (interrupted)" if answered else " (interrupted: not answered)"
        lines += [f"### {label}", "", close_fences(message.content), ""]
    return "\n".join(lines)
