"""Tool calls through `rolechat serve` over real HTTP with the embedded model (SmolLM2: its
template has no tool support, so the generic format carries the tools): the OpenAI SDK's
create and stream helpers, LangChain's ``bind_tools`` loop, and the library's own function loop
on the real engine. Calls forced by ``tool_choice`` are valid under their tool's schema every
time, greedy and sampled; bad requests are a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import Field

from fakes import FakeEngine
from rolechat import Chat, InvalidInput
from rolechat.conversation import Message
from rolechat.toolcalls import ToolCall
from servers import rolechat_serve

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rolechat_serve(tmp_path_factory.mktemp("home")) as url:
        yield url


@pytest.fixture
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def model_of(base: str) -> str:
    return str(httpx.get(f"{base}/v1/models").json()["data"][0]["id"])


def check_calls(calls: Any, names: set[str]) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11},
                                      {"temperature": 1.3}], ids=["greedy", "seeded", "hot"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_call_is_valid(client: openai.OpenAI, base: str, sampling: dict[str, Any],
                                choice: str) -> None:
    tool_choice: Any = ("required" if choice == "required" else
                        {"type": "function", "function": {"name": "get_time"}})
    # One call (parallel calls off): its schema bounds it, so it always ends.
    completion = client.chat.completions.create(
        model=model_of(base), messages=ASK, tools=TOOLS, tool_choice=tool_choice,  # type: ignore[arg-type]
        parallel_tool_calls=False, max_tokens=200, **sampling)
    choice0 = completion.choices[0]
    assert choice0.finish_reason == "tool_calls"
    calls = choice0.message.tool_calls
    check_calls(calls, {"get_weather", "get_time"} if choice == "required" else {"get_time"})
    assert calls is not None and len(calls) == 1


def test_parallel_calls_are_each_valid(client: openai.OpenAI, base: str) -> None:
    completion = client.chat.completions.create(
        model=model_of(base), messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        temperature=0, max_tokens=300)
    choice = completion.choices[0]
    calls = list(choice.message.tool_calls or [])
    if choice.finish_reason == "length":  # the calls may go on: the last one is cut off
        calls = calls[:-1]
    else:
        assert choice.finish_reason == "tool_calls"
    check_calls(calls, {"get_weather", "get_time"})


def test_the_sdk_stream_helpers_read_streamed_calls(client: openai.OpenAI, base: str) -> None:
    fragments: list[str] = []
    with client.chat.completions.stream(model=model_of(base), messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                        tool_choice="required", temperature=0,
                                        parallel_tool_calls=False,
                                        max_tokens=200) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                fragments.append(event.arguments_delta)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    assert choice.message.tool_calls is not None
    joined = "".join(c.function.arguments for c in choice.message.tool_calls)
    assert "".join(fragments) == joined and len(fragments) > 2  # in pieces, as generated


def test_a_round_trip_with_results_answers(client: openai.OpenAI, base: str) -> None:
    first = client.chat.completions.create(model=model_of(base), messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                           tool_choice="required", temperature=0,
                                           parallel_tool_calls=False, max_tokens=200)
    message = first.choices[0].message
    assert message.tool_calls
    results = [{"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
               for call in message.tool_calls]
    messages: Any = [*ASK, message.model_dump(exclude_none=True), *results]
    second = client.chat.completions.create(model=model_of(base), messages=messages,
                                            tools=TOOLS, tool_choice="none",  # type: ignore[arg-type]
                                            temperature=0, max_tokens=40)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    assert not answer.message.tool_calls


def test_langchain_bind_tools_loop(base: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    messages_module = pytest.importorskip("langchain_core.messages")
    chat = langchain_openai.ChatOpenAI(base_url=f"{base}/v1", api_key="none",
                                       model=model_of(base), temperature=0, max_tokens=200,
                                       max_retries=0)
    ran: list[dict[str, Any]] = []

    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city."""
        ran.append({"city": city, "unit": unit})
        return "21 degrees"

    bound = chat.bind_tools([WEATHER], tool_choice="get_weather", parallel_tool_calls=False)
    history: list[Any] = [messages_module.HumanMessage("What is the weather in Paris?")]
    ai = bound.invoke(history)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    history.append(ai)
    for call in ai.tool_calls:
        history.append(messages_module.ToolMessage(get_weather(**call["args"]),
                                                   tool_call_id=call["id"]))
    answer = chat.bind_tools([WEATHER]).invoke(history)
    assert ran and answer.content is not None


def test_the_library_runs_python_functions_on_the_real_model() -> None:
    from rolechat.engines import load_engine

    ran: list[str] = []

    # A bounded argument: the forced call always ends, whatever the model's numerics.
    def get_weather(city: Annotated[str, Field(max_length=30)]) -> str:
        """The current weather in a city."""
        ran.append(city)
        return f"It is 21 degrees in {city}."

    chat = Chat(load_engine(), params={"temperature": 0, "max_new_tokens": 80})
    reply = chat.send("What is the weather in Paris?", tools=[get_weather],
                      tool_choice="required", parallel_tool_calls=False, max_tool_rounds=2)
    assert ran and reply.steps[0].tool_calls[0].name == "get_weather"
    assert reply.steps[1].content == f"It is 21 degrees in {ran[0]}."
    assert reply.finish_reason in ("stop", "length") and not reply.tool_calls
    assert chat.conversation.turns[-1].steps == reply.steps


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "21"}]},
     "messages[1]"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_time", "arguments": "{}"}}]}]}, "messages[1]"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(base: str, extra: dict[str, Any],
                                                       param: str) -> None:
    response = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": ASK, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_steps_that_are_not_calls_and_results_are_refused() -> None:
    with pytest.raises(InvalidInput, match="must follow the assistant message"):
        Chat(FakeEngine()).send("hi", steps=[Message("tool", "1", tool_call_id="x")])
    call = ToolCall("call_1", "get_time", "{}")
    with pytest.raises(InvalidInput, match="answers no call"):
        Chat(FakeEngine()).send("hi", steps=[Message("assistant", "", (call,)),
                                             Message("tool", "1", tool_call_id="call_2")])


def test_the_remote_engine_passes_schemas_and_tools_through(base: str) -> None:
    """rolechat in front of an OpenAI-compatible server (here another rolechat serve): the
    server applies the schema and the tools; the calls it streams come back as calls."""
    from rolechat.engines import load_engine

    remote = load_engine(model_of(base), engine="openai", base_url=f"{base}/v1",
                         context_length=8192)
    try:
        chat = Chat(remote, params={"temperature": 0, "max_new_tokens": 200})
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                  "required": ["city"], "additionalProperties": False}
        reply = chat.send("Name a city.", schema=schema)
        jsonschema.validate(reply.parsed, schema)
        ran: list[str] = []

        def get_time(city: Annotated[str, Field(max_length=30)]) -> str:
            """The local time in a city."""
            ran.append(city)
            return "12:00"

        answer = chat.send("What time is it in Oslo?", tools=[get_time],
                           tool_choice="required", parallel_tool_calls=False,
                           max_tool_rounds=1)
        assert ran and answer.steps[0].tool_calls[0].name == "get_time"
        assert answer.steps[1].content == "12:00"
    finally:
        remote.close()
