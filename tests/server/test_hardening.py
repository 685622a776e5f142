"""`rolechat serve` under the ways clients misbehave, over real HTTP and raw sockets: clients
that leave, bodies over the limit, text that is not UTF-8, ids out of range, errors in OpenAI's
shape, and what real clients send by default."""

from __future__ import annotations

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
#: A request that would keep the worker busy for many seconds if nobody stopped it.
COUNT = "Count from 1 to 1000, separated by commas."
LONG = {"messages": [{"role": "user", "content": COUNT}], "max_tokens": 900, "temperature": 0}
LONG_SESSION = {"params": {"max_new_tokens": 900, "temperature": 0}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("home")
    with rolechat_serve(home, "--max-body-bytes", str(LIMIT)) as base:
        yield base, home


@pytest.fixture
def base(served: tuple[str, Path]) -> str:
    return served[0]


@pytest.fixture
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base}/v1", timeout=120) as c:
        yield c


def status(client: httpx.Client) -> dict[str, Any]:
    worker: dict[str, Any] = client.get("/status").json()["worker"]
    return worker


def wait_idle(client: httpx.Client, cancelled_before: int) -> dict[str, Any]:
    """Poll the worker until it is free; it must have stopped the abandoned job."""
    deadline = time.monotonic() + 10
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
    reply = client.post("/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200
    assert reply.json()["rolechat"]["ttft_s"] < 1.0  # measured by the server, queue excluded


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
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=LONG, timeout=1.5)
    wait_idle(client, before)
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
    cid = client.post("/conversations", json=LONG_SESSION).json()["id"]
    before = status(client)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/conversations/{cid}/messages", timeout=1.5,
                   json={"content": COUNT})
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


# ----- the body limit --------------------------------------------------------------------------

def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(base: str) -> None:
    sock = raw_request(base, "POST", "/v1/chat/completions", body=None,
                       headers={"Transfer-Encoding": "chunked"})
    sent, answer = 0, b""
    sock.settimeout(0.05)
    chunk = b"x" * 4096
    while sent < 50 * LIMIT:
        try:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
        try:
            answer += sock.recv(65536)
        except TimeoutError:
            continue
        if b"\r\n\r\n" in answer:
            break
    sock.settimeout(10)
    answer += read_until(sock, b"}}") if b"}}" not in answer else b""
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()
    error = json.loads(body[body.index(b"{"):])["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert sent < 5 * LIMIT  # refused early, not after reading everything
    sock.close()


def test_a_declared_length_over_the_limit_is_refused_unread(client: httpx.Client) -> None:
    response = client.post("/chat/completions", content=b"x" * (LIMIT + 1),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# ----- text that is not UTF-8, ids out of range --------------------------------------------

LONE = b'"a \\ud800 b"'


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + LONE + b"}]}",
     "user message (messages[0])"),
    ("/v1/conversations", b'{"system": ' + LONE + b"}", "system prompt"),
    ("/v1/conversations", b'{"title": ' + LONE + b"}", "title"),
])
def test_a_lone_surrogate_is_a_400_and_the_connection_survives(base: str, path: str,
                                                               body: bytes, field: str) -> None:
    sock = raw_request(base, "POST", path, body)
    first = read_until(sock, b"}}")
    assert first.startswith(b"HTTP/1.1 400"), first[:200]
    error = json.loads(first[first.index(b"\r\n\r\n") + 4:])["error"]
    assert "lone surrogate" in error["message"] and error["param"] == field
    # The same connection still answers.
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    second = read_until(sock, b"}]}")
    assert second.startswith(b"HTTP/1.1 200")
    sock.close()


