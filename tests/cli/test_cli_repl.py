"""`rolechat chat` in a real pseudo-terminal (pexpect), and with piped stdin."""

from __future__ import annotations

import itertools
import re

import pytest
from wcwidth import wcswidth

from rolechat.cli.repl import COMMANDS
from rolechat.store import Store
from screens import screen_lines

SHORT = ("-t", "0", "--max-new-tokens", "24", "--threads", "1")
FIRST = "What is the capital of France?"
SECOND = "And of Germany?"
USAGE = re.compile(r"(\d+) tokens · [\d.]+ tok/s · first token \d+ ms · prompt (\d+) "
                   r"\((\d+) cached(?:, restored from \w+)?\) · \d+/\d+ prompt tokens, "
                   r"(\d+) earlier turn\(s\) kept")
#: A word of the reply (not an escape sequence: those hold no run of four letters).
REPLY_WORD = r"[A-Za-z]{4,}[^A-Za-z]"


def usage_of(output: str) -> tuple[int, int, int, int]:
    """(generated, prompt, cached, kept turns) from a reply's usage line."""
    match = USAGE.search(output)
    assert match, output
    generated, prompt, cached, kept = (int(g) for g in match.groups())
    return generated, prompt, cached, kept


def reply_text(output: str, sent: str) -> str:
    """The streamed reply: what comes between the echoed input line and the usage line.
    prompt_toolkit may redraw the input line (``you › ...``) when the machine is busy; such
    redraws are not part of the reply."""
    after = output.split(sent, 1)[1]
    usage = USAGE.search(after)
    assert usage, output
    lines = after[:usage.start()].splitlines()
    return "\n".join(line for line in lines if not line.startswith("you ›")).strip()


def test_chat_session_in_a_terminal(spawn_repl):
    repl = spawn_repl(*SHORT)
    assert "persona concise" in repl.banner and "context 8192" in repl.banner

    first = repl.send(FIRST, "tok/s")
    assert reply_text(first, FIRST)
    generated, prompt1, cached, kept = usage_of(first)
    assert 1 <= generated <= 24 and cached == 0 and kept == 0

    shown = repl.send("/prompt", "<|im_start|>system")
    assert "You are a professional AI assistant." in shown
    assert f"<|im_start|>user\n{FIRST}<|im_end|>\n<|im_start|>assistant\n" in shown

    second = repl.send(SECOND, "tok/s")
    assert reply_text(second, SECOND)
    _, prompt2, cached, kept = usage_of(second)
    assert kept == 1
    assert prompt2 > prompt1
    assert cached >= prompt1  # the first turn's prompt is reused from the KV cache

    shown = repl.send("/prompt", "<|im_start|>system")
    assert FIRST in shown and SECOND in shown

    assert "[conversation cleared]" in repl.send("/reset", "conversation cleared")
    shown = repl.send("/prompt", "<|im_start|>system")
    assert "You are a professional AI assistant." in shown
    assert FIRST not in shown and SECOND not in shown

    error = repl.send("/foo", "Unknown command")
    assert "error: Unknown command '/foo'" in error
    for name in COMMANDS:
        assert name in error

    repl.child.sendintr()  # Ctrl-C at an empty prompt does not leave...
    helped = repl.send("/help", "Leave")  # ...the next line is read as usual
    assert repl.child.isalive()
    for name in COMMANDS:
        assert name in helped

    repl.child.sendeof()  # Ctrl-D at the prompt leaves
    assert repl.finish() == 0


