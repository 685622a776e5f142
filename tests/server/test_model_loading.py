"""What the server does while it switches models, over real HTTP (the app under uvicorn in this
process) with the fake engine and a loader the test holds: requests that arrive during a load
get 503 ``model_loading`` with ``Retry-After``; a switch waits for the replies on the old model
(and, past its bound, is called off with 503 ``model_busy``); a model that fails to load leaves
the old one serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import FakeEngine
from model_stores import STORE_VARIABLES, build_stores
from rolechat.errors import ModelLoadError
from rolechat.server import create_app, switch
from rolechat.server.state import ServerState
from rolechat.store import Store
from servers import in_process

OTHER = "ollama:smollm2:135m"
BROKEN = "ollama:someone/tiny:latest"
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Loads:
    """The server's loader: a fake engine named after the model, each load held until
    ``gate`` is set; ``failing`` names fail to load."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    failing: set[str] = field(default_factory=set)
    asked: list[str | None] = field(default_factory=list)

    def __call__(self, name: str | None) -> FakeEngine:
        self.asked.append(name)
        self.entered.set()
        assert self.gate.wait(30)
        if name in self.failing:
            raise ModelLoadError(str(name), "its file is broken", "Pick another model.")
        return FakeEngine(model=name or "fake")


@dataclass
class Server:
    base: str
    loads: Loads
    start: FakeEngine
    state: ServerState


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    build_stores(tmp_path / "home")  # the models the server lists (and loads, as fakes)
    for name in STORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    start, loads, store = FakeEngine(), Loads(), Store(tmp_path / "db")
    loads.gate.set()
    app = create_app(start, store=store, loader=loads)
    with in_process(app) as base:
        yield Server(f"{base}/v1", loads, start, app.state.rolechat)
    store.close()


def chat(base: str, model: str | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{base}/chat/completions", timeout=30,
                      json={"messages": HELLO, **({"model": model} if model else {}), **body})


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_during_a_load_get_503_model_loading(server: Server) -> None:
    base, loads = server.base, server.loads
    loads.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(chat, base, OTHER)  # this one waits for the load, then is served
        assert loads.entered.wait(10)
        for during in (chat(base), chat(base, "fake"),
                       httpx.post(f"{base}/conversations", json={}, timeout=10)):
            error = error_of(during, 503)
            assert error["code"] == "model_loading" and OTHER in error["message"]
            assert 1 <= int(during.headers["Retry-After"]) <= 30
        # What does not need the model answers at once, and says what is loading.
        status = httpx.get(f"{base}/status", timeout=10).json()
        assert status["models"]["loading"]["model"] == OTHER
        assert status["models"]["loading"]["phase"] == "loading" and status["engine"] is None
        listed = httpx.get(f"{base}/models", timeout=10).json()["data"]
        assert listed[0]["id"] == "fake" and [m["id"] for m in listed if m["loading"]] == [OTHER]
        assert httpx.get(f"{base}/conversations", timeout=10).status_code == 200
        loads.gate.set()
        served = asked.result(30)
    assert served.status_code == 200 and served.json()["model"] == OTHER
    status = httpx.get(f"{base}/status", timeout=10).json()
    assert (status["model"], status["models"]["switches"]) == (OTHER, 1)
    assert status["models"]["loading"] is None
    assert httpx.get(f"{base}/models", timeout=10).json()["data"][0]["loaded"] is True


def test_a_switch_waits_for_the_replies_on_the_old_model(server: Server,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base, start, models = server.base, server.start, server.state.models
    steps = start.adapter.steps = threading.Semaphore(0)  # type: ignore[attr-defined]
    start.replies.append("abcdef")
    with ThreadPoolExecutor(2) as pool:
        replying = pool.submit(chat, base)
        assert start.adapter.entered.wait(10)  # type: ignore[attr-defined]
        # Past the bound, the switch is called off and the old model goes on serving.
        monkeypatch.setattr(switch, "DRAIN_S", 0.3)
        error = error_of(chat(base, OTHER), 503)
        assert error["code"] == "model_busy" and "fake" in error["message"]
        assert models.loading is None and server.state.model_id == "fake"
        monkeypatch.setattr(switch, "DRAIN_S", 30.0)
        asked = pool.submit(chat, base, OTHER)
        until(lambda: models.loading is not None)
        assert models.loading is not None and models.loading.phase == "draining"
        time.sleep(0.2)
        assert not asked.done() and not server.loads.asked  # nothing loads while it replies
        steps.release(100)
        finished = replying.result(30)
        switched = asked.result(30)
    assert finished.status_code == 200, finished.text
    assert finished.json()["choices"][0]["message"]["content"] == "abcdef"
    assert finished.json()["model"] == "fake"
    assert switched.status_code == 200 and switched.json()["model"] == OTHER


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(server: Server) -> None:
    base, loads = server.base, server.loads
    loads.failing.add(BROKEN)
    error = error_of(chat(base, BROKEN), 500)
    assert error["code"] == "model_load_failed" and "its file is broken" in error["message"]
    assert loads.asked == [BROKEN, None]  # then the model served before, loaded again
    served = chat(base)
    assert served.status_code == 200 and served.json()["model"] == "fake"
    status = httpx.get(f"{base}/status", timeout=10).json()
    assert (status["model"], status["models"]["switches"]) == ("fake", 0)
    # A session request names models as completions do.
    cid = httpx.post(f"{base}/conversations", json={}, timeout=10).json()["id"]
    missing = httpx.post(f"{base}/conversations/{cid}/messages", timeout=10,
                         json={"content": "hi", "model": "ollama:nope:1b"})
    assert error_of(missing, 404)["code"] == "model_not_found"
