"""Branches over HTTP (the app in-process over the fake engine) and in the store: a message
sent with ``edit`` replaces a user message the conversation shows, and that message and what
followed stay as a branch; ``versions`` in GET places each version ("2/3"); POST .../branch
switches, and the window, the turns, search and the next prompt follow the branch shown; a
stale version is a 409; a JSON export carries every version and an import brings them back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.errors import InvalidInput
from rolechat.server import create_app
from rolechat.store import Store
from rolechat.transfer import read_import


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine, Store]]:
    store = Store(tmp_path / "rolechat.db")
    engine = FakeEngine()
    with TestClient(create_app(engine, store=store), base_url="http://testserver/v1") as client:
        yield client, engine, store
    store.close()


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def shown(client: TestClient, cid: int) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in ok(client.get(f"/conversations/{cid}"))["messages"]]


def send(client: TestClient, engine: FakeEngine, cid: int, text: str, reply: str,
         **extra: Any) -> dict[str, Any]:
    engine.replies.append(reply)
    return ok(client.post(f"/conversations/{cid}/messages", json={"content": text, **extra}))


def last_prompt(engine: FakeEngine) -> str:
    return bytes(t for t in engine.prompts[-1] if t < 256).decode()


def test_editing_an_old_message_keeps_the_old_branch_and_switching_brings_it_back(
        setup: tuple[TestClient, FakeEngine, Store]) -> None:
    client, engine, _ = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    send(client, engine, cid, "Q1", "A1")
    send(client, engine, cid, "Q2", "A2")
    send(client, engine, cid, "Q3", "A3")
    q2 = next(m for m in ok(client.get(f"/conversations/{cid}"))["messages"]
              if m["content"] == "Q2")
    # Edit Q2 (not the last message): Q2 and what followed become a branch.
    send(client, engine, cid, "Q2 edited", "A2'", edit=q2["id"])
    assert shown(client, cid) == [("user", "Q1"), ("assistant", "A1"),
                                  ("user", "Q2 edited"), ("assistant", "A2'")]
    prompt = last_prompt(engine)
    assert "Q2 edited" in prompt and "A2" not in prompt.replace("A2'", "") and "Q3" not in prompt
    body = ok(client.get(f"/conversations/{cid}"))
    assert body["turns"] == 2
    edited = body["messages"][2]
    assert edited["versions"]["count"] == 2 and edited["versions"]["index"] == 2
    old = edited["versions"]["branches"][0]
    assert isinstance(old, int) and edited["versions"]["branches"][1] is None
    assert all("versions" not in m for i, m in enumerate(body["messages"]) if i != 2)
    # Search sees the branch shown only.
    found = ok(client.get("/conversations", params={"q": "Q3"}))["data"]
    assert found == []
    # Switch back: the old branch whole, the edit kept as a branch; the next reply follows it.
    switched = ok(client.post(f"/conversations/{cid}/branch", json={"branch": old}))
    assert [(m["role"], m["content"]) for m in switched["messages"]] == [
        ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"),
        ("user", "Q3"), ("assistant", "A3")]
    assert switched["turns"] == 3
    assert switched["messages"][2]["versions"]["index"] == 1
    send(client, engine, cid, "Q4", "A4")
    prompt = last_prompt(engine)
    assert "Q3" in prompt and "A3" in prompt and "edited" not in prompt
    # And forth again: three versions of the second message now? No: two, the edit's.
    again = ok(client.get(f"/conversations/{cid}"))["messages"][2]["versions"]
    ok(client.post(f"/conversations/{cid}/branch", json={"branch": again["branches"][1]}))
    assert shown(client, cid)[2:] == [("user", "Q2 edited"), ("assistant", "A2'")]


def test_regenerating_with_the_same_text_keeps_each_reply(
        setup: tuple[TestClient, FakeEngine, Store]) -> None:
    client, engine, _ = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    first = send(client, engine, cid, "Tell me", "one")
    user_id = ok(client.get(f"/conversations/{cid}"))["messages"][0]["id"]
    send(client, engine, cid, "Tell me", "two", edit=user_id)
    user_id = ok(client.get(f"/conversations/{cid}"))["messages"][0]["id"]
    send(client, engine, cid, "Tell me", "three", edit=user_id)
    body = ok(client.get(f"/conversations/{cid}"))
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "Tell me"), ("assistant", "three")]
    versions = body["messages"][0]["versions"]
    assert versions["count"] == 3 and versions["index"] == 3
    ok(client.post(f"/conversations/{cid}/branch", json={"branch": versions["branches"][0]}))
    body = ok(client.get(f"/conversations/{cid}"))
    assert body["messages"][1]["content"] == "one" and body["messages"][1]["id"] == first["turn"]
    assert body["messages"][0]["versions"]["index"] == 1
    assert body["messages"][0]["versions"]["count"] == 3


def test_bad_and_stale_branch_requests_change_nothing(
        setup: tuple[TestClient, FakeEngine, Store]) -> None:
    client, engine, _ = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    send(client, engine, cid, "Q1", "A1")
    body = ok(client.get(f"/conversations/{cid}"))
    reply_id = body["messages"][1]["id"]
    not_user = client.post(f"/conversations/{cid}/messages",
                           json={"content": "x", "edit": reply_id})
    assert not_user.status_code == 400 and not_user.json()["error"]["param"] == "edit"
    stale = client.post(f"/conversations/{cid}/messages",
                        json={"content": "x", "edit": body["messages"][0]["id"]},
                        headers={"If-Match": f'"{body["version"] - 1}"'})
    assert stale.status_code == 409
    missing = client.post(f"/conversations/{cid}/branch", json={"branch": 999})
    assert missing.status_code == 400 and "no branch 999" in missing.text
    assert ok(client.get(f"/conversations/{cid}")) == body
    other = ok(client.post("/conversations", json={}), 201)["id"]
    send(client, engine, other, "O1", "B1")
    first = ok(client.get(f"/conversations/{other}"))["messages"][0]["id"]
    send(client, engine, other, "O1 again", "B2", edit=first)
    theirs = ok(client.get(f"/conversations/{other}"))["messages"][0]["versions"]["branches"][0]
    across = client.post(f"/conversations/{cid}/branch", json={"branch": theirs})
    assert across.status_code == 400  # another conversation's branch


def test_deleting_a_conversation_deletes_its_branches(
        setup: tuple[TestClient, FakeEngine, Store]) -> None:
    client, engine, store = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    send(client, engine, cid, "Q1", "A1")
    first = ok(client.get(f"/conversations/{cid}"))["messages"][0]["id"]
    send(client, engine, cid, "Q1b", "A1b", edit=first)
    ok(client.delete(f"/conversations/{cid}"))
    db = store._db  # what is left on disk
    assert db.execute("SELECT COUNT(*) FROM branches").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_json_export_carries_every_version_and_import_brings_them_back(
        setup: tuple[TestClient, FakeEngine, Store]) -> None:
    client, engine, store = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    send(client, engine, cid, "Q1", "A1")
    send(client, engine, cid, "Q2", "A2")
    q2 = ok(client.get(f"/conversations/{cid}"))["messages"][2]["id"]
    send(client, engine, cid, "Q2b", "A2b", edit=q2)  # a version of the second turn
    q1 = ok(client.get(f"/conversations/{cid}"))["messages"][0]["id"]
    send(client, engine, cid, "Q1b", "A1b", edit=q1)  # and one of the whole conversation
    exported = json.loads(store.export(cid, "json"))
    assert [m["content"] for m in exported["messages"]] == ["Q1b", "A1b"]
    branches = exported["branches"]
    contents = sorted(tuple(m["content"] for m in b["messages"]) for b in branches)
    assert contents == [("Q1", "A1", "Q2b", "A2b"), ("Q2", "A2")]
    nested = next(b for b in branches if b["messages"][0]["content"] == "Q2")
    holder = branches.index(next(b for b in branches if b["messages"][0]["content"] == "Q1"))
    assert nested["after"] == {"branch": holder, "message": 1}  # after A1, in its branch
    assert next(b for b in branches if b is not nested)["after"] is None
    # Imported, it is the same tree: switch to the first version and to its other branch.
    new = store.write_import(read_import(json.dumps(exported)))
    again = json.loads(store.export(new, "json"))
    assert again["messages"] == exported["messages"] and again["branches"] == branches
    first = ok(client.get(f"/conversations/{new}"))["messages"][0]["versions"]
    other = next(b for b in first["branches"] if b is not None)
    ok(client.post(f"/conversations/{new}/branch", json={"branch": other}))
    assert shown(client, new) == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2b"),
                                  ("assistant", "A2b")]
    second = ok(client.get(f"/conversations/{new}"))["messages"][2]["versions"]
    assert second["count"] == 2


@pytest.mark.parametrize(("branches", "field"), [
    ("no", "branches"),
    ([{"after": None, "messages": []}], "branches[0]"),
    ([{"after": {"message": 9}, "messages": [{"role": "user", "content": "x"}]}],
     "branches[0].after"),
    ([{"after": {"branch": 0, "message": 0}, "messages": [{"role": "user", "content": "x"}]}],
     "branches[0].after"),
    ([{"after": None, "messages": [{"role": "tool", "content": "x"}]}],
     "branches[0].messages[0]"),
])
def test_bad_branches_in_a_file_are_refused(branches: Any, field: str) -> None:
    text = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}],
                       "branches": branches})
    with pytest.raises(InvalidInput) as caught:
        read_import(text)
    assert caught.value.field == field


def test_switching_back_restores_the_branchs_warm_state(
        setup: tuple[TestClient, FakeEngine, Store]) -> None:
    """The branch left is set aside in the RAM tier (engine.set_aside): back on it, the next
    reply restores its whole prompt, not only what it shares with the other branch."""
    client, engine, _ = setup
    cid = ok(client.post("/conversations", json={}), 201)["id"]
    long = "x" * 300
    send(client, engine, cid, "Q1", "A1")
    send(client, engine, cid, "Q2 " + long, "A2 " + long)
    q2 = ok(client.get(f"/conversations/{cid}"))["messages"][2]["id"]
    send(client, engine, cid, "Q2b", "A2b", edit=q2)
    old = ok(client.get(f"/conversations/{cid}"))["messages"][2]["versions"]["branches"][0]
    ok(client.post(f"/conversations/{cid}/branch", json={"branch": old}))
    engine.replies.append("A3")
    reply = ok(client.post(f"/conversations/{cid}/messages", json={"content": "Q3"}))
    usage, extra = reply["usage"], reply["rolechat"]
    assert extra["kv_source"] == "ram", extra
    # All but the new message was restored: the old branch's 600 characters included.
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < 20
    assert usage["prompt_tokens_details"]["cached_tokens"] > 600
    # Deleting the conversation drops what it set aside.
    ok(client.delete(f"/conversations/{cid}"))
    assert not [name for name, _ in engine.kv.ram.items() if name.startswith(f"conversation-{cid}")]
