from __future__ import annotations

import json

import pytest

from rolechat import Conversation, InvalidInput, Message, Turn
from rolechat.conversation import close_fences, read_messages, render_markdown

HISTORY = [("hi", "hello!"), ("how are you?", "fine")]


def test_tuples_round_trip() -> None:
    conv = Conversation.from_tuples(HISTORY, system="be brief")
    assert conv.system == "be brief"
    assert conv.turns == [Turn("hi", "hello!"), Turn("how are you?", "fine")]
    assert conv.to_tuples() == HISTORY
    assert conv.pending is None


def test_openai_round_trip() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    conv = Conversation.from_openai(messages)
    assert conv.system == "s"
    assert conv.pending == "u2"
    assert conv.turns == [Turn("u1", "a1")]
    assert conv.to_openai() == messages


def test_openai_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    conv = Conversation.from_openai([{"role": "user", "content": parts}])
    assert conv.pending == "ab"


def test_json_round_trip() -> None:
    conv = Conversation.from_tuples(HISTORY, system="你好")
    again = Conversation.from_json(conv.to_json())
    assert again == conv
    assert "你好" in conv.to_json()  # not \u-escaped
    assert Conversation.from_json(json.dumps(conv.to_openai())) == conv


def test_prompt_messages_window_and_user() -> None:
    conv = Conversation.from_tuples(HISTORY, system="s")
    messages = conv.prompt_messages("next", first_turn=1)
    assert messages == [Message("system", "s"), Message("user", "how are you?"),
                        Message("assistant", "fine"), Message("user", "next")]


def test_append_and_pop() -> None:
    conv = Conversation()
    conv.append_turn("q", "")  # an empty reply is allowed
    assert conv.pop_turn() == Turn("q", "")
    assert conv.pop_turn() is None


@pytest.mark.parametrize("history, where", [
    ([("only one",)], "history[0]"),
    (["a string"], "history[0]"),
    ([("u", "a", "x")], "history[0]"),
    ([("u", "a"), ("u2", 5)], "history[1]"),
    ([(None, "a")], "history[0]"),
    ([("  ", "a")], "history[0]"),
])
def test_bad_tuple_history(history: list, where: str) -> None:
    with pytest.raises(InvalidInput, match=r"history\[\d\]") as info:
        Conversation.from_tuples(history)
    assert where in str(info.value)


def test_history_must_be_a_list() -> None:
    with pytest.raises(InvalidInput, match="list of"):
        Conversation.from_tuples("hello")  # type: ignore[arg-type]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "robot", "content": "a"}], "unknown role"),
    ([{"role": "user", "content": 5}], "must be a string, got int"),
    ([{"role": "user", "content": ""}], "empty"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only come first"),
    (["not a dict"], "object"),
    ({"role": "user"}, "must be a list"),
])
def test_bad_openai_messages(messages: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        Conversation.from_openai(messages)


def test_bad_json() -> None:
    with pytest.raises(InvalidInput, match="Not valid JSON"):
        Conversation.from_json("{nope")
    with pytest.raises(InvalidInput, match="two system prompts"):
        Conversation.from_dict({"system": "a", "messages": [{"role": "system", "content": "b"}]})


def test_blank_system_prompt_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="system prompt is empty"):
        Conversation(system="  ")


# ----- interrupted messages in files -------------------------------------------------------------

def test_interrupted_messages_are_read_but_never_part_of_a_turn() -> None:
    messages = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "cut", "status": "interrupted"},
                {"role": "assistant", "content": "so far", "status": "interrupted"},
                {"role": "user", "content": "alone", "status": "pending"},
                {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    system, entries = read_messages(messages)
    assert system is None
    assert [(m.content, status) for m, status in entries] == [
        ("u1", "complete"), ("a1", "complete"), ("cut", "interrupted"),
        ("so far", "interrupted"), ("alone", "interrupted"), ("u2", "complete"),
        ("a2", "complete")]
    conv = Conversation.from_dict({"messages": messages})
    assert conv.to_tuples() == [("u1", "a1"), ("u2", "a2")] and conv.pending is None


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "user", "content": "u", "status": "done"}], r"messages\[0\] has unknown status"),
    ([{"role": "assistant", "content": "a", "status": "interrupted"}],
     r"messages\[0\]: an interrupted assistant message cannot stand here"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "c", "status": "interrupted"}],
     r"messages\[1\]: an interrupted user message cannot stand here"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
      {"role": "assistant", "content": "c", "status": "interrupted"}],
     r"messages\[2\]: an interrupted assistant"),
    ([{"role": "user", "content": "", "status": "interrupted"}], "empty"),
])
def test_bad_interrupted_messages(messages: list, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        read_messages(messages)


def test_json_nested_too_deeply_is_one_error() -> None:
    with pytest.raises(InvalidInput, match="nested too deeply"):
        Conversation.from_json("[" * 100_000 + "]" * 100_000)


# ----- Markdown: code fences closed -------------------------------------------------------------

@pytest.mark.parametrize(("text", "closed"), [
    ("```python\nprint(1)", "```python\nprint(1)\n```"),
    ("```python\nprint(1)\n", "```python\nprint(1)\n```"),
    ("~~~\ncode\n```\nstill code", "~~~\ncode\n```\nstill code\n~~~"),
    ("````\n```\nstill code\n```", "````\n```\nstill code\n```\n````"),
    ("```\ncode\n``` not a close", "```\ncode\n``` not a close\n```"),
    ("  ```\nindented fence", "  ```\nindented fence\n```"),
    ("```\none\n```\n\n~~~~~\ntwo", "```\none\n```\n\n~~~~~\ntwo\n~~~~~"),
])
def test_an_open_fence_is_closed(text: str, closed: str) -> None:
    assert close_fences(text) == closed


@pytest.mark.parametrize("text", [
    "no code at all", "```\nclosed\n```", "~~~\nclosed\n~~~~", "    ```\nan indented code line",
    "``` inline ``` code on one line", "```\ncode\n   ```  ", "a ``` in the middle",
])
def test_a_closed_or_absent_fence_is_left_alone(text: str) -> None:
    assert close_fences(text) == text


def test_to_markdown_closes_fences_and_leaves_a_pending_message_out() -> None:
    conv = Conversation.from_tuples([("code?", "```\nx = 1")], system="s")
    conv.messages.append(Message("user", "pending"))
    assert conv.to_markdown("T") == ("# T\n\n**System:** s\n\n### You\n\ncode?\n\n"
                                     "### Assistant\n\n```\nx = 1\n```\n")
    labelled = render_markdown("T", None, [(Message("user", "cut"), "interrupted")])
    assert labelled == "# T\n\n### You (interrupted: not answered)\n\ncut\n"
