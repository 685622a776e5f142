"""The server's security defects of issue 19, sent exactly as they were found, over raw sockets
to uvicorn run as `rolechat serve` runs it (in-process, over the fake engine, with short
timeouts): two ``Authorization`` headers, half-sent headers and slow bodies, too many
connections, and a redirect built from the ``Host`` header; and what a connection survives:
bodies over the limit, text that is not UTF-8."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import FakeEngine
from rolechat.server import create_app
from rolechat.server.wire import owner_id
from rolechat.store import Store
from servers import in_process

K1, K2 = "key-one", "key-two"
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 1.0
LIMIT = 20_000


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def base(home: Path) -> Iterator[str]:
    store = Store(home / "rolechat.db")
    # A conversation that belongs to a key the server no longer has.
    store.create(title="the removed key's secret", owner=owner_id("removed-key"))
    app = create_app(FakeEngine(), api_keys=[K1, K2], store=store,
                     body_timeout=BODY_TIMEOUT, max_body_bytes=LIMIT)
    with in_process(app, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT) as url:
        yield url
    store.close()


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def send_raw(base: str, head: str, body: bytes = b"") -> socket.socket:
    sock = connect(base)
    sock.sendall(head.replace("\n", "\r\n").encode() + body)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def response_of(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def openai_error(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


# ----- 8: authentication and ownership read the same, single header -------------------------

def test_two_authorization_headers_are_refused(base: str) -> None:
    for first, second in (("removed-key", K2), (K2, "removed-key"), (K1, K2)):
        sock = send_raw(base, "GET /v1/conversations HTTP/1.1\nHost: x\n"
                              f"Authorization: Bearer {first}\nAuthorization: Bearer {second}\n"
                              "Connection: close\n\n")
        data = read_all(sock)
        sock.close()
        status, _, body = response_of(data)
        assert status == 400, data[:300]
        assert openai_error(body)["code"] == "duplicate_authorization"
        assert b"secret" not in data


def test_one_header_is_the_key_checked_and_the_owner(base: str) -> None:
    with httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {K2}"}) as c2:
        mine = c2.post("/conversations", json={"title": "key two's"}).json()["id"]
        listed = [c["id"] for c in c2.get("/conversations").json()["data"]]
    assert listed == [mine]  # not the removed key's conversation
    sock = send_raw(base, "GET /v1/conversations HTTP/1.1\nHost: x\n"
                          "Authorization: Bearer removed-key\nConnection: close\n\n")
    status, _, body = response_of(read_all(sock))
    sock.close()
    assert status == 401 and openai_error(body)["code"] == "invalid_api_key"


# ----- 12: no redirect built from the Host header -------------------------------------------

def test_a_trailing_slash_is_the_same_path_not_a_redirect(base: str) -> None:
    sock = send_raw(base, "GET /v1/models/ HTTP/1.1\nHost: evil.example\n"
                          f"Authorization: Bearer {K1}\nConnection: close\n\n")
    data = read_all(sock)
    sock.close()
    status, headers, body = response_of(data)
    assert status == 200 and "location" not in headers, data[:300]
    assert b"evil.example" not in data
    assert json.loads(body)["data"][0]["id"] == "fake"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {K1}",
                                              "Host": "evil.example"}) as client:
        for path in ("/v1/models/fake/", "/v1/conversations/", "/v1/nothing/"):
            response = client.get(path)
            assert "location" not in response.headers and response.status_code != 307, path
        assert client.get("/v1/nothing/").json()["error"]["code"] == "unknown_url"


# ----- 11: read timeouts and a bounded number of connections --------------------------------

def test_fifty_connections_with_half_sent_headers_are_closed(base: str) -> None:
    socks = [send_raw(base, f"GET /v1/models HTTP/1.1\nHost: x\nX-Probe: {i}\n")
             for i in range(50)]  # never the blank line that ends the headers
    for sock in socks:
        data = read_all(sock)  # returns once the server closes the connection
        sock.close()
        status, headers, body = response_of(data)
        assert status == 408 and headers["connection"] == "close"
        assert openai_error(body)["code"] == "request_timeout"
    silent = connect(base)  # a connection that sends nothing at all
    assert response_of(read_all(silent))[0] == 408
    silent.close()
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {K1}"}
                     ).status_code == 200


def drip_until_answered(sock: socket.socket, drops: Iterator[bytes]) -> bytes:
    """Send one byte at a time, 0.1 s apart, until the server answers (or closes)."""
    sock.settimeout(0.1)
    data = b""
    for byte in drops:
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        data += chunk
        if not chunk or b"\r\n\r\n" in data:
            break
    sock.settimeout(30)
    try:
        return data + read_all(sock)
    except ConnectionResetError:
        return data


def forever(byte: bytes, most: int = 600) -> Iterator[bytes]:
    """``byte`` again and again (``most`` times: 60 s of dripping, far past any timeout)."""
    for _ in range(most):
        yield byte


def test_headers_sent_a_byte_at_a_time_are_cut_off(base: str) -> None:
    sock = send_raw(base, "GET /v1/models HTTP/1.1\nHost: x\nX-Slow: ")
    data = drip_until_answered(sock, forever(b"a"))
    sock.close()
    assert data, "the server never answered a header that keeps growing"
    assert response_of(data)[0] == 408


def test_a_one_byte_per_tick_body_is_refused(base: str) -> None:
    sock = send_raw(base, "POST /v1/chat/completions HTTP/1.1\nHost: x\n"
                          f"Authorization: Bearer {K1}\nContent-Type: application/json\n"
                          "Content-Length: 15000\n\n", b'{"messages": "')
    data = drip_until_answered(sock, forever(b"x"))
    sock.close()
    assert data, "the server never answered a body that keeps dripping"
    status, headers, body = response_of(data)
    assert status == 408 and headers["connection"] == "close"
    error = openai_error(body)
    assert error["code"] == "request_timeout" and "--body-timeout" in error["message"]


def test_a_body_that_stops_half_way_is_refused(base: str) -> None:
    sock = send_raw(base, "POST /v1/chat/completions HTTP/1.1\nHost: x\n"
                          f"Authorization: Bearer {K1}\nContent-Type: application/json\n"
                          "Content-Length: 100\n\n", b'{"messages": [')
    status, _, body = response_of(read_all(sock))
    sock.close()
    assert status == 408 and openai_error(body)["code"] == "request_timeout"


def test_a_body_nobody_reads_cannot_hold_the_connection(base: str) -> None:
    with httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {K1}"}) as c1:
        cid = c1.post("/conversations", json={}).json()["id"]
    # Delete reads no body: the answer comes first, then the body may not drip on forever.
    sock = send_raw(base, f"DELETE /v1/conversations/{cid} HTTP/1.1\nHost: x\n"
                          f"Authorization: Bearer {K1}\nContent-Length: 15000\n\n", b"{")
    sock.settimeout(30)
    head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200")
    closed = False
    for byte in forever(b" "):  # keep the body coming: the server must still close
        try:
            sock.sendall(byte)
            time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    sock.close()
    assert closed, "a body nobody reads kept the connection open"


def test_connections_over_the_limit_are_refused_at_once(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), store=Store(tmp_path / "db"))
    with in_process(app, max_connections=3, header_timeout=60) as url:
        held = [connect(url) for _ in range(3)]
        extra = connect(url)  # refused before it sends a byte
        status, headers, body = response_of(read_all(extra))
        extra.close()
        assert status == 503 and headers["connection"] == "close"
        assert openai_error(body)["code"] == "too_many_connections"
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30  # the server notices the closed ones
        while True:
            try:
                if httpx.get(f"{url}/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no connection was accepted again"
            time.sleep(0.05)


# ----- the body limit, and what a connection survives ---------------------------------------

def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data[:500]!r}"
        data += chunk
    return data


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(base: str) -> None:
    sock = send_raw(base, "POST /v1/chat/completions HTTP/1.1\nHost: x\n"
                          f"Authorization: Bearer {K1}\nContent-Type: application/json\n"
                          "Transfer-Encoding: chunked\n\n")
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
    status, headers, body = response_of(answer)
    assert status == 413 and headers["connection"] == "close"
    error = openai_error(body[body.index(b"{"):])
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert sent < 5 * LIMIT  # refused early, not after reading everything
    sock.close()


LONE = b'"a \\ud800 b"'


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + LONE + b"}]}",
     "messages[0].content"),
    ("/v1/conversations", b'{"system": ' + LONE + b"}", "system"),
    ("/v1/conversations", b'{"title": ' + LONE + b"}", "title"),
])
def test_a_lone_surrogate_is_a_400_and_the_connection_survives(base: str, path: str,
                                                               body: bytes, field: str) -> None:
    sock = send_raw(base, f"POST {path} HTTP/1.1\nHost: x\nAuthorization: Bearer {K1}\n"
                          f"Content-Type: application/json\nContent-Length: {len(body)}\n\n",
                    body)
    first = read_until(sock, b"}}")
    assert first.startswith(b"HTTP/1.1 400"), first[:200]
    error = openai_error(response_of(first)[2])
    assert "lone surrogate" in error["message"] and error["param"] == field
    # The same connection still answers.
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {K1}\r\n"
                 "\r\n".encode())
    second = read_until(sock, b"}]}")
    assert second.startswith(b"HTTP/1.1 200")
    sock.close()
