"""The server's state stays bounded: a conversation's lock lives only while somebody holds or
awaits it, and the live chats are an LRU."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.saved import SavedChat
from rolechat.server import create_app
from rolechat.server.state import Chats, ServerState
from rolechat.server.worker import Worker
from rolechat.store import Store


def test_locks_do_not_outlive_the_requests(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), store=Store(tmp_path / "db"))
    state: ServerState = app.state.rolechat
    with TestClient(app, base_url="http://testserver/v1") as client:
        cids = [client.post("/conversations", json={}).json()["id"] for _ in range(20)]
        for cid in cids:
            assert client.post(f"/conversations/{cid}/messages",
                               json={"content": "hi"}).status_code == 200
            assert client.post(f"/conversations/{cid}/prompt", json={}).status_code == 200
            assert client.patch(f"/conversations/{cid}", json={"title": "t"}).status_code == 200
            assert client.post(f"/conversations/{cid}/undo", json={}).status_code == 200
        for cid in cids[:5]:
            assert client.delete(f"/conversations/{cid}").status_code == 200
        gc.collect()
        assert len(state.locks) == 0, dict(state.locks)


def test_a_lock_is_shared_while_it_is_held_or_awaited(tmp_path: Path) -> None:
    state = ServerState(engine=FakeEngine(), store=Store(tmp_path / "db"), worker=Worker(),
                        keyed=False, model_id="fake")
    order: list[str] = []

    async def main() -> None:
        first = state.lock_of(7)
        await first.acquire()
        waiting = asyncio.get_running_loop().create_task(waiter())
        await asyncio.sleep(0)  # the waiter asks for the lock and waits on it
        assert state.lock_of(7) is first and len(state.locks) == 1
        order.append("first")
        first.release()
        del first
        await waiting
        assert order == ["first", "second"]

    async def waiter() -> None:
        async with state.lock_of(7):
            order.append("second")

    asyncio.run(main())
    gc.collect()
    assert len(state.locks) == 0


def test_live_chats_are_an_lru(tmp_path: Path) -> None:
    engine, store = FakeEngine(), Store(tmp_path / "db")
    chats = Chats(size=2)
    made: list[int] = []

    def make(cid: int) -> Any:
        def build() -> SavedChat:
            made.append(cid)
            return SavedChat.new(engine, store=store)
        return build

    one = chats.get(1, make(1))
    chats.get(2, make(2))
    assert chats.get(1, make(1)) is one  # kept, and now the most recent
    chats.get(3, make(3))  # 2 goes: the least recently used
    assert len(chats) == 2 and chats.get(1, make(1)) is one
    chats.get(2, make(2))
    assert made == [1, 2, 3, 2]
    chats.pop(2)
    assert len(chats) == 1
