"""rolechat.schemas: every keyword the grammar claims to enforce is checked by compiling the
grammar with llama.cpp and feeding it texts token by token (the embedded model's vocabulary):
valid texts pass the grammar and validate(), invalid ones are stopped by the grammar."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import enum
import json
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import llm.utils
import numpy as np
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from rolechat.engines.llama_cpp import embedded_model_path
from rolechat.errors import InvalidInput
from rolechat.schemas import (
    JSON_OBJECT_GRAMMAR,
    check_schema,
    load_schema,
    parse_concise,
    rule_grammar,
    schema_grammar,
    validate,
)

Accepts = Callable[..., bool]
CHECKED = set(Draft202012Validator.FORMAT_CHECKER.checkers) | {None}


@pytest.fixture(scope="session")
def vocab() -> Iterator[Any]:
    """The embedded model's vocabulary alone (llama_cpp.Llama, vocab_only)."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(embedded_model_path()), vocab_only=True,
                            verbose=False)
    yield model
    model.close()


def allowed(sampler: Any, tokens: list[int]) -> list[int]:
    """The tokens among `tokens` that llama.cpp's grammar sampler lets the model write next."""
    import llama_cpp

    data = (llama_cpp.llama_token_data * len(tokens))()
    view = np.frombuffer(data, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    view["id"] = tokens
    candidates = llama_cpp.llama_token_data_array(data, len(tokens), -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
    return view["id"][np.isfinite(view["logit"])].tolist()  # type: ignore[no-any-return]


@contextlib.contextmanager
def grammar_sampler(vocab: Any, grammar: str, root: str = "root") -> Iterator[Any]:
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab._model.vocab, grammar.encode(),
                                                   root.encode())
    assert sampler, f"llama.cpp cannot parse the grammar:\n{grammar}"
    try:
        yield sampler
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.fixture(scope="session")
def accepts(vocab: Any) -> Accepts:
    """``accepts(grammar, text, root="root")``: whether the grammar lets the model write
    exactly `text` (its tokens one by one, then end of generation)."""
    import llama_cpp

    def check(grammar: str, text: str, root: str = "root") -> bool:
        with grammar_sampler(vocab, grammar, root) as sampler:
            for token in vocab.tokenize(text.encode(), add_bos=False, special=False):
                if not allowed(sampler, [token]):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return bool(allowed(sampler, [vocab.token_eos()]))

    return check


@pytest.fixture(scope="session")
def generate(vocab: Any) -> Callable[[str, random.Random], str | None]:
    """``generate(grammar, rng)``: a random text the grammar allows, written with the
    vocabulary's tokens of one or two bytes that are whole UTF-8 characters (llama.cpp's
    grammar decodes invalid UTF-8 leniently: see the module docstring of rolechat.schemas);
    None if it is not done in 400 tokens."""
    import llama_cpp

    pieces: dict[int, str] = {}
    for token in range(vocab.n_vocab()):
        with contextlib.suppress(UnicodeDecodeError):
            if 0 < len(piece := vocab.detokenize([token])) <= 2:
                pieces[token] = piece.decode()
    eos = vocab.token_eos()
    offered = [*pieces, eos]
    closing = [t for t, piece in pieces.items() if piece in ('"', "}", "]", ",", "0", "a")]

    def write(grammar: str, rng: random.Random) -> str | None:
        text = ""
        with grammar_sampler(vocab, grammar) as sampler:
            for step in range(400):
                can = allowed(sampler, offered)
                if eos in can and rng.random() < 0.5:
                    return text
                short = [t for t in closing if t in can] if rng.random() < step / 50 else []
                token = rng.choice(short or can)
                if token == eos:
                    return text
                text += pieces[token]
                llama_cpp.llama_sampler_accept(sampler, token)
        return None

    return write


def is_valid(schema: dict[str, Any], text: str) -> bool:
    try:
        validate(schema, json.loads(text))
    except (json.JSONDecodeError, InvalidInput):
        return False
    return True


# (schema, texts the grammar must accept (all valid), texts it must refuse (all invalid))
CASES: list[tuple[dict[str, Any], list[str], list[str]]] = [
    ({}, ["1", '"x"', "null", "true", '[1, {"a": []}]', '{"a": {"b": -0.5e3}}'], ["", "nul"]),
    ({"type": "object"}, ["{}", '{"a": [1, "x"]}'], ["1", "[]"]),
    ({"type": "string"}, ['"a\\nb"', '"é😀"', '"\\u00e9"'], ['"a\nb"', '"a\tb"', '"a"b"']),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"', '"a\\"b"', '"é😀"'],
     ['"a"', '"abcd"', '"\\ud83d\\ude00"', '"😀"']),
    ({"type": "integer"}, ["0", "-12", "1234567890123456"], ["1.5", '"1"', "01"]),
    ({"type": "number"}, ["1.5e3", "-0.25", "7"], ['"1"', "1."]),
    ({"type": "boolean"}, ["true", "false"], ["1", "null"]),
    ({"type": "null"}, ["null"], ["0"]),
    ({"enum": ["red", 'say "hi"', "a\\b", "tab\there", 3, None, [1]]},
     ['"red"', '"say \\"hi\\""', '"a\\\\b"', '"tab\\there"', "3", "null", "[1]"],
     ['"blue"', '"tab\there"', "4", '"a\\b"']),
    ({"type": "string", "enum": ["a", 1]}, ['"a"'], ["1"]),
    ({"const": {"a": [1, "é"]}}, ['{"a": [1, "\\u00e9"]}'], ['{"a": [1]}', '{"a": [1, "e"]}']),
    ({"type": ["string", "null"], "maxLength": 2}, ['"ab"', "null"], ['"abc"', "1"]),
    ({"type": ["integer", "null"], "enum": [1, None, "x"]}, ["1", "null"], ['"x"', "2"]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
     ["[1]", "[1, 2, 3]", "[1,2]"], ["[]", "[1, 2, 3, 4]", '["a"]']),
    ({"type": "array"}, ["[]", '[1, "a", {}]'], ["{}"]),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     ['[1, "a"]'], ['["a", 1]', '[1, "a", 2]']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
      "required": ["a"], "additionalProperties": False},
     ['{"a": 1}', '{"a": 1, "b": "x"}', '{"a":1,"b":"x"}'],
     ["{}", '{"b": "x"}', '{"a": 1, "c": 2}', '{"a": "1"}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
     ["{}", '{"b": 2}', '{"a": 1, "b": 2}'], ['{"a": "1"}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
     ['{"a": 1}'], ['{"a": []}']),
    ({"type": "object", "additionalProperties": {"type": "integer"}},
     ["{}", '{"x": 1, "y": 2}'], ['{"x": "1"}']),
    ({"type": "object", "additionalProperties": False}, ["{}"], ['{"a": 1}']),
    ({"type": "object", "required": ["people"], "properties": {"people": {
        "type": "array", "items": {"type": "object", "required": ["name", "age"], "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"]}}}}}},
     ['{"people": [{"name": "Ann", "age": 3, "address": {"city": "Oslo"}}, '
      '{"name": "Bo", "age": 4}]}', '{"people": []}'],
     ['{"people": [{"name": "Ann"}]}', '{"people": [{"name": "Ann", "age": 3, "address": {}}]}']),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]},
     ["1", '"a"'], ['"ab"', "true"]),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, ["1", '"a"'], ["1.5", "null"]),
    ({"$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}},
                        "required": ["name"]}},
      "type": "object", "properties": {"pet": {"$ref": "#/$defs/Pet", "description": "it"},
                                       "pets": {"type": "array",
                                                "items": {"$ref": "#/$defs/Pet"}}},
      "required": ["pet", "pets"]},
     ['{"pet": {"name": "Rex"}, "pets": [{"name": "A"}]}'], ['{"pet": {}, "pets": []}']),
    ({"type": "integer", "minimum": 1, "maximum": 5}, ["1", "3", "5"], ["0", "6", "-1"]),
    ({"type": "integer", "exclusiveMinimum": -1.5, "exclusiveMaximum": 2}, ["-1", "0", "1"],
     ["-2", "2"]),
    ({"type": "integer", "exclusiveMinimum": 0}, ["1", "1234567"], ["0", "-3", "01"]),
    ({"type": "integer", "minimum": 0}, ["0", "10"], ["-1", "00"]),
    ({"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, ['"AB-123"'],
     ['"AB-12"', '"ab-123"', '"AB-1234"']),
    ({"type": "string", "pattern": "^a.c\\.$"}, ['"abc."', '"a-c."'], ['"a"c."', '"abcx"']),
    ({"type": "string", "pattern": "^[^a]+$"}, ['"bcd"'], ['"bad"', '"b"c"', '""']),
    ({"type": "string", "pattern": "^(cat|dog)s?[\\w\\-]*$"}, ['"cats"', '"dog"', '"dog_-x"'],
     ['"cow"', '"cat!"']),
    ({"type": "string", "pattern": "^\\(\\d+\\)$"}, ['"(12)"'], ['"12"']),
    ({"type": "string", "format": "date"}, ['"2024-02-28"', '"2023-12-31"', '"2023-04-30"'],
     ['"2024-02-31"', '"2023-04-31"', '"0000-01-01"', '"2024-13-01"', '"2024-1-01"']),
    ({"type": "string", "format": "time"}, ['"10:00:00Z"', '"23:59:59.123+01:00"'],
     ['"24:00:00Z"', '"10:00:00"']),
    ({"type": "string", "format": "date-time"},
     ['"2024-01-02T03:04:05Z"', '"2024-01-02T03:04:05.123-05:30"'],
     ['"2024-01-02 03:04:05Z"', '"2024-02-30T03:04:05Z"']),
    ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'],
     ['"123e4567e89b12d3a456426614174000"', '"123e4567-e89b-12d3-a456-42661417400"']),
    # property names and consts that need escaping, names that clash with the grammar's rules
    ({"type": "object", "properties": {'say "hi"': {"type": "integer"}, "é": {"const": "x"},
                                       "date time": {"type": "string", "maxLength": 2},
                                       "when": {"type": "string", "format": "date-time"},
                                       "space": {"type": "string", "maxLength": 1},
                                       "ref0": {"type": "boolean"}},
      "required": ['say "hi"', "é", "date time", "when", "space", "ref0"]},
     ['{"say \\"hi\\"": 1, "\\u00e9": "x", "date time": "ab", "when": "2024-01-02T03:04:05Z", '
      '"space": "s", "ref0": true}'],
     ['{"say \\"hi\\"": 1, "\\u00e9": "x", "date time": "abc", "when": "2024-01-02T03:04:05Z", '
      '"space": "s", "ref0": true}']),
    ({"$defs": {"space": {"type": "integer"}, "Item": {"type": "boolean"},
                "string": {"type": "string", "maxLength": 1}, "a~b/c": {"const": 1}},
      "type": "object", "properties": {"Item": {"type": "string"}, "a": {"$ref": "#/$defs/space"},
                                       "b": {"$ref": "#/$defs/Item"},
                                       "c": {"$ref": "#/$defs/string"},
                                       "d": {"$ref": "#/$defs/a~0b~1c"}},
      "required": ["Item", "a", "b", "c", "d"]},
     ['{"Item": "xy", "a": 1, "b": true, "c": "z", "d": 1}'],
     ['{"Item": "xy", "a": " ", "b": true, "c": "z", "d": 1}',
      '{"Item": "xy", "a": 1, "b": "x", "c": "z", "d": 1}',
      '{"Item": "xy", "a": 1, "b": true, "c": "zz", "d": 1}']),
    ({"$ref": "#/$defs/Tree_Node", "$defs": {"Tree_Node": {
        "type": "object", "properties": {"v": {"type": "integer"}, "kids": {
            "type": "array", "items": {"$ref": "#/$defs/Tree_Node"}}}, "required": ["v", "kids"]}}},
     ['{"v": 1, "kids": [{"v": 2, "kids": []}]}'], ['{"v": 1, "kids": [{"v": 2}]}']),
    ({"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
      "required": ["next"]}, ['{"next": {"next": null}}'], ['{"next": {}}']),
]


