"""A conversation's settings over HTTP (the app in-process over the fake engine): GET
.../params shows the persona, the system prompt and every generation parameter with where its
value comes from; PATCH ``params`` changes them for the next reply (null puts one back),
checked as a message's are; nothing else changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.server import create_app
from rolechat.store import Store


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    store = Store(tmp_path / "rolechat.db")
    with TestClient(create_app(FakeEngine(), store=store),
                    base_url="http://testserver/v1") as made:
        yield made
    store.close()


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def settings(client: TestClient, cid: int) -> dict[str, tuple[Any, str]]:
    body = ok(client.get(f"/conversations/{cid}/params"))
    return {name: (p["value"], p["source"]) for name, p in body["params"].items()}


def test_the_params_say_where_each_value_comes_from(client: TestClient) -> None:
    cid = ok(client.post("/conversations", json={"persona": "expert",
                                                 "params": {"temperature": 0.2}}), 201)["id"]
    body = ok(client.get(f"/conversations/{cid}/params"))
    assert body["persona"] == "expert" and body["system"] and "expert" in body["system"].lower()
    shown = settings(client, cid)
    assert shown["temperature"] == (0.2, "you")
    assert shown["max_new_tokens"][1] in ("persona", "rolechat")
    assert shown["seed"] == (None, "rolechat")
    assert set(shown) == {"max_new_tokens", "temperature", "top_p", "top_k",
                          "repetition_penalty", "frequency_penalty", "presence_penalty",
                          "seed", "stop"}


def test_patch_params_applies_to_the_next_reply_and_null_puts_one_back(
        client: TestClient) -> None:
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "Before."}))
    before = ok(client.get(f"/conversations/{cid}"))
    changed = ok(client.patch(f"/conversations/{cid}",
                              json={"params": {"temperature": 0, "max_new_tokens": 3}}))
    assert changed["params"] == {"temperature": 0.0, "max_new_tokens": 3}
    assert changed["turns"] == before["turns"] and changed["system"] == before["system"]
    assert settings(client, cid)["temperature"] == (0.0, "you")
    assert settings(client, cid)["max_new_tokens"] == (3, "you")
    # The next reply uses them: max_new_tokens 3 cuts the fake's reply ("echo").
    reply = ok(client.post(f"/conversations/{cid}/messages", json={"content": "After."}))
    assert reply["usage"]["completion_tokens"] == 3 and reply["finish_reason"] == "length"
    # null: back to rolechat's default; the other one stays.
    ok(client.patch(f"/conversations/{cid}", json={"params": {"max_new_tokens": None}}))
    assert settings(client, cid)["max_new_tokens"] == (512, "rolechat")
    assert settings(client, cid)["temperature"] == (0.0, "you")
    assert ok(client.get(f"/conversations/{cid}"))["params"] == {"temperature": 0.0}


@pytest.mark.parametrize(("params", "field"), [
    ({"temperature": 5}, "params.temperature"),
    ({"temprature": 1}, "params.temprature"),
    ({"max_new_tokens": "many"}, "params.max_new_tokens"),
    ({"max_new_tokens": 10**6}, "params.max_new_tokens"),
])
def test_bad_params_are_refused_and_nothing_changes(client: TestClient,
                                                    params: dict[str, Any], field: str) -> None:
    cid = ok(client.post("/conversations", json={"params": {"temperature": 0.5}}), 201)["id"]
    before = ok(client.get(f"/conversations/{cid}"))
    response = client.patch(f"/conversations/{cid}", json={"params": params, "title": "x"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    after = ok(client.get(f"/conversations/{cid}"))
    assert after["params"] == {"temperature": 0.5} and after["title"] == before["title"]
    assert after["version"] == before["version"]
