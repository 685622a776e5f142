from __future__ import annotations

import pytest

from fakes import CHATML
from rolechat import InvalidInput, Message
from rolechat.template import ChatTemplate
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
