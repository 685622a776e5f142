"""Tool calls in a session (``/v1/conversations/{id}/messages``) over real HTTP with the
embedded model: a reply that calls tools leaves its turn waiting; ``tool_results`` answer the
calls and the model goes on; the turn is stored once, its calls and results with its reply.
Bad requests are a 400 naming the field, with nothing stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from servers import rolechat_serve

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
FORCED = {"tools": [WEATHER], "parallel_tool_calls": False,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with rolechat_serve(tmp_path_factory.mktemp("home")) as base, \
            httpx.Client(base_url=f"{base}/v1", timeout=120) as c:
        yield c


def new_conversation(client: httpx.Client) -> int:
    body = {"params": {"temperature": 0, "max_new_tokens": 120}}
    return int(client.post("/conversations", json=body).json()["id"])


def stored(client: httpx.Client, cid: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = client.get(f"/conversations/{cid}").json()["messages"]
    return messages


def test_a_call_waits_for_its_results_then_the_turn_is_stored_once(client: httpx.Client) -> None:
    cid = new_conversation(client)
    first = client.post(f"/conversations/{cid}/messages",
                        json={"content": "What is the weather in Paris?", **FORCED})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["finish_reason"] == "tool_calls" and body["turn"] is None
    (call,) = body["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        WEATHER["function"]["parameters"])
    assert [(m["role"], m["status"]) for m in stored(client, cid)] == [("user", "pending")]
    second = client.post(f"/conversations/{cid}/messages", json={
        "tool_results": [{"tool_call_id": call["id"], "content": "21 degrees, sunny"}],
        "tools": [WEATHER], "tool_choice": "none"})
    assert second.status_code == 200, second.text
    answer = second.json()
    assert answer["finish_reason"] in ("stop", "length") and answer["turn"] is not None
    assert "tool_calls" not in answer["message"]
    messages = stored(client, cid)
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"),
                                                            ("assistant", "complete")]
    steps = messages[1]["steps"]
    assert [s["role"] for s in steps] == ["assistant", "tool"]
    assert steps[0]["tool_calls"][0]["id"] == call["id"]
    assert steps[1] == {"role": "tool", "content": "21 degrees, sunny",
                        "tool_call_id": call["id"]}
    assert messages[1]["content"] == answer["message"]["content"]


def test_a_streamed_call_comes_in_openai_deltas(client: httpx.Client) -> None:
    cid = new_conversation(client)
    events = []
    with client.stream("POST", f"/conversations/{cid}/messages",
                       json={"content": "Weather in Rome?", "stream": True, **FORCED}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    pieces = [e["tool_calls"][0] for e in events if "tool_calls" in e]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    done = events[-1]
    assert done["done"] and done["finish_reason"] == "tool_calls"
    (call,) = done["message"]["tool_calls"]
    assert "".join(p["function"]["arguments"] for p in pieces) == call["function"]["arguments"]
    assert pieces[0]["id"] == call["id"]  # the id to answer is the one that streamed
    assert not any("<tool_call>" in e.get("delta", "") for e in events)


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_results": [{"tool_call_id": "call_x", "content": "1"}]}, "tool_results"),
    ({"content": "Hi", "tool_results": []}, "content"),
    ({}, "content"),
    ({"content": "Hi", "tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name"),
    ({"content": "Hi", "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_tool_messages_are_a_400_and_store_nothing(client: httpx.Client,
                                                        body: dict[str, Any],
                                                        param: str) -> None:
    cid = new_conversation(client)
    response = client.post(f"/conversations/{cid}/messages", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert stored(client, cid) == []


def test_results_must_answer_the_waiting_calls(client: httpx.Client) -> None:
    cid = new_conversation(client)
    call = client.post(f"/conversations/{cid}/messages", json={
        "content": "Weather in Oslo?", **FORCED}).json()["message"]["tool_calls"][0]
    wrong = client.post(f"/conversations/{cid}/messages",
                        json={"tool_results": [{"tool_call_id": "call_other", "content": "1"}]})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "tool_results"
    assert call["id"] in wrong.json()["error"]["message"]
    right = client.post(f"/conversations/{cid}/messages", json={
        "tool_results": [{"tool_call_id": call["id"], "content": "-3 degrees"}]})
    assert right.status_code == 200, right.text  # the turn still waited
