"""Eight clients at once for a bounded minute against a real `rolechat serve` (the embedded
model, its default sequences, real HTTP): sessions streaming and not, clients that leave
mid-reply, stateless clients. Afterwards every conversation holds each message its client sent
exactly once, in order, acknowledged ones complete with the reply the client received, left ones
marked interrupted; nothing is pending, and the scheduler is idle with an empty queue."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers import rolechat_serve

CLIENTS = 8
#: Clients 0..SESSIONS-1 use sessions; the rest the stateless endpoint.
SESSIONS = 6
#: Session clients from LEAVERS on leave every third reply after its first text.
LEAVERS = 4
SECONDS = 60
#: Every request a client started before the minute ended must finish within this.
GRACE = 120


@dataclass
class Sent:
    content: str
    outcome: str  # "complete" (acknowledged), "left" (the client closed it mid-reply)
    reply: str = ""


@dataclass
class Client:
    index: int
    cid: int = 0
    sent: list[Sent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stateless_replies: int = 0


def data_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def session_turn(http: httpx.Client, client: Client, turn: int, rng: random.Random) -> None:
    content = f"Client {client.index}, message {turn}: tell me about {rng.choice(TOPICS)}."
    params = {"max_new_tokens": rng.randint(8, 40)}
    leave = client.index >= LEAVERS and turn % 3 == 2
    if leave:
        with http.stream("POST", f"/conversations/{client.cid}/messages",
                         json={"content": content, "stream": True,
                               "params": {"max_new_tokens": 200}}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: ") and "delta" in line:
                    break  # the reply has begun: leave it
        client.sent.append(Sent(content, "left"))
    elif turn % 2:
        with http.stream("POST", f"/conversations/{client.cid}/messages",
                         json={"content": content, "stream": True,
                               "params": params}) as response:
            assert response.status_code == 200, response.read()
            events = data_events(response)
        done = events[-1]
        assert done.get("done") is True, events
        assert all(set(e) in ({"delta"}, {"waiting"}) for e in events[:-1]), events
        text = "".join(e.get("delta", "") for e in events[:-1])
        assert text == done["message"]["content"]
        client.sent.append(Sent(content, "complete", text))
    else:
        response = http.post(f"/conversations/{client.cid}/messages",
                             json={"content": content, "params": params})
        assert response.status_code == 200, response.text
        client.sent.append(Sent(content, "complete", response.json()["message"]["content"]))


def stateless_turn(http: httpx.Client, client: Client, history: list[dict[str, str]],
                   turn: int, rng: random.Random) -> None:
    model = http.get("/models").json()["data"][0]["id"]
    history.append({"role": "user", "content": f"Message {turn}: {rng.choice(TOPICS)}?"})
    with http.stream("POST", "/chat/completions", json={
            "model": model, "messages": history[-5:], "stream": True,
            "temperature": 0.7, "max_tokens": rng.randint(8, 40)}) as response:
        assert response.status_code == 200, response.read()
        events = data_events(response)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices"))
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), events[-1]
    history.append({"role": "assistant", "content": text})
    client.stateless_replies += 1


TOPICS = ("the sea", "mountains", "bread", "the moon", "rain", "a violin", "winter", "coffee")


def run_client(base: str, client: Client, deadline: float) -> None:
    rng = random.Random(client.index)
    history: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
    try:
        with httpx.Client(base_url=f"{base}/v1", timeout=GRACE) as http:
            if client.index < SESSIONS:
                response = http.post("/conversations", json={
                    "system": f"You are client {client.index}'s guide. Be brief.",
                    "params": {"temperature": 0.7}})
                assert response.status_code == 201, response.text
                client.cid = response.json()["id"]
            turn = 0
            while time.monotonic() < deadline:
                if client.index < SESSIONS:
                    session_turn(http, client, turn, rng)
                else:
                    stateless_turn(http, client, history, turn, rng)
                turn += 1
    except Exception as error:  # every failure is reported by the test
        client.errors.append(f"{type(error).__name__}: {error}")


@pytest.mark.slow
def test_eight_clients_for_a_minute_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    with rolechat_serve(tmp_path / "home") as base:
        clients = [Client(i) for i in range(CLIENTS)]
        deadline = time.monotonic() + SECONDS
        threads = [threading.Thread(target=run_client, args=(base, c, deadline), daemon=True)
                   for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=SECONDS + GRACE + 30)
        assert not any(t.is_alive() for t in threads), "a client never finished"
        assert [c.errors for c in clients] == [[]] * CLIENTS

        with httpx.Client(base_url=f"{base}/v1", timeout=30) as http:
            # Left replies finish being stored once the scheduler has cancelled them.
            settle = time.monotonic() + 30
            while True:
                status = http.get("/status").json()
                if status["jobs"]["running"] == 0 or time.monotonic() > settle:
                    break
                time.sleep(0.2)
            assert status["jobs"]["running"] == 0, status
            scheduler = status["scheduler"]
            assert scheduler["queued"] == 0, scheduler
            assert all(s["state"] == "idle" for s in scheduler["sequences"]), scheduler

            listed = http.get("/conversations").json()["data"]
            assert sorted(c["id"] for c in listed) == sorted(c.cid for c in clients[:SESSIONS])
            for client in clients[:SESSIONS]:
                stored = http.get(f"/conversations/{client.cid}").json()
                messages = stored["messages"]
                assert all(m["status"] != "pending" for m in messages), messages
                users = [m for m in messages if m["role"] == "user"]
                assert [m["content"] for m in users] == [s.content for s in client.sent]
                expected: list[tuple[str, str]] = []
                for sent in client.sent:
                    if sent.outcome == "complete":
                        expected += [("user", "complete"), ("assistant", "complete")]
                    else:
                        expected += [("user", "interrupted"), ("assistant", "interrupted")]
                assert [(m["role"], m["status"]) for m in messages] == expected
                replies = [m["content"] for m in messages if m["role"] == "assistant"]
                for sent, reply in zip(client.sent, replies):
                    if sent.outcome == "complete":
                        assert reply == sent.reply
                completed = sum(s.outcome == "complete" for s in client.sent)
                assert stored["turns"] == completed
                assert completed >= 2, (client.index, client.sent)
            left = sum(s.outcome == "left" for c in clients for s in c.sent)
            assert left >= 1
            assert scheduler["cancelled"] >= left and status["jobs"]["cancelled"] >= left
            print(f"{status['jobs']['done']} replies, {left} left mid-reply")
            assert all(c.stateless_replies >= 2 for c in clients[SESSIONS:])
