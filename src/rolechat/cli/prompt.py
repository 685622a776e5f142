"""``rolechat prompt``: print the exact text the model receives for a conversation.

The rendered text goes to stdout byte for byte (no added newline; on a terminal, wrapped between
words at its width); the token count goes to stderr, so ``rolechat prompt conv.json >
prompt.txt`` captures exactly the model's input. With ``--window``, a conversation that ends
with a reply (rolechat's own exports) is planned for the next message, as the server's dry run
does: the conversation so far and an open user turn; the note on stderr says so.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..conversation import Conversation, Message
from ..errors import InvalidInput
from ..persona import get_persona
from ..window import Window
from . import cli
from .options import generation_options, model_options, open_engine, params_from
from .render import echo, wrapped


def _from_arguments(system: str | None, users: tuple[str, ...], assistants: tuple[str, ...],
                    persona: str | None) -> Conversation:
    if not users:
        raise InvalidInput("Nothing to render.",
                           "Pass a conversation JSON file, or --user TEXT (and --system).")
    if len(assistants) not in (len(users) - 1, len(users)):
        raise InvalidInput(f"{len(users)} --user and {len(assistants)} --assistant messages do "
                           "not alternate.", "Give one --assistant between each two --user.")
    messages = []
    for index, user in enumerate(users):
        messages.append(Message("user", user))
        if index < len(assistants):
            messages.append(Message("assistant", assistants[index]))
    if system is None and persona is not None:
        system = get_persona(persona).system
    return Conversation(system, messages)


@cli.command()
@click.argument("file", type=click.File("r", encoding="utf-8"), required=False)
@click.option("--system", "-s", default=None, help="System prompt.")
@click.option("--persona", "-p", default=None, help="Use this persona's system prompt.")
@click.option("--user", "-u", "users", multiple=True, help="A user message (repeat).")
@click.option("--assistant", "-a", "assistants", multiple=True,
              help="An assistant reply (repeat; they interleave with --user).")
@click.option("--window", "apply_window", is_flag=True,
              help="Apply the sliding window: show only what fits in the context.")
@generation_options
@model_options
def prompt(file: Any, system: str | None, persona: str | None, users: tuple[str, ...],
           assistants: tuple[str, ...], apply_window: bool, **options: Any) -> None:
    """Render FILE (a JSON message list or a rolechat conversation; - for stdin) or the given
    messages with the model's own chat template."""
    if file is not None:
        if users or assistants:
            raise InvalidInput("Give either a FILE or --user/--assistant messages, not both.",
                               "Drop one of them.")
        conversation = Conversation.from_json(file.read())
        if system is not None or persona is not None:
            conversation.system = system if system is not None else get_persona(persona).system
    else:
        conversation = _from_arguments(system, users, assistants, persona)
    params = params_from(options)
    engine = open_engine(options)
    messages = conversation.prompt_messages()
    note = ""
    if apply_window:
        pending = conversation.pending
        if pending is None:  # it ends with a reply: the next message, not written yet
            history, pending = conversation, ""
        else:
            history = Conversation(conversation.system, conversation.messages[:-1])
        plan = Window().plan(history, pending, engine, params)
        messages, note = plan.messages, f" · window: {plan.summary()}"
        if conversation.pending is None:
            note += (" · the conversation ends with a reply: planned for the next message "
                     "(an open user turn)")
    ends_with_user = bool(messages) and messages[-1].role == "user"
    text = engine.template.render(messages, add_generation_prompt=ends_with_user)
    sys.stdout.write(wrapped(text, sys.stdout))
    sys.stdout.flush()
    tokens = engine.count_tokens(messages, add_generation_prompt=ends_with_user)
    budget = engine.context_length - params.max_new_tokens
    if tokens > budget and not apply_window:
        note += (f" · does not fit: {tokens} > {budget} (context - max_new_tokens); "
                 "--window shows what would be sent")
    echo(f"\n[{tokens} tokens · context {engine.context_length}{note}]", err=True)
