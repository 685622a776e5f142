"""Conversation: a system prompt plus ordered user/assistant messages. Plain data.

Contract:
- Messages alternate ``user``, ``assistant``, ``user``, ... starting with ``user``; the list may
  end with a user message that has no reply yet (``pending``). A *turn* is one user message and
  the assistant's reply to it.
- Every way in validates and raises :class:`~rolechat.errors.InvalidInput` naming the bad item:
  the seed's tuple history ``[(user, assistant), ...]``, the OpenAI ``[{"role", "content"}]``
  list, and rolechat's own JSON ``{"system": ..., "messages": [...]}``.
- User messages must be non-blank strings; a reply may be empty (a model can say nothing).
- It never knows about tokens; the window and the engine do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidInput

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


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
        """``[{"role": "system"|"user"|"assistant", "content": str}, ...]``."""
        if not isinstance(messages, list):
            raise InvalidInput(f"messages must be a list, got {type(messages).__name__}.",
                               'Pass [{"role": "user", "content": "..."}].', field="messages")
        system: str | None = None
        out: list[Message] = []
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
            out.append(Message(role, check_text(content, f"{role} message ({where})",
                                                allow_blank=role == "assistant")))
        return cls(system, out)

    def to_openai(self) -> list[dict[str, str]]:
        return [m.to_openai() for m in self.prompt_messages()]

    def to_markdown(self, title: str = "Conversation") -> str:
        """A readable export: the system prompt, then each turn under "You" / "Assistant"."""
        lines = [f"# {title}", ""]
        if self.system:
            lines += [f"**System:** {self.system}", ""]
        for turn in self.turns:
            lines += ["### You", "", turn.user, "", "### Assistant", "", turn.assistant, ""]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [m.to_openai() for m in self.messages]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        """rolechat's own ``{"system", "messages"}`` object, or an OpenAI message list."""
        if isinstance(data, list):
            return cls.from_openai(data)
        if not isinstance(data, Mapping) or "messages" not in data:
            raise InvalidInput("A conversation must be a JSON list of messages or an object "
                               'with "messages".', "See `rolechat prompt --help`.")
        conv = cls.from_openai(list(data["messages"] or []))
        system = data.get("system")
        if system is not None:
            if conv.system is not None:
                raise InvalidInput("The conversation has two system prompts.",
                                   'Keep either "system" or the system message.')
            conv.system = check_text(system, "system prompt")
        return conv

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"Not valid JSON: {exc.msg} at line {exc.lineno} column "
                               f"{exc.colno}.", "Check the file.") from None
        return cls.from_dict(data)
