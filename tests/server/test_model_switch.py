"""`rolechat serve` switching models on request, over real HTTP with the embedded model: a home
whose stores (Hugging Face, ModelScope, Ollama, LM Studio: tests/model_stores.py) hold the
embedded GGUF under several names, plus one real copy of it (a file of its own: another model
as far as KV snapshots go). ``/v1/models`` lists them all; the official ``openai`` client
chats by two names in a row; a session goes on after a switch; snapshots stay with their
model; ``--no-switch`` pins the model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from model_stores import GGUF, NAMES, STORE_VARIABLES, build_stores
from servers import ROLECHAT, free_port, running

#: The id the model `serve` starts with keeps (the default: the embedded file's name).
START = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A copy of the embedded GGUF in LM Studio's folder: the same weights in another file.
COPY = "lmstudio:copies/Copy-GGUF:copy.gguf"
GREEDY = {"temperature": 0, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("switch-home")
    build_stores(home)
    copy = home / ".lmstudio/models/copies/Copy-GGUF/copy.gguf"
    copy.parent.mkdir(parents=True)
    try:
        os.link(GGUF, copy)  # another path is another model to the KV store
    except OSError:
        shutil.copyfile(GGUF, copy)
    return home


def serve(home: Path, *args: str) -> Any:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in STORE_VARIABLES},
           "HOME": str(home), "ROLECHAT_HOME": str(home / "rolechat")}
    command = [str(ROLECHAT), "serve", "--port", str(port), "--context-length", "1024",
               "--threads", "1", "--parallel", "2", *args]
    return running(command, f"http://127.0.0.1:{port}/v1/models", env=env), \
        f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[str]:
    started, base = serve(home)
    with started:
        yield base


def get(base: str, path: str) -> Any:
    response = httpx.get(f"{base}{path}", timeout=60)
    response.raise_for_status()
    return response.json()


def say(base: str, cid: int, text: str, model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"content": text, "params": GREEDY}
    if model is not None:
        body["model"] = model
    response = httpx.post(f"{base}/conversations/{cid}/messages", json=body, timeout=120)
    assert response.status_code == 200, response.text
    done: dict[str, Any] = response.json()
    return done


def test_every_model_on_the_machine_is_listed_with_its_facts(server: str) -> None:
    listed = get(server, "/models")["data"]
    first, others = listed[0], {m["id"]: m for m in listed[1:]}
    assert first["id"] == START and first["loaded"] is True
    assert (first["source"], first["context_length"]) == ("embedded", 1024)  # as served
    assert set(others) == {*NAMES, COPY}  # the embedded entry is the start model itself
    for model in listed:
        assert model["object"] == "model" and model["size"] == GGUF.stat().st_size
        assert (model["quantization"], model["architecture"]) == ("Q4_1", "llama")
        assert model["trained_context_length"] == 8192
    for name, source in NAMES.items():
        assert others[name]["source"] == source and others[name]["loaded"] is False
        assert others[name]["context_length"] == 8192  # as trained, until it is loaded
    assert get(server, "/models/smollm2:135m")["id"] == START  # its name is one of its names
    assert get(server, f"/models/{COPY}")["location"] == "LM Studio"
    missing = httpx.get(f"{server}/models/ollama:qwen2.5:3b", timeout=60)
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["code"] == "model_not_found"
    assert COPY in error["message"] and START in error["message"]


def test_the_openai_client_chats_with_two_models_in_a_row(server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)
    before = get(server, "/status")["models"]["switches"]
    hello = [{"role": "user", "content": "Say hello."}]
    other = client.chat.completions.create(model="ollama:smollm2:135m", messages=hello,
                                           temperature=0, max_tokens=8)
    assert other.model == "ollama:smollm2:135m"
    status = get(server, "/status")
    assert status["model"] == "ollama:smollm2:135m" and status["models"]["loading"] is None
    assert status["models"]["switches"] == before + 1 and status["engine"]["parallel"] == 2
    assert status["engine"]["context_length"] == 1024  # serve's options, on the new model
    listed = client.models.list().data
    assert listed[0].id == "ollama:smollm2:135m" and getattr(listed[0], "loaded", None) is True
    back = client.chat.completions.create(model=START, messages=hello, temperature=0,
                                          max_tokens=8)
    assert back.model == START and get(server, "/status")["models"]["switches"] == before + 2
    # The same weights under two names: the same greedy reply.
    assert back.choices[0].message.content == other.choices[0].message.content


def test_a_session_goes_on_after_a_switch_and_snapshots_stay_with_their_model(
        server: str, home: Path) -> None:
    cid = httpx.post(f"{server}/conversations", json={"model": START}, timeout=60).json()["id"]
    first = say(server, cid, "My name is Ada.")
    assert first["model"] == START
    # On another model (another file): its chat is rebuilt on the new engine, and nothing of
    # the first model's KV state (its RAM tier, its snapshot file) is used.
    second = say(server, cid, "What is my name?", model=COPY)
    assert second["model"] == COPY and get(server, "/status")["model"] == COPY
    assert second["rolechat"]["kv_source"] == "none"
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Back on the first model: its own snapshot file, written when it was let go, is restored.
    third = say(server, cid, "Thanks.", model=START)
    assert third["model"] == START and third["rolechat"]["kv_source"] == "disk"
    assert third["rolechat"]["restored_tokens"] > 0
    stored = get(server, f"/conversations/{cid}")
    assert stored["turns"] == 3
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
        "My name is Ada.", "What is my name?", "Thanks."]
    assert {m["status"] for m in stored["messages"]} == {"complete"}
    # Each model's snapshot of the conversation is a file under that model's own folder.
    files = sorted((home / "rolechat/kv").glob(f"*/conversation-{cid}.kv"))
    assert len(files) == 2 and files[0].parent != files[1].parent


def test_no_switch_pins_the_model(home: Path) -> None:
    started, base = serve(home, "--no-switch", "--model", "ollama:smollm2:135m")
    with started:
        listed = get(base, "/models")["data"]
        assert [m["id"] for m in listed] == ["ollama:smollm2:135m"] and listed[0]["loaded"]
        refused = httpx.post(f"{base}/chat/completions", timeout=60, json={
            "model": START, "messages": [{"role": "user", "content": "Hi"}]})
        error = refused.json()["error"]
        assert refused.status_code == 404 and error["code"] == "model_not_found"
        assert "ollama:smollm2:135m" in error["message"]
        assert get(base, "/status")["models"]["can_switch"] is False
