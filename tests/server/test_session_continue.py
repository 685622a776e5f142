"""POST /v1/conversations/{id}/continue over HTTP (the app in-process over the fake engine): a
reply cut at max_new_tokens goes on where it stopped, streamed and appended to the stored
reply (its turn keeps its place, with a new id); a stale turn is a 409 and nothing changes; a
conversation with no reply says so."""

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


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine]]:
    store = Store(tmp_path / "rolechat.db")
    engine = FakeEngine()
    with TestClient(create_app(engine, store=store), base_url="http://testserver/v1") as client:
        yield client, engine
    store.close()


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_cut_reply_goes_on_and_is_stored_whole(setup: tuple[TestClient, FakeEngine]) -> None:
    client, engine = setup
    cid = ok(client.post("/conversations", json={"params": {"max_new_tokens": 6}}), 201)["id"]
    engine.replies.append("Once upon a time")
    first = ok(client.post(f"/conversations/{cid}/messages", json={"content": "A story?"}))
    assert first["message"]["content"] == "Once u" and first["finish_reason"] == "length"
    engine.replies.append("pon a")
    events: list[dict[str, Any]] = []
    with client.stream("POST", f"/conversations/{cid}/continue",
                       json={"turn": first["turn"], "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    added = "".join(e.get("delta", "") for e in events)
    done = events[-1]
    assert added == "pon a" and done["done"] is True and done["finish_reason"] == "stop"
    stored = ok(client.get(f"/conversations/{cid}"))
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", "A story?"), ("assistant", "Once upon a")]
    assert stored["messages"][1]["id"] == done["turn"] != first["turn"]
    assert stored["turns"] == 1


def test_a_stale_or_missing_reply_changes_nothing(setup: tuple[TestClient, FakeEngine]) -> None:
    client, _ = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    nothing = client.post(f"/conversations/{cid}/continue", json={})
    assert nothing.status_code == 400 and "no reply to continue" in nothing.text
    first = ok(client.post(f"/conversations/{cid}/messages", json={"content": "One."}))
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "Two."}))
    before = ok(client.get(f"/conversations/{cid}"))
    stale = client.post(f"/conversations/{cid}/continue", json={"turn": first["turn"]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "conversation_changed"
    assert ok(client.get(f"/conversations/{cid}")) == before
