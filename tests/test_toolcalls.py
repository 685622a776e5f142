"""rolechat.toolcalls: tools checked, the generic format against Qwen2.5's template, replies
parsed whole and streamed, and the grammar run through llama.cpp's grammar sampler over the
embedded model's vocabulary (no model weights)."""

from __future__ import annotations

import copy
import ctypes
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fakes import CHATML
from rolechat.errors import InvalidInput
from rolechat.toolcalls import (
    TRIGGER,
    CallDelta,
    CallStream,
    ContentDelta,
    Delta,
    ToolCall,
    Tools,
    generic_messages,
    generic_system,
    parse_reply,
)

QWEN = (Path(__file__).parent / "data" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
        ).read_text(encoding="utf-8")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city — today or later.",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {
                       "city": {"type": "string", "description": "The city."},
                       "days": {"type": "array", "items": {"type": "integer"}}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "required": ["zone"], "additionalProperties": False,
    "properties": {"zone": {"type": "string", "enum": ["UTC", "Europe/Paris"]}}}}}
NOTHING = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME, NOTHING]


def parsed(**fields: Any) -> Tools:
    tools = Tools.parse(fields.pop("tools", TOOLS), **fields)
    assert tools is not None
    return tools


# ----- validation ------------------------------------------------------------------------------
def bad_parameters() -> dict[str, Any]:
    tool = copy.deepcopy(WEATHER)
    tool["function"]["parameters"]["properties"]["city"]["type"] = "no-such-type"
    return tool


@pytest.mark.parametrize("fields, field", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [WEATHER, {"type": "retrieval", "function": {"name": "x"}}]}, "tools[1].type"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, TIME, WEATHER]}, "tools[2].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                   "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, bad_parameters()]}, "tools[1].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools[0].function.strict"),
    ({"tools": [{"type": "function", "function": {"name": "f", "params": {}}}]},
     "tools[0].function.params"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": "false"}, "parallel_tool_calls"),
    ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
])
def test_bad_requests_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parsed(**fields)
    got = raised.value.field  # check_schema may name the keyword inside the parameters
    assert got == field or (field.endswith(".parameters") and got.startswith(field + ".")), got
    assert raised.value.hint


def test_a_missing_tool_choice_lists_the_tools() -> None:
    with pytest.raises(InvalidInput, match="get_weather, get_time, ping"):
        parsed(tool_choice={"type": "function", "function": {"name": "get_news"}})