def test_ctrl_c_discards_the_reply_and_keeps_the_conversation(spawn_repl):
    repl = spawn_repl("-t", "0", "--max-new-tokens", "1000", "--threads", "1")
    repl.send(FIRST, "tok/s")

    story = "Write a very long story about a dragon"
    repl.child.sendline(story)
    repl.expect(story)  # the input line, echoed...
    repl.expect("\n")  # ...and accepted
    repl.child.expect(REPLY_WORD)  # the reply is streaming
    repl.child.sendintr()
    note = repl.expect("interrupted")
    repl.wait_prompt()
    assert "tok/s" not in note  # the reply never finished

    shown = repl.send("/prompt", "<|im_start|>system")
    assert FIRST in shown
    assert "dragon" not in shown

    saved = repl.send("/save", "saved in")
    match = re.search(r"conversation (\d+)", saved)
    assert match, saved
    cid = int(match.group(1))
    store = Store(repl.home / "rolechat.db")
    statuses = [(m.role, m.status, m.content) for m in store.messages(cid)]
    # The message and the reply so far: kept, marked, never sent back.
    assert statuses[-2] == ("user", "interrupted", story)
    assert statuses[-1][:2] == ("assistant", "interrupted") and statuses[-1][2]
    assert store.conversation(cid).to_tuples()[-1][0] == FIRST
    store.close()

    again = repl.send(SECOND, "tok/s")  # the engine is usable after the interruption
    assert reply_text(again, SECOND)
    assert usage_of(again)[3] == 1  # one earlier turn kept: the interrupted one is gone

    repl.child.sendline("/exit")
    assert repl.finish() == 0


def test_chat_with_piped_stdin(cli):
    result = cli.ok("chat", "-t", "0", "--max-new-tokens", "8", "--threads", "1",
                    stdin="hello\n/exit\n")
    lines = result.out.splitlines()
    assert lines[0].startswith("rolechat · ") and "persona concise" in lines[0]
    if lines[-1].startswith("[the reply stopped at max_new_tokens (8)"):
        lines.pop()  # a cut reply says so after its usage line
    assert USAGE.search(lines[-1]), result.out  # the reply's usage line comes last
    assert "\n".join(lines[1:-1]).strip()  # the reply
    assert result.err == ""


def test_piped_chat_ends_at_end_of_input(cli):
    result = cli.ok("chat", *cli.FAST, stdin="hello\n\n/prompt\n")
    assert "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n" in result.out
    usage_of(result.out)


def test_system_undo_retry_and_multiline_in_a_terminal(spawn_repl):
    repl = spawn_repl(*SHORT)
    assert "system prompt set" in repl.send("/system You are a pirate.", "system prompt set")
    shown = repl.send("/prompt", "<|im_start|>system")
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in shown

    first = repl.send(FIRST, "tok/s")
    answer = reply_text(first, FIRST)
    second = repl.send(SECOND, "tok/s")
    assert usage_of(second)[3] == 1

    undone = repl.send("/undo", "removed the last turn")
    assert SECOND in undone
    shown = repl.send("/prompt", "<|im_start|>system")
    assert FIRST in shown and SECOND not in shown

    retried = repl.send("/retry", "tok/s")
    assert f"retrying: {FIRST}" in retried
    assert reply_text(retried, f"retrying: {FIRST}]") == answer  # greedy: the same reply
    assert usage_of(retried)[3] == 0  # the first turn was taken out before sending again
    shown = repl.send("/prompt", "<|im_start|>system")
    assert shown.count(FIRST) == 1

    # Esc then Enter inserts a newline; Enter alone sends the whole message.
    repl.child.send("Line one.\x1b\r")
    repl.child.send("Line two.\r")
    repl.expect("tok/s")
    repl.wait_prompt()
    shown = repl.send("/prompt", "<|im_start|>system")
    assert "<|im_start|>user\nLine one.\nLine two.<|im_end|>" in shown

    assert "nothing to undo" not in repl.send("/undo", "removed the last turn")
    repl.send("/undo", "removed the last turn")
    assert "nothing to undo" in repl.send("/undo", "nothing to undo")

    repl.child.sendeof()
    assert repl.finish() == 0


def test_resume_the_last_conversation_with_continue(spawn_repl):
    repl = spawn_repl(*SHORT)
    repl.send(FIRST, "tok/s")
    repl.child.sendeof()  # Ctrl-D
    assert repl.finish() == 0

    resumed = spawn_repl("-c", *SHORT)
    # It says which conversation it resumed, and shows the last turn.
    assert re.search(r"continuing conversation \d+ \"What is the capital of France\?\" "
                     r"\(1 turn\(s\)\); last:", resumed.intro)
    assert f"you: {FIRST}" in resumed.intro and "reply: " in resumed.intro
    shown = resumed.send("/prompt", "<|im_start|>system")
    assert f"<|im_start|>user\n{FIRST}<|im_end|>\n<|im_start|>assistant\n" in shown
    second = resumed.send(SECOND, "tok/s")
    assert usage_of(second)[3] == 1  # the first session's turn is in the prompt
    resumed.child.sendeof()
    assert resumed.finish() == 0


