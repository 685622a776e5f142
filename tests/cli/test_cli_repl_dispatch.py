"""The REPL's dispatch table and reply handling, without a terminal (FakeEngine)."""

from __future__ import annotations

import io
import re

from fakes import FakeEngine
from rolechat import Chat
from rolechat.cli.repl import COMMANDS, Repl

SYSTEM = "You are a professional AI assistant. Answer as concisely as possible."


def make_repl(engine: FakeEngine | None = None) -> tuple[Repl, io.StringIO]:
    out = io.StringIO()
    chat = Chat(engine or FakeEngine(), params={"max_new_tokens": 32})
    return Repl(chat, out=out), out


def test_commands_table():
    assert set(COMMANDS) == {"/help", "/reset", "/prompt", "/exit"}
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
    assert "Valid commands: /exit, /help, /prompt, /reset." in text
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
    """Streams two chunks, then the user presses Ctrl-C."""

    def _generate(self, prompt_ids, params):
        yield "Once upon"
        yield " a time"
        raise KeyboardInterrupt


def test_ctrl_c_during_a_reply_discards_it():
    repl, out = make_repl(InterruptedEngine())
    assert repl.handle("Tell me a story") is True
    text = out.getvalue()
    assert text.startswith("Once upon a time\n")
    assert "[interrupted — reply discarded, conversation unchanged]" in text
    assert "tok/s" not in text
    assert repl.chat.conversation.messages == []
    assert repl.chat.last_reply is None
