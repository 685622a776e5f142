"""The REPL's dispatch table and reply handling, without a terminal (FakeEngine)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeEngine
from rolechat.cli.repl import BLOCK, COMMANDS, Repl, parse_value, read_message
from rolechat.conversation import Conversation, Message
from rolechat.engines.base import Generation
from rolechat.errors import ContextOverflow
from rolechat.params import GenerationParams
from rolechat.saved import SavedChat
from rolechat.store import Store

SYSTEM = "You are a professional AI assistant. Answer as concisely as possible."


def make_repl(engine: FakeEngine | None = None) -> tuple[Repl, io.StringIO]:
    out = io.StringIO()
    saved = SavedChat.new(engine or FakeEngine(), params={"max_new_tokens": 32})
    return Repl(saved, out=out), out


def test_commands_table():
    assert {"/help", "/reset", "/undo", "/retry", "/system", "/persona", "/set", "/params",
            "/prompt", "/window", "/usage", "/save", "/export", "/exit"} <= set(COMMANDS)
    for name, (func, help_text) in COMMANDS.items():
        assert name.startswith("/") and callable(func) and help_text.strip()


def test_help_lists_every_command():
    repl, out = make_repl()
    assert repl.handle("/help") is True
    lines = out.getvalue().splitlines()
    assert len(lines) == len(COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        assert any(line.split() and line.split()[0] == name and help_text in line
                   for line in lines), (name, lines)


def test_a_line_streams_the_reply_and_records_the_turn():
    engine = FakeEngine()
    engine.replies.append("Paris.")
    repl, out = make_repl(engine)
    assert repl.handle("Capital of France?") is True
    text = out.getvalue()
    assert text.startswith("Paris.\n")
    assert re.search(r"\n\d+ tokens · [\d.]+ tok/s · .* 0 earlier turn\(s\) kept\n$", text), text
    assert repl.chat.conversation.to_tuples() == [("Capital of France?", "Paris.")]


def test_reset_clears_the_conversation_but_keeps_the_system_prompt():
    repl, out = make_repl()
    repl.handle("hello")
    assert repl.chat.conversation.turns
    assert repl.dispatch("/reset") is True
    assert repl.chat.conversation.messages == []
    assert repl.chat.system == SYSTEM
    assert "[conversation cleared]" in out.getvalue()


def test_prompt_shows_the_conversation_and_a_draft():
    repl, out = make_repl()
    repl.handle("hello")
    assert repl.handle("/prompt") is True
    assert out.getvalue().endswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
                                   "hello<|im_end|>\n<|im_start|>assistant\necho<|im_end|>\n\n")
    out.truncate(0)
    out.seek(0)
    assert repl.handle("/prompt  next question ") is True
    assert out.getvalue().endswith("<|im_start|>user\nnext question<|im_end|>\n"
                                   "<|im_start|>assistant\n\n")
    assert len(repl.chat.conversation.turns) == 1  # a draft is not recorded


def test_exit_returns_false():
    repl, out = make_repl()
    assert repl.handle("/exit") is False
    assert repl.dispatch("  /exit  ") is False
    assert out.getvalue() == ""


def test_unknown_command_is_an_error_and_the_loop_goes_on():
    repl, out = make_repl()
    assert repl.handle("/foo bar") is True
    text = out.getvalue()
    assert text.startswith("error: Unknown command '/foo'.")
    assert "Valid commands: " + ", ".join(sorted(COMMANDS)) + "." in text
    assert len(text.splitlines()) == 1


def test_blank_line_does_nothing():
    repl, out = make_repl()
    assert repl.handle("   ") is True
    assert out.getvalue() == ""
    assert repl.chat.conversation.messages == []


def test_library_error_is_printed_and_the_conversation_unchanged():
    repl, out = make_repl(FakeEngine(context_length=256))
    repl.handle("hello")
    assert repl.handle("x" * 1000) is True  # 1000 tokens cannot fit in 256
    text = out.getvalue()
    assert "error: The prompt needs" in text
    assert len(repl.chat.conversation.turns) == 1


class InterruptedEngine(FakeEngine):
    """Streams "Once upon a time", then the user presses Ctrl-C: KeyboardInterrupt in the
    thread that reads the reply, as a real Ctrl-C is."""

    def stream(self, messages, params, **options):
        self.replies.append("Once upon a time, there was a dragon who never stopped talking.")
        generation = super().stream(messages, params, **options)

        def chunks():
            shown = ""
            try:
                for chunk in generation:
                    shown += chunk
                    yield chunk
                    if shown == "Once upon a time":
                        raise KeyboardInterrupt
            finally:
                generation.close()
            return generation.completion

        return Generation(chunks(), generation.cancel)


def test_ctrl_c_during_a_reply_discards_it():
    repl, out = make_repl(InterruptedEngine())
    assert repl.handle("Tell me a story") is True
    text = out.getvalue()
    assert text.startswith("Once upon a time\n")
    assert "[interrupted — the reply is not part of the conversation" in text
    assert "tok/s" not in text
    assert repl.chat.conversation.messages == []
    assert repl.chat.last_reply is None


def test_ctrl_c_marks_the_stored_message_interrupted(tmp_path):
    store = Store(tmp_path / "db")
    saved = SavedChat.new(InterruptedEngine(), store=store,
                          params=GenerationParams(max_new_tokens=32))
    repl = Repl(saved, out=io.StringIO())
    repl.handle("Tell me a story")
    cid = saved.cid
    assert cid is not None
    # The message and the reply so far are kept, marked, and never part of a prompt.
    assert [(m.role, m.status, m.content) for m in store.messages(cid)] == [
        ("user", "interrupted", "Tell me a story"),
        ("assistant", "interrupted", "Once upon a time")]
    assert store.conversation(cid).turns == [] and store.info(cid).turns == 0
    assert saved.chat.conversation.messages == []
    assert saved.undo() is None  # nothing to undo: the interrupted reply is not a turn


# ----- commands, with and without a store ------------------------------------------------

def stored_repl(tmp_path: Path, engine: FakeEngine | None = None,
                **params: Any) -> tuple[Repl, io.StringIO, Store]:
    store = Store(tmp_path / "db")
    saved = SavedChat.new(engine or FakeEngine(), store=store,
                          params=GenerationParams(max_new_tokens=32, **params), lazy=False)
    out = io.StringIO()
    return Repl(saved, out=out), out, store


def cid_of(repl: Repl) -> int:
    assert repl.saved.cid is not None
    return repl.saved.cid


def fresh(out: io.StringIO) -> str:
    """What was written since the last call, then forget it."""
    text = out.getvalue()
    out.truncate(0)
    out.seek(0)
    return text


def test_undo_removes_the_last_turn_from_the_conversation_and_the_store(tmp_path):
    repl, out, store = stored_repl(tmp_path)
    repl.handle("one")
    repl.handle("two")
    fresh(out)
    assert repl.handle("/undo") is True
    assert "removed the last turn: two" in fresh(out)
    assert repl.chat.conversation.to_tuples() == [("one", "echo")]
    assert store.conversation(cid_of(repl)).to_tuples() == [("one", "echo")]
    repl.handle("/undo")
    assert repl.chat.conversation.messages == []
    assert store.messages(cid_of(repl)) == []
    fresh(out)
    repl.handle("/undo")
    assert fresh(out).strip() == "nothing to undo"


def test_undo_without_a_store():
    repl, _out = make_repl()
    repl.handle("one")
    repl.handle("/undo")
    assert repl.chat.conversation.messages == []
    assert repl.chat.first_turn == 0


def test_retry_sends_the_last_message_again(tmp_path):
    engine = FakeEngine()
    engine.replies += ["first answer", "second answer"]
    repl, out, store = stored_repl(tmp_path, engine)
    repl.handle("question")
    fresh(out)
    assert repl.handle("/retry") is True
    text = fresh(out)
    assert "retrying: question" in text and "second answer\n" in text and "tok/s" in text
    assert repl.chat.conversation.to_tuples() == [("question", "second answer")]
    assert store.conversation(cid_of(repl)).to_tuples() == [("question", "second answer")]
    assert len(engine.prompts) == 2
    assert engine.prompts[0] == engine.prompts[1]  # the same prompt went out again


def test_retry_with_nothing_to_retry():
    repl, out = make_repl()
    repl.handle("/retry")
    assert out.getvalue().strip() == "nothing to retry"


def test_system_sets_shows_and_stores_the_system_prompt(tmp_path):
    repl, out, store = stored_repl(tmp_path)
    repl.handle("/system")
    assert fresh(out).strip() == SYSTEM
    repl.handle("/system You are a pirate.")
    assert "system prompt set" in fresh(out)
    repl.handle("/prompt")
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in fresh(out)
    assert store.info(cid_of(repl)).system == "You are a pirate."
    repl.handle("/system")
    assert fresh(out).strip() == "You are a pirate."


def test_persona_switches_system_prompt_and_parameters(tmp_path):
    repl, out, store = stored_repl(tmp_path)
    assert repl.chat.params.temperature == 0.9
    assert repl.handle("/persona expert") is True
    chat = repl.chat
    assert chat.persona.name == "expert"
    assert chat.system is not None and chat.system.startswith("You are a technical")
    assert chat.params.temperature == 0.3
    assert chat.params.max_new_tokens == 32  # what the user set explicitly stays
    info = store.info(cid_of(repl))
    assert info.persona == "expert" and info.system == chat.system
    assert info.params == {"temperature": 0.3, "max_new_tokens": 32}
    fresh(out)
    repl.handle("/persona")
    assert fresh(out).startswith("expert: ")


def test_persona_keeps_values_set_with_set():
    repl, _out = make_repl()
    repl.handle("/set temperature 0.5")
    repl.handle("/persona support")
    assert repl.chat.params.temperature == 0.5
    assert repl.chat.persona.name == "support"


def test_unknown_persona_lists_the_valid_names():
    repl, out = make_repl()
    assert repl.handle("/persona nobody") is True
    text = out.getvalue()
    assert text.startswith("error: Unknown persona 'nobody'. Valid personas: ")
    assert "concise" in text and "expert" in text and len(text.splitlines()) == 1
    assert repl.chat.persona.name == "concise"


def test_set_changes_a_parameter_and_the_store(tmp_path):
    repl, out, store = stored_repl(tmp_path)
    assert repl.handle("/set temperature 0.2") is True
    assert repl.chat.params.temperature == 0.2
    assert "temperature = 0.2" in fresh(out)
    assert store.info(cid_of(repl)).params["temperature"] == 0.2
    repl.handle("/set seed 7")
    assert repl.chat.params.seed == 7
    repl.handle("/set seed none")
    assert repl.chat.params.seed is None
    assert "seed" not in store.info(cid_of(repl)).params


def test_set_out_of_range_is_a_one_line_error():
    repl, out = make_repl()
    assert repl.handle("/set top_p 2") is True
    text = out.getvalue()
    assert text.startswith("error: Invalid generation parameters: top_p: ")
    assert len(text.splitlines()) == 1
    assert repl.chat.params.top_p == 0.95


def test_set_unknown_parameter_lists_the_valid_names():
    repl, out = make_repl()
    repl.handle("/set nope 1")
    text = out.getvalue()
    assert "error: Invalid generation parameters: nope: unknown parameter (valid: " in text
    for name in GenerationParams.model_fields:
        assert name in text
    assert len(text.splitlines()) == 1


def test_set_without_a_value_is_an_error():
    repl, out = make_repl()
    repl.handle("/set temperature")
    assert out.getvalue().startswith("error: /set temperature needs a value.")
    fresh(out)
    repl.handle("/set")
    assert fresh(out).startswith("error: Usage: /set KEY VALUE.")


def test_set_stop_takes_the_rest_of_the_line_and_clears(tmp_path):
    engine = FakeEngine()
    engine.replies.append("one two THE END three")
    repl, _out, store = stored_repl(tmp_path, engine)
    repl.handle("/set stop THE END")
    assert repl.chat.params.stop == ("THE END",)
    assert store.info(cid_of(repl)).params["stop"] == ["THE END"]
    repl.handle("go")
    assert repl.chat.conversation.turns[-1].assistant == "one two "
    repl.handle("/set stop")
    assert repl.chat.params.stop == ()
    assert "stop" not in store.info(cid_of(repl)).params


def test_params_shows_every_parameter():
    repl, out = make_repl()
    repl.handle("/set temperature 0.2")
    fresh(out)
    assert repl.handle("/params") is True
    lines = fresh(out).splitlines()
    assert len(lines) == len(GenerationParams.model_fields)
    assert any(line.split()[:2] == ["temperature", "0.2"] and "(you)" in line
               for line in lines)
    assert any(line.split()[:2] == ["max_new_tokens", "32"] and "(you)" in line
               for line in lines)
    assert any(line.split()[:2] == ["top_p", "0.95"] and "(rolechat)" in line for line in lines)


def test_window_shows_kept_and_dropped_turns():
    repl, out = make_repl(FakeEngine(context_length=256))
    for i in range(6):
        repl.handle(f"message number {i} " + "x" * 20)
    assert repl.chat.first_turn > 0  # the window slid
    fresh(out)
    assert repl.handle("/window") is True
    lines = fresh(out).splitlines()
    plan = repl.chat.plan("…")
    assert lines[0].startswith(f"next prompt: {plan.prompt_tokens}/224 tokens (context 256 - "
                               "max_new_tokens 32)")
    assert f"{len(plan.kept)} turn(s) kept, {len(plan.dropped)} dropped" in lines[0]
    assert lines[1] == "memory: none"
    assert len(lines) == 2 + 6
    states = [line.split()[2] for line in lines[2:]]
    assert states == ["dropped"] * plan.first_turn + ["kept"] * (6 - plan.first_turn)
    assert "dropped" in states
    assert lines[2].split()[:2] == ["turn", "1"]
    assert re.search(r"\b\d+ tokens  message number 0", lines[2])


def test_window_with_no_turns():
    repl, out = make_repl()
    repl.handle("/window")
    assert out.getvalue().splitlines()[0].endswith("0 turn(s) kept, 0 dropped")


def test_usage_shows_the_last_reply_and_totals(tmp_path):
    repl, out, _store = stored_repl(tmp_path)
    repl.handle("/usage")
    text = fresh(out)
    assert "no reply yet" in text and "this session: 0 tokens generated" in text
    repl.handle("hello")
    repl.handle("again")
    fresh(out)
    assert repl.handle("/usage") is True
    text = fresh(out)
    # "echo" and its end-of-turn token.
    assert re.search(r"last reply: 5 tokens · [\d.]+ tok/s .* · finish stop", text), text
    assert "this session: 10 tokens generated" in text
    assert f"conversation {cid_of(repl)}: 10 tokens generated in all" in text


def test_save_names_the_conversation_and_the_file(tmp_path):
    repl, out, store = stored_repl(tmp_path)
    assert repl.handle("/save") is True
    text = out.getvalue()
    assert f"conversation {cid_of(repl)}" in text and str(store.path) in text
    repl2, out2 = make_repl()
    repl2.handle("/save")
    assert out2.getvalue().startswith("not saved")


def test_export_md_and_json(tmp_path):
    repl, out, _store = stored_repl(tmp_path)
    repl.handle("first question")
    repl.handle("second question")
    repl.handle(f"/export md {tmp_path / 'chat.md'}")
    repl.handle(f"/export json {tmp_path / 'chat.json'}")
    assert "error" not in out.getvalue()
    md = (tmp_path / "chat.md").read_text(encoding="utf-8")
    assert "first question" in md and "### Assistant" in md and SYSTEM in md
    loaded = Conversation.from_json((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert loaded.to_tuples() == repl.chat.conversation.to_tuples()
    assert loaded.system == SYSTEM


def test_export_without_a_store(tmp_path):
    repl, out = make_repl()
    repl.handle("hi there")
    repl.handle(f"/export json {tmp_path / 'c.json'}")
    repl.handle(f"/export md {tmp_path / 'c.md'}")
    loaded = Conversation.from_json((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert loaded.to_tuples() == [("hi there", "echo")]
    assert "hi there" in (tmp_path / "c.md").read_text(encoding="utf-8")
    assert "exported 1 turn(s) as md" in out.getvalue()


def test_export_errors(tmp_path):
    repl, out = make_repl()
    repl.handle("/export pdf x.pdf")
    assert fresh(out).startswith("error: Usage: /export md|json PATH.")
    repl.handle("/export md")
    assert fresh(out).startswith("error: Usage: /export md|json PATH.")
    repl.handle(f"/export md {tmp_path / 'missing' / 'x.md'}")
    text = fresh(out)
    assert text.startswith("error: Cannot write") and len(text.splitlines()) == 1


def test_reset_with_a_store_starts_a_new_conversation(tmp_path):
    repl, out, store = stored_repl(tmp_path)
    repl.handle("remember me")
    old = cid_of(repl)
    repl.handle("/reset")
    new = cid_of(repl)
    assert new != old
    assert f"new conversation {new}" in out.getvalue()
    assert store.conversation(old).to_tuples() == [("remember me", "echo")]
    assert store.conversation(new).turns == []
    assert store.info(new).system == SYSTEM
    repl.handle("fresh start")
    assert store.conversation(new).to_tuples() == [("fresh start", "echo")]
    assert store.conversation(old).to_tuples() == [("remember me", "echo")]


def test_reply_cut_at_max_new_tokens_says_so_and_continue_extends_it(tmp_path):
    engine = FakeEngine()
    engine.replies += ["abcdefgh", "ijklmnopqrstuvwxyz"]
    store = Store(tmp_path / "s.db")
    saved = SavedChat.new(engine, store=store, params={"max_new_tokens": 8})
    out = io.StringIO()
    repl = Repl(saved, out=out)
    repl.handle("letters please")
    text = fresh(out)
    assert "stopped at max_new_tokens (8)" in text and "/continue" in text
    repl.handle("/continue")
    text = fresh(out)
    assert text.startswith("ijklmnop\n")
    assert repl.chat.conversation.to_tuples() == [("letters please", "abcdefghijklmnop")]
    # The model was given the reply so far, left open: no end of turn, no new header.
    opened = [256, *b"assistant\nabcdefgh"]
    assert engine.prompts[-1][-len(opened):] == opened
    messages = [(m.role, m.content, m.status) for m in store.messages(saved.cid)]
    assert messages == [("user", "letters please", "complete"),
                        ("assistant", "abcdefghijklmnop", "complete")]
    assert store.messages(saved.cid)[-1].usage.get("continued") is True
    # The next turn's prompt holds the whole extended reply.
    assert "abcdefghijklmnop<|im_end|>" in repl.chat.prompt("next")
    store.close()


def test_continue_with_nothing_to_continue():
    repl, out = make_repl()
    assert repl.handle("/continue") is True
    assert "nothing to continue" in out.getvalue()


def test_history_shows_the_last_turns():
    engine = FakeEngine()
    engine.replies += [f"answer {i}" for i in range(7)]
    repl, out = make_repl(engine)
    repl.handle("/history")
    assert "no turns yet" in fresh(out)
    for i in range(7):
        repl.handle(f"question {i}")
    fresh(out)
    repl.handle("/history")
    text = fresh(out)
    assert "question 1" not in text and "[3] you › question 2" in text
    assert "[7] answer 6" in text and "(2 earlier turn(s) not shown)" in text
    repl.handle("/history 2")
    text = fresh(out)
    assert "question 4" not in text and "[6] you › question 5" in text
    repl.handle("/history 100")
    assert "[1] you › question 0" in fresh(out)
    repl.handle("/history lots")
    assert "error: /history takes a number of turns" in fresh(out)


def test_persona_reflects_a_system_prompt_set_with_system():
    repl, out = make_repl()
    repl.handle("/persona")
    assert "own system prompt" not in fresh(out)
    repl.handle("/system You are a pirate.")
    fresh(out)
    repl.handle("/persona")
    assert "with your own system prompt" in fresh(out)


def test_read_message_joins_a_triple_quoted_block():
    lines = iter([f"{BLOCK}first line", "", "  second line", f"last{BLOCK}", "after"])
    assert read_message(lambda: next(lines)) == "first line\n\n  second line\nlast"
    assert read_message(lambda: next(lines)) == "after"
    one = iter([f"{BLOCK}all in one{BLOCK}"])
    assert read_message(lambda: next(one)) == "all in one"

    cut = iter([f"{BLOCK}unfinished", "block"])

    def until_end() -> str:
        try:
            return next(cut)
        except StopIteration:
            raise EOFError from None

    assert read_message(until_end) == "unfinished\nblock"  # Ctrl-D ends an open block


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5
    assert parse_value("none") is None and parse_value("None") is None
    assert parse_value("abc") == "abc"


def test_retry_that_fails_keeps_the_previous_reply(tmp_path):
    engine = FakeEngine()
    engine.replies.append("first answer")
    store = Store(tmp_path / "db")
    saved = SavedChat.new(engine, store=store)
    repl = Repl(saved, out=io.StringIO())
    repl.handle("question")
    engine.fail_after = 1
    engine.replies.append("never finished")
    assert repl.dispatch("/retry") is True
    assert saved.chat.conversation.to_tuples() == [("question", "first answer")]
    assert saved.cid is not None
    assert store.conversation(saved.cid).to_tuples() == [("question", "first answer")]


def test_set_refuses_a_max_new_tokens_the_context_cannot_hold():
    repl, out = make_repl(FakeEngine(context_length=512))
    repl.handle("/set max_new_tokens 600")
    assert "must be less than the context length 512" in fresh(out)
    assert repl.chat.params.max_new_tokens == 32  # unchanged
    repl.handle("hello")
    assert "tok/s" in fresh(out)


def test_window_shows_each_turns_real_share():
    engine = FakeEngine()
    repl, out = make_repl(engine)
    texts = ("one", "two two", "three three three")
    for text in texts:
        engine.replies.append("ok")
        repl.handle(text)
    fresh(out)
    repl.handle("/window")
    lines = fresh(out).splitlines()[2:]  # after the totals and the memory line
    shares = [int(line.split()[3]) for line in lines]
    # Each turn adds its text and its template once: the fake's ChatML writes 17 byte tokens
    # ("user\n", "\n", "assistant\n", "\n") and 4 control tokens around a user message and
    # its reply.
    assert shares == [len(text) + len("ok") + 21 for text in texts]
    messages = repl.chat.conversation.prompt_messages()
    whole = engine.count_tokens(messages, add_generation_prompt=False)
    system = engine.count_tokens(messages[:1], add_generation_prompt=False)
    assert sum(shares) == whole - system


def test_pin_unpin_and_window_show_the_memory(tmp_path):
    from fakes import Summarizer
    from rolechat.window import Window

    engine = Summarizer()
    store = Store(tmp_path / "s.db")
    saved = SavedChat.new(engine, store=store, params={"max_new_tokens": 40},
                          window=Window(summarize=True, summary_tokens=40))
    out = io.StringIO()
    repl = Repl(saved, out=out)
    repl.handle("/pin")
    assert "error: There is no turn 0" in fresh(out)
    repl.handle("My name is Ada.")
    repl.handle("/pin 1")
    assert "[turn 1 pinned" in fresh(out)
    assert store.info(saved.cid).memory["pins"] == [0]
    repl.handle("/pin 9")
    assert "error: There is no turn 9: the conversation has 1 turn(s)." in fresh(out)
    repl.handle("/pin first")
    assert "error: /pin takes a turn number, not 'first'" in fresh(out)
    slid = ""
    for i in range(30):
        repl.handle(f"Question number {i} about the topic?")
        slid += fresh(out)
    assert "[the window slid: the dropped turns are in the summary" in slid
    repl.handle("/window")
    shown = fresh(out)
    assert "memory: summary (summary cap 40 tokens); pinned: 1" in shown
    assert "S" in shown and ": the user asked questions." in shown
    assert re.search(r"turn 1 +pinned", shown) and re.search(r"turn 2 +summary", shown)
    repl.handle("/unpin 2")
    assert "error: Turn 2 is not pinned." in fresh(out)
    repl.handle("/unpin")
    assert "error: /unpin needs a turn number." in fresh(out)
    repl.handle("/unpin 1")
    assert "[turn 1 unpinned]" in fresh(out)
    assert store.info(saved.cid).memory["pins"] == []
    store.close()


def test_continue_counts_the_prompt_it_sends_and_refuses_one_that_does_not_fit():
    engine = FakeEngine(context_length=200)
    engine.replies += ["x" * 40, "more"]
    saved = SavedChat.new(engine, params={"max_new_tokens": 40})
    saved.send("go")
    stream = saved.continue_reply()
    assert stream.plan.prompt_tokens == len(engine.continuation_ids(
        [*stream.plan.messages, Message("assistant", "x" * 40)]))
    list(stream)
    assert stream.reply is not None and stream.reply.plan.prompt_tokens == len(engine.prompts[-1])
    tight = SavedChat.new(FakeEngine(context_length=400), params={"max_new_tokens": 200})
    tight.chat.engine.replies.append("y" * 200)  # type: ignore[attr-defined]
    tight.send("go")  # cut at 200 tokens; with them the prompt no longer leaves 200 free
    with pytest.raises(ContextOverflow, match="The prompt needs"):
        tight.continue_reply()
    assert tight.chat.conversation.to_tuples() == [("go", "y" * 200)]  # unchanged


def test_unpin_a_turn_that_does_not_exist():
    repl, out = make_repl()
    repl.handle("hello")
    fresh(out)
    repl.handle("/unpin 7")
    assert "error: There is no turn 7: the conversation has 1 turn(s)." in fresh(out)


def test_prompt_without_text_shows_the_summary_the_next_prompt_holds(tmp_path):
    from fakes import Summarizer
    from rolechat.window import Window

    saved = SavedChat.new(Summarizer(), store=Store(tmp_path / "s.db"),
                          params={"max_new_tokens": 40},
                          window=Window(summarize=True, summary_tokens=40))
    out = io.StringIO()
    repl = Repl(saved, out=out)
    for i in range(30):
        repl.handle(f"Question number {i} about the topic?")
    assert saved.chat.memory.summary
    fresh(out)

    def system_of(shown: str) -> str:
        return shown.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]

    repl.handle("/prompt")
    alone = fresh(out)
    repl.handle("/prompt next one")
    with_text = fresh(out)
    assert ": the user asked questions." in system_of(alone)  # the summary section...
    assert system_of(alone) == system_of(with_text)  # ...as the next message's prompt has it
    # The turns the next prompt keeps, and no more: the summarized ones are left out.
    assert alone.rstrip("\n") in with_text
    assert "Question number 0 about" not in alone
