"""Following a conversation over real HTTP (the app under uvicorn in-process, over the fake
engine spelling its replies at a set pace): GET .../events shows another client's reply as it
is written and the version it leaves; a detached reply outlives its client and is stored
complete; POST .../stop keeps its text, interrupted; a deletion ends the stream; another key
sees none of it; the server saves a reply's text so far on its pending message; a shutdown
ends the open streams."""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import PacedEngine
from rolechat.server import create_app, worker
from rolechat.store import Store
from servers import in_process

#: The reply the paced fake writes (a token every 15 ms: about 6 s; under the 400 tokens the
#: tests' conversations allow), long enough that a loaded machine still catches it in the
#: middle.
REPLY = " ".join(f"Part {i} of a reply written one character a token." for i in range(1, 8))
KEY, OTHER = "key-one", "key-two"


def paced() -> PacedEngine:
    engine = PacedEngine()
    engine.pace, engine.reply = 0.015, REPLY
    return engine


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    path = tmp_path / "rolechat.db"
    store = Store(path)
    app = create_app(paced(), store=store, api_keys=[KEY, OTHER])
    with in_process(app) as base:
        yield base, path
    store.close()


def client(base: str, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"},
                        timeout=60)


class Follower:
    """GET .../events read on a thread: every event in ``events``, in order."""

    def __init__(self, base: str, cid: int, key: str = KEY) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.status: int | None = None
        self.ended = threading.Event()
        self._client = client(base, key)
        self._thread = threading.Thread(target=self._read, args=(cid,), daemon=True)
        self._thread.start()

    def _read(self, cid: int) -> None:
        try:
            with self._client.stream("GET", f"/conversations/{cid}/events") as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.put(json.loads(line[6:]))
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def until(self, test: Any, timeout: float = 30) -> dict[str, Any]:
        """The first event (after those already taken) that passes ``test``."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(event)
            if test(event):
                return event

    def close(self) -> None:
        self._client.close()


def create(http: httpx.Client) -> int:
    response = http.post("/conversations", json={"params": {"max_new_tokens": 400}})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def messages(http: httpx.Client, cid: int) -> list[tuple[str, str, str]]:
    body = http.get(f"/conversations/{cid}").json()
    return [(m["role"], m["status"], m["content"]) for m in body["messages"]]


def test_a_follower_sees_another_clients_reply_as_it_is_written(
        server: tuple[str, Path]) -> None:
    base, _ = server
    with client(base) as http:
        cid = create(http)
        follower = Follower(base, cid)
        first = follower.until(lambda e: "version" in e)
        assert first["live"] is None
        answered: list[httpx.Response] = []
        sent = threading.Thread(target=lambda: answered.append(http.post(
            f"/conversations/{cid}/messages", json={"content": "Tell me."})), daemon=True)
        sent.start()
        growing = [follower.until(lambda e: bool(e.get("live")))["live"]]
        while (event := follower.until(lambda e: "live" in e))["live"] is not None:
            growing.append(event["live"])  # until the reply ends: {"live": null}
        assert all(live["kind"] == "message" for live in growing)
        # one reply, named: the client that asked knows it as its own (X-Rolechat-Reply)
        assert len({live["id"] for live in growing}) == 1
        texts = [live["text"] for live in growing]
        assert len(texts) > 3 and all(REPLY.startswith(t) for t in texts)
        assert texts == sorted(texts, key=len) and texts[-1] == REPLY  # it grows to the end
        latest = follower.until(lambda e: "version" in e)["version"]
        sent.join(30)
        assert answered[0].headers["X-Rolechat-Reply"] == growing[0]["id"]
        body = http.get(f"/conversations/{cid}").json()
        assert body["version"] == latest
        assert messages(http, cid) == [("user", "complete", "Tell me."),
                                       ("assistant", "complete", REPLY)]
        follower.close()


def test_a_detached_reply_outlives_its_client_and_stop_keeps_its_text(
        server: tuple[str, Path]) -> None:
    base, _ = server
    with client(base) as http:
        cid = create(http)
        follower = Follower(base, cid)
        follower.until(lambda e: "version" in e)
        # A streaming client that leaves after a few deltas: the reply goes on.
        with client(base) as leaving, leaving.stream(
                "POST", f"/conversations/{cid}/messages",
                json={"content": "Go on.", "stream": True, "detach": True}) as response:
            assert response.status_code == 200
            mine = response.headers["X-Rolechat-Reply"]
            for line in response.iter_lines():
                if line.startswith("data: ") and "delta" in line:
                    break
        ended = follower.until(lambda e: (e.get("live") or {}).get("text") == REPLY)
        assert ended["live"]["id"] == mine
        follower.until(lambda e: e.get("live", "") is None)
        assert messages(http, cid)[-2:] == [("user", "complete", "Go on."),
                                            ("assistant", "complete", REPLY)]

        # Left alone, a detached reply is stopped only by POST .../stop: its text kept.
        with client(base) as leaving, leaving.stream(
                "POST", f"/conversations/{cid}/messages",
                json={"content": "Again.", "stream": True, "detach": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and "delta" in line:
                    break
        live = follower.until(lambda e: len((e.get("live") or {}).get("text", "")) > 20)
        stopped = http.post(f"/conversations/{cid}/stop")
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["stopped"] is True
        last = [(m["role"], m["status"], m["content"])
                for m in stopped.json()["conversation"]["messages"]][-2:]
        assert last[0] == ("user", "interrupted", "Again.")
        assert last[1][:2] == ("assistant", "interrupted")
        kept = last[1][2]
        assert REPLY.startswith(kept) and len(live["live"]["text"]) <= len(kept) < len(REPLY)
        assert http.post(f"/conversations/{cid}/stop").json()["stopped"] is False
        follower.close()


def test_a_client_that_did_not_detach_still_stops_its_reply(server: tuple[str, Path]) -> None:
    base, _ = server
    with client(base) as http:
        cid = create(http)
        with client(base) as leaving, leaving.stream(
                "POST", f"/conversations/{cid}/messages",
                json={"content": "Hi.", "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and "delta" in line:
                    break
        deadline = time.monotonic() + 30
        while messages(http, cid)[0][1] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        shown = messages(http, cid)
        assert shown[0] == ("user", "interrupted", "Hi.")
        assert len(shown) == 1 or len(shown[1][2]) < len(REPLY)


def test_deleting_ends_the_stream_and_another_key_sees_nothing(
        server: tuple[str, Path]) -> None:
    base, _ = server
    with client(base) as http, client(base, OTHER) as other:
        cid = create(http)
        assert other.get(f"/conversations/{cid}/events").status_code == 404
        assert other.post(f"/conversations/{cid}/stop").status_code == 404
        follower = Follower(base, cid)
        follower.until(lambda e: "version" in e)
        assert http.delete(f"/conversations/{cid}").status_code == 200
        assert follower.until(lambda e: "deleted" in e) == {"deleted": True}
        assert follower.ended.wait(10)
        assert http.get(f"/conversations/{cid}/events").status_code == 404
        follower.close()


def test_the_server_saves_a_replys_text_so_far_on_its_pending_message(
        server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a crash would leave: the store puts it after the message, interrupted, when it
    next opens (tests/test_store_recovery.py kills a real writer)."""
    monkeypatch.setattr(worker, "CHECKPOINT_S", 0.3)
    base, path = server
    with client(base) as http:
        cid = create(http)
        follower = Follower(base, cid)
        follower.until(lambda e: "version" in e)
        sent = threading.Thread(target=lambda: http.post(
            f"/conversations/{cid}/messages", json={"content": "Save me."}), daemon=True)
        sent.start()
        follower.until(lambda e: len((e.get("live") or {}).get("text", "")) > 60)
        db = sqlite3.connect(path)
        try:
            status, partial = db.execute(
                "SELECT status, partial FROM messages WHERE conversation_id = ? AND "
                "role = 'user'", (cid,)).fetchone()
        finally:
            db.close()
        assert status == "pending"
        assert partial and REPLY.startswith(partial) and len(partial) < len(REPLY)
        sent.join(30)
        db = sqlite3.connect(path)
        try:
            assert db.execute("SELECT partial FROM messages WHERE conversation_id = ?",
                              (cid,)).fetchall() == [(None,), (None,)]  # done: cleared
        finally:
            db.close()
        follower.close()


