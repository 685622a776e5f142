"""Search over a key's conversations (``GET /v1/conversations?q=``) over real HTTP: uvicorn as
`rolechat serve` runs it, in-process over the fake engine, with two API keys. Conversations are
made and written through the API; another key's never appear, whatever the query."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import FakeEngine
from rolechat.server import create_app
from rolechat.store import Store
from servers import in_process

K1, K2 = "search-key-one", "search-key-two"


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, engine: FakeEngine) -> Iterator[str]:
    store = Store(tmp_path_factory.mktemp("search") / "rolechat.db")
    with in_process(create_app(engine, api_keys=[K1, K2], store=store)) as url:
        yield f"{url}/v1"
    store.close()


def client(base: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def converse(http: httpx.Client, engine: FakeEngine, turns: list[tuple[str, str]],
             **body: Any) -> dict[str, Any]:
    made = http.post("/conversations", json=body)
    assert made.status_code == 201, made.text
    cid = made.json()["id"]
    for user, reply in turns:
        engine.replies.append(reply)
        sent = http.post(f"/conversations/{cid}/messages", json={"content": user})
        assert sent.status_code == 200, sent.text
    conv: dict[str, Any] = http.get(f"/conversations/{cid}").json()
    return conv


def search(http: httpx.Client, q: str, **params: Any) -> dict[str, Any]:
    response = http.get("/conversations", params={"q": q, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def seeded(base: str, engine: FakeEngine) -> dict[str, Any]:
    with client(base, K1) as one, client(base, K2) as two:
        lights = converse(one, engine, [("Tell me about lighthouses.", "They guide ships."),
                                        ("Who keeps them?", "A keeper, once.")])
        cooking = converse(one, engine, [("我想做家常菜，有什么推荐？", "试试番茄炒蛋。家常菜。")],
                           title="晚饭")
        secret = converse(two, engine, [("The lighthouse code is 4711.", "Noted: 4711."),
                                        ("家常菜 for two", "Rice and eggs.")])
    return {"lights": lights, "cooking": cooking, "secret": secret}


def test_search_finds_the_message_and_marks_the_match(base: str,
                                                      seeded: dict[str, Any]) -> None:
    lights = seeded["lights"]
    with client(base, K1) as one:
        body = search(one, "keeper")
    assert body["object"] == "list" and body["query"] == "keeper"
    [conv] = body["data"]
    assert conv["id"] == lights["id"] and conv["title"] == lights["title"]
    assert conv["turns"] == 2 and "messages" not in conv
    [hit] = conv["hits"]
    keeper = next(m for m in lights["messages"] if "keeper" in m["content"])
    assert hit["message_id"] == keeper["id"] and hit["role"] == "assistant"
    assert hit["snippet"] == "A keeper, once."
    assert hit["parts"] == [{"text": "A ", "match": False}, {"text": "keeper", "match": True},
                            {"text": ", once.", "match": False}]


def test_another_keys_conversations_never_appear(base: str, seeded: dict[str, Any]) -> None:
    secret = seeded["secret"]["id"]
    mine = {seeded["lights"]["id"], seeded["cooking"]["id"]}
    with client(base, K1) as one, client(base, K2) as two:
        for q in ("lighthouse", "4711", "家常菜", "菜", "li", "e", "Rice eggs", "code"):
            ids = {c["id"] for c in search(one, q)["data"]}
            assert secret not in ids and ids <= mine, q
        assert {c["id"] for c in search(two, "lighthouse")["data"]} == {secret}
        assert {c["id"] for c in search(two, "家常菜")["data"]} == {secret}
        assert search(two, "keeper")["data"] == []
        # The list is scoped the same way.
        assert {c["id"] for c in one.get("/conversations").json()["data"]} == mine
    with client(base, None) as anonymous:
        assert anonymous.get("/conversations", params={"q": "lighthouse"}).status_code == 401


def test_chinese_text_is_found(base: str, seeded: dict[str, Any]) -> None:
    cooking = seeded["cooking"]
    with client(base, K1) as one:
        [conv] = search(one, "家常菜")["data"]
        assert conv["id"] == cooking["id"] and conv["title"] == "晚饭"
        assert sorted(h["role"] for h in conv["hits"]) == ["assistant", "user"]
        assert all([p["text"] for p in h["parts"] if p["match"]] == ["家常菜"]
                   for h in conv["hits"])
        short = search(one, "饭")["data"]  # one character: the title, by the LIKE scan
        assert [c["id"] for c in short] == [cooking["id"]]
        assert short[0]["hits"][0]["message_id"] is None


@pytest.mark.parametrize(("query", "param"), [
    ({"q": ""}, "q"), ({"q": "   "}, "q"), ({"q": "x" * 201}, "q"),
    ({"q": "x", "limit": "0"}, "limit"), ({"q": "x", "limit": "101"}, "limit"),
    ({"q": "x", "limit": "many"}, "limit"), ({"query": "x"}, "query")])
def test_bad_queries_are_400_naming_the_field(base: str, query: dict[str, str],
                                              param: str) -> None:
    with client(base, K1) as one:
        response = one.get("/conversations", params=query)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_hostile_text_and_limits(base: str, seeded: dict[str, Any]) -> None:
    with client(base, K1) as one:
        for q in ('"', "AND", "NEAR(", "*", "-x", "') OR 1=1 --", "%", "_"):
            assert search(one, q)["data"] == [], q  # searched as text, found nowhere
        hits = [h for c in search(one, "e", limit=2)["data"] for h in c["hits"]]
        assert len(hits) == 2