@pytest.mark.parametrize("schema, good, bad", CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
def test_grammar_accepts_valid_and_stops_invalid(accepts: Accepts, schema: dict[str, Any],
                                                 good: list[str], bad: list[str]) -> None:
    grammar = schema_grammar(schema)
    for text in good:
        assert is_valid(schema, text), text
        assert accepts(grammar, text), text
    for text in bad:  # (jsonschema checks time and date-time only with rfc3339-validator)
        assert not is_valid(schema, text) or schema.get("format") not in CHECKED, text
        assert not accepts(grammar, text), text


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
     "The schema uses 'uniqueItems' (at properties.tags), which constrained decoding does not "
     "support."),
    ({"type": "integer", "multipleOf": 2}, "'multipleOf' (at the root)"),
    ({"not": {"type": "null"}}, "'not'"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "'if'"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
    ({"type": "object", "dependentSchemas": {"a": {}}}, "'dependentSchemas'"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "'propertyNames'"),
    ({"type": "object", "minProperties": 1}, "'minProperties'"),
    ({"type": "object", "unevaluatedProperties": False}, "'unevaluatedProperties'"),
    ({"type": "array", "contains": {"type": "integer"}}, "'contains'"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "'allOf'"),
    ({"type": "number", "minimum": 0}, "'minimum' on a number"),
    ({"type": "number", "exclusiveMaximum": 1}, "'exclusiveMaximum' on a number"),
    ({"type": "integer", "minimum": 0, "maximum": 1000}, "integer bounds 0..1000"),
    ({"type": "integer", "maximum": 10}, "integer bounds None..10"),
    ({"type": "integer", "minimum": 5}, "integer bounds 5..None"),
    ({"type": "string", "format": "email"}, "the format 'email'"),
    ({"type": "string", "format": "date", "maxLength": 10}, "'maxLength' next to 'format'"),
    ({"type": "string", "pattern": "^a+$", "minLength": 2}, "'minLength' next to 'pattern'"),
    ({"type": "string", "maxLength": 5000}, "'maxLength' above 1000"),
    ({"type": "array", "maxItems": 2000}, "'maxItems' above 1000"),
    ({"$ref": "https://example.com/s.json"}, "the $ref 'https://example.com/s.json'"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"type": "string"}}, "maxLength": 2},
     "'maxLength' next to '$ref'"),
    ({"type": "string", "anyOf": [{"maxLength": 1}]}, "'type' next to 'anyOf'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf' with alternatives"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}},
                {"type": "object", "properties": {"k": {"const": "b"}}}]}, "'oneOf' with"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
     "'additionalProperties' (a schema) next to 'properties'"),
    ({"type": "array", "prefixItems": [{}], "minItems": 2}, "'prefixItems' with minItems"),
    ({"type": "object", "properties": {"a": False}}, "a false schema"),
    ({"type": "string", "pattern": "a+"}, "no ^ at the start"),
    ({"type": "string", "pattern": "^a|b$"}, "'|' in the pattern"),
    ({"type": "string", "pattern": "^(?=a)a$"}, "'(?' in the pattern"),
    ({"type": "string", "pattern": "^\\s+$"}, "the escape \\s"),
    ({"type": "string", "pattern": '^a"$'}, "'\"' in the pattern"),
    ({"type": "string", "pattern": "^[ -~]+$"}, "a class with"),
    ({"type": "string", "pattern": "^a+?$"}, "a lazy or repeated quantifier"),
    ({"type": "string", "pattern": "^a{2000}$"}, "a '{' that is not a quantifier"),
])
def test_what_the_grammar_cannot_enforce_is_refused(schema: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_schema(schema, field="response_format")
    assert words in info.value.message
    assert info.value.field == "response_format" and info.value.hint
    with pytest.raises(InvalidInput):
        schema_grammar(schema)


def test_every_unsupported_keyword_hint_lists_what_is_supported() -> None:
    with pytest.raises(InvalidInput) as info:
        check_schema({"type": "array", "uniqueItems": True})
    assert "minItems/maxItems" in info.value.hint and "format (date" in info.value.hint


@pytest.mark.parametrize("schema, words", [
    ([], "must be a JSON object, not list"),
    ({"type": "strng"}, "is not a valid JSON Schema (at type)"),
    ({"type": "string", "pattern": "^($"}, "is not a valid JSON Schema (at pattern)"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "requires 'b' without"),
    ({"properties": {"a": {"$ref": "#/$defs/Gone"}}}, "refers to '#/$defs/Gone', which is not"),
    ({"type": "string", "enum": [1, 2]}, "allows none of its enum or const values"),
    ({"type": "integer", "minimum": 3, "maximum": 1}, "allows no integer between its bounds"),
    ({"type": "string", "minLength": 3, "maxLength": 1}, "has minLength above maxLength"),
    ({"minLength": 1, "minItems": 1}, "uses keywords of array and string without 'type'"),
])
def test_schemas_that_are_wrong(schema: Any, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_schema(schema)
    assert words in info.value.message and info.value.field == "schema"


@pytest.mark.parametrize("schema", [
    {}, {"type": "object"}, {"type": "string"}, {"type": "array", "items": {"type": "integer"}},
    {"title": "T", "description": "d", "examples": [1], "default": 1, "$comment": "c",
     "deprecated": False, "readOnly": True, "x-vendor": 1, "type": "integer"},
    {"type": "array", "uniqueItems": False},
])
def test_accepted_as_they_are(schema: dict[str, Any]) -> None:
    assert check_schema(schema) is schema
    assert "root ::=" in schema_grammar(schema)


class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    city: str = Field(description="The city")
    zip_code: Annotated[str, Field(pattern=r"^\d{5}$")]


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: Annotated[int, Field(ge=1, le=9)]


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool = True


class Person(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=40)]
    age: Annotated[int, Field(ge=0)]
    colour: Colour
    size: Literal["S", "M", "L"]
    tags: list[str]
    scores: dict[str, int]
    point: tuple[int, float]
    home: Address
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]
    born: datetime.date
    seen: datetime.datetime
    id: uuid.UUID
    nickname: str | None = None
    friends: list[Address] = []
    rating: Annotated[int, Field(gt=0)] | None = None


