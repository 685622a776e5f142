"""`rolechat serve` over real HTTP on loopback, with the embedded model and the official
`openai` client (and raw SSE parsing)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from servers import rolechat_serve

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rolechat_serve(tmp_path_factory.mktemp("home"), "--api-key", KEY,
                        "--max-body-bytes", "20000") as base:
        yield f"{base}/v1"


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def model_of(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models(client: openai.OpenAI) -> None:
    assert model_of(client) == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_completion_and_cached_prefix(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model=model_of(client), messages=messages,
                                           temperature=0, max_tokens=16)
    assert first.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage is not None and first.usage.prompt_tokens > 0
    assert 0 < first.usage.completion_tokens <= 16
    follow = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model=model_of(client), messages=follow,
                                            temperature=0, max_tokens=16)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 2
    again = client.chat.completions.create(model=model_of(client), messages=messages,
                                           temperature=0, max_tokens=16)
    assert again.choices[0].message.content == first.choices[0].message.content


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=model_of(client), messages=[{"role": "user", "content": "Count to five."}],
        temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_raw_sse(server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 8,
            "temperature": 0}
    events = []
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def long_conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 12},
                     {"role": "assistant", "content": f"Answer {i}: " + "here is more " * 12}]
    return [*messages, {"role": "user", "content": "Last question?"}]


def test_too_long_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_of(client), messages=long_conversation(12),
                                       max_tokens=64)
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded"
    assert "available" in error["message"]


def test_window_opt_in_drops_whole_turns(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=model_of(client), messages=long_conversation(12), max_tokens=32, temperature=0,
        extra_body={"rolechat": {"window": True}})
    extra = reply.model_extra or {}
    dropped = extra["rolechat"]["dropped_turns"]
    assert dropped and dropped == list(range(len(dropped)))  # the oldest, whole turns
    assert reply.usage is not None and reply.usage.prompt_tokens <= 1024 - 32
    # The parameters the reply used, and where each came from.
    params = extra["rolechat"]["params"]
    assert params["max_new_tokens"] == {"value": 32, "from": "you"}  # the request
    assert params["temperature"] == {"value": 0.0, "from": "you"}
    assert params["top_k"]["from"] in ("persona", "rolechat")  # the GGUF stores none


def test_client_disconnect_frees_the_engine(server: str, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}

    def worker() -> dict[str, Any]:
        jobs: dict[str, Any] = httpx.get(f"{server}/status", headers=headers).json()["jobs"]
        return {**jobs, "busy": jobs["running"] > 0}

    before = worker()["cancelled"]
    body = {"messages": [{"role": "user", "content": "Count from 1 to 1000, separated by "
                          "commas."}], "stream": True, "max_tokens": 800, "temperature": 0}
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=60,
                      headers=headers) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 5:
                assert worker()["busy"]  # the story is being generated
                break  # leave mid-stream
    deadline = time.monotonic() + 10
    while worker()["busy"]:  # the server stops the abandoned generation
        assert time.monotonic() < deadline, worker()
        time.sleep(0.1)
    assert worker()["cancelled"] == before + 1
    reply = client.chat.completions.create(
        model=model_of(client), messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_concurrent_requests_all_succeed(client: openai.OpenAI) -> None:
    results: list[str] = []

    def ask(i: int) -> None:
        reply = client.chat.completions.create(
            model=model_of(client), messages=[{"role": "user", "content": f"Say {i}."}],
            max_tokens=8, temperature=0)
        results.append(reply.choices[0].message.content or "")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4


def test_stateless_requests_use_no_persona_file_unless_named(tmp_path) -> None:
    home = tmp_path / "home"
    (home / "personas").mkdir(parents=True)
    (home / "personas" / "concise.toml").write_text(
        'system = "Answer in one word."\n[params]\nmax_new_tokens = 2\n', encoding="utf-8")
    with rolechat_serve(home) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Tell me about the sea."}]
        # Its first sentence only (no max_tokens: the persona's must not apply).
        plain = client.chat.completions.create(model=model_of(client), messages=messages,
                                               temperature=0, stop=["."])
        assert plain.usage is not None and plain.usage.completion_tokens > 2
        named = client.chat.completions.create(model=model_of(client), messages=messages,
                                               temperature=0,
                                               extra_body={"rolechat": {"persona": "concise"}})
        assert named.usage is not None and named.usage.completion_tokens == 2
        # The persona's system prompt was used: the same prompt as sending it as a message.
        explicit = client.chat.completions.create(
            model=model_of(client), temperature=0, max_tokens=2,
            messages=[{"role": "system", "content": "Answer in one word."}, *messages])
        assert explicit.usage is not None
        assert named.usage.prompt_tokens == explicit.usage.prompt_tokens
        assert named.choices[0].message.content == explicit.choices[0].message.content