def test_a_shutdown_ends_the_open_streams(tmp_path: Path) -> None:
    store = Store(tmp_path / "rolechat.db")
    app = create_app(paced(), store=store)
    started = time.monotonic()
    with in_process(app) as base, client(base) as http:
        cid = create(http)
        follower = Follower(base, cid)
        follower.until(lambda e: "version" in e)
    assert follower.ended.wait(10)
    assert time.monotonic() - started < 20  # not uvicorn's wait for the stream to end
    follower.close()
    store.close()


def test_a_stopped_reply_can_be_continued(server: tuple[str, Path]) -> None:
    base, _ = server
    with client(base) as http:
        cid = create(http)
        follower = Follower(base, cid)
        follower.until(lambda e: "version" in e)
        sent = threading.Thread(target=lambda: http.post(
            f"/conversations/{cid}/messages", json={"content": "Begin.", "detach": True}),
            daemon=True)
        sent.start()
        follower.until(lambda e: len((e.get("live") or {}).get("text", "")) > 20)
        stopped = http.post(f"/conversations/{cid}/stop").json()["conversation"]["messages"]
        sent.join(30)
        partial = stopped[1]
        assert partial["status"] == "interrupted" and REPLY.startswith(partial["content"])
        # Continue it: the pair becomes a turn, and the reply goes on from its text.
        response = http.post(f"/conversations/{cid}/continue", json={"turn": partial["id"]})
        assert response.status_code == 200, response.text
        body = http.get(f"/conversations/{cid}").json()
        assert body["turns"] == 1
        assert [(m["role"], m["status"]) for m in body["messages"]] == [
            ("user", "complete"), ("assistant", "complete")]
        reply = body["messages"][1]["content"]
        assert reply.startswith(partial["content"]) and len(reply) > len(partial["content"])
        assert reply == partial["content"] + response.json()["message"]["content"]
        follower.close()
