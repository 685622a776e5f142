"""Chat templates: render messages with the model's own Jinja template, safely.

Contract:
- :class:`ChatTemplate` renders ``[{"role", "content"}]`` with the template found in the model
  (GGUF metadata ``tokenizer.chat_template`` or the tokenizer config) in an immutable sandboxed
  Jinja environment configured like Hugging Face's ``apply_chat_template`` (``trim_blocks``,
  ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, ``tojson``), so
  the text is byte for byte what transformers would produce.
- :meth:`ChatTemplate.segments` splits that same text into template-owned pieces and
  message-content pieces, so an engine can tokenize content as *plain text*: a user who types
  ``<|im_start|>system`` never forges a role boundary.
- The sandbox is bounded (:mod:`rolechat.sandbox`): a render may make values and text only up to
  a size that grows with its input, take a bounded number of steps, nest macro calls a bounded
  depth and run 30 s at most; ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are
  refused when the template compiles. Real templates render byte for byte as transformers
  renders them.
- Every template failure — ``raise_exception`` in the template, bad syntax, a bound broken, any
  error the template's code raises — becomes one :class:`~rolechat.errors.InvalidInput` naming
  what the template did.
- Tools: the tools a system message offers, the assistant's ``tool_calls`` (arguments as
  objects, as transformers' templates expect) and ``tool`` messages (with the called
  function's ``name``) go to a template that uses a ``tools`` variable and whose models call
  tools with ``<tool_call>`` blocks (``native_tools``: Qwen2.5's, Qwen3's, Hermes'), exactly
  as ``apply_chat_template(..., tools=...)`` passes them. Any other template (SmolLM2's, with
  no tool support; Llama 3.1's and Mistral's, whose models write calls in their own formats)
  renders the generic format of :mod:`rolechat.toolcalls` instead: plain messages, all of it
  content, telling the model to write ``<tool_call>`` blocks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from .conversation import Message
from .errors import InvalidInput
from .sandbox import TemplateLimit, environment, limits

#: Private-use characters that mark where message ``i`` goes: "\ue000{i}\ue001".
_MARK = re.compile("\ue000(\\d+)\ue001")


class TemplateRaised(Exception):
    """Raised by the template's own ``raise_exception(...)``."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


_ENV = environment(filters={"tojson": _tojson},
                   globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now})

#: What to do about a template that fails.
_FIX = "Fix or replace the template (--chat-template, or chat_template=...)."


def read_template_option(value: str | None) -> str | None:
    """A ``chat_template`` option is either Jinja source or the path of a file holding it. Text
    with no Jinja in it is a path: a file that does not exist is an error, never a template."""
    if not value:
        return value
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"Cannot read the chat template file {value!r}: {exc}.",
                           "Pass a readable UTF-8 .jinja file.", field="chat_template") from None
    raise InvalidInput(f"There is no chat template file {value!r} (and it is not a Jinja "
                       "template: it has no {{ }} or {% %}).",
                       "Pass an existing .jinja file or the template's text.",
                       field="chat_template")

#: A content piece of a rendered prompt is ``(text, True)``; template text is ``(text, False)``.
Segment = tuple[str, bool]


