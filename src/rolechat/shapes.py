"""What a reply must be, and a turn that waits for its tools' results.

Contract:
- :class:`ReplyShape` is a reply's constraint and how its text becomes a value: JSON under a
  schema (``Reply.parsed``: the value, or an instance of the pydantic model that was the
  schema; None when the reply was cut off before its JSON ended; a remote server's reply that
  is not the JSON asked for is an :class:`~rolechat.errors.EngineError`), or tool calls
  (:func:`tools_constraint`: the grammar of the offered tools' calls, and the same request in
  OpenAI's words). A schema and tools together are refused.
- :class:`OpenTurn` is a turn whose last reply called tools: its user message, the turn log's
  handle, its steps so far; :meth:`OpenTurn.answered` adds the results, which must answer
  exactly the waiting calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .constraint import Constraint
from .conversation import Message, check_text
from .engines.base import FinishReason
from .errors import EngineError, InvalidInput
from .toolcalls import Tools


@dataclass(frozen=True)
class OpenTurn:
    """A turn whose last reply called tools: its user message, the log's handle for it, and
    its steps so far (the last one the calls that wait for their results)."""

    text: str
    handle: Any
    steps: tuple[Message, ...]

    def answered(self, results: Sequence[tuple[str, str]]) -> tuple[Message, ...]:
        """The steps with ``results`` (``(tool_call_id, content)``, one per waiting call)."""
        waiting = [c.id for c in self.steps[-1].tool_calls]
        given = [call_id for call_id, _ in results]
        if sorted(given) != sorted(waiting):
            raise InvalidInput(f"The results must answer exactly the waiting calls "
                               f"({', '.join(waiting)}); got {', '.join(given) or 'none'}.",
                               "Send one result per call, with its tool_call_id.",
                               field="tool_results")
        return (*self.steps, *(Message("tool", check_text(content, "tool result",
                                                          allow_blank=True),
                                       tool_call_id=call_id) for call_id, content in results))


@dataclass(frozen=True)
class ReplyShape:
    """What a reply must be (its constraint) and how its text becomes a value or tool calls."""

    constraint: Constraint | None
    #: The pydantic model class the schema came from, if it did.
    model: Any = None
    #: The tools offered (the reply's ``<tool_call>`` blocks become ``Reply.tool_calls``).
    tools: Tools | None = None

    @classmethod
    def of(cls, schema: Any, *, json: bool = False, tools: Any = None, tool_choice: Any = None,
           parallel_tool_calls: Any = None) -> ReplyShape | None:
        checked = Tools.parse(tools, tool_choice, parallel_tool_calls)
        if checked is not None:
            if schema is not None or json:
                raise InvalidInput("A reply can follow a JSON schema or call tools, not both.",
                                   "Leave out either the schema or the tools.", field="tools")
            return cls(tools_constraint(checked), tools=checked)
        if schema is None:
            return cls(Constraint.json()) if json else None
        model = schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None
        return cls(Constraint.json(schema), model)

    def parse(self, text: str, finish: FinishReason, engine: str) -> Any:
        """The reply's value (None if it was cut off before its JSON ended)."""
        if finish == "length" or self.tools is not None:
            return None
        try:
            value = json.loads(text)
            return self.model.model_validate(value) if self.model is not None else value
        except ValueError as exc:  # a remote server that ignored response_format
            raise EngineError(engine, f"the reply is not the JSON that was asked for ({exc})",
                              "Check that the server supports response_format.") from None


def tools_constraint(tools: Tools) -> Constraint:
    """The grammar of a reply offered ``tools`` (none for ``tool_choice`` "none"), and the same
    request in OpenAI's words for a remote server."""
    choice: Any = ({"type": "function", "function": {"name": tools.choice}} if tools.forced
                   else tools.choice)
    openai = {"tools": list(tools.functions), "tool_choice": choice,
              "parallel_tool_calls": tools.parallel}
    grammar = tools.grammar()
    if grammar is None:
        return Constraint(None, openai=openai)
    return Constraint(grammar[0], grammar[1], openai=openai)
