"""`rolechat serve`'s JSON against the OpenAPI schemas OpenAI publishes (a trimmed copy in
openai_schemas.json, its source noted there), and real clients with their default settings:
the official client's models.retrieve, LangChain's ChatOpenAI and simonw's `llm` CLI. Errors
are checked on the app in-process (the fake engine: they need no model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.server import create_app
from rolechat.store import Store
from servers import rolechat_serve, run_llm

jsonschema = pytest.importorskip("jsonschema")

def nullable(schema: Any) -> Any:
    """OpenAPI's ``nullable: true`` (which the spec still uses in places) as JSON Schema."""
    if isinstance(schema, list):
        return [nullable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {k: nullable(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable") is True:
        if "enum" in converted:
            converted["enum"] = [*converted["enum"], None]
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


SCHEMAS = nullable(json.loads(Path(__file__).with_name("openai_schemas.json").read_text())[
    "schemas"])
HELLO = [{"role": "user", "content": "Say hi."}]


def check(instance: Any, name: str) -> None:
    root = {"components": {"schemas": SCHEMAS}, "$ref": f"#/components/schemas/{name}"}
    errors = sorted(jsonschema.Draft202012Validator(root).iter_errors(instance),
                    key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rolechat_serve(tmp_path_factory.mktemp("home"), "--max-body-bytes", "20000") as url:
        yield url


def test_a_completion_matches_the_schema(base: str) -> None:
    response = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                          json={"messages": HELLO, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200
    check(response.json(), "CreateChatCompletionResponse")


def test_every_stream_chunk_matches_the_schema(base: str) -> None:
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120, json={
            "messages": HELLO, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]" and len(frames) >= 4
    chunks = [json.loads(frame) for frame in frames[:-1]]
    for chunk in chunks:
        check(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_models_match_the_schema(base: str) -> None:
    check(httpx.get(f"{base}/v1/models").json(), "ListModelsResponse")


def test_a_model_retrieved_matches_the_schema(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)
    model = client.models.list().data[0].id
    assert client.models.retrieve(model).id == model  # the official client's retrieve
    check(httpx.get(f"{base}/v1/models/{model}").json(), "Model")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app over the fake engine: errors need no model."""
    store = Store(tmp_path_factory.mktemp("errors") / "rolechat.db")
    app = create_app(FakeEngine(), store=store, max_body_bytes=20000)
    with TestClient(app) as client:
        yield client
    store.close()


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/v1/chat/completions", {"messages": HELLO, "model": "nope"}, 404),
    ("GET", "/v1/chat/completions", None, 405),
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/v1/models/nope", None, 404),
    ("POST", "/v1/chat/completions", {"messages": HELLO, "pad": "x" * 30_000}, 413),
    ("GET", "/v1/conversations/9", None, 404),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
])
def test_errors_match_the_schema(in_process: TestClient, method: str, path: str, body: Any,
                                 status: int) -> None:
    response = in_process.request(method, path, json=body)
    assert response.status_code == status, response.text
    check(response.json(), "ErrorResponse")


def test_langchain_chat_openai_with_its_defaults(base: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    chat = langchain_openai.ChatOpenAI(base_url=f"{base}/v1", api_key="not-needed", model=model,
                                       temperature=0, max_tokens=8, frequency_penalty=0,
                                       presence_penalty=0, max_retries=0)
    answer = chat.invoke("Say hi.")
    assert isinstance(answer.content, str) and answer.content
    streamed = "".join(str(part.content) for part in chat.stream("Say hi."))
    assert streamed == answer.content  # greedy: the same reply, streamed


def test_the_llm_cli(base: str, tmp_path: Path) -> None:
    done = run_llm(tmp_path, base, "-o", "temperature", "0", "-o", "max_tokens", "8",
                   "-o", "frequency_penalty", "0", "Say hi.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    # Any JSON object: the grammar holds it to one (that it ends is the model's business; a
    # schema bounds it, see test_structured.py's llm --schema).
    json_object = run_llm(tmp_path, base, "-o", "json_object", "1", "-o", "max_tokens", "30",
                          "-o", "temperature", "0", "Say hi in JSON.")
    assert json_object.returncode == 0, json_object.stderr
    assert json_object.stdout.startswith("{")
