"""`rolechat serve` with the embedded model under the ways clients misbehave, over real HTTP and
raw sockets: clients that leave (their generation stops, their turn is stored interrupted), and
the read timeouts of the flags. What needs no model — validation, errors, body limits, the
security probes — is checked in-process on the fake engine (test_validation.py,
test_security.py)."""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rolechat.store import Store
from servers import rolechat_serve

LIMIT = 20_000
TIMEOUT = 2  # --header-timeout and --body-timeout of the server here
#: A request that would keep the worker busy for many seconds if nobody stopped it.
COUNT = "Count from 1 to 1000, separated by commas."
LONG = {"messages": [{"role": "user", "content": COUNT}], "max_tokens": 900, "temperature": 0}
LONG_SESSION = {"params": {"max_new_tokens": 900, "temperature": 0}}
_letters = itertools.count()


def letter() -> str:
    """A prompt of ~900 tokens: its evaluation alone takes several seconds here (and the reply
    to it, however short the model makes it, comes after). Each one opens differently, so no
    request finds an earlier one's prompt in the KV cache and skips its evaluation."""
    weather = "A long letter about the weather. " * 110
    return f"Letter {next(_letters)}. {weather}Summarize it."


def document(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": letter()}], "max_tokens": 8,
            "temperature": 0, **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("home")
    with rolechat_serve(home, "--max-body-bytes", str(LIMIT), "--header-timeout", str(TIMEOUT),
                        "--body-timeout", str(TIMEOUT)) as base:
        yield base, home


@pytest.fixture
def base(served: tuple[str, Path]) -> str:
    return served[0]


@pytest.fixture
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base}/v1", timeout=120) as c:
        yield c


def status(client: httpx.Client) -> dict[str, Any]:
    """The server's jobs (running, done, cancelled), whether one runs, and the engine's
    queue."""
    body = client.get("/status").json()
    jobs: dict[str, Any] = body["jobs"]
    return {**jobs, "busy": jobs["running"] > 0, "queued": body["scheduler"]["queued"]}


def wait_idle(client: httpx.Client, cancelled_before: int) -> dict[str, Any]:
    """Poll the worker until it is free; it must have stopped the abandoned job (counted as
    cancelled: one left to finish would count as done). The bound is generous: a loaded
    machine (two test workers on two cores) can take seconds to reach the job's next step."""
    deadline = time.monotonic() + 60
    while True:
        worker = status(client)
        if not worker["busy"] and worker["queued"] == 0:
            assert worker["cancelled"] == cancelled_before + 1, worker
            return worker
        assert time.monotonic() < deadline, f"the worker is still busy: {worker}"
        time.sleep(0.1)


def raw_request(base: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if body is not None and "Transfer-Encoding" not in all_headers:
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
    return sock


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    """Read until ``marker`` has come ``count`` times."""
    data = b""
    while data.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data[:500]!r}"
        data += chunk
    return data


def check_the_next_request_starts_at_once(client: httpx.Client) -> None:
    """The next request runs at once: told by events, not by a clock. The abandoned job is over
    (``wait_idle``: the worker is free, nothing queued, the job counted as cancelled; its stream
    was closed on the worker thread, which releases the engine, before the job ended), and the
    next request is the one job that runs after it, to the end."""
    before = status(client)
    assert not before["busy"] and before["queued"] == 0
    reply = client.post("/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"]
    after = status(client)
    assert after["done"] == before["done"] + 1 and after["cancelled"] == before["cancelled"]


# ----- clients that leave ------------------------------------------------------------------------

def test_a_stateless_stream_whose_socket_closes_stops(base: str, client: httpx.Client) -> None:
    before = status(client)["cancelled"]
    sock = raw_request(base, "POST", "/v1/chat/completions",
                       json.dumps({**LONG, "stream": True}).encode())
    read_until(sock, b"data: ", count=4)  # text is streaming
    assert status(client)["busy"]
    sock.close()
    wait_idle(client, before)
    check_the_next_request_starts_at_once(client)