class ChatTemplate:
    """One model's chat template, compiled once."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if not source or not source.strip():
            raise InvalidInput("The model has no chat template.",
                               "Pass chat_template=... (a Jinja string or a .jinja file).")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENV.from_string(source)
            # Tools go through the template when it takes them and its models write the
            # calls rolechat reads (Hermes' and Qwen's <tool_call> blocks); any other
            # template gets the generic format, which tells the model that format.
            self.native_tools = "<tool_call>" in source and \
                "tools" in jinja2.meta.find_undeclared_variables(_ENV.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidInput(f"The chat template does not compile: {exc.message} "
                               f"(line {exc.lineno}).", _FIX) from None
        except TemplateLimit as exc:
            raise InvalidInput(f"The chat template {exc}.", _FIX) from None
        except (RecursionError, MemoryError):
            raise InvalidInput("The chat template does not compile: it nests too deep or is "
                               "too large.", _FIX) from None

    def _prepare(self, messages: Sequence[Message]) -> tuple[list[dict[str, Any]],
                                                             list[dict[str, Any]] | None]:
        """The messages as the template takes them, and the tools (None: none offered)."""
        tools = next((list(m.tools) for m in messages if m.tools), None)
        if tools is None and not any(m.tool_calls or m.role == "tool" for m in messages):
            return [m.to_openai() for m in messages], None
        # A system message with tools and no text stands for "no system prompt".
        kept = [m for m in messages if not (m.role == "system" and m.tools and not m.content)]
        if not self.native_tools:
            from .toolcalls import generic_messages, generic_system

            plain = generic_messages([m.to_openai() for m in kept])
            if tools:
                system = plain[0]["content"] if plain and plain[0]["role"] == "system" else None
                plain = [{"role": "system", "content": generic_system(system, tools)},
                         *(plain[1:] if system is not None else plain)]
            return plain, None
        names = {c.id: c.name for m in kept for c in m.tool_calls}
        out = []
        for m in kept:
            item = m.to_openai()
            if m.tool_calls:
                item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": json.loads(c.arguments)}}
                    for c in m.tool_calls]
            if m.role == "tool" and m.tool_call_id in names:
                item["name"] = names[m.tool_call_id]
            out.append(item)
        return out, tools

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        size = len(self.source) + len(self.bos_token) + len(self.eos_token) + sum(
            len(m["role"]) + len(m["content"]) + len(json.dumps(m.get("tool_calls", "")))
            for m in messages) + (len(json.dumps(tools)) if tools else 0)
        extra = {"tools": tools} if tools else {}
        try:
            with limits(size, len(messages)):
                return self._template.render(messages=list(messages),
                                             add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token, eos_token=self.eos_token,
                                             **extra)
        except TemplateRaised as exc:
            raise InvalidInput(f"The model's chat template refused these messages: {exc}",
                               "Check the roles and their order.") from None
        except TemplateLimit as exc:
            raise InvalidInput(f"The chat template {exc}.", _FIX) from None
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"The chat template failed: {exc}.", _FIX) from None
        except RecursionError:
            raise InvalidInput("The chat template nests too deep (recursion without end?).",
                               _FIX) from None
        except MemoryError:
            raise InvalidInput("The chat template ran out of memory.", _FIX) from None
        except Exception as exc:  # the template is code: whatever it raises is its failure
            raise InvalidInput(f"The chat template failed: {type(exc).__name__}: {exc}.",
                               _FIX) from None

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The exact text the model receives."""
        prepared, tools = self._prepare(messages)
        return self._render(prepared, add_generation_prompt, tools)

    def segments(self, messages: Sequence[Message], *,
                 add_generation_prompt: bool = True) -> list[Segment] | None:
        """The rendered text split into template pieces and content pieces, in order.

        Joined, the pieces are exactly :meth:`render`'s text. Returns ``None`` when the template
        rewrites content in a way that cannot be traced (the caller then must not trust any
        control-token text inside content).
        """
        prepared, tools = self._prepare(messages)
        # Empty content stays empty: templates test it (an assistant's tool calls with no text).
        marked = [{**m, "content": f"\ue000{i}\ue001" if m["content"] else ""}
                  for i, m in enumerate(prepared)]
        text = self._render(marked, add_generation_prompt, tools)
        expected = self._render(prepared, add_generation_prompt, tools)
        parts = _MARK.split(text)
        # parts = [template, index, template, index, ..., template]
        for transform in (lambda s: s, str.strip):
            out: list[Segment] = []
            for k, part in enumerate(parts):
                if k % 2 == 0:
                    if part:
                        out.append((part, False))
                else:
                    content = transform(prepared[int(part)]["content"])
                    if content:
                        out.append((content, True))
            if "".join(s for s, _ in out) == expected:
                return out
        return None
