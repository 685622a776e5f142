"""JSON replies from `rolechat serve` over real HTTP with the embedded model, read by the clients
people use: the OpenAI SDK's ``parse()`` with a pydantic model, LangChain's
``with_structured_output``, ``llm --schema``, and raw ``response_format`` bodies (json_object,
json_schema, llama-cpp-python's json_object + schema), streamed and not, greedy and sampled.
Every reply must parse and validate: the grammar guarantees it. Bad schemas are a 400 naming
the field, with nothing stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from rolechat.store import Store
from servers import rolechat_serve, run_llm


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Pet(BaseModel):
    name: str = Field(max_length=30)
    legs: int = Field(ge=0, le=8)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)
    favourite: Colour
    pets: list[Pet] = Field(max_length=3)


FLAT = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a fictional person who has pets, as JSON."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("home")
    with rolechat_serve(home) as base:
        yield base, home


@pytest.fixture
def base(served: tuple[str, Path]) -> str:
    return served[0]


@pytest.fixture
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def model_of(base: str) -> str:
    return str(httpx.get(f"{base}/v1/models").json()["data"][0]["id"])


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7},
                                      {"temperature": 1.2, "seed": 21}],
                         ids=["greedy", "seeded", "hot"])
def test_the_sdk_parses_every_reply_into_the_model(client: openai.OpenAI, base: str,
                                                   sampling: dict[str, Any]) -> None:
    completion = client.chat.completions.parse(model=model_of(base), messages=ASK,  # type: ignore[arg-type]
                                               response_format=Person, max_tokens=400,
                                               **sampling)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    person = choice.message.parsed
    assert isinstance(person, Person) and person.name
    assert isinstance(person.favourite, Colour) and len(person.pets) <= 3
    jsonschema.validate(json.loads(choice.message.content or ""), Person.model_json_schema())


def test_a_streamed_schema_reply_joins_into_valid_json(base: str) -> None:
    body = {"messages": [{"role": "user", "content": "Name a city and its population."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "city", "schema": FLAT, "strict": True}},
            "stream": True, "temperature": 0, "max_tokens": 100}
    parts, finish = [], None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    assert finish == "stop"
    value = json.loads("".join(parts))
    jsonschema.validate(value, FLAT)


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_object", "schema": FLAT},  # llama-cpp-python's form
], ids=["json_object", "json_object+schema"])
def test_json_object_replies_parse(client: openai.OpenAI, base: str,
                                   response_format: dict[str, Any]) -> None:
    completion = client.chat.completions.create(
        model=model_of(base), temperature=0.8, seed=3, max_tokens=200,
        messages=[{"role": "user", "content": "Give me a city as JSON."}],
        response_format=response_format)  # type: ignore[arg-type]
    choice, content = completion.choices[0], completion.choices[0].message.content or ""
    if "schema" not in response_format and choice.finish_reason == "length":
        # Any object: the grammar holds the reply to one, but nothing bounds its length.
        assert content.startswith("{")
        return
    assert choice.finish_reason == "stop"
    value = json.loads(content)
    assert isinstance(value, dict)
    if "schema" in response_format:
        jsonschema.validate(value, FLAT)


def test_langchain_with_structured_output(base: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=f"{base}/v1", api_key="none",
                                       model=model_of(base), temperature=0, max_tokens=300,
                                       max_retries=0)
    person = chat.with_structured_output(Person, method="json_schema").invoke(
        "Describe a fictional person who has pets.")
    assert isinstance(person, Person) and person.name


def test_llm_schema(base: str, tmp_path: Path) -> None:
    done = run_llm(tmp_path, base, "--schema", "city, population int", "-o", "temperature", "0",
                   "Name a big city.", supports_schema=True)
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


@pytest.mark.parametrize(("response_format", "param", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x"}},
     "response_format.json_schema.schema", "no schema"),
    ({"type": "xml"}, "response_format.type", "json_schema"),
])
def test_a_bad_schema_is_a_400_naming_the_field(served: tuple[str, Path],
                                                response_format: dict[str, Any], param: str,
                                                words: str) -> None:
    base, home = served
    response = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "messages": ASK, "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    cid = httpx.post(f"{base}/v1/conversations", json={}).json()["id"]
    response = httpx.post(f"{base}/v1/conversations/{cid}/messages", timeout=60,
                          json={"content": "Hello", "response_format": response_format})
    assert response.status_code == 400, response.text
    store = Store(home / "rolechat.db")
    try:
        assert store.messages(cid) == []  # nothing stored
    finally:
        store.close()


def test_a_session_turn_can_be_json(base: str) -> None:
    cid = httpx.post(f"{base}/v1/conversations", json={"params": {"temperature": 0}}).json()["id"]
    response = httpx.post(f"{base}/v1/conversations/{cid}/messages", timeout=120, json={
        "content": "Name a city and its population.",
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": FLAT}}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["message"]["content"]), FLAT)