def screen_of(repl) -> list[str]:
    """The terminal's lines, scrollback first, as a terminal emulator shows what the REPL
    wrote."""
    return screen_lines(repl.log.getvalue(), repl.columns, 40)


def words_of(text: str) -> list[str]:
    """Latin words and numbers, and each Chinese character; Markdown's syntax (emphasis,
    bullets) and punctuation left out."""
    return re.findall(r"[A-Za-z0-9']+|[\u4e00-\u9fff]", text)


LONG = {"english": "Write two long paragraphs about the history of the ocean and ships.",
        "chinese": "用中文写两段关于海洋和船只历史的长文章。"}


@pytest.mark.parametrize(("language", "columns", "rendering"), [
    ("english", 120, "markdown"), ("english", 40, "plain"),
    ("chinese", 120, "plain"), ("chinese", 40, "markdown")])
def test_a_long_reply_shows_every_stored_word(spawn_repl, language, columns, rendering):
    repl = spawn_repl("--render", rendering, "-t", "0", "--max-new-tokens", "160", "--threads",
                      "1", columns=columns)
    repl.send(LONG[language], "tok/s")
    store = Store(repl.home / "rolechat.db")
    message = store.messages(store.latest())[-1]
    store.close()
    reply = message.content
    assert message.tokens is not None and message.tokens >= 150, reply
    lines = screen_of(repl)
    start = next(i for i, line in enumerate(lines) if line.startswith("you ›"))
    start += -(-wcswidth("you › " + LONG[language]) // columns) - 1  # the message's last line
    end = next(i for i in range(start, len(lines)) if re.match(r"\d+ tokens · ", lines[i]))
    shown = lines[start + 1:end]
    assert len(shown) > 1 and all(len(line) <= columns for line in shown), shown
    if language == "chinese" and rendering == "markdown":  # rich may fold a Latin word here
        assert "".join(words_of("\n".join(shown))) == "".join(words_of(reply)), (reply, shown)
    else:  # every word of the stored reply, once, in order
        assert words_of("\n".join(shown)) == words_of(reply), (reply, shown)
    repl.child.sendeof()
    assert repl.finish() == 0


def test_markdown_rendering_shows_each_reply_once(spawn_repl):
    repl = spawn_repl("--render", "markdown", *SHORT)
    repl.send("List three fruits, with **bold** names.", "tok/s")
    store = Store(repl.home / "rolechat.db")
    reply = store.messages(store.latest())[-1].content
    store.close()
    lines = screen_of(repl)
    shown = "\n".join(lines)
    words = re.findall(r"[A-Za-z]{3,}", reply)
    assert words, reply
    # Every word of the reply is on the screen, in order, the first one only once: the
    # stream was rendered in place, not printed raw and then again.
    found = re.search(".*?".join(re.escape(w) for w in words), shown, re.S)
    assert found, (reply, shown)
    below = shown.split("with **bold** names.", 1)[1].splitlines()
    after = "\n".join(itertools.takewhile(lambda line: "tok/s" not in line, below))  # the reply
    assert after.count(words[0]) == reply.count(words[0]), (reply, shown)
    assert sum(1 for line in lines if "tok/s" in line) == 1
    assert not any(set(line.strip()) == {"─"} for line in lines if line.strip())  # no rule
    assert "**" not in after  # Markdown is rendered
    repl.child.sendeof()
    assert repl.finish() == 0


def test_triple_quoted_block_is_one_message(spawn_repl):
    repl = spawn_repl(*SHORT)
    repl.child.sendline('"""First line of a block.')
    repl.expect("...")  # the continuation prompt
    repl.child.sendline("")
    repl.child.sendline('Last line."""')
    repl.expect("tok/s")
    repl.wait_prompt()
    shown = repl.send("/prompt", "<|im_start|>system")
    assert "<|im_start|>user\nFirst line of a block.\n\nLast line.<|im_end|>" in shown
    repl.child.sendeof()
    assert repl.finish() == 0


def test_a_cut_reply_says_so_and_continue_extends_it(spawn_repl):
    repl = spawn_repl("-t", "0", "--max-new-tokens", "6", "--threads", "1")
    cut = repl.send("Write a long story about a dragon.", "/continue")
    assert "stopped at max_new_tokens (6)" in cut
    store = Store(repl.home / "rolechat.db")
    cid = store.latest()
    first = store.messages(cid)[-1].content
    more = repl.send("/continue", "tok/s")
    assert usage_of(more)[0] >= 1
    after = store.messages(cid)
    store.close()
    assert [m.role for m in after] == ["user", "assistant"]  # no new turn: the same reply...
    assert after[-1].content.startswith(first) and len(after[-1].content) > len(first)
    shown = repl.send("/prompt", "<|im_start|>system")
    assert f"{after[-1].content}<|im_end|>" in shown  # ...goes on, and into the next prompt
    repl.child.sendeof()
    assert repl.finish() == 0


def test_plain_replies_wrap_between_words_history_and_persona(spawn_repl):
    repl = spawn_repl("--render", "plain", "-t", "0", "--max-new-tokens", "40", "--threads",
                      "1", columns=40)
    repl.send("Tell me about the sea.", "tok/s")
    store = Store(repl.home / "rolechat.db")
    reply = store.messages(store.latest())[-1].content
    store.close()
    lines = screen_of(repl)
    start = min(i for i, line in enumerate(lines) if "about the sea." in line) + 1
    end = next(i for i in range(start, len(lines)) if "tok/s" in lines[i])
    shown = lines[start:end]
    assert len(shown) > 1 and all(len(line) <= 40 for line in shown)
    # Every word is whole on one line: the screen's words are the reply's words.
    assert " ".join(shown).split() == reply.split(), (reply, shown)

    history = repl.send("/history", "[1] you ›")
    assert "[1] you › Tell me about the sea." in history

    assert "own system prompt" not in repl.send("/persona", "concise")
    repl.send("/system You are a pirate.", "system prompt set")
    assert "with your own system prompt" in repl.send("/persona", "own system prompt")
    repl.child.sendeof()
    assert repl.finish() == 0


def test_functions_show_each_call_and_result_before_the_reply(spawn_repl, rolechat_home,
                                                              tmp_path):
    tools = tmp_path / "tools.py"
    tools.write_text('from typing import Annotated\n\nfrom pydantic import Field\n\n\n'
                     'def get_weather(city: Annotated[str, Field(max_length=30)]) -> str:\n'
                     '    """The current weather in a city."""\n'
                     '    return f"WEATHER-{city.upper()}-21C"\n\n\n'
                     'def _helper() -> None:\n    pass\n')
    session = spawn_repl("--functions", str(tools), "--tool-choice", "get_weather", "-t", "0",
                         "--max-new-tokens", "60", "--threads", "1")
    output = session.send("What is the weather in Paris?", "WEATHER-")  # up to the prompt
    assert "→ get_weather(" in output and "← WEATHER-" in output
    assert output.index("→ get_weather(") < output.index("← WEATHER-")
    session.child.sendeof()
    assert session.finish() == 0
    from rolechat.store import Store

    store = Store(rolechat_home / "rolechat.db")
    try:
        (info,) = store.recent()
        turn = store.conversation(info.id).turns[-1]
    finally:
        store.close()
    assert [m.role for m in turn.steps][:2] == ["assistant", "tool"]
    assert turn.steps[0].tool_calls[0].name == "get_weather"
    assert turn.steps[1].content.startswith("WEATHER-")


def test_a_bad_functions_file_is_one_clear_error(cli, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert "failed to load: SyntaxError" in cli.fails("chat", "--functions", str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("import os\n")
    assert "defines no public function" in cli.fails("chat", "--functions", str(empty))
    ok = tmp_path / "ok.py"
    ok.write_text("def f(x: int) -> int:\n    return x\n")
    assert "--tool-choice 'g'" in cli.fails("chat", "--functions", str(ok), "--tool-choice",
                                            "g")
