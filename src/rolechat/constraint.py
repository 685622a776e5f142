"""Constraint: what a reply's text must be, said once for every engine.

Contract:
- A :class:`Constraint` is a grammar in llama.cpp's GBNF dialect (root rule ``root``), strict
  from the reply's first token, or *lazy*: free text until one of ``triggers`` (regular
  expressions) matches the whole reply so far, then the grammar from the text of the match's
  first group on (llama.cpp's ``llama_sampler_init_grammar_lazy_patterns``). A reply under a
  constraint can only be text the grammar accepts (then the end of generation), or a prefix of
  it when ``max_new_tokens`` cuts it off.
- ``openai`` holds the request fields that ask the same of an OpenAI-compatible server
  (``response_format``; ``tools``, ``tool_choice``, ``parallel_tool_calls``): the remote engine
  sends those and no grammar.
- :meth:`Constraint.json` builds one from a JSON Schema (checked first: an unsupported keyword
  is an :class:`~rolechat.errors.InvalidInput` naming it, never a silently unconstrained
  reply) or, with no schema, for any JSON object. ``schema`` is kept so that the caller can
  parse and validate the reply.
- Local engines apply it by sampling first and consulting the grammar only when the sampled
  token is refused (llama.cpp's common sampler does the same), so a constrained reply decodes
  nearly as fast as free text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)
class Constraint:
    """A grammar a reply must follow, and the same request in OpenAI's words."""

    #: None: no grammar here (only the OpenAI fields: tools offered with tool_choice "none").
    gbnf: str | None
    triggers: tuple[str, ...] = ()
    openai: dict[str, Any] = field(default_factory=dict)
    #: The JSON Schema the grammar came from (None: any JSON object, or not JSON at all).
    schema: dict[str, Any] | None = None

    @property
    def lazy(self) -> bool:
        return bool(self.triggers)

    @classmethod
    def json(cls, schema: Any = None, *, name: str = "reply",
             strict: bool | None = None) -> Constraint:
        """Replies that are one JSON value valid under ``schema`` (anything :func:`~rolechat.
        schemas.load_schema` takes: a dict, a pydantic model class, JSON text, a file, the
        concise form), or any JSON object when ``schema`` is None."""
        from .schemas import JSON_OBJECT_GRAMMAR, check_schema, load_schema, schema_grammar

        if schema is None:
            return cls(JSON_OBJECT_GRAMMAR, openai={"response_format": {"type": "json_object"}})
        checked = check_schema(load_schema(schema))
        spec: dict[str, Any] = {"name": name, "schema": checked}
        if strict is not None:
            spec["strict"] = strict
        return cls(schema_grammar(checked), schema=checked,
                   openai={"response_format": {"type": "json_schema", "json_schema": spec}})
