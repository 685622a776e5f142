"""``rolechat chat``: an interactive, streaming conversation (see :mod:`rolechat.cli.repl`)."""

from __future__ import annotations

from typing import Any

import click

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
def chat(render: str, no_log: bool, **options: Any) -> None:
    """Chat interactively; every turn is saved. Type /help for the slash commands, Ctrl-D to
    leave; `rolechat chat -c` picks up where you left off."""
    session = open_chat(options, log=not no_log)
    history = None if no_log else home_dir() / "input_history"
    run(session, history_file=history, rendering=render)


__all__ = ["chat", "click"]
