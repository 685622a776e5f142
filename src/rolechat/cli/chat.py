"""``rolechat chat``: an interactive, streaming conversation (see :mod:`rolechat.cli.repl`)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import InvalidInput
from ..functions import load_functions
from ..paths import home_dir
from . import cli
from .options import (
    generation_options,
    kv_disk_option,
    memory_options,
    model_options,
    open_chat,
    persona_options,
    store_options,
)
from .render import RENDERINGS
from .repl import run


@cli.command()
@persona_options
@store_options
@generation_options
@model_options
@kv_disk_option
@memory_options
@click.option("--render", type=click.Choice(RENDERINGS), default="markdown", show_default=True,
              help="How replies show on a terminal: rendered Markdown, or plain text.")
@click.option("--no-log", is_flag=True,
              help="Do not save this chat (with -c/--cid: continue without saving).")
@click.option("--functions", "functions_file", metavar="FILE.py",
              help="Offer the model the public functions FILE.py defines as tools: its calls "
                   "run, and each call and its result show before the reply.")
@click.option("--tool-choice", metavar="CHOICE", default="auto", show_default=True,
              help="With --functions: auto (the model decides), required (it must call one "
                   "first), or a function's name (it must call that one first).")
def chat(render: str, no_log: bool, functions_file: str | None, tool_choice: str,
         **options: Any) -> None:
    """Chat interactively; every turn is saved. Type /help for the slash commands, Ctrl-D to
    leave; `rolechat chat -c` picks up where you left off."""
    functions = load_functions(functions_file) if functions_file is not None else []
    choice = tool_choice_option(tool_choice, functions)
    session = open_chat(options, log=not no_log)
    history = None if no_log else home_dir() / "input_history"
    run(session, history_file=history, rendering=render, functions=functions,
        tool_choice=choice)


def tool_choice_option(value: str, functions: list[Any]) -> Any:
    """``--tool-choice`` as the library takes it (checked against the functions)."""
    names = [f.__name__ for f in functions]
    if value in ("auto", "required", "none"):
        return value
    if value in names:
        return {"type": "function", "function": {"name": value}}
    raise InvalidInput(f"--tool-choice {value!r} is not auto, required, none or a function "
                       f"of --functions ({', '.join(names) or 'none given'}).",
                       "Pick one of those.", field="tool_choice")


__all__ = ["chat", "click"]
