from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fakes import CHATML
from rolechat import InvalidInput, Message
from rolechat.engines.llama_cpp import embedded_model_path
from rolechat.engines.tokenizers import GGUFVocab
from rolechat.sandbox import MAX_DEPTH, limits
from rolechat.template import _ENV, ChatTemplate
from seed_data import ASSISTANT1, IN17, IN17_TEXT, SYSTEM, USER1, USER2


def test_in17_renders_byte_for_byte() -> None:
    assert ChatTemplate(CHATML).render(IN17) == IN17_TEXT


def test_generation_prompt_optional() -> None:
    text = ChatTemplate(CHATML).render(IN17, add_generation_prompt=False)
    assert text == IN17_TEXT.removesuffix("<|im_start|>assistant\n")


def test_segments_mark_content() -> None:
    template = ChatTemplate(CHATML)
    segments = template.segments(IN17)
    assert segments is not None
    assert "".join(text for text, _ in segments) == IN17_TEXT
    assert [text for text, is_content in segments if is_content] == [SYSTEM, USER1, ASSISTANT1,
                                                                     USER2]
    assert all("<|im_start|>" in text for text, is_content in segments[:1] if not is_content)


def test_segments_follow_a_trimming_template() -> None:
    trimming = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>"
                "{% endfor %}")
    messages = [Message("user", "  padded  ")]
    segments = ChatTemplate(trimming).segments(messages)
    assert segments == [("<user>", False), ("padded", True), ("</s>", False)]


def test_segments_give_up_when_content_is_rewritten() -> None:
    rewriting = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert ChatTemplate(rewriting).segments([Message("user", "abc")]) is None


def test_sandbox_blocks_python_internals() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidInput, match="template failed"):
        ChatTemplate(evil).render([Message("user", "x")])


def test_sandbox_is_immutable() -> None:
    mutating = "{% set _ = messages.append(1) %}{{ messages | length }}"
    with pytest.raises(InvalidInput):
        ChatTemplate(mutating).render([Message("user", "x")])


def test_raise_exception_becomes_invalid_input() -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles!') }}{% endif %}"
    with pytest.raises(InvalidInput, match="roles!"):
        ChatTemplate(strict).render([Message("system", "s")])


def test_bad_or_missing_template() -> None:
    with pytest.raises(InvalidInput, match="no chat template"):
        ChatTemplate("")
    with pytest.raises(InvalidInput, match="does not compile"):
        ChatTemplate("{% for %}")


def test_hf_helpers_available() -> None:
    template = ChatTemplate("{{ bos_token }}{{ messages | tojson }}{{ strftime_now('%Y') }}",
                            bos_token="<s>")
    text = template.render([Message("user", "é")])
    assert text.startswith('<s>[{"role": "user", "content": "é"}]20')


# ----- real templates: byte for byte what transformers renders --------------------------------
TEMPLATES = Path(__file__).parent / "data" / "templates"
#: Gemma's template refuses a system message, as it does in transformers.
NO_SYSTEM = {"google-gemma-2-2b-it"}
TURNS = [Message("user", "Hello {{ there }} 你好  "), Message("assistant", " Hi! <b>x</b>\n"),
         Message("user", "Explain %s and {0}, please.")]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city."},
        "days": {"type": "array", "items": {"type": "integer"}, "description": "Days ahead."},
        "units": {"type": "object", "additionalProperties": {"type": ["string", "number"]},
                  "description": "Units by quantity."}}}}}]
TOOL_MESSAGES = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 °C."}, {"role": "user", "content": "Thanks"}]


def real_templates() -> dict[str, str]:
    sources = {path.stem: path.read_text(encoding="utf-8")
               for path in sorted(TEMPLATES.glob("*.jinja"))}
    assert len(sources) >= 6
    return sources


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    return GGUFVocab.load(embedded_model_path()).template_source


