"""Constrained replies on the transformers engine (llguidance through engines/hf_grammar.py):
a tiny random-weight model — whose free text is noise — gives JSON valid under the schema and
tool calls valid under their tool's, greedy and sampled, because the grammar allows nothing
else. The same Chat API as the llama.cpp engine (tests/server/test_structured.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rolechat import Chat

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "size": {"type": "string", "enum": ["small", "big"]},
    "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
             "maxItems": 3}},
    "required": ["city", "size", "tags"], "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine(tiny_folder: Path) -> Iterator[object]:
    from rolechat.engines import load_engine

    loaded = load_engine(tiny_folder, context_length=1024, dtype="float32")
    yield loaded
    loaded.close()


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1},
                                      {"temperature": 1.5, "seed": 2}])
def test_a_schema_reply_is_valid_json(engine: object, sampling: dict[str, float]) -> None:
    reply = Chat(engine, params={**sampling, "max_new_tokens": 300}).send(  # type: ignore[arg-type]
        "A city, please.", schema=CITY)
    assert reply.finish_reason == "stop", reply.text
    jsonschema.validate(json.loads(reply.text), CITY)
    assert reply.parsed == json.loads(reply.text)


@pytest.mark.parametrize("seed", [3, 4])
def test_a_forced_tool_call_is_valid(engine: object, seed: int) -> None:
    reply = Chat(engine, params={"temperature": 1.0, "seed": seed,  # type: ignore[arg-type]
                                 "max_new_tokens": 200}).send(
        "Time in Oslo?", tools=[TIME], tool_choice="required", parallel_tool_calls=False)
    assert reply.finish_reason == "tool_calls", reply.text
    (call,) = reply.tool_calls
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME["function"]["parameters"])
