"""JSON Schema → llama.cpp GBNF grammar, so that a constrained reply always parses and validates.

Contract:
- :func:`load_schema` reads what a user gives: a dict, a pydantic model class, JSON text, a
  ``.json`` file, or llm's concise form ``'name, age int, tags list[str]'`` (:func:`parse_concise`).
- :func:`check_schema` accepts a schema only when the grammar enforces every keyword in it; one
  it cannot enforce is refused by name and place (``InvalidInput``), never ignored. Descriptive
  keywords (title, description, default, examples, $comment, ...) and unknown ones are
  ignored, as JSON Schema ignores them.
- :func:`schema_grammar` / :func:`rule_grammar` build the grammar with llama-cpp-python's
  ``SchemaConverter`` and close its gaps: every ``$ref`` target gets a rule name of its own (it
  finds them by their last path segment, so a property or a builtin rule of that name stood in
  for them), ``{}``/``true`` mean any JSON value (not any object), strings hold no raw control
  character or surrogate escape, ``const``/``enum`` values and property names with ``"`` or
  ``\\`` are escaped, ``format: date`` allows only real dates (never 29 February), a pattern's
  ``.`` never matches ``"``/``\\``, and integer bounds (which it ignores) become an enum or a rule.
- The grammar accepts a subset of the valid texts: at most one space between tokens, properties
  in schema order (required ones first), none beyond those declared, numbers of at most 16
  digits, strings without ``"``/``\\`` where a pattern applies. Every text it accepts is valid
  under :func:`validate` (Draft 2020-12, formats checked); the tests check that keyword by
  keyword through llama.cpp's own grammar sampler, and on random texts the grammar writes.
- One gap is llama.cpp's, not the grammar's: its sampler decodes a token's bytes leniently, so
  inside a string an overlong UTF-8 sequence (``E0 9F 91``) passes for the character it spells;
  such bytes reach the reply as U+FFFD (streaming.ReplyText), which may break a length bound.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel

from .errors import InvalidInput

LIMIT = 1000  # the largest length or count bound (llama.cpp refuses ~2,000 repetitions)
RANGE = 256  # the widest integer range, written out as an enum
FORMATS = ("date", "time", "date-time", "uuid")
_HINT = ("Use only what the grammar enforces: type, enum, const, anyOf, oneOf (alternatives that "
         "cannot both match), $ref inside the schema, properties, required, additionalProperties "
         "(false, or a schema for an object without properties), items, prefixItems, "
         f"minItems/maxItems and minLength/maxLength (at most {LIMIT}), pattern, format "
         f"({', '.join(FORMATS)}), integer minimum/maximum (a range of at most {RANGE} values, or "
         "minimum 0 or 1 alone).")
_PATTERN_HINT = ("Anchor it with ^ and $; use characters, \\d, \\w, \\., classes without '\"', "
                 "'\\' or control characters (negated ones may), groups without (?, | inside a "
                 f"group, * + ? {{m,n}} (n at most {LIMIT}), no lazy quantifiers.")
_FOR_TYPE = {"object": {"properties", "required", "additionalProperties"},
             "array": {"items", "prefixItems", "minItems", "maxItems"},
             "string": {"minLength", "maxLength", "pattern", "format"},
             "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
             "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
             "boolean": set(), "null": set()}
_UNSUPPORTED = ("not", "if", "then", "else", "allOf", "dependentRequired", "dependentSchemas",
                "dependencies", "patternProperties", "propertyNames", "unevaluatedProperties",
                "unevaluatedItems", "minProperties", "maxProperties", "contains", "minContains",
                "maxContains", "multipleOf", "$dynamicRef", "$dynamicAnchor", "$anchor",
                "$recursiveRef")
_KNOWN = set(_UNSUPPORTED).union({"type", "enum", "const", "anyOf", "oneOf", "$ref"},
                                 *_FOR_TYPE.values())
_ANY = ["null", "boolean", "object", "array", "number", "string"]
# Rule bodies that replace SchemaConverter's (see the module docstring).
# Never in a string: '"', '\\', control characters, and what no UTF-8 text holds (surrogates,
# beyond U+10FFFF), which llama.cpp decodes from invalid bytes.
_NOT = r'"\\\x00-\x1F\uD800-\uDFFF\U00110000-\U001FFFFF'
_CHAR = (f'[^{_NOT}] | "\\\\" (["\\\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F] | [dD] [0-7])'
         ' [0-9a-fA-F] [0-9a-fA-F])')
_DOT = f"[^{_NOT}]"
_DATE = ('[1-9] [0-9] [0-9] [0-9] "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | '
         '"3" [01]) | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") | "02-" ("0" [1-9] '
         '| "1" [0-9] | "2" [0-8]))')
_CLASS_ESC = {"d": "0-9", "w": "0-9A-Za-z_", ".": ".", "-": r"\x2D", "/": "/", "[": r"\[",
              "]": r"\]"}
_CONCISE = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_CONCISE_HINT = ("Write items such as 'name, age int, tags list[str], bio: their biography', "
                 "separated by commas or newlines; types: str (the default), int, float, bool "
                 "and list[...] of one of them.")


def load_schema(value: Any) -> dict[str, Any]:
    """A JSON Schema from what a user gives: a dict (taken as is), a pydantic BaseModel subclass
    (its model_json_schema()), JSON text (str starting with '{'), the path of a .json file
    (str or Path), or the concise form (str, :func:`parse_concise`). Raises InvalidInput
    (field="schema") naming what was wrong. The schema is not checked: see check_schema."""
    if isinstance(value, dict):
        return value
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value.model_json_schema()
    text, what = (value.strip() if isinstance(value, str) else ""), "The schema"
    if isinstance(value, Path) or (text.endswith(".json") and not text.startswith("{")):
        path, what = Path(value).expanduser(), f"The schema file {str(value)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"Cannot read the schema file {str(path)!r}: {exc}.",
                               "Give the path of a JSON Schema file.", field="schema") from None
    elif not isinstance(value, str):
        raise InvalidInput(f"A schema cannot be a {type(value).__name__}.", "Give a JSON Schema "
                           "(a dict or JSON text), a pydantic model class, the path of a .json "
                           "file, or a concise schema such as 'name, age int'.", field="schema")
    elif not text.startswith("{"):
        return parse_concise(value)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                           f"{exc.colno}.", "Fix the JSON.", field="schema") from None
    if not isinstance(schema, dict):
        raise InvalidInput(f"{what} is JSON but not an object (a JSON Schema is one).",
                           'Write it as {"type": ..., ...}.', field="schema")
    return schema


def parse_concise(text: str) -> dict[str, Any]:
    """llm's concise schema form: 'name, age int, tags list[str]' -> an object schema, all
    properties required, additionalProperties false. Items are separated by newlines if there
    are any, else by commas (so only newline-separated items may have commas in their
    description); each is 'name [type][: description]'; types: str (default), int, float, bool,
    and list[...] of those (list[str], list[int], ...: rolechat's addition; otherwise the
    output is llm's schema_dsl() plus additionalProperties). A bad item -> InvalidInput."""
    props: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split("\n" if "\n" in text else ","))):
        head, _, description = item.partition(":")
        words = head.split()
        if len(words) not in (1, 2):
            raise InvalidInput(f"The schema item {item!r} is not 'name [type][: description]'.",
                               _CONCISE_HINT, field="schema")
        name, kind = words[0], words[1] if len(words) == 2 else "str"
        listed = re.fullmatch(r"list\[(\w+)\]", kind)
        if (listed[1] if listed else kind) not in _CONCISE or name in props:
            what = "a name used before" if name in props else f"an unknown type {kind!r}"
            raise InvalidInput(f"The schema item {item!r} has {what}.", _CONCISE_HINT,
                               field="schema")
        prop: dict[str, Any] = {"type": _CONCISE[listed[1] if listed else kind]}
        props[name] = {"type": "array", "items": prop} if listed else prop
        if description.strip():
            props[name]["description"] = description.strip()
    if not props:
        raise InvalidInput("The concise schema has no items.", _CONCISE_HINT, field="schema")
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def check_schema(schema: Any, *, field: str = "schema") -> dict[str, Any]:
    """Raise InvalidInput (field=field) unless `schema` is a JSON Schema (jsonschema's
    Draft202012Validator.check_schema; a non-dict -> error) whose every keyword the grammar
    supports. An unsupported keyword is named with its location, e.g. "The schema uses
    'uniqueItems' (at properties.tags), which constrained decoding does not support." with a
    hint listing what is supported. Returns the schema."""
    _prepare(schema, field)
    return schema  # type: ignore[no-any-return]


def schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF (llama.cpp's dialect) whose root rule accepts only JSON texts valid under the
    schema (checked here first), made by ``SchemaConverter`` (prop_order={}, allow_fetch=False,
    dotall=False, raw_pattern=False; resolve_refs, visit, format_grammar())."""
    return str(_convert(schema).format_grammar())


def rule_grammar(schema: dict[str, Any], name: str) -> str:
    """The same grammar with its root rule named `name` instead of `root` and every other rule
    ``<name>-<rule>``, so that grammars of different names (not both ``x`` and ``x-y``) can be
    concatenated into one file, for composing into a larger grammar (a tool call embeds its
    arguments' schema)."""
    if not re.fullmatch(r"[a-zA-Z0-9-]+", name) or name == "root":
        raise InvalidInput(f"{name!r} cannot name a grammar rule.",
                           "Use letters, digits and '-' (not 'root').", field="name")
    rules: dict[str, str] = _convert(schema)._rules
    new = {rule: name if rule == "root" else f"{name}-{rule}" for rule in rules}
    token = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[a-zA-Z0-9-]+')
    return "\n".join(f"{new[rule]} ::= " + token.sub(lambda m: new.get(m[0], m[0]), body)
                     for rule, body in sorted(rules.items()))


#: The grammar of any JSON object (OpenAI's response_format {"type": "json_object"}), made on
#: first use (it imports llama_cpp): ``schema_grammar({"type": "object"})``.
JSON_OBJECT_GRAMMAR: str


@functools.cache
def __getattr__(name: str) -> str:
    if name != "JSON_OBJECT_GRAMMAR":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return schema_grammar({"type": "object"})


def validate(schema: dict[str, Any], value: Any) -> None:
    """Raise InvalidInput (field="value") naming the most relevant violation (jsonschema's
    best_match: its path and message) unless `value` is valid under `schema` (jsonschema
    Draft202012Validator, with its format checks)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    if (error := best_match(validator.iter_errors(value))) is not None:
        raise InvalidInput(f"The value does not match the schema ({_where(error.absolute_path)})"
                           f": {error.message}.", "Give a value the schema allows.", field="value")


def _where(path: Any) -> str:
    at = ".".join(map(str, path)) if not isinstance(path, str) else path
    return f"at {at}" if at else "at the root"


def _keys(value: Any) -> Iterator[str]:
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        yield str(key)
        if isinstance(item, (dict, list)):
            yield from _keys(item)


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "null" if value is None else "boolean"
    if isinstance(value, (int, float)):
        return "integer" if isinstance(value, int) or value.is_integer() else "number"
    return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else "string"


def _prepare(schema: Any, field: str) -> dict[str, Any]:
    """The schema checked, and rewritten into shapes that SchemaConverter converts right."""
    from jsonschema import Draft202012Validator, SchemaError

    if not isinstance(schema, dict):
        raise InvalidInput(f"A schema must be a JSON object, not {type(schema).__name__}.",
                           'Give a JSON Schema such as {"type": "object", "properties": {...}}.',
                           field=field)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidInput(f"The schema is not a valid JSON Schema ({_where(exc.absolute_path)})"
                           f": {exc.message}.", "Fix it (see https://json-schema.org/"
                           "understanding-json-schema).", field=field) from None
    walk = _Walk(schema, field, Draft202012Validator(schema))
    return {**walk.node(schema, ""), "$defs": walk.defs}


class _Walk:
    """One walk down a schema: its refusals, and the converter-ready copy (``node``)."""

    def __init__(self, root: dict[str, Any], field: str, validator: Any) -> None:
        self.root, self.field, self.validator = root, field, validator
        self.names: dict[str, str] = {}
        self.defs: dict[str, Any] = {}
        keys = {re.sub(r"[^a-zA-Z0-9-]+", "-", key) for key in _keys(root)}
        self.prefix = "ref"  # $ref targets are rules ref0, ref1, ...: no other rule starts so
        while any(key.startswith(self.prefix) for key in keys):
            self.prefix += "f"

    def refuse(self, what: str, at: str, hint: str = _HINT) -> InvalidInput:
        return InvalidInput(f"The schema uses {what} ({_where(at)}), which constrained "
                            "decoding does not support.", hint, field=self.field)

    def wrong(self, what: str, at: str, hint: str = "Fix it.") -> InvalidInput:
        return InvalidInput(f"The schema {what} ({_where(at)}).", hint, field=self.field)

    def node(self, s: Any, at: str) -> dict[str, Any]:
        def join(part: str) -> str:
            return f"{at}.{part}" if at else part

        if s is True:
            return {"type": _ANY}
        if not isinstance(s, dict):
            raise self.refuse("a false schema (no value is valid)", at, "Leave it out.")
        if "enum" in s or "const" in s:  # exactly the values listed that the whole of s allows
            check = self.validator.evolve(schema=s)
            if not (values := [v for v in s.get("enum", [s.get("const")]) if check.is_valid(v)]):
                raise self.wrong("allows none of its enum or const values", at)
            return {"enum": values}
        keys = set(s) & _KNOWN
        if keys == {"allOf"} and len(s["allOf"]) == 1:
            return self.node(s["allOf"][0], join("allOf.0"))
        if bad := [k for k in s if k in _UNSUPPORTED or (k == "uniqueItems" and s[k])]:
            raise self.refuse(repr(bad[0]), at)
        for word in ("$ref", "anyOf", "oneOf"):
            if word in s and keys - {word}:
                raise self.refuse(f"{sorted(keys - {word})[0]!r} next to {word!r}", at)
            if word == "$ref" and word in s:
                return {"$ref": self.ref(s["$ref"], at)}
            if word in s:
                alts = s[word]
                if word == "oneOf" and not all(self.disjoint(a, b, at) for i, a in
                                               enumerate(alts) for b in alts[i + 1:]):
                    raise self.refuse("'oneOf' with alternatives that can both match", at, "Use "
                                      "anyOf, or alternatives of different types or with a "
                                      "required property whose const differs.")
                return {"anyOf": [self.node(a, join(f"{word}.{i}")) for i, a in enumerate(alts)]}
        kind = s.get("type")
        if isinstance(kind, list):
            return {"anyOf": [self.node({k: v for k, v in s.items() if k in _FOR_TYPE[t]}
                                        | {"type": t}, at) for t in kind]}
        kinds = [t for t in ("object", "array", "string", "number") if keys & _FOR_TYPE[t]]
        if kind is None and len(kinds) > 1:
            raise self.wrong(f"uses keywords of {' and '.join(kinds)} without 'type'", at,
                             "Give 'type' (a list of types if it may be several).")
        kind = kind or (kinds[0] if kinds else None)
        if kind in (None, "boolean", "null"):
            return {"type": kind or _ANY}
        if kind == "number":
            if bounds := _FOR_TYPE["number"] & set(s):
                raise self.refuse(f"{sorted(bounds)[0]!r} on a number", at, "Leave the bound "
                                  f"out, or use an integer range of at most {RANGE} values.")
            return {"type": "number"}
        if kind == "integer":
            return self.integer(s, at)
        if kind == "string":
            return self.string(s, at)
        if kind == "array":
            self.bounds(s, at, "minItems", "maxItems")
            if "prefixItems" not in s:
                return {"type": "array", "items": self.node(s.get("items", True), join("items"))
                        } | {k: s[k] for k in ("minItems", "maxItems") if k in s}
            items = s["prefixItems"]  # the grammar makes exactly these, no more, no fewer
            if not s.get("minItems", 0) <= len(items) <= s.get("maxItems", len(items)):
                raise self.refuse("'prefixItems' with minItems or maxItems that rule out "
                                  f"{len(items)} items", at)
            return {"type": "array", "prefixItems": [
                self.node(item, join(f"prefixItems.{i}")) for i, item in enumerate(items)]}
        props: dict[str, Any] = s.get("properties") or {}
        if missing := [name for name in s.get("required", []) if name not in props]:
            raise self.wrong(f"requires {missing[0]!r} without listing it in properties", at,
                             "Add it to properties, or drop it from required.")
        extra = s.get("additionalProperties", not props)
        if not props and extra is not False:  # any object, or a map of one schema
            return {"type": "object"} | ({} if extra is True else {
                "additionalProperties": self.node(extra, join("additionalProperties"))})
        if extra not in (True, False):  # True is fine: the grammar makes no extra property
            raise self.refuse("'additionalProperties' (a schema) next to 'properties'", at)
        return {"type": "object", "required": s.get("required", []), "properties": {
            name: self.node(sub, join(f"properties.{name}")) for name, sub in props.items()},
            "additionalProperties": False}

    def integer(self, s: dict[str, Any], at: str) -> dict[str, Any]:
        low = max([math.ceil(s[k]) if k == "minimum" else math.floor(s[k]) + 1
                   for k in ("minimum", "exclusiveMinimum") if k in s], default=None)
        high = min([math.floor(s[k]) if k == "maximum" else math.ceil(s[k]) - 1
                    for k in ("maximum", "exclusiveMaximum") if k in s], default=None)
        if low is not None and high is not None and high - low < RANGE:
            if low > high:
                raise self.wrong("allows no integer between its bounds", at)
            return {"enum": list(range(low, high + 1))}
        if high is None and low in (None, 0, 1):
            return {"type": "integer"} | ({} if low is None else {"minimum": low})
        raise self.refuse(f"the integer bounds {low}..{high}", at, f"Use a range of at most "
                          f"{RANGE} values, or minimum 0 or 1 alone.")

    def string(self, s: dict[str, Any], at: str) -> dict[str, Any]:
        if "format" in s and s["format"] not in FORMATS:
            raise self.refuse(f"the format {s['format']!r}", at, "Supported formats: "
                              f"{', '.join(FORMATS)}; leave format out for any string.")
        used = [k for k in ("format", "pattern", "minLength", "maxLength") if k in s]
        if len(used) > 1 and used[0] in ("format", "pattern"):
            raise self.refuse(f"{used[1]!r} next to {used[0]!r}", at)
        if "pattern" in s:
            return {"type": "string", "pattern": self.pattern(s["pattern"], at)}
        self.bounds(s, at, "minLength", "maxLength")
        return {"type": "string"} | {k: s[k] for k in ("format", "minLength", "maxLength")
                                     if k in s}

    def bounds(self, s: dict[str, Any], at: str, low: str, high: str) -> None:
        if too_big := [key for key in (low, high) if s.get(key, 0) > LIMIT]:
            raise self.refuse(f"{too_big[0]!r} above {LIMIT}", at, f"Lower it to at most "
                              f"{LIMIT} (cap a long reply with max_tokens instead).")
        if s.get(low, 0) > s.get(high, math.inf):
            raise self.wrong(f"has {low} above {high}", at)

    def target(self, ref: str, at: str) -> Any:
        if ref != "#" and not ref.startswith("#/"):
            raise self.refuse(f"the $ref {ref!r}", at, "Refer only inside the schema "
                              "(#/$defs/Name): copy what it refers to into $defs.")
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise self.wrong(f"refers to {ref!r}, which is not there", at,
                                 "Define it under $defs, or fix the $ref.")
        return target

    def ref(self, ref: str, at: str) -> str:
        if ref not in self.names:
            target = self.target(ref, at)
            name = self.names[ref] = f"{self.prefix}{len(self.names)}"
            self.defs[name] = self.node(target, ref[2:].replace("/", "."))
        return f"#/$defs/{self.names[ref]}"

    def deref(self, s: Any, at: str) -> Any:
        seen: set[str] = set()
        while isinstance(s, dict) and "$ref" in s and s["$ref"] not in seen:
            seen.add(s["$ref"])
            s = self.target(s["$ref"], at)
        return s

    def kinds(self, s: Any, at: str) -> set[str]:
        s = self.deref(s, at)
        if not isinstance(s, dict) or "$ref" in s:
            return set(_FOR_TYPE) if s is not False else set()
        if "enum" in s or "const" in s:
            return {_kind(v) for v in s.get("enum", [s.get("const")])}
        if alts := s.get("anyOf") or s.get("oneOf"):
            return set().union(*(self.kinds(alt, at) for alt in alts))
        kind = s.get("type", list(_FOR_TYPE))
        kinds = set(kind) if isinstance(kind, list) else {kind}
        return kinds | {"integer"} if "number" in kinds else kinds

    def disjoint(self, a: Any, b: Any, at: str) -> bool:
        """Whether no value matches both: their types differ, or a property both require has a
        const (or enum) in each with no value in common (pydantic's tagged unions)."""
        if not self.kinds(a, at) & self.kinds(b, at):
            return True
        a, b = self.deref(a, at), self.deref(b, at)
        if not isinstance(a, dict) or not isinstance(b, dict):
            return False
        for prop in set(a.get("required", [])) & set(b.get("required", [])):
            pa, pb = (self.deref(x.get("properties", {}).get(prop), at) for x in (a, b))
            if all(isinstance(p, dict) and ("enum" in p or "const" in p) for p in (pa, pb)):
                va, vb = ([(_kind(v), v) for v in p.get("enum", [p.get("const")])]
                          for p in (pa, pb))
                if not any(x in vb for x in va):
                    return True
        return False

    def pattern(self, pattern: str, at: str) -> str:
        """The pattern rewritten into what SchemaConverter translates right (\\d -> [0-9], a
        negated class never matching '"', '\\' or control characters), or a refusal."""
        def no(what: str) -> InvalidInput:
            return self.refuse(f"{what} in the pattern {pattern!r}", at, _PATTERN_HINT)
        if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or pattern[-2] == "\\":
            raise no("no ^ at the start or no $ at the end")
        body, out, i, depth, quantified = pattern[1:-1], [], 0, 0, False
        while i < len(body):
            c, nxt = body[i], body[i + 1:i + 2]
            if c in "*+?{" and quantified:
                raise no("a lazy or repeated quantifier")
            quantified = c in "*+?{"
            if c == "\\" and nxt and nxt in "dw.-/[]()|{}*+?":
                out.append(f"[{_CLASS_ESC[nxt]}]" if nxt in "dw." else nxt if nxt in "-/"
                           else c + nxt)
                i += 2
            elif c == "[":
                negated, text, spans = nxt == "^", "", []
                i += 1 + (nxt == "^")
                while i < len(body) and body[i] != "]":
                    if body[i] == "\\":
                        if (esc := body[i + 1:i + 2]) not in _CLASS_ESC:
                            raise no(f"the escape \\{esc} in a class")
                        text, i = text + _CLASS_ESC[esc], i + 2
                        continue
                    end = 3 if body[i + 1:i + 2] == "-" and body[i + 2:i + 3] not in "]\\" else 1
                    spans.append((ord(body[i]), ord(body[i + end - 1])))
                    text, i = text + body[i:i + end], i + end
                if i >= len(body) or not text:
                    raise no("an unclosed or empty character class")
                if not negated and any(lo < 0x20 or lo <= 0x22 <= hi or lo <= 0x5C <= hi
                                       for lo, hi in spans):
                    raise no("a class with '\"', '\\' or a control character")
                out.append(f"[^{text}{_NOT}]" if negated else f"[{text}]")
                i += 1
            elif c == "{":
                count = re.compile(r"\{(\d+)(?:,(\d*))?\}").match(body, i)
                if not count or max(int(n or 0) for n in count.groups()) > LIMIT:
                    raise no(f"a '{{' that is not a quantifier {{m,n}} with n at most {LIMIT}")
                out.append(count[0])
                i = count.end()
            else:
                depth += (c == "(") - (c == ")")
                if c in "\\^$\"" or ord(c) < 0x20 or (c == "|" and not depth) or c + nxt == "(?":
                    raise no(f"the escape \\{nxt}" if c == "\\" else repr(c + nxt)
                             if c == "(" else repr(c))
                out.append(c)
                i += 1
        return "^" + "".join(out) + "$"


@functools.cache
def _converter() -> type[Any]:
    """SchemaConverter with the fixes of the module docstring."""
    from llama_cpp import llama_grammar as lg

    builtin = {name: rule.content for name, rule in {**lg.PRIMITIVE_RULES,
                                                       **lg.STRING_FORMAT_RULES}.items()}
    fixes = {builtin["char"]: _CHAR, lg.DOT: _DOT, builtin["date"]: _DATE}
    builtin |= {"space": lg.SPACE_RULE, "dot": lg.DOT}

    class Converter(lg.SchemaConverter):
        def _format_literal(self, literal: str) -> str:  # always JSON text: escape it whole
            return '"' + literal.replace("\\", "\\\\").replace('"', '\\"') + '"'

        def _add_rule(self, name: str, rule: str) -> str:
            rule = fixes.get(rule, rule)  # and no property rule takes a builtin rule's name
            plain = lg.INVALID_RULE_CHARS_RE.sub("-", name)
            if plain in builtin and fixes.get(builtin[plain], builtin[plain]) != rule:
                name = plain + "-"
            return str(super()._add_rule(name, rule))  # type: ignore[no-untyped-call]

        def visit(self, schema: dict[str, Any], name: str) -> str:
            if schema.get("type") == "integer" and "minimum" in schema:  # 0 or 1 (_Walk)
                digits = "[1-9] [0-9]{0,15}" if schema["minimum"] else '"0" | [1-9] [0-9]{0,15}'
                rule_name = name + "-" if name in lg.RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, f"({digits}) space")
            return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

    return Converter


def _convert(schema: dict[str, Any]) -> Any:
    converter = _converter()(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(_prepare(schema, "schema"), ""), "")
    return converter