def test_pydantic_models_load_check_and_constrain(accepts: Accepts) -> None:
    schema = load_schema(Person)
    assert schema == Person.model_json_schema()
    grammar = schema_grammar(check_schema(schema))
    person = Person(name="Ann", age=30, colour=Colour.RED, size="M", tags=["a", "b"],
                    scores={"x": 1}, point=(1, 2.5), home=Address(city="Oslo", zip_code="01234"),
                    pet=Cat(kind="cat", lives=9), born=datetime.date(2000, 2, 28),
                    seen=datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                    id=uuid.UUID(int=7), friends=[Address(city="Rome", zip_code="00100")],
                    rating=3)
    for text in (person.model_dump_json(), person.model_dump_json(exclude_defaults=True)):
        assert accepts(grammar, text), text
        validate(schema, json.loads(text))
        assert Person.model_validate_json(text) == Person.model_validate_json(text)
    dog = person.model_copy(update={"pet": Dog(kind="dog")}).model_dump_json()
    assert accepts(grammar, dog)
    for wrong in ({"age": -1}, {"size": "XL"}, {"colour": "blue"}, {"name": ""},
                  {"pet": {"kind": "cat", "lives": 10}}, {"home": {"city": "X", "zip_code": "1"}},
                  {"pet": {"kind": "cow"}}, {"rating": 0}):
        text = json.dumps(json.loads(person.model_dump_json()) | wrong)
        assert not accepts(grammar, text), text
        assert not is_valid(schema, text), text