def test_a_connection_reset_stops_the_stream(base: str, client: httpx.Client) -> None:
    before = status(client)["cancelled"]
    sock = raw_request(base, "POST", "/v1/chat/completions",
                       json.dumps({**LONG, "stream": True}).encode())
    read_until(sock, b"data: ", count=4)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST
    wait_idle(client, before)


def test_a_stateless_client_that_times_out_frees_the_worker(base: str,
                                                            client: httpx.Client) -> None:
    before = status(client)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # its ~900-token prompt alone takes longer
        httpx.post(f"{base}/v1/chat/completions", json=document(max_tokens=100),
                   timeout=1.5)
    wait_idle(client, before)
    check_the_next_request_starts_at_once(client)




def prompt_chunks(client: httpx.Client) -> int:
    chunks: int = client.get("/status").json()["scheduler"]["prompt_chunks"]
    return chunks


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "wait"])
def test_a_client_that_leaves_during_the_prompt_stops_it(base: str, client: httpx.Client,
                                                         streaming: bool) -> None:
    """The prompt is evaluated in chunks and the engine looks for the client between them: one
    that leaves while its long prompt is evaluated stops it there (not after the whole prompt
    and the reply)."""
    before, chunks = status(client)["cancelled"], prompt_chunks(client)
    if streaming:
        sock = raw_request(base, "POST", "/v1/chat/completions",
                           json.dumps(document(stream=True)).encode())
        read_until(sock, b"data: ")  # the stream began: the prompt is being evaluated
        sock.close()
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=document(), timeout=0.5)
    wait_idle(client, before)
    assert prompt_chunks(client) - chunks < 4  # stopped before the prompt's end
    check_the_next_request_starts_at_once(client)


def session_turns(home: Path, cid: int) -> list[tuple[str, str]]:
    store = Store(home / "rolechat.db")
    try:
        return [(m.role, m.status) for m in store.messages(cid)]
    finally:
        store.close()


def test_a_session_client_that_times_out_is_stored_interrupted(
        served: tuple[str, Path], client: httpx.Client) -> None:
    base, home = served
    cid = client.post("/conversations", json={"params": {"max_new_tokens": 80}}).json()["id"]
    before = status(client)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # its ~900-token prompt alone takes longer
        httpx.post(f"{base}/v1/conversations/{cid}/messages", timeout=1.5,
                   json={"content": letter()})
    wait_idle(client, before)
    turns = session_turns(home, cid)  # never complete; the reply so far kept, marked
    assert turns in ([("user", "interrupted")],
                     [("user", "interrupted"), ("assistant", "interrupted")])


def test_a_session_stream_whose_socket_closes_is_stored_interrupted(
        served: tuple[str, Path], client: httpx.Client) -> None:
    base, home = served
    cid = client.post("/conversations", json=LONG_SESSION).json()["id"]
    before = status(client)["cancelled"]
    sock = raw_request(base, "POST", f"/v1/conversations/{cid}/messages", json.dumps(
        {"content": COUNT, "stream": True}).encode())
    read_until(sock, b'"delta"', count=3)
    sock.close()
    wait_idle(client, before)
    assert session_turns(home, cid) == [("user", "interrupted"), ("assistant", "interrupted")]


# ----- read timeouts (the flags of `rolechat serve`) ------------------------------------------

def test_the_serve_flags_set_the_read_timeouts(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    half = socket.create_connection((host, int(port)), timeout=60)
    half.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    slow = raw_request(base, "POST", "/v1/chat/completions", headers={"Content-Length": "50"})
    slow.sendall(b'{"messages": ')  # nor does the body
    for sock, timeout in ((half, "--header-timeout"), (slow, "--body-timeout")):
        answer = read_until(sock, b"}}")
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        error = json.loads(answer[answer.index(b"\r\n\r\n") + 4:])["error"]
        assert error["code"] == "request_timeout" and timeout in error["message"]
        assert sock.recv(1) == b""  # and the connection is closed
        sock.close()
