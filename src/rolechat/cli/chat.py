"""``rolechat chat``: an interactive, streaming conversation (see :mod:`rolechat.cli.repl`)."""

from __future__ import annotations

from typing import Any

import click

from ..paths import home_dir
from . import cli
from .options import (
    generation_options,
    kv_disk_option,
    model_options,
    open_chat,
    persona_options,
    store_options,
)
from .repl import run


@cli.command()
@persona_options
@store_options
@generation_options
@model_options
@kv_disk_option
def chat(**options: Any) -> None:
    """Chat interactively; every turn is saved. Type /help for the slash commands, Ctrl-D to
    leave; `rolechat chat -c` picks up where you left off."""
    session = open_chat(options)
    run(session, history_file=home_dir() / "input_history")


__all__ = ["chat", "click"]