def test_the_schema_given_is_left_as_it_was() -> None:
    schema = Person.model_json_schema()
    before = json.dumps(schema)
    schema_grammar(schema)
    rule_grammar(schema, "person")
    assert json.dumps(schema) == before


def test_pydantic_recursive_model(accepts: Accepts) -> None:
    class Node(BaseModel):
        value: int
        children: list[Node] = []

    grammar = schema_grammar(Node.model_json_schema())
    assert accepts(grammar, '{"value": 1, "children": [{"value": 2}, {"value": 3, '
                            '"children": []}]}')
    assert not accepts(grammar, '{"value": 1, "children": [{}]}')


def test_pydantic_set_is_refused() -> None:
    class Tagged(BaseModel):
        tags: set[str]

    with pytest.raises(InvalidInput, match=r"'uniqueItems' \(at properties.tags\)"):
        check_schema(load_schema(Tagged))


@pytest.mark.parametrize("schema", [case[0] for case in CASES] + [Person.model_json_schema()],
                         ids=[json.dumps(c[0])[:60] for c in CASES] + ["Person"])
def test_what_the_grammar_writes_is_valid(generate: Callable[[str, random.Random], str | None],
                                          schema: dict[str, Any]) -> None:
    grammar, rng = schema_grammar(schema), random.Random(json.dumps(schema))
    texts = [text for _ in range(6) if (text := generate(grammar, rng)) is not None]
    assert texts
    for text in texts:
        validate(schema, json.loads(text))


