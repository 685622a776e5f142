"""The interactive chat loop and its slash commands.

Contract: the REPL is a loop over one dispatch table, :data:`COMMANDS`. Each slash command is a
small function ``(repl, argument) -> bool`` (False ends the loop) that can be called without a
terminal. Replies stream to ``repl.out``; Ctrl-C during a reply stops it and discards it — the
conversation stays as it was before — and Ctrl-D (end of input) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console

from ..chat import Chat
from ..errors import RolechatError, UnknownName
from .options import usage_line

Command = Callable[["Repl", str], bool]
COMMANDS: dict[str, tuple[Command, str]] = {}


def command(name: str, help_text: str) -> Callable[[Command], Command]:
    def register(func: Command) -> Command:
        COMMANDS[name] = (func, help_text)
        return func
    return register


@dataclass
class Repl:
    chat: Chat
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def __post_init__(self) -> None:
        self.console = Console(file=self.out, highlight=False, soft_wrap=True)

    def note(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False)

    def dispatch(self, line: str) -> bool:
        """Run one slash command line; False means leave."""
        name, _, argument = line.strip().partition(" ")
        entry = COMMANDS.get(name)
        if entry is None:
            self.note(f"error: {UnknownName('command', name, COMMANDS)}", style="red")
            return True
        return entry[0](self, argument.strip())

    def reply(self, text: str) -> None:
        """Stream the reply to ``text``; Ctrl-C discards it."""
        try:
            chunks = self.chat.stream(text)
        except RolechatError as exc:
            self.note(f"error: {exc}", style="red")
            return
        try:
            for chunk in chunks:
                self.out.write(chunk)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n")
            self.note("[interrupted — reply discarded, conversation unchanged]", style="yellow")
            return
        except RolechatError as exc:
            self.out.write("\n")
            self.note(f"error: {exc}", style="red")
            return
        finally:
            chunks.close()
        self.out.write("\n")
        if chunks.reply is not None:
            self.note(usage_line(chunks.reply.usage) + " · " + chunks.reply.plan.summary())

    def handle(self, line: str) -> bool:
        """One line of input; False means leave."""
        if not line.strip():
            return True
        if line.lstrip().startswith("/"):
            return self.dispatch(line)
        self.reply(line)
        return True


@command("/help", "Show the commands.")
def _help(repl: Repl, argument: str) -> bool:
    for name, (_, help_text) in COMMANDS.items():
        repl.console.print(f"  {name:<10} {help_text}", markup=False, highlight=False)
    return True


@command("/reset", "Forget the conversation (the system prompt stays).")
def _reset(repl: Repl, argument: str) -> bool:
    repl.chat.reset()
    repl.note("[conversation cleared]")
    return True


@command("/prompt", "Show the exact text the model receives (/prompt TEXT: for that message).")
def _prompt(repl: Repl, argument: str) -> bool:
    chat = repl.chat
    try:
        if argument:
            text = chat.prompt(argument)
        else:
            messages = chat.conversation.prompt_messages(first_turn=chat.first_turn)
            text = chat.engine.template.render(messages, add_generation_prompt=False)
    except RolechatError as exc:
        repl.note(f"error: {exc}", style="red")
        return True
    repl.console.print(text, markup=False, highlight=False, end="")
    repl.console.print()
    return True


@command("/exit", "Leave (Ctrl-D does too).")
def _exit(repl: Repl, argument: str) -> bool:
    return False


def read_lines(history_file: Path | None) -> Callable[[], str]:
    """A function that reads one line: prompt_toolkit on a terminal, plain stdin otherwise.
    Raises EOFError at the end of input (Ctrl-D)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        session: PromptSession[str] = PromptSession(
            history=FileHistory(str(history_file)) if history_file else InMemoryHistory())
        return lambda: session.prompt("you › ")

    def read() -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    return read


def run(chat: Chat, history_file: Path | None = None) -> None:
    repl = Repl(chat)
    engine = chat.engine
    repl.note(f"rolechat · {Path(engine.model).name} · persona {chat.persona.name} · "
              f"context {engine.context_length} · /help for commands, Ctrl-D to leave")
    read = read_lines(history_file)
    while True:
        try:
            line = read()
        except EOFError:
            break
        except KeyboardInterrupt:
            continue
        if not repl.handle(line):
            break
