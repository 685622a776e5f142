"""Server-side sessions (/v1/conversations, /v1/personas) over real HTTP against a real
`rolechat serve` with two API keys and the embedded model."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rolechat.store import MIGRATIONS, Store
from servers import rolechat_serve

K1, K2 = "k1", "k2"
SHORT = {"temperature": 0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rolechat_serve(tmp_path_factory.mktemp("home"), "--api-key", K1,
                        "--api-key", K2) as base:
        yield f"{base}/v1"


@pytest.fixture
def c1(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {K1}"},
                      timeout=120) as client:
        yield client


@pytest.fixture
def c2(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {K2}"},
                      timeout=120) as client:
        yield client


def new(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/conversations", json={"params": SHORT, **body})
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def send(client: httpx.Client, cid: int, content: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"/conversations/{cid}/messages", json={"content": content, **body})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_personas(c1: httpx.Client) -> None:
    body = c1.get("/personas").json()
    assert body["object"] == "list"
    names = {p["name"] for p in body["data"]}
    assert {"concise", "tutorial", "expert", "support"} <= names
    expert = next(p for p in body["data"] if p["name"] == "expert")
    assert expert["params"] == {"temperature": 0.3} and expert["system"]


def test_create_list_get_delete(c1: httpx.Client) -> None:
    made = new(c1, persona="expert", title="Physics", system="Be exact.")
    assert made["persona"] == "expert" and made["title"] == "Physics"
    assert made["system"] == "Be exact." and made["turns"] == 0 and made["messages"] == []
    assert made["params"]["max_new_tokens"] == 12 and made["params"]["temperature"] == 0
    other = new(c1)
    listed = c1.get("/conversations").json()
    assert listed["object"] == "list"
    ids = [c["id"] for c in listed["data"]]
    assert ids.index(other["id"]) < ids.index(made["id"])  # newest first
    assert all("messages" not in c for c in listed["data"])
    got = c1.get(f"/conversations/{made['id']}").json()
    assert got["id"] == made["id"] and got["messages"] == []
    assert c1.delete(f"/conversations/{made['id']}").json() == {"id": made["id"],
                                                                  "deleted": True}
    gone = c1.get(f"/conversations/{made['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "conversation_not_found"
    assert made["id"] not in [c["id"] for c in c1.get("/conversations").json()["data"]]


def test_three_turns_grow_and_reuse_the_cache(c1: httpx.Client) -> None:
    cid = new(c1, system="Be brief.")["id"]
    for i, question in enumerate(["What is the capital of France?", "And of Italy?",
                                  "And of Spain?"]):
        reply = send(c1, cid, question)
        assert reply["message"]["role"] == "assistant" and reply["message"]["content"]
        assert reply["finish_reason"] in ("stop", "length")
        usage = reply["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 < usage["completion_tokens"] <= 12
        if i > 0:
            assert usage["prompt_tokens_details"]["cached_tokens"] > 0
        assert reply["rolechat"]["kept_turns"] == list(range(i))
        assert reply["rolechat"]["dropped_turns"] == []
        got = c1.get(f"/conversations/{cid}").json()
        assert got["turns"] == i + 1 and len(got["messages"]) == 2 * (i + 1)
        assert got["messages"][-2] == {**got["messages"][-2], "role": "user",
                                       "content": question, "status": "complete"}
        assert got["messages"][-1]["content"] == reply["message"]["content"]


def test_prompt_dry_run_stores_nothing(c1: httpx.Client) -> None:
    cid = new(c1, system="You are a pirate.")["id"]
    first = send(c1, cid, "Hello there!")["message"]["content"]
    before = c1.get(f"/conversations/{cid}").json()
    response = c1.post(f"/conversations/{cid}/prompt", json={"content": "Where is the gold?"})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt = body["prompt"]
    assert "You are a pirate." in prompt and "Hello there!" in prompt and first in prompt
    assert "Where is the gold?" in prompt and prompt.endswith("<|im_start|>assistant\n")
    plan = body["plan"]
    assert plan["kept_turns"] == [0] and plan["dropped_turns"] == []
    assert plan["context_length"] == 1024 and plan["max_new_tokens"] == 12
    assert 0 < plan["prompt_tokens"] <= plan["budget"]
    assert body["next_message"] is False

    # Nothing typed yet: the prompt the next message gets, with an open, empty user turn.
    for empty in ({}, {"content": ""}):
        nothing = c1.post(f"/conversations/{cid}/prompt", json=empty)
        assert nothing.status_code == 200, nothing.text
        preview = nothing.json()
        assert preview["next_message"] is True
        assert preview["prompt"] == prompt.replace("Where is the gold?", "")
        assert preview["plan"]["kept_turns"] == [0]
        assert preview["plan"]["prompt_tokens"] < plan["prompt_tokens"]
    # Blank text that is not empty is still refused, as it would be when sent.
    assert error_of(c1.post(f"/conversations/{cid}/prompt", json={"content": "  "}),
                    400)["param"] == "content"
    assert c1.get(f"/conversations/{cid}").json() == before


def test_streaming_message(c1: httpx.Client) -> None:
    cid = new(c1)["id"]
    with c1.stream("POST", f"/conversations/{cid}/messages",
                   json={"content": "Count to five.", "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    data = [json.loads(e) for e in events[:-1]]
    deltas, done = data[:-1], data[-1]
    assert deltas and all(set(d) == {"delta"} for d in deltas)
    assert done["done"] is True and done["finish_reason"] in ("stop", "length")
    assert "".join(d["delta"] for d in deltas) == done["message"]["content"]
    assert done["usage"]["completion_tokens"] > 0 and "dropped_turns" in done["rolechat"]
    stored = c1.get(f"/conversations/{cid}").json()["messages"]
    assert [m["status"] for m in stored] == ["complete", "complete"]
    assert stored[1]["content"] == done["message"]["content"]


def test_undo_and_retry(c1: httpx.Client, c2: httpx.Client) -> None:
    cid = new(c1, params={"temperature": 0.9, "max_new_tokens": 12})["id"]
    send(c1, cid, "First question?")
    second = send(c1, cid, "Second question?")
    stored = c1.get(f"/conversations/{cid}").json()["messages"]

    # Retry: the last reply again, stored in place of the old one.
    again = c1.post(f"/conversations/{cid}/retry", json={})
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["message"]["content"] and body["rolechat"]["kept_turns"] == [0]
    got = c1.get(f"/conversations/{cid}").json()
    assert got["turns"] == 2
    assert [m["content"] for m in got["messages"][:3]] == [m["content"] for m in stored[:3]]
    assert got["messages"][-1]["content"] == body["message"]["content"]
    assert got["messages"][-1]["status"] == "complete" and second  # replaced, not appended

    # Retry, streamed, cut off by the client: the previous reply stays.
    with c1.stream("POST", f"/conversations/{cid}/retry",
                   json={"stream": True, "params": {"max_new_tokens": 200}}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {\"delta\""):
                break  # leave mid-stream
    deadline = time.monotonic() + 30
    while True:  # the server notices the client left, and puts the old turn back
        kept = c1.get(f"/conversations/{cid}").json()
        contents = [m["content"] for m in kept["messages"] if m["status"] == "complete"]
        if kept["turns"] == 2 and contents[-1] == body["message"]["content"]:
            break
        assert time.monotonic() < deadline, kept
        time.sleep(0.2)

    # Undo: the last turn goes.
    undone = c1.post(f"/conversations/{cid}/undo", json={}).json()
    assert undone["removed"]["user"] == "Second question?"
    assert undone["conversation"]["turns"] == 1
    assert c1.post(f"/conversations/{cid}/undo", json={}).json()["conversation"]["turns"] == 0
    assert c1.post(f"/conversations/{cid}/undo", json={}).json()["removed"] is None
    nothing = c1.post(f"/conversations/{cid}/retry", json={})
    assert nothing.status_code == 400 and "no turn to retry" in nothing.json()["error"]["message"]
    # Another key sees none of it.
    assert c2.post(f"/conversations/{cid}/undo", json={}).status_code == 404
    assert c2.post(f"/conversations/{cid}/retry", json={}).status_code == 404


@pytest.mark.slow
def test_window_drops_whole_turns_and_loses_nothing(c1: httpx.Client) -> None:
    cid = new(c1, system="Be brief.", params={"temperature": 0.7, "max_new_tokens": 8})["id"]
    dropped_seen: list[int] = []
    for i in range(12):
        reply = send(c1, cid, f"Question {i}: " + "tell me more about the sea " * 14)
        dropped = reply["rolechat"]["dropped_turns"]
        assert dropped == list(range(len(dropped)))  # the oldest, whole turns
        assert reply["usage"]["prompt_tokens"] <= 1024 - 8
        dropped_seen = dropped or dropped_seen
    assert dropped_seen
    got = c1.get(f"/conversations/{cid}").json()
    assert got["turns"] == 12 and len(got["messages"]) == 24
    assert all(m["status"] == "complete" for m in got["messages"])
    assert [m["content"].split(":")[0] for m in got["messages"][::2]] == [
        f"Question {i}" for i in range(12)]


def test_key_isolation(c1: httpx.Client, c2: httpx.Client) -> None:
    cid = new(c1)["id"]
    assert c2.get("/conversations").json()["data"] == []
    for response in (c2.get(f"/conversations/{cid}"),
                     c2.post(f"/conversations/{cid}/messages", json={"content": "hi"}),
                     c2.post(f"/conversations/{cid}/prompt", json={"content": "hi"}),
                     c2.delete(f"/conversations/{cid}")):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "conversation_not_found"
    assert c1.get(f"/conversations/{cid}").status_code == 200
    theirs = new(c2)["id"]
    assert [c["id"] for c in c2.get("/conversations").json()["data"]] == [theirs]
    assert theirs not in [c["id"] for c in c1.get("/conversations").json()["data"]]
    assert httpx.get(c1.base_url.join("/v1/conversations")).status_code == 401


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_rename_and_change_the_system_prompt(c1: httpx.Client, c2: httpx.Client) -> None:
    cid = new(c1, system="You are a pirate.")["id"]
    send(c1, cid, "Hello there!", params={"max_new_tokens": 4})

    renamed = c1.patch(f"/conversations/{cid}", json={"title": "  Sea \n stories "})
    assert renamed.status_code == 200, renamed.text
    body = renamed.json()
    assert body["title"] == "Sea stories" and body["system"] == "You are a pirate."
    assert body["turns"] == 1 and len(body["messages"]) == 2
    assert [c["title"] for c in c1.get("/conversations").json()["data"]
            if c["id"] == cid] == ["Sea stories"]

    # A new system prompt: stored, and the next prompt is built with it.
    changed = c1.patch(f"/conversations/{cid}", json={"system": "You are a cat. Say meow."})
    assert changed.status_code == 200, changed.text
    assert changed.json()["system"] == "You are a cat. Say meow."
    assert changed.json()["title"] == "Sea stories"  # left out: unchanged
    prompt = c1.post(f"/conversations/{cid}/prompt", json={"content": "Who are you?"}).json()
    assert "You are a cat. Say meow." in prompt["prompt"] and "pirate" not in prompt["prompt"]
    assert "Hello there!" in prompt["prompt"]  # the history stays
    reply = send(c1, cid, "Who are you?", params={"max_new_tokens": 4})
    assert reply["rolechat"]["kept_turns"] == [0]
    assert c1.get(f"/conversations/{cid}").json()["system"] == "You are a cat. Say meow."

    # An empty system prompt means none; null leaves it as it is.
    cleared = c1.patch(f"/conversations/{cid}", json={"system": "", "title": None}).json()
    assert cleared["system"] is None and cleared["title"] == "Sea stories"
    prompt = c1.post(f"/conversations/{cid}/prompt", json={"content": "Hi"}).json()
    assert "meow" not in prompt["prompt"] and "pirate" not in prompt["prompt"]
    assert c1.patch(f"/conversations/{cid}", json={}).json()["system"] is None

    # Bad input changes nothing.
    before = c1.get(f"/conversations/{cid}").json()
    assert error_of(c1.patch(f"/conversations/{cid}", json={"persona": "expert"}),
                    400)["param"] == "persona"
    assert error_of(c1.patch(f"/conversations/{cid}", json={"title": 5}), 400)["param"] == "title"
    assert error_of(c1.patch(f"/conversations/{cid}", json={"system": ["x"]}),
                    400)["param"] == "system"
    assert error_of(c1.patch(f"/conversations/{cid}", content=b'{"system": "a\\ud800"}',
                             headers={"Content-Type": "application/json"}),
                    400)["param"] == "system"
    assert error_of(c1.patch(f"/conversations/{cid}", content=b"[1]",
                             headers={"Content-Type": "application/json"}), 400)
    assert c1.get(f"/conversations/{cid}").json() == before
    # A conversation that does not exist, or is another key's, is not found.
    assert error_of(c1.patch("/conversations/999999", json={"title": "x"}),
                    404)["code"] == "conversation_not_found"
    assert error_of(c2.patch(f"/conversations/{cid}", json={"title": "mine"}),
                    404)["code"] == "conversation_not_found"
    assert c1.get(f"/conversations/{cid}").json() == before


def test_concurrent_messages_never_interleave(c1: httpx.Client, server: str) -> None:
    cid = new(c1)["id"]
    statuses: list[int] = []

    def post(i: int) -> None:
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {K1}"},
                          timeout=120) as client:
            response = client.post(f"/conversations/{cid}/messages",
                                   json={"content": f"Say the number {i}."})
            statuses.append(response.status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [200, 200]
    messages = c1.get(f"/conversations/{cid}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert all(m["status"] == "complete" for m in messages)
    assert {messages[0]["content"], messages[2]["content"]} == {"Say the number 0.",
                                                                "Say the number 1."}


def got_turns(client: httpx.Client, cid: int) -> int:
    turns: int = client.get(f"/conversations/{cid}").json()["turns"]
    return turns


def test_disconnect_mid_stream_interrupts(c1: httpx.Client) -> None:
    cid = new(c1, params={"temperature": 0.8, "max_new_tokens": 600})["id"]
    with c1.stream("POST", f"/conversations/{cid}/messages",
                   json={"content": "Write a very long story about a dragon.",
                         "stream": True}) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 5:
                break  # leave mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        messages = c1.get(f"/conversations/{cid}").json()["messages"]
        if messages and messages[0]["status"] != "pending":
            break
        time.sleep(0.1)
    # The message and the reply so far are kept, marked interrupted.
    assert [(m["role"], m["status"]) for m in messages] == [("user", "interrupted"),
                                                            ("assistant", "interrupted")]
    assert messages[1]["content"] and got_turns(c1, cid) == 0
    reply = send(c1, cid, "Say hi.", params={"max_new_tokens": 8})
    assert reply["message"]["content"]
    messages = c1.get(f"/conversations/{cid}").json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "interrupted"), ("assistant", "interrupted"), ("user", "complete"),
        ("assistant", "complete")]
    assert got_turns(c1, cid) == 1
    # The interrupted message never reaches the model.
    prompt = c1.post(f"/conversations/{cid}/prompt", json={"content": "More?"}).json()
    assert "dragon" not in prompt["prompt"] and "Say hi." in prompt["prompt"]


def test_migration_2_on_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO conversations (title, params, created_at, updated_at) "
               "VALUES ('old one', '{}', '2024-01-01T00:00:00', '2024-01-01T00:00:00')")
    db.commit()
    db.close()
    store = Store(path)
    try:
        assert store.version == len(MIGRATIONS) >= 2
        columns = {row[1] for row in store._db.execute("PRAGMA table_info(conversations)")}
        assert "owner" in columns
        [old] = store.recent()
        assert old.title == "old one" and old.owner is None
        assert [c.id for c in store.recent(owner=None)] == [old.id]
        assert store.recent(owner="abc") == []
        mine = store.create(title="mine", owner="abc")
        assert [c.id for c in store.recent(owner="abc")] == [mine]
        assert store.info(mine, owner="abc").owner == "abc"
        with pytest.raises(Exception, match="no conversation"):
            store.info(mine, owner="other")
        with pytest.raises(Exception, match="no conversation"):
            store.info(old.id, owner="abc")
    finally:
        store.close()


@pytest.mark.slow
def test_summary_memory_and_pins_over_http(c1: httpx.Client) -> None:
    cid = new(c1, system="Be brief.", params={"temperature": 0, "max_new_tokens": 8,
                                              "memory": "summary", "summary_tokens": 48})["id"]
    first = send(c1, cid, "My name is Ada and I live in Lisbon.", pinned=True)
    assert first["rolechat"]["pinned_turns"] == [] and first["rolechat"]["kept_turns"] == []
    summarized = None
    turns = 11  # about 118 tokens each: the window slides after eight or nine
    for i in range(turns):
        reply = send(c1, cid, f"Question {i}: " + "tell me more about the sea " * 16)
        extra = reply["rolechat"]
        assert reply["usage"]["prompt_tokens"] <= 1024 - 8
        if extra["dropped_turns"]:
            assert extra["pinned_turns"] == [0] and 0 in extra["kept_turns"]
            memory = extra["memory"]
            if memory["usage"] is not None:  # this reply slid the window
                summarized = memory
    assert summarized is not None, "the window never slid"
    assert summarized["summary"] and summarized["usage"]["generated_tokens"] > 0
    got = c1.get(f"/conversations/{cid}").json()
    assert got["memory"]["mode"] == "summary" and got["memory"]["pins"] == [0]
    assert got["memory"]["summary"] and got["turns"] == turns + 1
    preview = c1.post(f"/conversations/{cid}/prompt", json={}).json()
    assert got["memory"]["summary"] in preview["prompt"]
    assert "[Summary of the earlier conversation]" in preview["prompt"]
    assert "My name is Ada" in preview["prompt"]  # the pinned turn
    assert preview["plan"]["memory"]["summary"] == got["memory"]["summary"]

    bad = c1.patch(f"/conversations/{cid}", json={"pins": [99]})
    assert bad.status_code == 400 and "There is no turn 99" in bad.json()["error"]["message"]
    bad = c1.patch(f"/conversations/{cid}", json={"memory": "everything"})
    assert bad.status_code == 400
    bad = c1.post("/conversations", json={"params": {"memory": "lots"}})
    assert bad.status_code == 400 and "memory" in bad.json()["error"]["message"]
    changed = c1.patch(f"/conversations/{cid}", json={"pins": [], "memory": "none"}).json()
    assert changed["memory"]["pins"] == [] and changed["memory"]["mode"] == "none"
    assert changed["memory"]["summary"] == got["memory"]["summary"]  # kept
