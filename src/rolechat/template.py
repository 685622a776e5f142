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
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

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
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidInput(f"The chat template does not compile: {exc.message} "
                               f"(line {exc.lineno}).", _FIX) from None
        except TemplateLimit as exc:
            raise InvalidInput(f"The chat template {exc}.", _FIX) from None
        except (RecursionError, MemoryError):
            raise InvalidInput("The chat template does not compile: it nests too deep or is "
                               "too large.", _FIX) from None

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        size = len(self.source) + len(self.bos_token) + len(self.eos_token) + sum(
            len(m["role"]) + len(m["content"]) for m in messages)
        try:
            with limits(size, len(messages)):
                return self._template.render(messages=list(messages),
                                             add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token, eos_token=self.eos_token)
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
        return self._render([m.to_openai() for m in messages], add_generation_prompt)

    def segments(self, messages: Sequence[Message], *,
                 add_generation_prompt: bool = True) -> list[Segment] | None:
        """The rendered text split into template pieces and content pieces, in order.

        Joined, the pieces are exactly :meth:`render`'s text. Returns ``None`` when the template
        rewrites content in a way that cannot be traced (the caller then must not trust any
        control-token text inside content).
        """
        marked = [{"role": m.role, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        text = self._render(marked, add_generation_prompt)
        expected = self.render(messages, add_generation_prompt=add_generation_prompt)
        parts = _MARK.split(text)
        # parts = [template, index, template, index, ..., template]
        for transform in (lambda s: s, str.strip):
            out: list[Segment] = []
            for k, part in enumerate(parts):
                if k % 2 == 0:
                    if part:
                        out.append((part, False))
                else:
                    content = transform(messages[int(part)].content)
                    if content:
                        out.append((content, True))
            if "".join(s for s, _ in out) == expected:
                return out
        return None