def test_session_message_and_dry_run_refuse_a_lone_surrogate(client: httpx.Client) -> None:
    cid = client.post("/conversations", json={}).json()["id"]
    for path in (f"/conversations/{cid}/messages", f"/conversations/{cid}/prompt"):
        response = client.post(path, content=b'{"content": ' + LONE + b"}",
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "content"


@pytest.mark.parametrize("cid", [2**63, 2**64 + 5, -1])
def test_ids_out_of_range_are_not_found(client: httpx.Client, cid: int) -> None:
    for method, path in (("GET", f"/conversations/{cid}"), ("DELETE", f"/conversations/{cid}"),
                         ("POST", f"/conversations/{cid}/undo")):
        response = client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "conversation_not_found"


# ----- OpenAI's error shape everywhere ----------------------------------------------------------

def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_errors_under_v1_are_openai_shaped(client: httpx.Client) -> None:
    assert openai_error(client.get("/nothing/here"), 404)["code"] == "unknown_url"
    error = openai_error(client.get("/chat/completions"), 405)
    assert error["code"] == "method_not_allowed" and "POST" in error["message"]
    openai_error(client.delete("/models"), 405)
    error = openai_error(client.post("/chat/completions", content=b"{not json",
                                     headers={"Content-Type": "application/json"}), 400)
    assert error["message"].startswith("The body is not valid JSON") and error["param"] is None
    error = openai_error(client.post("/chat/completions", content=b"\xff\xfe{}",
                                     headers={"Content-Type": "application/json"}), 400)
    deep = b"[" * 9_000 + b"]" * 9_000  # deeper than the JSON parser recurses
    openai_error(client.post("/chat/completions", content=deep,
                             headers={"Content-Type": "application/json"}), 400)


def test_a_bad_id_in_the_url_is_not_about_a_body(client: httpx.Client) -> None:
    for method in ("GET", "DELETE"):
        error = openai_error(client.request(method, "/conversations/abc"), 400)
        assert "in the URL" in error["message"] and "body" not in error["message"]
        assert error["param"] == "cid"


def test_errors_name_the_parameters_the_client_sent(client: httpx.Client) -> None:
    error = openai_error(client.post("/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}), 400)
    assert error["param"] == "max_tokens" and "max_new_tokens" not in error["message"]


# ----- what real clients send --------------------------------------------------------------

HELLO = [{"role": "user", "content": "Say hi."}]


@pytest.mark.parametrize("extra", [
    {"frequency_penalty": 0}, {"presence_penalty": 0}, {"logprobs": False},
    {"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
    {"metadata": {"app": "test"}}, {"store": False}, {"service_tier": "auto"},
    {"user": "u1"}, {"parallel_tool_calls": True}, {"frequency_penalty": 0.5},
])
def test_neutral_fields_are_accepted(client: httpx.Client, extra: dict[str, Any]) -> None:
    response = client.post("/chat/completions",
                           json={"messages": HELLO, "max_tokens": 4, **extra})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("extra", "field"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"temperature": 3}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"stream": "yes"}, "stream"), ({"max_tokens": "5"}, "max_tokens"),
])
def test_what_rolechat_cannot_do_is_a_clear_400(client: httpx.Client, extra: dict[str, Any],
                                                field: str) -> None:
    error = openai_error(client.post("/chat/completions",
                                     json={"messages": HELLO, "max_tokens": 4, **extra}), 400)
    assert error["param"] == field, error


def test_message_shapes_other_servers_take(client: httpx.Client) -> None:
    cases = [
        [{"role": "developer", "content": "Be brief."}, *HELLO],
        [{"role": "user", "content": "Hello."}, {"role": "user", "content": "Say hi."}],
        [*HELLO, {"role": "assistant", "content": "Hi!"},
         {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again."}],
    ]
    for messages in cases:
        response = client.post("/chat/completions",
                               json={"messages": messages, "max_tokens": 4})
        assert response.status_code == 200, (messages, response.text)
    # The developer message is the system prompt: the same prompt as a system message.
    as_developer = client.post("/chat/completions", json={
        "messages": cases[0], "max_tokens": 2, "temperature": 0}).json()
    as_system = client.post("/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, *HELLO], "max_tokens": 2,
        "temperature": 0}).json()
    assert as_developer["usage"]["prompt_tokens"] == as_system["usage"]["prompt_tokens"]
