"""Exact cut points with the byte-level fake engine.

Token arithmetic (ChatML, one token per byte, control tokens 1 each): system "S" = 11;
a turn with a 10-byte user message and a 20-byte reply = 18 + 33 = 51; the new 10-byte user
message = 18; the generation prompt = 11. So a prompt with k kept turns has 40 + 51k tokens.
Context 256 with max_new_tokens 50 gives a budget of 206 and a low-water mark of 154.
"""

from __future__ import annotations

import pytest

from fakes import FakeEngine
from rolechat import ContextOverflow, Conversation, GenerationParams, InvalidParams, Window

PARAMS = GenerationParams(max_new_tokens=50)
USER = "u" * 10


def history(turns: int) -> Conversation:
    return Conversation.from_tuples(
        [(f"user {i:05d}", f"assistant reply {i:04d}") for i in range(turns)], system="S")


def test_token_arithmetic() -> None:
    engine = FakeEngine(256)
    for k in range(4):
        assert engine.count_tokens(history(k).prompt_messages(USER)) == 40 + 51 * k


def test_everything_fits() -> None:
    plan = Window().plan(history(3), USER, FakeEngine(256), PARAMS)
    assert (plan.first_turn, plan.kept, plan.dropped) == (0, [0, 1, 2], [])
    assert (plan.prompt_tokens, plan.budget, plan.context_length) == (193, 206, 256)
    assert plan.messages[0].role == "system" and plan.messages[-1].content == USER


def test_slides_down_to_the_low_water_mark() -> None:
    plan = Window().plan(history(5), USER, FakeEngine(256), PARAMS)
    assert plan.dropped == [0, 1, 2] and plan.kept == [3, 4]  # 142 <= 154 < 193
    assert plan.prompt_tokens == 142
    assert plan.summary() == "142/206 prompt tokens, 2 earlier turn(s) kept, 3 oldest dropped"


def test_sticky_start_keeps_the_prefix_for_several_turns() -> None:
    window, engine = Window(), FakeEngine(256)
    assert window.plan(history(6), USER, engine, PARAMS, first_turn=3).first_turn == 3
    # 4 kept turns (244) no longer fit: slide again, to 2 turns.
    assert window.plan(history(7), USER, engine, PARAMS, first_turn=3).first_turn == 5


def test_without_stickiness_the_full_history_is_tried_first() -> None:
    assert Window().plan(history(6), USER, FakeEngine(256), PARAMS).first_turn == 4


def test_low_water_is_configurable() -> None:
    plan = Window(low_water=1.0).plan(history(5), USER, FakeEngine(256), PARAMS)
    assert plan.kept == [2, 3, 4] and plan.prompt_tokens == 193
    with pytest.raises(InvalidParams, match="low_water"):
        Window(low_water=0)


def test_max_turns() -> None:
    plan = Window(max_turns=1).plan(history(3), USER, FakeEngine(256), PARAMS)
    assert plan.kept == [2]
    assert Window(max_turns=0).plan(history(3), USER, FakeEngine(256), PARAMS).kept == []
    with pytest.raises(InvalidParams, match="max_turns"):
        Window(max_turns=-1)


def test_only_the_user_message_fits() -> None:
    long_user = "x" * 150  # 11 + 158 + 11 = 180: under the budget, over the low-water mark
    plan = Window().plan(history(2), long_user, FakeEngine(256), PARAMS)
    assert plan.kept == [] and plan.prompt_tokens == 180
    assert [m.role for m in plan.messages] == ["system", "user"]


def test_user_message_too_long_gives_the_numbers() -> None:
    with pytest.raises(ContextOverflow) as info:
        Window().plan(history(2), "x" * 300, FakeEngine(256), PARAMS)
    error = info.value
    assert (error.prompt_tokens, error.available_tokens) == (330, 206)
    assert (error.context_length, error.max_new_tokens) == (256, 50)
    assert "needs 330 tokens but only 206 are available" in str(error)


def test_max_new_tokens_must_leave_room() -> None:
    with pytest.raises(InvalidParams, match="less than the context length 256"):
        Window().plan(history(0), USER, FakeEngine(256), GenerationParams(max_new_tokens=256))


def test_window_never_splits_a_turn() -> None:
    engine = FakeEngine(256)
    for turns in range(12):
        plan = Window().plan(history(turns), USER, engine, PARAMS)
        roles = [m.role for m in plan.messages]
        assert roles[0] == "system" and roles[-1] == "user"
        assert roles[1:] == ["user", "assistant"] * len(plan.kept) + ["user"]
        assert plan.prompt_tokens <= plan.budget
