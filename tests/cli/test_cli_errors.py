"""Bad input: a non-zero exit code, one `error: ...` line on stderr, nothing on stdout."""

from __future__ import annotations

import json
import re

import pytest

#: Exit codes of the error classes (rolechat.errors).
INVALID, OVERFLOW, MODEL = 2, 3, 4

PARAM_CASES = {
    "negative-temperature": (["--temperature", "-1"], ["temperature", "-1"]),
    "short-temperature-flag": (["-t", "-1"], ["temperature"]),
    "top-p-zero": (["--top-p", "0"], ["top_p", "greater than 0"]),
    "top-p-above-one": (["--top-p", "1.5"], ["top_p", "1.5"]),
    "max-new-tokens-zero": (["--max-new-tokens", "0"], ["max_new_tokens", "greater than 0"]),
    "negative-seed": (["--seed", "-1"], ["seed"]),
    "empty-stop": (["--stop", ""], ["stop"]),
}


@pytest.mark.parametrize("case", PARAM_CASES)
def test_out_of_range_generation_parameter(cli, case):
    flags, words = PARAM_CASES[case]
    line = cli.fails("ask", "hi", *flags, code=INVALID)
    assert line.startswith("error: Invalid generation parameters:")
    for word in words:
        assert word in line


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_message(cli, text):
    line = cli.fails("ask", text, *cli.FAST, code=INVALID)
    assert "empty" in line


def test_empty_message_on_stdin(cli):
    assert "empty" in cli.fails("ask", *cli.FAST, stdin="  \n", code=INVALID)


def test_max_new_tokens_not_below_the_context_length(cli):
    line = cli.fails("ask", "hi", "--max-new-tokens", "999999", "--threads", "1", code=INVALID)
    assert "max_new_tokens" in line and "context length 8192" in line
    line = cli.fails("ask", "hi", "--max-new-tokens", "8192", "--threads", "1", code=INVALID)
    assert "context length 8192" in line


def test_unknown_persona_lists_the_valid_names(cli):
    line = cli.fails("ask", "hi", "--persona", "nobody", code=INVALID)
    assert "'nobody'" in line
    assert "concise, expert, support, tutorial" in line
    line = cli.fails("prompt", "--persona", "nobody", "--user", "hi", code=INVALID)
    assert "concise, expert, support, tutorial" in line


def test_missing_model_file(cli):
    line = cli.fails("ask", "hi", "--model", "/does/not/exist.gguf", code=MODEL)
    assert "/does/not/exist.gguf" in line and "no such file" in line


def test_model_that_is_not_gguf(cli):
    path = cli.write("some_text_file.txt", "just some text, not a model\n" * 10)
    line = cli.fails("ask", "hi", "--model", str(path), code=MODEL)
    assert str(path) in line and "not a GGUF file" in line


def test_model_that_is_a_folder(cli):
    line = cli.fails("ask", "hi", "--model", str(cli.tmp), code=MODEL)
    assert "folder" in line


def test_message_too_long_for_the_context(cli):
    text = " ".join(f"word{i % 50}" for i in range(2000))
    line = cli.fails("ask", "--context-length", "256", "--max-new-tokens", "64",
                     "--threads", "1", text, code=OVERFLOW)
    match = re.search(r"needs (\d+) tokens but only (\d+) are available \(context length 256 "
                      r"- max_new_tokens 64\)", line)
    assert match, line
    assert int(match[1]) > 2000
    assert int(match[2]) == 256 - 64


PROMPT_FILE_CASES = {
    "non-alternating": (json.dumps([{"role": "user", "content": "a"},
                                    {"role": "user", "content": "b"}]),
                        ["messages[1]", "alternate"]),
    "invalid-json": ('[{"role": "user", "content": "a"', ["Not valid JSON", "line 1"]),
    "content-not-a-string": (json.dumps([{"role": "user", "content": 5}]),
                             ["messages[0]", "must be a string", "int"]),
    "unknown-role": (json.dumps([{"role": "robot", "content": "a"}]), ["'robot'"]),
    "late-system": (json.dumps([{"role": "user", "content": "a"},
                                {"role": "system", "content": "b"}]), ["system"]),
    "blank-user": (json.dumps([{"role": "user", "content": " "}]), ["empty"]),
    "not-a-conversation": (json.dumps({"turns": []}), ["messages"]),
    "two-system-prompts": (json.dumps({"system": "a", "messages": [
        {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]}), ["two system"]),
}


@pytest.mark.parametrize("case", PROMPT_FILE_CASES)
def test_bad_conversation_file(cli, case):
    text, words = PROMPT_FILE_CASES[case]
    path = cli.write("conversation.json", text)
    line = cli.fails("prompt", str(path), code=INVALID)
    for word in words:
        assert word in line


def test_bad_conversation_on_stdin(cli):
    line = cli.fails("prompt", "-", stdin='[{"role": "user", "content": 5}]', code=INVALID)
    assert "must be a string" in line


@pytest.mark.parametrize(("args", "words"), [
    ([], ["Nothing to render"]),
    (["--user", "a", "--user", "b"], ["2 --user and 0 --assistant", "alternate"]),
    (["--system", "", "--user", "a"], ["system prompt", "empty"]),
    (["--user", "   "], ["empty"]),
])
def test_bad_prompt_flags(cli, args, words):
    line = cli.fails("prompt", *args, code=INVALID)
    for word in words:
        assert word in line


def test_prompt_file_and_flags_together(cli):
    path = cli.write("c.json", json.dumps([{"role": "user", "content": "a"}]))
    assert "not both" in cli.fails("prompt", str(path), "--user", "b", code=INVALID)


def test_window_after_a_reply_plans_the_next_message(cli):  # once refused (issue 19)
    path = cli.write("c.json", json.dumps([{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}]))
    result = cli.ok("prompt", str(path), "--window", "--threads", "1")
    assert result.out.endswith("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    assert "planned for the next message" in result.err
