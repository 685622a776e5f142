"""Several writers on one conversation over HTTP, on the app in-process over the fake engine:
the version, the ETag and message ids GET returns; a stale undo or retry (a turn that is not the
last, or another version) is 409 in OpenAI's shape and changes nothing; and the server's cached
chat takes the turns a REPL (another Store on the same file) added before it plans or acts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.errors import ConversationChanged
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


def conflict(response: Any) -> dict[str, Any]:
    """A 409 in OpenAI's error shape."""
    assert response.status_code == 409, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "conversation_changed" and error["type"] == "invalid_request_error"
    assert "Nothing was changed" in error["message"] and "GET /v1/conversations" in error["message"]
    return error


def conversation(client: TestClient, *messages: str) -> int:
    cid: int = ok(client.post("/conversations", json={}), 201)["id"]
    for text in messages:
        ok(client.post(f"/conversations/{cid}/messages", json={"content": text}))
    return cid


def last_reply(body: dict[str, Any]) -> int:
    """The id of the last reply a client shows (what it names as ``turn``)."""
    replies = [m["id"] for m in body["messages"]
               if m["role"] == "assistant" and m["status"] == "complete"]
    return int(replies[-1])


def test_get_shows_the_version_its_etag_and_message_ids(
        setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, _engine, _path = setup
    cid = conversation(client)
    got = client.get(f"/conversations/{cid}")
    body = ok(got)
    assert got.headers["ETag"] == f'"{body["version"]}"'
    reply = ok(client.post(f"/conversations/{cid}/messages", json={"content": "hi"}))
    after = ok(client.get(f"/conversations/{cid}"))
    assert after["version"] > body["version"]
    assert [m["role"] for m in after["messages"]] == ["user", "assistant"]
    assert all(isinstance(m["id"], int) for m in after["messages"])
    assert reply["turn"] == last_reply(after)  # a reply names its stored turn


def test_a_stale_undo_is_409_and_deletes_nothing(
        setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, _engine, _path = setup
    cid = conversation(client, "one")
    stale = ok(client.get(f"/conversations/{cid}"))  # tab 1 shows one turn
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "two"}))  # tab 2 adds one
    before = ok(client.get(f"/conversations/{cid}"))
    error = conflict(client.post(f"/conversations/{cid}/undo",
                                 json={"turn": last_reply(stale)}))
    assert error["param"] == "turn"
    error = conflict(client.post(f"/conversations/{cid}/undo", json={},
                                 headers={"If-Match": f'"{stale["version"]}"'}))
    assert error["param"] == "If-Match"
    assert ok(client.get(f"/conversations/{cid}"))["messages"] == before["messages"]
    # Naming what is there now works, by turn and by version.
    undone = ok(client.post(f"/conversations/{cid}/undo", json={"turn": last_reply(before)},
                            headers={"If-Match": f'"{before["version"]}"'}))
    assert undone["removed"]["user"] == "two" and undone["conversation"]["turns"] == 1
    # Leaving both out acts on the last turn, as before.
    assert ok(client.post(f"/conversations/{cid}/undo"))["removed"]["user"] == "one"


def test_a_stale_retry_is_409_and_changes_nothing(
        setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, engine, _path = setup
    cid = conversation(client, "one")
    stale = last_reply(ok(client.get(f"/conversations/{cid}")))
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "two"}))
    before = ok(client.get(f"/conversations/{cid}"))
    asked = len(engine.prompts)
    for stream in (False, True):
        conflict(client.post(f"/conversations/{cid}/retry", json={"turn": stale,
                                                                   "stream": stream}))
    assert len(engine.prompts) == asked  # nothing generated
    assert ok(client.get(f"/conversations/{cid}"))["messages"] == before["messages"]
    retried = ok(client.post(f"/conversations/{cid}/retry", json={"turn": last_reply(before)}))
    after = ok(client.get(f"/conversations/{cid}"))
    assert retried["turn"] == last_reply(after) != last_reply(before)  # a new reply, a new name
    assert after["turns"] == 2


def test_a_bad_if_match_or_turn_is_400(setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, _engine, _path = setup
    cid = conversation(client, "one")
    response = client.post(f"/conversations/{cid}/undo", json={},
                           headers={"If-Match": "W/\"abc\""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "If-Match"
    response = client.post(f"/conversations/{cid}/undo", json={"turn": "5"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "turn"
    assert ok(client.get(f"/conversations/{cid}"))["turns"] == 1


def test_the_server_takes_a_repls_turns_before_it_acts(
        setup: tuple[TestClient, FakeEngine, Path]) -> None:
    client, engine, path = setup
    cid = conversation(client, "asked on the page")  # the server now holds this chat
    repl_store = Store(path)
    repl = SavedChat.resume(FakeEngine(), repl_store, cid)
    repl.send("asked in a REPL")
    # A dry run, then a message: both see the REPL's turn.
    prompt = ok(client.post(f"/conversations/{cid}/prompt", json={}))["prompt"]
    assert "asked in a REPL" in prompt
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "asked on the page again"}))
    sent = bytes(t for t in engine.prompts[-1] if t < 256).decode()
    assert "asked in a REPL" in sent
    body = ok(client.get(f"/conversations/{cid}"))
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == [
        "asked on the page", "asked in a REPL", "asked on the page again"]
    # The REPL undoes the page's turn without having shown it: refused, nothing deleted.
    with pytest.raises(ConversationChanged):
        repl.undo()
    assert ok(client.get(f"/conversations/{cid}"))["messages"] == body["messages"]
    # The page undoes the REPL's turn it shows: the server's chat follows.
    repl.send("asked in a REPL again")
    shown = ok(client.get(f"/conversations/{cid}"))
    ok(client.post(f"/conversations/{cid}/undo", json={"turn": last_reply(shown)}))
    assert repl_store.conversation(cid).to_tuples()[-1][0] == "asked on the page again"
    ok(client.post(f"/conversations/{cid}/messages", json={"content": "last"}))
    sent = bytes(t for t in engine.prompts[-1] if t < 256).decode()
    assert "asked in a REPL again" not in sent
    repl_store.close()