@pytest.mark.parametrize("text", [
    "name", "name, age int, bio: their biography", "name str, score float, ok bool",
    "name: the name\nbio: a bio, with commas\nage int",
])
def test_concise_form_matches_llm(text: str) -> None:
    assert parse_concise(text) == {**llm.utils.schema_dsl(text), "additionalProperties": False}


def test_concise_lists() -> None:
    schema = parse_concise("tags list[str]: the tags\nids list[int]")
    assert schema["properties"] == {
        "tags": {"type": "array", "items": {"type": "string"}, "description": "the tags"},
        "ids": {"type": "array", "items": {"type": "integer"}}}
    assert schema["required"] == ["tags", "ids"] and not schema["additionalProperties"]
    check_schema(schema)


@pytest.mark.parametrize("text, words", [
    ("name, age integer", "'age integer' has an unknown type 'integer'"),
    ("tags list[dict]", "unknown type 'list[dict]'"),
    ("name, name int", "'name int' has a name used before"),
    ("first name str", "'first name str' is not 'name [type][: description]'"),
    ("name, : no name", "': no name' is not"),
    (", ,", "has no items"),
])
def test_concise_errors_name_the_item(text: str, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_concise(text)
    assert words in info.value.message and "list[str]" in info.value.hint
    assert info.value.field == "schema"


def test_load_schema_from_everything(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert load_schema(schema) is schema
    assert load_schema(json.dumps(schema)) == schema
    assert load_schema("  " + json.dumps(schema, indent=2)) == schema
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    assert load_schema(path) == load_schema(str(path)) == schema
    assert load_schema("a, b int") == parse_concise("a, b int")


@pytest.mark.parametrize("value, words", [
    ('{"type": }', "The schema is not valid JSON: Expecting value at line 1, column 10."),
    ("/nowhere/s.json", "Cannot read the schema file '/nowhere/s.json'"),
    (Path("/nowhere/s"), "Cannot read the schema file '/nowhere/s'"),
    (3, "A schema cannot be a int."),
    (Person(name="x", age=1, colour=Colour.RED, size="S", tags=[], scores={}, point=(1, 1),
            home=Address(city="x", zip_code="12345"), pet=Dog(kind="dog"),
            born=datetime.date(2000, 1, 1), seen=datetime.datetime(2000, 1, 1),
            id=uuid.UUID(int=1)),
     "A schema cannot be a Person."),
])
def test_load_schema_errors(value: Any, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        load_schema(value)
    assert words in info.value.message and info.value.field == "schema"


def test_load_schema_file_must_hold_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1]")
    with pytest.raises(InvalidInput, match="is JSON but not an object"):
        load_schema(path)


def test_rule_grammars_compose(accepts: Accepts) -> None:
    person = rule_grammar({"type": "object", "properties": {"name": {"type": "string"}},
                           "required": ["name"]}, "person")
    count = rule_grammar({"type": "integer", "minimum": 1, "maximum": 3}, "count")
    names = [line.split(" ::= ")[0] for line in (person + "\n" + count).splitlines()]
    assert len(names) == len(set(names))
    assert all(n == "person" or n.startswith("person-") for n in names[:person.count("\n") + 1])
    grammar = f'root ::= "P" person | "C" count\n{person}\n{count}'
    assert accepts(grammar, 'P{"name": "x"}') and accepts(grammar, "C3")
    assert not accepts(grammar, "P3") and not accepts(grammar, "C4")
    assert accepts(person, '{"name": "x"}', root="person")


def test_rule_grammar_names() -> None:
    for name in ("root", "a b", ""):
        with pytest.raises(InvalidInput) as info:
            rule_grammar({}, name)
        assert info.value.field == "name"


def test_json_object_grammar(accepts: Accepts) -> None:
    assert schema_grammar({"type": "object"}) == JSON_OBJECT_GRAMMAR
    assert accepts(JSON_OBJECT_GRAMMAR, '{"a": [1, {"b": null}], "c": "\\n"}')
    assert not accepts(JSON_OBJECT_GRAMMAR, "[]")
    assert not accepts(JSON_OBJECT_GRAMMAR, '{"a": "\n"}')


def test_validate_names_the_violation() -> None:
    schema = parse_concise("name, tags list[str]")
    validate(schema, {"name": "x", "tags": []})
    with pytest.raises(InvalidInput) as info:
        validate(schema, {"name": "x", "tags": ["a", 5]})
    assert info.value.message == ("The value does not match the schema (at tags.1): 5 is not of "
                                  "type 'string'.")
    assert info.value.field == "value"
    with pytest.raises(InvalidInput, match=r"at the root.*'tags' is a required property"):
        validate(schema, {"name": "x"})
    with pytest.raises(InvalidInput, match="is not a 'date'"):
        validate({"type": "string", "format": "date"}, "2023-02-30")


def test_converter_gaps_are_closed(accepts: Accepts) -> None:
    """What llama-cpp-python's SchemaConverter gets wrong on its own (see the module
    docstring), each shown against the raw converter and the fixed one."""
    from llama_cpp.llama_grammar import SchemaConverter

    def raw(schema: dict[str, Any]) -> str:
        converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False,
                                    raw_pattern=False)
        converter.visit(converter.resolve_refs(schema, ""), "")
        return str(converter.format_grammar())

    for schema, text, valid in [
        ({"type": "string"}, '"a\nb"', False),            # a raw control character
        ({}, "1", True),                                   # {} taken as any object
        ({"type": "integer", "minimum": 1}, "0", False),   # bounds ignored
        ({"type": "string", "format": "date"}, '"2023-02-30"', False),
        ({"type": "string", "pattern": "^a.$"}, '"a""', False),
        ({"enum": ["a\tb"]}, '"a\\tb"', True),            # json.dumps text not escaped
        ({"type": "string", "minLength": 2}, '"\\ud83d\\ude00"', False),  # 1 character
        ({"type": "object", "properties": {"a": {"type": "integer"}},
          "additionalProperties": {"type": "string"}}, '{"a": "x"}', False),
    ]:
        assert accepts(raw(json.loads(json.dumps(schema))), text) is not valid, schema
        if "additionalProperties" not in schema:
            assert accepts(schema_grammar(schema), text) is valid, schema
