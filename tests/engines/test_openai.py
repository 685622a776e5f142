"""The openai engine against a real OpenAI-compatible server: llama-cpp-python's own
``llama_cpp.server`` serving the embedded SmolLM2-135M-Instruct GGUF (started once, on a free
local port, killed at the end). Skipped when the server extra (fastapi, uvicorn, ...) or the
``openai`` client is missing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.conftest import Cli
from rolechat import Chat, GenerationParams, Message, ModelLoadError, load_engine
from rolechat.engines.llama_cpp import LlamaCppEngine, embedded_model_path
from rolechat.engines.openai import OpenAIEngine
from servers import free_port, running

pytest.importorskip("openai")
pytest.importorskip("llama_cpp.server.app")  # the llama-cpp-python[server] extra

ALIAS = "smol"
GREEDY = {"temperature": 0.0, "max_new_tokens": 24}


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of a running llama-cpp-python server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()),
               "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx",
               "2048", "--chat_format", "chatml", "--n_threads", "1"]
    with running(command, f"{url}/models"):
        yield url


@pytest.fixture(scope="session")
def remote(server: str) -> Iterator[OpenAIEngine]:
    engine = load_engine(ALIAS, engine="openai", base_url=server, context_length=2048)
    assert isinstance(engine, OpenAIEngine)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def remote_exact(server: str) -> Iterator[OpenAIEngine]:
    engine = load_engine(ALIAS, engine="openai", base_url=server,
                         tokenizer=str(embedded_model_path()), context_length=2048)
    assert isinstance(engine, OpenAIEngine)
    yield engine
    engine.close()


SAMPLES = [
    [Message("user", "hi")],
    [Message("system", "You are a concise assistant."),
     Message("user", "What is the capital of France?"), Message("assistant", "Paris."),
     Message("user", "And of Italy? Answer in one word.")],
    [Message("user", "Add 123456 + 987654 and 31415926535 * 2; show 3.14159, 2.71828!")],
    [Message("system", "Réponds en français, s'il te plaît."),
     Message("user", "Über naïve café — ¿qué tal? 日本語のテキストも少し。 🙂🙂")],
    [Message("user", "def f(x):\n    return {'a': [x**2, x//3]}  # <|im_start|> {}[]()")],
]


def test_two_turn_streamed_chat(remote: OpenAIEngine) -> None:
    chat = Chat(remote, params=GREEDY)
    usages = []
    for question in ("What is the capital of France?", "And of Italy?"):
        stream = chat.stream(question)
        chunks = list(stream)
        assert stream.reply is not None
        assert "".join(chunks) == stream.reply.text
        assert stream.reply.text.strip()
        assert stream.reply.finish_reason in ("stop", "length")
        usages.append(stream.reply.usage)
    first, second = usages
    assert first.prompt_tokens > 0 and first.generated_tokens > 0
    assert second.prompt_tokens > first.prompt_tokens
    assert first.ttft_s > 0 and first.total_s >= first.ttft_s
    assert len(chat.conversation.turns) == 2
    # llama-cpp-python's server reports no usage when streaming: rolechat's counts are
    # estimates, and say so (in the usage, the plan, and where they are stored or shown).
    assert first.estimated and stream.reply.plan.estimated
    assert "(estimated)" in stream.reply.plan.summary()
    assert remote.kv_stats() is None  # the server keeps its own cache


def test_local_tokenizer_counts_exactly(remote_exact: OpenAIEngine,
                                        engine: LlamaCppEngine) -> None:
    assert remote_exact.exact_counts
    assert remote_exact.describe()["token_counting"].startswith("exact")
    for messages in SAMPLES:
        assert remote_exact.count_tokens(messages) == engine.count_tokens(messages)
    reply = Chat(remote_exact, params=GREEDY).send("Say hi.")
    assert reply.text.strip()
    assert not reply.plan.estimated


def test_estimate_is_never_below_the_exact_count(remote: OpenAIEngine,
                                                  engine: LlamaCppEngine) -> None:
    assert not remote.exact_counts
    assert "estimate" in remote.describe()["token_counting"]
    for messages in SAMPLES:
        assert remote.count_tokens(messages) >= engine.count_tokens(messages), messages


def test_reported_usage_tightens_the_estimate_safely(server: str,
                                                    engine: LlamaCppEngine) -> None:
    """What the server reports as prompt_tokens calibrates the estimate (llama-cpp-python's
    server sends no usage when streaming, so the report is fed in as a server would)."""
    fresh = load_engine(ALIAS, engine="openai", base_url=server)
    try:
        first, *others = SAMPLES
        before = fresh.count_tokens(first)
        fresh._calibrate(first, engine.count_tokens(first))  # the server's exact count
        assert fresh.calibration < 1.0
        assert engine.count_tokens(first) <= fresh.count_tokens(first) < before
        assert fresh.count_tokens(first) <= 1.2 * engine.count_tokens(first)
        for messages in others:  # calibration keeps the largest ratio: still never below
            fresh._calibrate(messages, engine.count_tokens(messages))
        for messages in SAMPLES:
            assert fresh.count_tokens(messages) >= engine.count_tokens(messages), messages
    finally:
        fresh.close()


def test_window_drops_whole_turns_on_a_small_context(server: str) -> None:
    small = load_engine(ALIAS, engine="openai", base_url=server, context_length=512)
    try:
        chat = Chat(small, params={"temperature": 0.0, "max_new_tokens": 16})
        dropped = False
        for i in range(14):
            reply = chat.send(f"Turn {i}: tell me one short fact about the number {i}.")
            assert reply.plan.prompt_tokens <= reply.plan.budget
            dropped = dropped or bool(reply.plan.dropped)
            assert reply.usage.generated_tokens > 0
        assert dropped
    finally:
        small.close()


def test_stop_strings(remote: OpenAIEngine) -> None:
    messages = [Message("user", "Count from 1 to 10.")]
    params = GenerationParams(temperature=0.0, max_new_tokens=40)
    full = remote.complete(messages, params)
    stop = "\n" if "\n" in full.text.strip() else " "
    assert stop in full.text.strip(), full.text
    cut = remote.complete(messages, params.merged(stop=[stop]))
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_request_mapping(remote: OpenAIEngine) -> None:
    body = remote.request([Message("user", "hi")], GenerationParams(seed=7, stop=["x"]), 5)
    assert body["max_tokens"] == 5 and body["seed"] == 7 and body["stop"] == ["x"]
    assert body["stream_options"] == {"include_usage": True}
    assert "extra_body" not in body  # defaults are left to the server
    body = remote.request([Message("user", "hi")],
                          GenerationParams(top_k=5, repetition_penalty=1.2), 5)
    assert body["extra_body"] == {"top_k": 5, "repetition_penalty": 1.2}


def test_closed_port_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelLoadError) as caught:
        load_engine(ALIAS, engine="openai", base_url=url)
    assert url in str(caught.value) and "--base-url" in caught.value.hint


def test_unknown_model_lists_the_served_ones(server: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_engine("no-such-model", engine="openai", base_url=server)
    assert "no-such-model" in str(caught.value) and ALIAS in caught.value.hint


def test_no_model_name_uses_the_only_served_model(server: str) -> None:
    engine = load_engine(engine="openai", base_url=server, context_length=2048)
    try:
        assert engine.model == ALIAS
        assert engine.describe()["context_source"] == "option"
    finally:
        engine.close()


@pytest.fixture
def cli(rolechat_home: Path, tmp_path: Path) -> Cli:
    work = tmp_path / "work"
    work.mkdir()
    return Cli(rolechat_home, work)


def test_cli_ask(server: str, cli: Cli) -> None:
    data = cli.ask_json("--engine", "openai", "--base-url", server, "--model", ALIAS, "-t", "0",
                        "--max-new-tokens", "8", "hi")
    assert data["model"] == ALIAS
    assert isinstance(data.get("reply", data.get("response", "")), str)


def test_cli_openai_needs_a_base_url(cli: Cli) -> None:
    line = cli.fails("ask", "--engine", "openai", "--model", ALIAS, "hi", code=2)
    assert "--base-url" in line


def test_cli_remote_flags_only_for_openai(cli: Cli, tmp_path: Path) -> None:
    line = cli.fails("ask", "--engine", "llama.cpp", "--api-key", "k", "hi", code=2)
    assert "--api-key" in line and "openai" in line
