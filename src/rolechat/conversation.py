"""Conversation: a system prompt plus ordered user/assistant messages. Plain data.

Contract:
- Messages alternate ``user``, ``assistant``, ``user``, ... starting with ``user``; the list may
  end with a user message that has no reply yet (``pending``). A *turn* is one user message and
  the assistant's reply to it.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidInput

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
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

    def to_openai(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


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
            expected = "user" if index % 2 == 0 else "assistant"
            if not isinstance(message, Message) or message.role != expected:
                got = message.role if isinstance(message, Message) else type(message).__name__
                article = "an" if expected == "assistant" else "a"
                raise InvalidInput(
                    f"messages[{index}] should be {article} {expected} message, got {got}.",
                    "Messages must alternate user, assistant, user, ... starting with user.",
                    field=f"messages[{index}]")
            check_text(message.content, f"{message.role} message {index}",
                       allow_blank=message.role == "assistant")

    # ----- views ---------------------------------------------------------------------------
    @property
    def turns(self) -> list[Turn]:
        """Completed turns, oldest first."""
        m = self.messages
        return [Turn(m[i].content, m[i + 1].content) for i in range(0, len(m) - 1, 2)]

    @property
    def pending(self) -> str | None:
        """The last user message if it has no reply yet."""
        return self.messages[-1].content if len(self.messages) % 2 == 1 else None

    def prompt_messages(self, user: str | None = None, *, first_turn: int = 0) -> list[Message]:
        """System prompt, completed turns from ``first_turn`` on, then ``user`` (or pending)."""
        out = [Message("system", self.system)] if self.system is not None else []
        for turn in self.turns[first_turn:]:
            out += [Message("user", turn.user), Message("assistant", turn.assistant)]
        last = user if user is not None else self.pending
        if last is not None:
            out.append(Message("user", last))
        return out

    # ----- changes -------------------------------------------------------------------------
    def append_turn(self, user: str, assistant: str) -> None:
        if self.pending is not None:
            raise InvalidInput("The conversation already ends with a user message.",
                               "Answer or remove the pending message first.")
        check_text(user, "user message")
        check_text(assistant, "assistant message", allow_blank=True)
        self.messages += [Message("user", user), Message("assistant", assistant)]

    def pop_turn(self) -> Turn | None:
        """Remove and return the last completed turn (dropping any pending message first)."""
        if self.pending is not None:
            self.messages.pop()
        if not self.messages:
            return None
        assistant, user = self.messages.pop(), self.messages.pop()
        return Turn(user.content, assistant.content)

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
        complete = self.messages[:2 * len(self.turns)]  # a pending message is no turn yet
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
    assistant, ...; an ``interrupted`` user message may stand between turns, followed by its
    ``interrupted`` reply so far (as the store keeps them). A ``pending`` message is read as
    ``interrupted``. Errors name the item by its place in ``messages``."""
    if not isinstance(messages, list):
        raise InvalidInput(f"messages must be a list, got {type(messages).__name__}.",
                           'Pass [{"role": "user", "content": "..."}].', field="messages")
    system: str | None = None
    entries: list[tuple[Message, str]] = []
    expected = "user"
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
        text = check_text(content, f"{role} message ({where})", allow_blank=role == "assistant")
        if status == "complete":
            if role != expected:
                article = "an" if expected == "assistant" else "a"
                raise InvalidInput(
                    f"{where} should be {article} {expected} message, got {role}.",
                    "Messages must alternate user, assistant, user, ... starting with user.",
                    field=where)
            expected = "assistant" if role == "user" else "user"
        else:
            status = "interrupted"
            follows_cut_user = (bool(entries) and entries[-1][1] == "interrupted"
                                and entries[-1][0].role == "user")
            if (role == "user" and expected != "user") or (role == "assistant"
                                                           and not follows_cut_user):
                raise InvalidInput(
                    f"{where}: an interrupted {role} message cannot stand here.",
                    "An interrupted user message comes between turns, and its interrupted "
                    "reply right after it.", field=where)
        entries.append((Message(role, text), status))
    return system, entries


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
        if status == "pending":
            label += " (pending: its reply is being written)"
        elif status != "complete" and message.role == "assistant":
            label += " (interrupted: the reply was cut off here)"
        elif status != "complete":
            answered = index + 1 < len(entries) and entries[index + 1][0].role == "assistant"
            label += " (interrupted)" if answered else " (interrupted: not answered)"
        lines += [f"### {label}", "", close_fences(message.content), ""]
    return "\n".join(lines)
