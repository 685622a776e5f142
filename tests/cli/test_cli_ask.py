"""`rolechat ask` with the real embedded model: JSON output, determinism, stdin, streaming."""

from __future__ import annotations

import re

import pexpect

from rolechat.store import Store

QUESTION = "What is the capital of France?"
#: A word of the reply, not of the spinner ("Loading the embedded model…") or an escape code.
REPLY_WORD = r"\b(?!(?:Loading|embedded|model)\b)[A-Za-z]{4,}[^A-Za-z]"


def test_version_and_help(cli):
    assert cli.ok("--version").out == "rolechat, version 0.1.0\n"
    help_text = cli.ok("--help").out
    for command in ("ask", "chat", "personas", "prompt"):
        assert command in help_text
    ask_help = cli.ok("ask", "--help").out
    for flag in ("--max-new-tokens", "--temperature", "-t,", "--top-p", "--top-k",
                 "--repetition-penalty", "--seed", "--stop", "--persona", "--system", "--model",
                 "--context-length", "--threads", "--json"):
        assert flag in ask_help
    # Descriptions after an engine prefix start lowercase, but acronyms stay whole.
    assert re.search(r"CPU\s+threads", ask_help), ask_help
    assert not re.search(r"\b[a-z][A-Z]{2,}", ask_help), ask_help  # no "cPU"


def check_reply(data: dict, persona: str = "concise", max_new_tokens: int = 16) -> None:
    assert isinstance(data["response"], str) and data["response"].strip()
    assert data["finish_reason"] in {"stop", "length"}
    assert data["persona"] == persona
    usage = data["usage"]
    assert isinstance(usage["prompt_tokens"], int) and usage["prompt_tokens"] > 0
    assert 1 <= usage["generated_tokens"] <= max_new_tokens
    assert 0 <= usage["cached_tokens"] < usage["prompt_tokens"]
    assert usage["ttft_s"] >= 0
    assert usage["tokens_per_s"] >= 0
    if data["finish_reason"] == "length":
        assert usage["generated_tokens"] == max_new_tokens
    window = data["window"]
    assert window["prompt_tokens"] == usage["prompt_tokens"]
    assert window["max_new_tokens"] == max_new_tokens
    assert window["budget"] == window["context_length"] - max_new_tokens


def test_ask_json_fields_and_greedy_determinism(cli):
    first = cli.ask_json(QUESTION, *cli.FAST)
    check_reply(first)
    assert first["model"].endswith(".gguf")
    assert first["window"]["context_length"] == 8192
    # Again, with the question given as separate words (they are joined with spaces).
    second = cli.ask_json(*QUESTION.split(), *cli.FAST)
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert second["response"] == first["response"]
    assert second["usage"]["generated_tokens"] == first["usage"]["generated_tokens"]


def test_ask_same_seed_same_sampled_reply(cli):
    args = ("Tell me a fact about cats.", "--seed", "7", "-t", "0.9", "--max-new-tokens", "16",
            "--threads", "1")
    first = cli.ask_json(*args)
    check_reply(first)
    assert cli.ask_json(*args)["response"] == first["response"]


def test_ask_streams_text_to_stdout_and_usage_to_stderr(cli):
    result = cli.ok("ask", QUESTION, *cli.FAST, "--usage")
    assert result.out.endswith("\n") and result.out.strip()
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token \d+ ms · prompt \d+ \(0 cached\)",
                     result.err), result.err
    quiet = cli.ok("ask", QUESTION, *cli.FAST)
    assert quiet.out == result.out
    assert quiet.err == ""


def test_ask_reads_the_question_from_stdin(cli):
    data = cli.ask_json(*cli.FAST, stdin=QUESTION + "\n")
    check_reply(data)
    plain = cli.ok("ask", *cli.FAST, stdin="Why is the sky blue?")
    assert plain.out.strip()


def test_ask_without_a_question_on_a_terminal_is_an_error(cli):
    child = cli.spawn("ask")
    child.expect(pexpect.EOF)
    child.close()
    lines = cli.clean(child.before).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No question given."), lines
    assert child.exitstatus == 2


def test_ctrl_c_during_ask_exits_130(cli):
    child = cli.spawn("ask", "Write a very long story about a dragon.", "-t", "0",
                      "--max-new-tokens", "1000", "--threads", "1")
    child.expect_exact("Loading")  # the spinner on stderr (a terminal)
    child.expect(REPLY_WORD)  # the reply is streaming
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None
    assert child.exitstatus == 130
    assert "Traceback" not in child.before


def test_ask_on_a_terminal_wraps_between_words(cli):
    code, lines = cli.on_terminal("ask", "Describe the sea in one long paragraph.", "-t", "0",
                                  "--max-new-tokens", "80", "--threads", "1", columns=40)
    assert code == 0, lines
    store = Store(cli.home / "rolechat.db")
    reply = store.messages(store.latest())[-1].content
    store.close()
    assert len(lines) > 2 and all(len(line) <= 40 for line in lines), lines
    assert " ".join(lines).split() == reply.split(), (reply, lines)  # no word broken


def test_an_error_on_a_terminal_wraps_between_words(cli):
    error = cli.fails("ask", "-t", "7", "hello")  # not a terminal: one line
    assert len(error) > 80 and "less than or equal to 2" in error
    code, lines = cli.on_terminal("ask", "-t", "7", "hello", columns=40)
    assert code == 2
    assert len(lines) > 2 and all(len(line) <= 40 for line in lines), lines
    assert " ".join(lines).split() == error.split(), lines


def test_ask_schema_prints_json_valid_under_it(cli, tmp_path):
    import json

    jsonschema = __import__("pytest").importorskip("jsonschema")
    concise = cli.ok("ask", "Invent a person.", "--schema", "name, age int", "-t", "0",
                     "--max-new-tokens", "100")
    value = json.loads(concise.out)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert concise.out == json.dumps(value, indent=2) + "\n"  # printed indented
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "size": {"type": "string", "enum": ["small", "big"]}},
        "required": ["city", "size"], "additionalProperties": False}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema))
    for given in (str(path), json.dumps(schema)):  # a file, or the schema itself
        data = cli.ask_json("Name a city.", "--schema", given, "-t", "0.9", "--seed", "3",
                            "--max-new-tokens", "100")
        jsonschema.validate(data["parsed"], schema)
        assert json.loads(data["response"]) == data["parsed"]


def test_ask_schema_errors_are_clear(cli):
    assert "uniqueItems" in cli.fails("ask", "Hi", "--schema",
                                      '{"type": "array", "uniqueItems": true}', code=2)
    assert "ran out of tokens (5) before its JSON ended" in cli.fails(
        "ask", "Invent a person.", "--schema", "name, biography", "-t", "0",
        "--max-new-tokens", "5", code=1)
