"""``rolechat ask``: one question, one streamed answer (or JSON for scripts).

The answer streams to stdout as it comes; on a terminal it is wrapped between words at the
terminal's width (:class:`~rolechat.cli.render.WordWrap`), in a pipe or a file it is the text
as it is. With ``--schema`` (a JSON Schema, a .json file, or the concise form
``'name, age int, tags list[str]'``) the answer is JSON valid under it, guaranteed by the
grammar it is decoded with, and printed indented once it is complete; a reply cut off by
``--max-new-tokens`` before its JSON ends is an error (exit 1), never half a JSON value.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..conversation import check_text
from ..errors import InvalidInput, RolechatError
from ..schemas import check_schema, load_schema
from . import cli
from .options import (
    err_console,
    generation_options,
    kv_disk_option,
    memory_options,
    model_options,
    open_chat,
    persona_options,
    store_options,
    usage_line,
)
from .render import WordWrap, terminal_size


@cli.command()
@click.argument("text", nargs=-1)
@persona_options
@store_options
@generation_options
@model_options
@kv_disk_option
@memory_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: response, usage, finish_reason, window.")
@click.option("--schema", metavar="SCHEMA",
              help="Answer with JSON valid under SCHEMA: a JSON Schema, a .json file, or the "
                   "concise form 'name, age int, tags list[str]'.")
@click.option("--usage", "show_usage", is_flag=True, help="Print token usage and speed to stderr.")
@click.option("--no-log", is_flag=True, help="Do not save this exchange in the store.")
def ask(text: tuple[str, ...], as_json: bool, schema: str | None, show_usage: bool,
        no_log: bool, **options: Any) -> None:
    """Ask one question. TEXT is read from stdin when not given."""
    if text:
        question = " ".join(text)
    elif not sys.stdin.isatty():
        question = sys.stdin.read().rstrip("\r\n")
    else:
        raise InvalidInput("No question given.", 'Pass it: rolechat ask "Why is the sky blue?"')
    check_text(question, "question")  # before loading a model
    checked = check_schema(load_schema(schema)) if schema is not None else None
    saved = open_chat(options, log=not no_log, save_overrides=False)
    chat = saved.chat
    if checked is not None:
        reply = saved.send(question, schema=checked)
        if reply.finish_reason == "length":
            raise RolechatError(f"The answer ran out of tokens ({reply.usage.generated_tokens})"
                                " before its JSON ended.", "Raise --max-new-tokens.")
        if not as_json:
            click.echo(json.dumps(reply.parsed, ensure_ascii=False, indent=2))
            if show_usage:
                err_console.print(usage_line(reply.usage), style="dim")
            return
    if as_json:
        reply = reply if checked is not None else saved.send(question)
        extra = {"parsed": reply.parsed} if checked is not None else {}
        click.echo(json.dumps({**extra,
            "response": reply.text, "finish_reason": reply.finish_reason,
            "usage": reply.usage.to_dict(), "window": reply.plan.to_dict(),
            "persona": chat.persona.name, "model": chat.engine.model,
            "conversation_id": saved.cid,
        }, ensure_ascii=False, indent=2))
        return
    size = terminal_size(sys.stdout)
    wrap = WordWrap(size.columns) if size is not None else None
    try:
        with saved.stream(question) as chunks:
            for chunk in chunks:
                click.echo(wrap.push(chunk) if wrap is not None else chunk, nl=False)
    finally:  # what was held back (the last word), even when the reply stopped
        if wrap is not None:
            click.echo(wrap.finish(), nl=False)
    click.echo()
    if show_usage and chunks.reply is not None:
        err_console.print(usage_line(chunks.reply.usage), style="dim")
