"""Python functions as tools: described from their signatures, called when the model asks.

Contract:
- :meth:`Function.of` describes a plain Python function as an OpenAI tool: its ``__name__``,
  the first paragraph of its docstring, and a JSON Schema of its parameters built by pydantic
  from the signature (annotations and defaults; an unannotated parameter takes any JSON
  value). ``*args``/``**kwargs`` cannot be described and are refused.
- :meth:`Function.call` validates the model's arguments against the same pydantic model, calls
  the function and returns the result as text (a ``str`` as it is, anything else as JSON).
  Nothing it does raises: bad arguments and an exception inside the function become an
  ``Error: ...`` result the model reads (and the user sees in ``Reply.steps``).
- :func:`run` is the loop behind ``Chat.send(text, tools=[function, ...])``: the model replies;
  while it calls tools, each call is run and its result fed back as the turn's next step, at
  most ``max_rounds`` rounds (``tool_choice`` "required" or a named function applies to the
  first round only, so a model cannot be made to call forever); after the last round the model
  must answer without tools. A call of a tool that does not exist gets an error result naming
  the tools there are. The turn is recorded once, when the model answers, with every call and
  result in it (``Reply.steps``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .conversation import Message
from .errors import InvalidInput

if TYPE_CHECKING:
    from .chat import Chat, Reply, ReplyStream
    from .toolcalls import ToolCall

#: Rounds of tool calls in one turn before the model must answer.
MAX_ROUNDS = 8


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def _strip_titles(schema: Any) -> Any:
    """pydantic's schema without its generated ``title`` keys (noise in a prompt)."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items()
                if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [_strip_titles(item) for item in schema]
    return schema


@dataclass(frozen=True)
class Function:
    """A Python function and its description as a tool."""

    name: str
    fn: Callable[..., Any]
    arguments: type[BaseModel]
    spec: dict[str, Any]

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Function:
        name = getattr(fn, "__name__", None)
        if not callable(fn) or not isinstance(name, str) or not name.isidentifier():
            raise InvalidInput(f"{fn!r} cannot be a tool: it is not a named function.",
                               "Pass functions defined with def.", field="tools")
        fields: dict[str, Any] = {}
        try:  # annotations written as strings (``from __future__ import annotations``) too
            signature = inspect.signature(fn, eval_str=True)
        except (NameError, SyntaxError, TypeError, ValueError) as exc:
            raise InvalidInput(f"The tool {name}'s signature cannot be read: {exc}.",
                               "Use annotations that name importable types.",
                               field="tools") from None
        for parameter in signature.parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise InvalidInput(f"The tool {name} takes *args or **kwargs, which a model "
                                   "cannot be told about.", "Name every parameter.",
                                   field="tools")
            annotation = (Any if parameter.annotation is parameter.empty
                          else parameter.annotation)
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[parameter.name] = (annotation, default)
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"),
                             **fields)
        schema = _strip_titles(model.model_json_schema())
        function: dict[str, Any] = {"name": name, "parameters": schema}
        description = _description(fn)
        if description:
            function["description"] = description
        return cls(name, fn, model, {"type": "function", "function": function})

    def call(self, arguments: str) -> str:
        """Run the function on the model's arguments; its result, or an error, as text."""
        try:
            values = self.arguments.model_validate_json(arguments or "{}")
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                                 for e in exc.errors())
            return f"Error: bad arguments for {self.name}: {problems}"
        try:
            result = self.fn(**{k: getattr(values, k) for k in self.arguments.model_fields})
        except Exception as exc:  # the tool's failure is the model's to read
            return f"Error: {self.name} raised {type(exc).__name__}: {exc}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(result)


def load_functions(path: str | Path) -> list[Callable[..., Any]]:
    """The public functions a Python file defines (not those it imports, not ``_private``
    ones), in the order it defines them: ``rolechat chat --functions FILE.py``."""
    import importlib.util

    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidInput(f"There is no file {str(path)!r}.", "Pass a .py file that defines "
                           "the functions.", field="functions")
    spec = importlib.util.spec_from_file_location(f"rolechat_functions_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise InvalidInput(f"{str(path)!r} cannot be loaded as Python.", "Pass a .py file.",
                           field="functions")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: whatever it raises is its failure
        raise InvalidInput(f"{str(path)!r} failed to load: {type(exc).__name__}: {exc}.",
                           "Fix the file.", field="functions") from None
    found: list[Callable[..., Any]] = [value for name, value in vars(module).items()
             if inspect.isfunction(value) and value.__module__ == module.__name__
             and not name.startswith("_")]
    if not found:
        raise InvalidInput(f"{str(path)!r} defines no public function.",
                           "Define the tools with def (names not starting with _).",
                           field="functions")
    for function in found:
        Function.of(function)  # each one checked now, before the chat starts
    return found


def functions_of(tools: Sequence[Any]) -> list[Function]:
    return [Function.of(tool) for tool in tools]


class Rounds:
    """The function loop one round at a time (see the module's contract): iterating yields each
    round's :class:`~rolechat.chat.ReplyStream`, which the caller reads to its end; the calls
    it made are run before the next round starts. ``reply`` is the last round's reply, once
    the model has answered."""

    def __init__(self, chat: Any, text: str, tools: Sequence[Callable[..., Any]], *,
                 tool_choice: Any = None, parallel_tool_calls: Any = None,
                 max_rounds: int = MAX_ROUNDS,
                 on_result: Callable[[ToolCall, str], None] | None = None,
                 **options: Any) -> None:
        if max_rounds < 1:
            raise InvalidInput(f"max_rounds must be at least 1, got {max_rounds}.",
                               "Allow the model one round of calls at least.",
                               field="max_rounds")
        self.chat, self.text, self.options = chat, text, options
        self.functions = {f.name: f for f in functions_of(tools)}
        self.choice, self.parallel, self.max_rounds = tool_choice, parallel_tool_calls, max_rounds
        self.on_result = on_result
        self.steps: list[Message] = []
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[ReplyStream]:
        specs = [f.spec for f in self.functions.values()]
        choice = self.choice
        for round_ in range(self.max_rounds + 1):
            if round_ == self.max_rounds:
                choice = "none"  # the last round: the model must answer
            stream = self.chat.stream(self.text, tools=specs, tool_choice=choice,
                                      parallel_tool_calls=self.parallel, steps=self.steps,
                                      **self.options)
            yield stream
            reply = stream.reply
            if reply is None or not reply.tool_calls:
                self.reply = reply
                return
            self.steps = [*self.steps, Message("assistant", reply.text, reply.tool_calls),
                          *(self._result(call) for call in reply.tool_calls)]
            if choice not in (None, "auto", "none"):
                choice = "auto"  # forced once: then the model may answer

    def _result(self, call: ToolCall) -> Message:
        function = self.functions.get(call.name)
        result = (function.call(call.arguments) if function is not None else
                  f"Error: there is no tool named {call.name!r} (tools: "
                  f"{', '.join(self.functions)}).")
        if self.on_result is not None:
            self.on_result(call, result)
        return Message("tool", result, tool_call_id=call.id)


def run(chat: Chat, text: str, tools: Sequence[Callable[..., Any]], **options: Any) -> Reply:
    """Reply to ``text``, running the functions the model calls (:class:`Rounds`' options)."""
    rounds = Rounds(chat, text, tools, **options)
    for stream in rounds:
        with stream:
            for _ in stream:
                pass
    assert rounds.reply is not None
    return rounds.reply