def test_checked_tools() -> None:
    assert Tools.parse(None) is None and Tools.parse([]) is None
    tools = parsed()
    assert (tools.choice, tools.parallel, tools.forced) == ("auto", True, False)
    assert tools.offered() == [WEATHER, TIME, {"type": "function", "function": {
        "name": "ping", "parameters": {"type": "object", "properties": {}}}}]
    assert parsed(tool_choice="none").offered() == []
    assert parsed(tool_choice="none").grammar() is None
    assert parsed(tool_choice="required", parallel_tool_calls=False).parallel is False
    forced = parsed(tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (forced.choice, forced.forced, forced.offered()) == ("get_time", True, [TIME])
    # A function may be called "none": forcing it is not tool_choice "none".
    named_none = parsed(tools=[{"type": "function", "function": {"name": "none"}}],
                        tool_choice={"type": "function", "function": {"name": "none"}})
    assert len(named_none.offered()) == 1 and named_none.grammar() is not None


def test_tool_call_to_and_from_openai() -> None:
    call = ToolCall.from_openai({"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}, "messages[2].tool_calls[0]")
    assert call == ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    assert ToolCall.from_openai(call.to_openai(), "x") == call
    made = ToolCall.from_openai({"function": {"name": "f", "arguments": {"a": "é"}}}, "x")
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", made.id) and made.arguments == '{"a": "é"}'
    for item, field in [([], "m"), ({"function": {"name": "f", "arguments": "[1]"}},
                                    "m.function.arguments"),
                        ({"function": {"name": "f", "arguments": "{"}}, "m.function.arguments"),
                        ({"function": {"arguments": "{}"}}, "m.function.name"),
                        ({"type": "code", "function": {}}, "m.type"), ({"id": 3}, "m.id")]:
        with pytest.raises(InvalidInput) as raised:
            ToolCall.from_openai(item, "m")
        assert raised.value.field == field


# ----- the generic format: Qwen2.5's text through plain ChatML ---------------------------------
def render(source: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered = utils.render_jinja_template([messages], chat_template=source,
                                           add_generation_prompt=True, **variables)
    return str(rendered[0][0] if isinstance(rendered, tuple) else rendered[0])


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, separators=(",", ":"),
                                                               ensure_ascii=False)}}


CONVERSATION = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        call("call_a", "get_weather", {"city": "Paris", "days": [1, 2]}),
        call("call_b", "get_time", {"zone": "Europe/Paris"})]},
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21, "sky": "clair"}'},
    {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
    {"role": "assistant", "content": "21 °C and 14:05."},
    {"role": "user", "content": "And Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        call("call_c", "get_weather", {"city": "Zürich"})]},
    {"role": "tool", "tool_call_id": "call_c", "content": "18"},
]


def as_transformers(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as Qwen's template expects them: arguments as objects."""
    out = copy.deepcopy(messages)
    for message in out:
        for item in message.get("tool_calls", []):
            item["function"]["arguments"] = json.loads(item["function"]["arguments"])
    return out


@pytest.mark.parametrize("system", ["Be brief.", None])
def test_generic_format_is_qwen25_text(system: str | None) -> None:
    offered = parsed().offered()
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    expected = render(QWEN, as_transformers(messages), tools=offered)
    plain = generic_messages(messages)
    if system is None:  # Qwen's template has its persona, the generic format none
        plain.insert(0, {"role": "system", "content": "You are Qwen, created by Alibaba Cloud. "
                                                      "You are a helpful assistant."})
    plain[0]["content"] = generic_system(plain[0]["content"], offered)
    assert all(set(m) == {"role", "content"} for m in plain)
    assert render(CHATML, plain) == expected


def test_generic_system_alone() -> None:
    section = generic_system(None, [NOTHING])
    assert section.startswith("# Tools\n\nYou may call") and section.endswith("\n</tool_call>")
    assert '\n{"type": "function", "function": {"name": "ping"}}\n</tools>' in section
    assert generic_system("Hi.", [NOTHING]) == "Hi.\n\n" + section
    assert generic_system("Hi.", []) == "Hi." and generic_system(None, []) == ""


def test_generic_messages_check_calls() -> None:
    with pytest.raises(InvalidInput) as raised:
        generic_messages([{"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "oops"}}]}])
    assert raised.value.field == "messages[0].tool_calls[0].function.arguments"


# ----- replies: parse_reply and CallStream ----------------------------------------------------
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",'
             ' "days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
             '{"zone": "Eu\\"}<tool_call>{\\\\", "n": {"a" : [ {} ]} }}\n</tool_call>\n')
REPLIES: list[tuple[str, str, list[tuple[str, str]]]] = [
    (TWO_CALLS, "Let me check.", [
        ("get_weather", '{"city": "Paris", "days": [1, 2]}'),
        ("get_time", '{"zone": "Eu\\"}<tool_call>{\\\\", "n": {"a" : [ {} ]} }')]),
    ("Just text, no <tool_ calls <b>.", "Just text, no <tool_ calls <b>.", []),
    ('  <tool_call>\nnot json\n</tool_call> and then  ',
     "<tool_call>\nnot json\n</tool_call> and then", []),
    ('<tool_call>{"name": "ping"}</tool_call>', '<tool_call>{"name": "ping"}</tool_call>', []),
    ('A <tool_call>{"arguments": {"a": "é"}, "name": "f"}</tool_call> B', "A  B",
     [("f", '{"a": "é"}')]),
    ('<tool_call>{"name":"f","arguments":{\n  "a": "x y",\n  "b": 1\n}}</tool_call>\n'
     '<tool_call>{"name": "g", "arguments": {}}</tool_call>\n\n',
     "", [("f", '{\n  "a": "x y",\n  "b": 1\n}'), ("g", "{}")]),
    ('Cut <tool_call>\n{"name": "f", "arguments": {"a": [1, ', "Cut", [("f", '{"a": [1,')]),
    ('Cut <tool_call>\n{"na', 'Cut <tool_call>\n{"na', []),
    ("Almost <tool_c", "Almost <tool_c", []),
    ('<tool_call>{"name": "f", "arguments": {"a": 1\n</tool_call>after', "after",
     [("f", '{"a": 1')]),
    # The grammar lets a space follow the arguments; the rest of a block is dropped.
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1} }\n</tool_call>', "",
     [("f", '{"a": 1}')]),
]


@pytest.mark.parametrize("text, content, calls", REPLIES)
def test_parse_reply(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = parse_reply(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in got_calls)
    for c in got_calls:
        if c.arguments.endswith("}"):
            assert isinstance(json.loads(c.arguments), dict)


def chunkings(text: str) -> Iterator[list[str]]:
    yield list(text)
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def joined(deltas: Sequence[Delta]) -> tuple[str, list[tuple[str, str, str]]]:
    content, calls = "", []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            assert delta.text
            content += delta.text
            continue
        assert isinstance(delta, CallDelta)
        if delta.index == len(calls):
            assert delta.id and delta.name  # the first delta of a call names it
            calls.append((delta.id, delta.name, delta.arguments))
        else:
            assert delta.index == len(calls) - 1 and delta.id is None and delta.name is None
            assert delta.arguments
            calls[-1] = (*calls[-1][:2], calls[-1][2] + delta.arguments)
    return content, calls


@pytest.mark.parametrize("text, content, calls", REPLIES)
def test_stream_in_any_pieces_gives_parse_reply(text: str, content: str,
                                                calls: list[tuple[str, str]]) -> None:
    for pieces in chunkings(text):
        stream = CallStream()
        deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
        got_content, got_calls = joined(deltas)
        assert got_content == content, pieces
        assert [(name, args) for _, name, args in got_calls] == calls, pieces
        assert [c.to_openai() for c in stream.calls] == [
            ToolCall(*c).to_openai() for c in got_calls]


def test_stream_shows_a_call_before_it_ends() -> None:
    stream = CallStream()
    assert stream.feed("Sure. <tool") == [ContentDelta("Sure.")]
    assert stream.feed('_call>\n{"name": "get_weather", "argu') == []
    first = stream.feed('ments": {"city": "Pa')
    assert [(d.index, d.name, d.arguments) for d in first if isinstance(d, CallDelta)] == [
        (0, "get_weather", ""), (0, None, '{"city": "Pa')]
    assert stream.feed('ris"}}\n</tool_call> ') == [CallDelta(0, None, None, 'ris"}')]
    assert stream.calls == [ToolCall(stream.calls[0].id, "get_weather", '{"city": "Paris"}')]
    assert stream.feed("Done.") == [ContentDelta("  Done.")] and stream.finish() == []


# ----- grammar: llama.cpp's grammar sampler over the embedded model's vocabulary ----------------
def test_trigger_matches_the_first_call() -> None:
    for text in ["<tool_call>", "Sure. <tool_call>", "Sure.\n\n<tool_call>\n{", "a<tool_call>b"]:
        match = re.fullmatch(TRIGGER, text)
        assert match and match.start(1) == text.index("<tool_call>")
    assert not re.fullmatch(TRIGGER, "Sure. <tool_")
    grammar = parsed().grammar()
    assert grammar is not None and grammar[1] == (TRIGGER,)
    for choice in ("required", {"type": "function", "function": {"name": "ping"}}):
        grammar = parsed(tool_choice=choice).grammar()
        assert grammar is not None and grammar[1] == ()


class Sampler:
    """llama.cpp's grammar sampler over the embedded model's vocabulary (no weights)."""

    def __init__(self) -> None:
        self.llama_cpp = pytest.importorskip("llama_cpp")
        from rolechat.engines.llama_cpp import embedded_model_path

        self.model = self.llama_cpp.Llama(model_path=str(embedded_model_path()), vocab_only=True,
                                          verbose=False)
        self.vocab = self.model._model.vocab

    def refused_at(self, gbnf: str, text: str, triggers: tuple[str, ...] = ()) -> str | None:
        """None if ``text`` and then the end of generation are accepted, else the text up to
        and including the first refused token."""
        lib = self.llama_cpp
        if triggers:
            patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
            sampler = lib.llama_sampler_init_grammar_lazy_patterns(
                self.vocab, gbnf.encode(), b"root", patterns, len(triggers), None, 0)
        else:
            sampler = lib.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert sampler, f"the grammar does not compile:\n{gbnf}"
        try:
            tokens = self.model.tokenize(text.encode(), add_bos=False, special=False)
            tokens.append(lib.llama_vocab_eos(self.vocab))
            for at, token in enumerate(tokens):
                data = (lib.llama_token_data * 1)(lib.llama_token_data(token, 0.0, 0.0))
                candidates = lib.llama_token_data_array(data, 1, -1, False)
                lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
                if math.isinf(data[0].logit):
                    return self.model.detokenize(tokens[:at + 1]).decode(errors="replace")
                if at < len(tokens) - 1:
                    lib.llama_sampler_accept(sampler, token)
            return None
        finally:
            lib.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    return Sampler()


def block(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


PARIS = block("get_weather", '{"city": "Paris", "days": [1, 2]}')
UTC = block("get_time", '{"zone": "UTC"}')


def test_grammar_compiles_and_constrains_calls(sampler: Sampler) -> None:
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    grammar = parsed(tool_choice="required").grammar()
    assert grammar is not None
    gbnf = grammar[0]
    llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)
    for text in [PARIS, UTC, block("ping", "{}"), PARIS + "\n" + UTC + "\n" + PARIS]:
        assert sampler.refused_at(gbnf, text) is None, text
    assert parse_reply(PARIS + "\n" + UTC)[1][1].arguments == '{"zone": "UTC"}'
    refused = {
        "unknown tool": block("get_news", "{}"),
        "unknown argument": block("get_weather", '{"city": "Paris", "country": "FR"}'),
        "missing required": block("get_weather", '{"days": [1]}'),
        "wrong type": block("get_weather", '{"city": "Paris", "days": ["1"]}'),
        "not in enum": block("get_time", '{"zone": "Mars"}'),
        "another tool's arguments": block("get_time", '{"city": "Paris"}'),
        "arguments first": '<tool_call>\n{"arguments": {}, "name": "ping"}\n</tool_call>',
        "text first": "Sure. " + PARIS,
        "text after": PARIS + " Done.",
        "unfinished": PARIS[:-3],
    }
    for why, text in refused.items():
        assert sampler.refused_at(gbnf, text) is not None, why


def test_one_call_unless_parallel(sampler: Sampler) -> None:
    grammar = parsed(tool_choice="required", parallel_tool_calls=False).grammar()
    assert grammar is not None
    assert sampler.refused_at(grammar[0], PARIS) is None
    assert sampler.refused_at(grammar[0], PARIS + "\n" + UTC) == PARIS + "\n"


def test_forced_tool_only(sampler: Sampler) -> None:
    grammar = parsed(tool_choice={"type": "function", "function": {"name": "get_time"}}
                     ).grammar()
    assert grammar is not None
    assert sampler.refused_at(grammar[0], UTC) is None
    assert sampler.refused_at(grammar[0], PARIS) is not None


def test_auto_is_free_text_until_a_call(sampler: Sampler) -> None:
    grammar = parsed().grammar()
    assert grammar is not None
    gbnf, triggers = grammar
    for text in ["Just an answer, no call.", "Sure.\n" + PARIS, "Sure. " + PARIS + "\n" + UTC,
                 PARIS]:
        assert sampler.refused_at(gbnf, text, triggers) is None, text
    assert sampler.refused_at(gbnf, "Sure. " + block("get_news", "{}"), triggers) is not None
    assert sampler.refused_at(gbnf, "Sure. " + PARIS + " Done.", triggers) is not None
