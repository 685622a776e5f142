"""Python functions as tools (rolechat.functions) and the loop ``Chat.send(text, tools=[...])``
runs, on the fake engine (its replies are queued: the calls a model would make). The real
model's loop is in tests/server/test_tools.py."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from fakes import FakeEngine
from rolechat import Chat, InvalidInput
from rolechat.functions import Function
from rolechat.toolcalls import ToolCall


def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict[str, object]:
    """The weather in a city.

    Longer notes the model does not need."""
    return {"city": city, "temp": 21 if unit == "C" else 70, "unit": unit}


def broken(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"no luck with {x}")


def call(name: str, **arguments: object) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_a_function_is_described_from_its_signature_and_docstring() -> None:
    spec = Function.of(get_weather).spec
    assert spec == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string"},
                                      "unit": {"default": "C", "enum": ["C", "F"],
                                               "type": "string"}}}}}


def test_a_call_validates_its_arguments_and_never_raises() -> None:
    weather = Function.of(get_weather)
    assert json.loads(weather.call('{"city": "Paris"}')) == {"city": "Paris", "temp": 21,
                                                             "unit": "C"}
    assert weather.call('{"town": "Paris"}').startswith("Error: bad arguments for get_weather")
    assert weather.call("not json").startswith("Error: bad arguments")
    assert Function.of(broken).call('{"x": 3}') == \
        "Error: broken raised RuntimeError: no luck with 3"


def test_what_cannot_be_a_tool_is_refused() -> None:
    def spread(*args: int) -> None:
        """No."""

    with pytest.raises(InvalidInput, match=r"\*args"):
        Function.of(spread)


def test_the_loop_runs_the_calls_and_records_one_turn() -> None:
    engine = FakeEngine()
    engine.replies += [call("get_weather", city="Paris"), "It is 21 °C in Paris."]
    chat = Chat(engine)
    heard: list[tuple[ToolCall, str]] = []
    reply = chat.send("Weather in Paris?", tools=[get_weather],
                      on_tool_result=lambda c, r: heard.append((c, r)))
    assert reply.text == "It is 21 °C in Paris." and reply.finish_reason == "stop"
    assert [c.name for c, _ in heard] == ["get_weather"]
    assert json.loads(heard[0][1])["temp"] == 21
    assert [m.role for m in reply.steps] == ["assistant", "tool"]
    assert reply.steps[1].tool_call_id == reply.steps[0].tool_calls[0].id
    turn = chat.conversation.turns[-1]  # one turn, its call and result inside it
    assert (turn.user, turn.assistant, turn.steps) == ("Weather in Paris?", reply.text,
                                                        reply.steps)
    # The second prompt held the call and its result (the generic format: as content).
    second = bytes(t for t in engine.prompts[1] if t < 256).decode()
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in second
    assert "<tool_response>" in second and '"temp": 21' in second
    assert engine.constraints[0].triggers  # auto: lazy grammar


def test_a_tool_that_raises_becomes_an_error_the_model_reads() -> None:
    engine = FakeEngine()
    engine.replies += [call("broken", x=1), "Sorry, it failed."]
    reply = Chat(engine).send("Try it.", tools=[broken])
    assert reply.text == "Sorry, it failed."
    assert reply.steps[1].content == "Error: broken raised RuntimeError: no luck with 1"


def test_a_call_of_an_unknown_tool_gets_an_error_result() -> None:
    engine = FakeEngine()
    engine.replies += [call("launch", target="moon"), "I cannot."]
    reply = Chat(engine).send("Go.", tools=[get_weather])
    assert reply.steps[1].content == \
        "Error: there is no tool named 'launch' (tools: get_weather)."


def test_a_model_that_keeps_calling_must_answer_after_the_last_round() -> None:
    engine = FakeEngine()
    engine.replies += [call("get_weather", city="Paris")] * 3 + ["Enough."]
    reply = Chat(engine).send("Loop.", tools=[get_weather], tool_choice="required",
                              max_tool_rounds=3)
    assert reply.text == "Enough." and len(reply.steps) == 6
    grammars = [c.gbnf is not None for c in engine.constraints]
    triggers = [bool(c.triggers) for c in engine.constraints]
    # Round 1 forced (strict), rounds 2-3 auto (lazy), then "none": no grammar, no tools.
    assert grammars == [True, True, True, False] and triggers == [False, True, True, False]


def test_a_reply_that_calls_tools_is_no_turn_yet() -> None:
    engine = FakeEngine()
    engine.replies.append("Let me look. " + call("get_weather", city="Rome"))
    chat = Chat(engine)
    reply = chat.send("Rome?", tools=[Function.of(get_weather).spec])
    assert reply.finish_reason == "tool_calls" and reply.text == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Rome"})]
    assert chat.conversation.turns == []