@pytest.fixture
def same_day(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """transformers' renderer for a template, both renderers dating the prompt 26 Jul 2024
    (Llama 3.1's template writes today's date)."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    monkeypatch.setitem(_ENV.globals, "strftime_now", lambda fmt: "26 Jul 2024")

    def compiled(source: str) -> Any:
        template = chat_template_utils._compile_jinja_template(source)
        monkeypatch.setitem(template.environment.globals, "strftime_now",
                            lambda fmt: "26 Jul 2024")
        return chat_template_utils.render_jinja_template

    return compiled


def transformers_text(render: Any, source: str, messages: list[dict[str, Any]],
                      **variables: Any) -> str:
    rendered = render([messages], chat_template=source, bos_token="<s>", eos_token="</s>",
                      **variables)
    return str(rendered[0][0] if isinstance(rendered, tuple) else rendered[0])


@pytest.mark.parametrize("name", [*(name for name in real_templates()
                                    if not name.endswith("tool_use")),  # needs tools
                                  "SmolLM2 (embedded GGUF)"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_as_transformers_does(
        name: str, add_generation_prompt: bool, same_day: Callable[[str], Any],
        smollm2_template: str) -> None:
    source = real_templates().get(name, smollm2_template)
    render = same_day(source)
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    for messages in ([*TURNS] if name in NO_SYSTEM else [Message("system", "Be brief."), *TURNS],
                     [Message("user", "长" * 3000)]):
        expected = transformers_text(render, source, [m.to_openai() for m in messages],
                                     add_generation_prompt=add_generation_prompt)
        assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B",
                                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
                                  "meta-llama-Llama-3.1-8B-Instruct"])
def test_real_templates_with_tools_render_as_transformers_does(
        name: str, same_day: Callable[[str], Any]) -> None:
    # Tools take the templates' longest paths: tool calls through tojson, and Hermes 3's
    # recursive json_to_python_type macro.
    source = real_templates()[name]
    render = same_day(source)
    expected = transformers_text(render, source, TOOL_MESSAGES, tools=TOOLS,
                                 add_generation_prompt=True)
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    with limits(len(source), len(TOOL_MESSAGES)):
        assert template._template.render(messages=TOOL_MESSAGES, tools=TOOLS, bos_token="<s>",
                                         eos_token="</s>", add_generation_prompt=True) == expected


def test_a_prompt_larger_than_the_floor_renders(smollm2_template: str) -> None:
    # The size bound grows with the input: 3 MB of messages are not "too large".
    messages = [Message("user", "x" * 3_000_000), Message("assistant", "y" * 100),
                Message("user", "z")]
    text = ChatTemplate(smollm2_template).render(messages)
    assert len(text) > 3_000_000 and text.endswith("<|im_start|>assistant\n")


# ----- hostile templates: one InvalidInput each, at once ----------------------------------------
def refused(source: str, messages: Sequence[Message] = (Message("user", "hi"),)) -> str:
    """The InvalidInput message of compiling and rendering ``source``. The render runs in a
    thread joined with a generous timeout: a safety net so that a regression fails instead of
    hanging the suite, not a measure of speed."""
    outcome: list[BaseException | str] = []

    def render() -> None:
        try:
            outcome.append(ChatTemplate(source).render(list(messages)))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), f"{source!r} is still rendering"
    assert isinstance(outcome[0], InvalidInput), outcome[0]
    message = str(outcome[0])
    assert "\n" not in message and message.endswith("Fix or replace the template "
                                                    "(--chat-template, or chat_template=...).")
    return message


@pytest.mark.parametrize("source, expected", [
    # The templates: a hang, an OverflowError, a TypeError and a RecursionError.
    ("{{ 'x' * 10**10 }}", "repeats a string of 1 character 10,000,000,000 times "
                           "(10,000,000,000 characters), over this render's limit of"),
    ("{{ 'x' * 10000000000 }}", "repeats a string of 1 character 10,000,000,000 times"),
    ("{% for i in range(10**12) %}{% endfor %}",
     "calls range(1000000000000) (1,000,000,000,000 items), over this render's limit"),
    ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
     f"nests macro calls (or recursive loops) more than {MAX_DEPTH} deep"),
    ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
     f"nests macro calls (or recursive loops) more than {MAX_DEPTH} deep"),
    # Loops inside loops, each within bounds, and a macro that calls itself twice.
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "takes more than 1,001,000 steps"),
    ("{% macro m(n) %}{% if n < 30 %}{{ m(n + 1) }}{{ m(n + 1) }}{% endif %}{% endmacro %}"
     "{{ m(0) }}", "takes more than 1,001,000 steps"),
    # Growth: doubling with ~ and +, numbers, padding, formatting, joining, writing.
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "joins values with ~ into a string (2,097,152 characters)"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "adds two values into a string (2,097,152 characters)"),
    ("{{ 10 ** (10 ** 10) }}", "computes 10 ** 10000000000, a number of about"),
    ("{{ 10.0 ** 1000 }}", "computes 10.0 ** 1000, a number too large to hold"),
    ("{{ 'x'|center(9999999999) }}", "passes 9,999,999,999 to the center filter"),
    ("{{ 'x'.ljust(10**10) }}", "passes 10,000,000,000 to str.ljust()"),
    ("{{ '{:>9999999999}'.format(1) }}", "formats a field 9,999,999,999 characters wide"),
    ("{{ '%9999999999d' % 1 }}", "formats a field 9,999,999,999 characters wide"),
    ("{{ (['x' * 1000000] * 1000)|join }}", "uses the join filter, more than this render's "
                                            "limit of"),
    ("{{ ('a' * 1000000).replace('a', 'bb') }}", "replaces text (2,000,000 characters)"),
    ("{{ ([1] * 100000)|tojson(indent=100000) }}", "uses the tojson filter"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "writes more than"),
    ("{% macro m() %}{% for i in range(100000) %}{{ 'z' * 100 }}{% endfor %}{% endmacro %}"
     "{% set x = m() %}", "writes more than"),
    # Plain Python errors of the template's own code.
    ("{{ 1 + 'a' }}", "failed: TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
    ("{{ 1 / 0 }}", "failed: ZeroDivisionError: division by zero"),
    ("{{ lipsum(10**6) }}", "failed: 'lipsum' is undefined"),
])
def test_hostile_templates_are_one_line_errors(source: str, expected: str) -> None:
    assert expected in refused(source)


@pytest.mark.parametrize("tag, source", [
    ("include", "{% include 'other.jinja' %}"),
    ("import", "{% import 'macros.jinja' as m %}{{ m.x() }}"),
    ("from ... import", "{% from 'macros.jinja' import x %}"),
    ("extends", "{% extends 'base.jinja' %}"),
])
def test_other_templates_are_refused_when_compiling(tag: str, source: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        ChatTemplate(source)
    assert (f"The chat template uses {{% {tag} %}} (line 1), but a chat template cannot load "
            "other templates; put their text in this one.") in str(raised.value)


def test_each_render_has_its_own_budget() -> None:
    # A render that takes most of its steps leaves none of them used up for the next one, nor
    # for a render on another thread at the same time.
    busy = ChatTemplate("{% for i in range(900000) %}{% endfor %}ok")
    results: list[str] = []
    workers = [threading.Thread(target=lambda: results.append(busy.render([]))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == ["ok"] * 3
    assert busy.render([]) == "ok"


def round_trip() -> list[Message]:
    """A tools → call → result → answer round trip, then the next question, as rolechat holds
    it (two parallel calls, one with no system prompt left to the template)."""
    from rolechat.toolcalls import ToolCall

    calls = (ToolCall("call_a", "get_weather", '{"city": "Paris", "days": [1, 2]}'),
             ToolCall("call_b", "get_weather", '{"city": "Rome"}'))
    return [Message("user", "Paris and Rome?"), Message("assistant", "", calls),
            Message("tool", '{"temp": 21}', tool_call_id="call_a"),
            Message("tool", '{"temp": 25}', tool_call_id="call_b"),
            Message("assistant", "21 °C and 25 °C."), Message("user", "Thanks")]


def openai_round_trip() -> list[dict[str, Any]]:
    """The same messages as transformers' templates take them: arguments as objects, the
    called function's name on each tool message."""
    out: list[dict[str, Any]] = []
    for m in round_trip():
        item = m.to_openai()
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": json.loads(c.arguments)}} for c in m.tool_calls]
        if m.role == "tool":
            item["name"] = "get_weather"
        out.append(item)
    return out


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B",
                                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"])
def test_a_tool_round_trip_renders_as_transformers_does(
        name: str, system: str | None, same_day: Callable[[str], Any]) -> None:
    source = real_templates()[name]
    render = same_day(source)
    head = [{"role": "system", "content": system}] if system else []
    expected = transformers_text(render, source, [*head, *openai_round_trip()], tools=TOOLS,
                                 add_generation_prompt=True)
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.native_tools
    offered = [Message("system", system or "", tools=tuple(TOOLS))]
    messages = [*offered, *round_trip()]
    assert template.render(messages) == expected
    segments = template.segments(messages)
    assert segments is not None and "".join(s for s, _ in segments) == expected
    assert ('{"temp": 21}', True) in segments  # a tool's result is content, never control text


def test_without_tool_support_the_generic_format_is_qwens_text(
        smollm2_template: str, same_day: Callable[[str], Any]) -> None:
    """SmolLM2's template knows nothing of tools: rolechat writes the same text Qwen2.5's
    template writes (ChatML both), all of it content."""
    template = ChatTemplate(smollm2_template)
    assert not template.native_tools
    qwen = real_templates()["Qwen-Qwen2.5-7B-Instruct"]
    render = same_day(qwen)
    expected = transformers_text(render, qwen, [{"role": "system", "content": "Be brief."},
                                                *openai_round_trip()], tools=TOOLS,
                                 add_generation_prompt=True)
    messages = [Message("system", "Be brief.", tools=tuple(TOOLS)), *round_trip()]
    assert template.render(messages) == expected
    segments = template.segments(messages)
    assert segments is not None
    template_text = "".join(text for text, is_content in segments if not is_content)
    assert "<tool_call>" not in template_text and "<tool_response>" not in template_text
