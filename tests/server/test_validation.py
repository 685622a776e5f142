"""What the server accepts and refuses, and how it says so, checked on the app in-process over
the fake engine (no model, no sockets): OpenAI's types and neutral fields, field paths in every
error's ``param``, ``/v1/models/{id}``, and the sessions' request checks (strict types, stop
strings, pins numbered from 0, a system prompt that cannot fit, clean titles)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.server import create_app
from rolechat.store import Store

HELLO = [{"role": "user", "content": "Say hi."}]
LIMIT = 20_000
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = Store(tmp_path_factory.mktemp("validation") / "rolechat.db")
    yield create_app(FakeEngine(), store=store, max_body_bytes=LIMIT)
    store.close()


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://testserver/v1") as c:
        yield c


def openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert error["message"]
    return error


def new(client: TestClient, **body: Any) -> int:
    response = client.post("/conversations", json=body)
    assert response.status_code == 201, response.text
    cid: int = response.json()["id"]
    return cid


# ----- completions: what OpenAI's clients send ---------------------------------------------

@pytest.mark.parametrize("extra", [
    {"frequency_penalty": 0}, {"presence_penalty": 0}, {"logprobs": False},
    {"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
    {"metadata": {"app": "test"}}, {"store": False}, {"service_tier": "auto"},
    {"user": "u1"}, {"parallel_tool_calls": True}, {"frequency_penalty": 0.5},
    # issue 19: spec-valid, neutral fields
    {"n": None}, {"n": 1}, {"prompt_cache_key": "conversation-7"},
    {"safety_identifier": "user-hash"}, {"reasoning_effort": "low"},
    {"reasoning_effort": None}, {"verbosity": "medium"}, {"prompt_cache_retention": "24h"},
    {"stream_options": None}, {"stop": ["X1", "X2", "X3", "X4"]},
])
def test_neutral_fields_are_accepted(client: TestClient, extra: dict[str, Any]) -> None:
    response = client.post("/chat/completions", json={"messages": HELLO, "max_tokens": 4, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo"


def test_stream_options_may_ask_for_no_obfuscation(client: TestClient) -> None:
    with client.stream("POST", "/chat/completions", json={
            "messages": HELLO, "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False}}) as response:
        frames = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200 and frames[-1] == "data: [DONE]"
    assert all("obfuscation" not in frame for frame in frames)


@pytest.mark.parametrize(("extra", "field"), [
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "1",
                                                        "tool_call_id": "x"}]}, "messages[1]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
    ({"logprobs": True}, "logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"temperature": 3}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"stream": "yes"}, "stream"), ({"max_tokens": "5"}, "max_tokens"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"), ({"verbosity": 1}, "verbosity"),
    ({"prompt_cache_key": 5}, "prompt_cache_key"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream_options": {"frobnicate": True}}, "stream_options.frobnicate"),
    ({"rolechat": {"window": "yes"}}, "rolechat.window"),
    ({"stop": [1]}, "stop"),
])
def test_what_rolechat_cannot_do_is_a_clear_400(client: TestClient, extra: dict[str, Any],
                                                field: str) -> None:
    error = openai_error(client.post("/chat/completions",
                                     json={"messages": HELLO, "max_tokens": 4, **extra}), 400)
    assert error["param"] == field, error


@pytest.mark.parametrize(("messages", "param", "says"), [
    ([{"role": "robot", "content": "x"}], "messages[0].role", "unknown role"),
    ([{"role": "user", "content": ""}], "messages[0].content", "empty"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": 5}],
     "messages[1].content", "string"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"},
                                   {"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[1]", "text content parts"),
    # A system message later on is moved to the front when read; the error names where the
    # client put it.
    ([*HELLO, {"role": "assistant", "content": "Hi!"}, {"role": "system", "content": "  "}],
     "messages[2].content", "empty"),
    (["hello"], "messages[0]", "object"),
])
def test_an_error_names_the_field_path(client: TestClient, messages: Any, param: str,
                                       says: str) -> None:
    error = openai_error(client.post("/chat/completions", json={"messages": messages}), 400)
    assert error["param"] == param and says in error["message"], error


def test_a_lone_surrogate_names_the_content(client: TestClient) -> None:
    body = b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    error = openai_error(client.post("/chat/completions", content=body, headers=JSON), 400)
    assert error["param"] == "messages[0].content" and "lone surrogate" in error["message"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, 400, "frobnicate"),
])
def test_bad_requests_get_openai_errors(client: TestClient, body: dict[str, Any], status: int,
                                        param: str) -> None:
    assert openai_error(client.post("/chat/completions", json=body), status)["param"] == param


def test_errors_name_the_parameters_the_client_sent(client: TestClient) -> None:
    error = openai_error(client.post("/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}), 400)
    assert error["param"] == "max_tokens" and "max_new_tokens" not in error["message"]


def test_message_shapes_other_servers_take(client: TestClient) -> None:
    cases = [
        [{"role": "developer", "content": "Be brief."}, *HELLO],
        [{"role": "user", "content": "Hello."}, {"role": "user", "content": "Say hi."}],
        [*HELLO, {"role": "assistant", "content": "Hi!"},
         {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again."}],
    ]
    for messages in cases:
        response = client.post("/chat/completions", json={"messages": messages})
        assert response.status_code == 200, (messages, response.text)
    # The developer message is the system prompt: the same prompt as a system message.
    as_developer = client.post("/chat/completions", json={"messages": cases[0]}).json()
    as_system = client.post("/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, *HELLO]}).json()
    assert as_developer["usage"]["prompt_tokens"] == as_system["usage"]["prompt_tokens"]


# ----- /v1/models/{id} ---------------------------------------------------------------------

def test_a_model_is_retrieved_by_its_id(client: TestClient) -> None:
    listed = client.get("/models").json()["data"]
    assert [m["id"] for m in listed] == ["fake"]
    assert client.get("/models/fake").json() == listed[0]
    error = openai_error(client.get("/models/gpt-4o"), 404)
    assert error["code"] == "model_not_found" and "fake" in error["message"]
    assert openai_error(client.get("/models/a/b"), 404)["code"] == "model_not_found"


# ----- bodies the server cannot read ------------------------------------------------------

def test_errors_under_v1_are_openai_shaped(client: TestClient) -> None:
    assert openai_error(client.get("/nothing/here"), 404)["code"] == "unknown_url"
    error = openai_error(client.get("/chat/completions"), 405)
    assert error["code"] == "method_not_allowed" and "POST" in error["message"]
    openai_error(client.delete("/models"), 405)
    error = openai_error(client.post("/chat/completions", content=b"{not json", headers=JSON),
                         400)
    assert error["message"].startswith("The body is not valid JSON") and error["param"] is None


def test_a_body_that_is_not_utf8_says_so(client: TestClient) -> None:
    body = b'{"messages": [{"role": "user", "content": "\xff"}]}'
    error = openai_error(client.post("/chat/completions", content=body, headers=JSON), 400)
    assert "UTF-8" in error["message"] and "nested" not in error["message"]


def test_deeply_nested_json_says_so(client: TestClient) -> None:
    deep = b"[" * 9_000 + b"]" * 9_000  # deeper than the JSON parser recurses
    error = openai_error(client.post("/chat/completions", content=deep, headers=JSON), 400)
    assert "nested too deeply" in error["message"] and "UTF-8" not in error["message"]


def test_a_body_that_is_not_json_says_so(client: TestClient) -> None:
    error = openai_error(client.post(
        "/chat/completions", content=b"messages=hi",
        headers={"Content-Type": "application/x-www-form-urlencoded"}), 400)
    assert "Content-Type: application/json" in error["message"]


def test_a_declared_length_over_the_limit_is_refused_unread(client: TestClient) -> None:
    response = client.post("/chat/completions", content=b"x" * (LIMIT + 1), headers=JSON)
    assert openai_error(response, 413)["code"] == "request_too_large"
    big = client.post("/chat/completions", headers=JSON, content=json.dumps(
        {"messages": [{"role": "user", "content": "x" * 30000}]}).encode())
    assert openai_error(big, 413)["code"] == "request_too_large"


def test_a_bad_id_in_the_url_is_not_about_a_body(client: TestClient) -> None:
    for method in ("GET", "DELETE"):
        error = openai_error(client.request(method, "/conversations/abc"), 400)
        assert "in the URL" in error["message"] and "body" not in error["message"]
        assert error["param"] == "cid"


@pytest.mark.parametrize("cid", [2**63, 2**64 + 5, -1])
def test_ids_out_of_range_are_not_found(client: TestClient, cid: int) -> None:
    for method, path in (("GET", f"/conversations/{cid}"), ("DELETE", f"/conversations/{cid}"),
                         ("POST", f"/conversations/{cid}/undo")):
        response = client.request(method, path, json={} if method == "POST" else None)
        assert openai_error(response, 404)["code"] == "conversation_not_found", (method, path)


def test_api_keys(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), api_keys=["k"], store=Store(tmp_path / "db"))
    with TestClient(app, base_url="http://testserver/v1") as client:
        assert openai_error(client.get("/models"), 401)["code"] == "invalid_api_key"
        wrong = client.get("/models", headers={"Authorization": "Bearer nope"})
        assert openai_error(wrong, 401)["code"] == "invalid_api_key"
        assert client.get("/models", headers={"Authorization": "bearer k"}).status_code == 200
        page = client.get("http://testserver/")
        assert page.status_code == 200  # the page needs no key; its API calls do


# ----- sessions ------------------------------------------------------------------------------

def test_session_bodies_are_as_strict_as_completions(client: TestClient) -> None:
    cid = new(client)
    for path, body, param in [
        (f"/conversations/{cid}/messages", {"content": "x", "pinned": "yes"}, "pinned"),
        (f"/conversations/{cid}/messages", {"content": "x", "stream": "yes"}, "stream"),
        (f"/conversations/{cid}/messages", {"content": "x", "stream": 1}, "stream"),
        (f"/conversations/{cid}/retry", {"stream": "yes"}, "stream"),
        (f"/conversations/{cid}/prompt", {"content": 5}, "content"),
        ("/conversations", {"title": 5}, "title"),
        ("/conversations", {"system": ["x"]}, "system"),
    ]:
        error = openai_error(client.post(path, json=body), 400)
        assert error["param"] == param, (path, body, error)
    error = openai_error(client.patch(f"/conversations/{cid}", json={"pins": ["0"]}), 400)
    assert error["param"] == "pins[0]"
    assert client.get(f"/conversations/{cid}").json()["messages"] == []


def test_one_rule_for_stop_strings(client: TestClient) -> None:
    five = ["a", "b", "c", "d", "e"]
    error = openai_error(client.post("/conversations", json={"params": {"stop": five}}), 400)
    assert error["param"] == "params.stop" and "at most 4" in error["message"]
    cid = new(client, params={"stop": five[:4]})
    error = openai_error(client.post(f"/conversations/{cid}/messages",
                                     json={"content": "x", "params": {"stop": five}}), 400)
    assert error["param"] == "params.stop"
    assert openai_error(client.post("/chat/completions",
                                    json={"messages": HELLO, "stop": five}), 400)["param"] == "stop"
    assert client.post(f"/conversations/{cid}/messages",
                       json={"content": "x", "params": {"stop": five[:4]}}).status_code == 200


def test_session_params_errors_name_their_path(client: TestClient) -> None:
    cid = new(client)
    assert openai_error(client.post("/conversations", json={"params": {"temperature": -1}}),
                        400)["param"] == "params.temperature"
    assert openai_error(client.post("/conversations", json={"params": {"frobnicate": 1}}),
                        400)["param"] == "params.frobnicate"
    assert openai_error(client.post(f"/conversations/{cid}/messages",
                                    json={"content": "x", "params": {"top_p": 0}}),
                        400)["param"] == "params.top_p"
    assert openai_error(client.post("/conversations", json={"params": {"memory": "lots"}}),
                        400)["param"] == "params.memory"


def test_bad_session_input(client: TestClient) -> None:
    cid = new(client)
    assert openai_error(client.post(f"/conversations/{cid}/messages", json={"content": "  "}),
                        400)["param"] == "content"
    assert openai_error(client.post("/conversations", json={"persona": "nobody"}),
                        404)["code"] == "persona_not_found"
    assert openai_error(client.get("/conversations/999999"), 404)["code"] == \
        "conversation_not_found"
    assert openai_error(client.post("/conversations/999999/messages", json={"content": "x"}),
                        404)["code"] == "conversation_not_found"
    assert openai_error(client.post("/conversations", json={"frobnicate": 1}),
                        400)["param"] == "frobnicate"
    assert openai_error(client.post(f"/conversations/{cid}/messages",
                                    json={"content": "x", "frobnicate": 1}), 400)
    assert openai_error(client.post(f"/conversations/{cid}/prompt", json={"draft": "x"}), 400)
    for path in (f"/conversations/{cid}/messages", f"/conversations/{cid}/prompt"):
        error = openai_error(client.post(path, content=b'{"content": "a \\ud800"}',
                                         headers=JSON), 400)
        assert error["param"] == "content" and "lone surrogate" in error["message"]
    for field in ("system", "title"):
        error = openai_error(client.post("/conversations", content=json.dumps(
            {field: "a \ud800"}, ensure_ascii=True).encode(), headers=JSON), 400)
        assert error["param"] == field
    assert client.get(f"/conversations/{cid}").json()["messages"] == []


def test_pins_are_numbered_from_0_in_errors(tmp_path: Path) -> None:
    app = create_app(FakeEngine(context_length=400), store=Store(tmp_path / "db"))
    with TestClient(app, base_url="http://testserver/v1") as client:
        cid = new(client, system="S", params={"max_new_tokens": 50})
        first = client.post(f"/conversations/{cid}/messages",
                            json={"content": "Remember this.", "pinned": True})
        assert first.status_code == 200, first.text
        error = openai_error(client.patch(f"/conversations/{cid}", json={"pins": [0, 5]}), 400)
        assert error["param"] == "pins[1]" and "There is no turn 5" in error["message"]
        assert "numbered from 0" in error["message"]
        # A message that does not fit beside the pinned turn 0 names it as turn 0.
        error = openai_error(client.post(f"/conversations/{cid}/messages",
                                         json={"content": "x" * 320}), 400)
        assert error["code"] == "context_length_exceeded"
        assert "pinned turn(s) 0," in error["message"] and "/unpin" not in error["message"]


def test_a_system_prompt_that_cannot_fit_is_refused_at_once(tmp_path: Path) -> None:
    engine = FakeEngine(context_length=2048)
    app = create_app(engine, store=Store(tmp_path / "db"),
                     max_body_bytes=1_000_000)
    with TestClient(app, base_url="http://testserver/v1") as client:
        cid = new(client, system="Be brief.", params={"max_new_tokens": 48})
        before = client.get(f"/conversations/{cid}").json()
        error = openai_error(client.patch(f"/conversations/{cid}",
                                          json={"system": "x" * 200_000}), 400)
        assert error["param"] == "system"
        assert "The system prompt is 200000 tokens" in error["message"]
        assert "max_new_tokens 48" in error["message"]
        assert client.get(f"/conversations/{cid}").json() == before
        # Nothing changed: messages still work.
        reply = client.post(f"/conversations/{cid}/messages", json={"content": "Hi"})
        assert reply.status_code == 200, reply.text
        # The largest system prompt it names fits; one more token does not.
        room = int(error["message"].split("room for ")[1].split(":")[0])
        assert client.patch(f"/conversations/{cid}",
                            json={"system": "y" * room}).status_code == 200
        assert openai_error(client.patch(f"/conversations/{cid}",
                                         json={"system": "y" * (room + 1)}), 400)
        # The same check when the conversation is made.
        error = openai_error(client.post("/conversations", json={"system": "x" * 200_000}), 400)
        assert error["param"] == "system"
        assert len(client.get("/conversations").json()["data"]) == 1  # none was made


def test_titles_lose_control_and_bidi_override_characters(client: TestClient) -> None:
    cid = new(client, title="a\x00b\u202ec\u2066d")
    assert client.get(f"/conversations/{cid}").json()["title"] == "abcd"
    changed = client.patch(f"/conversations/{cid}", json={"title": " Sea\x00\n\u202estories\t"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["title"] == "Sea stories"
    listed = {c["id"]: c["title"] for c in client.get("/conversations").json()["data"]}
    assert listed[cid] == "Sea stories"
    kept = client.patch(f"/conversations/{cid}", json={"title": "日本語 — café 🙂"}).json()
    assert kept["title"] == "日本語 — café 🙂"
