"""Undo and redo over HTTP (the app in-process over the fake engine): redo puts back the turn
the last undo removed, as it was (text, reply, usage, its id: the turn's name), in order for
several undos; after a change (a new message, another writer) redo is a 409 and changes
nothing; with nothing undone it says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.saved import SavedChat
from rolechat.server import create_app
from rolechat.store import Store


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine, Path]]:
    path = tmp_path / "rolechat.db"
    store = Store(path)
    engine = FakeEngine()
    with TestClient(create_app(engine, store=store), base_url="http://testserver/v1") as client:
        yield client, engine, path
    store.close()


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def test_redo_puts_back_what_undo_removed(setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, engine, _ = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    for text, reply in (("One?", "First."), ("Two?", "Second."), ("Three?", "Third.")):
        engine.replies.append(reply)
        ok(client.post(f"/conversations/{cid}/messages", json={"content": text}))
    full = ok(client.get(f"/conversations/{cid}"))["messages"]
    ok(client.post(f"/conversations/{cid}/undo", json={}))
    ok(client.post(f"/conversations/{cid}/undo", json={}))
    assert ok(client.get(f"/conversations/{cid}"))["turns"] == 1
    again = ok(client.post(f"/conversations/{cid}/redo"))
    assert again["restored"] == {"user": "Two?", "assistant": "Second."}
    again = ok(client.post(f"/conversations/{cid}/redo"))
    assert again["restored"] == {"user": "Three?", "assistant": "Third."}
    back = ok(client.get(f"/conversations/{cid}"))["messages"]
    keep = ("id", "role", "content", "status", "tokens", "usage")
    assert [{k: m[k] for k in keep} for m in back] == [{k: m[k] for k in keep} for m in full]
    nothing = client.post(f"/conversations/{cid}/redo")
    assert nothing.status_code == 400 and "nothing to redo" in nothing.text
    # The turns it put back are the session's again: the next prompt holds all three.
    engine.replies.append("Fourth.")
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "Four?"}))
    prompt = bytes(t for t in engine.prompts[-1] if t < 256).decode()
    assert all(word in prompt for word in ("First.", "Second.", "Third."))


def test_redo_after_a_change_is_refused(setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, engine, path = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "One?"}))
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "Two?"}))
    ok(client.post(f"/conversations/{cid}/undo", json={}))
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "Other?"}))  # a change
    before = ok(client.get(f"/conversations/{cid}"))
    refused = client.post(f"/conversations/{cid}/redo")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "conversation_changed"
    assert ok(client.get(f"/conversations/{cid}")) == before
    # Another writer (a REPL on the same store) after an undo: refused as well.
    ok(client.post(f"/conversations/{cid}/undo", json={}))
    repl = SavedChat.resume(engine, Store(path), cid)
    repl.send("From the REPL.")
    assert client.post(f"/conversations/{cid}/redo").status_code == 409
