"""``rolechat conversations``: list, search, show, export, import and delete conversations.

Contract: ``list``, ``search``, ``show`` and ``export`` only read: they open the store read-only,
so they work on a read-only or full store, and never change it. ``show`` and ``export``
include every message (interrupted ones marked). ``import`` checks the whole file before
writing anything and writes it in one transaction; a last user message without a reply is kept,
marked interrupted, and said so on stderr. A damaged conversation is listed (flagged) and can be
shown, exported and deleted; what cannot be read of it is said on stderr. ``search`` prints one
line a hit (its match highlighted on a terminal, plain text in a pipe; ``--json``: a list of
hits) and searches every conversation, whoever owns it (:mod:`rolechat.store_search`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..engines.snapshots import conversation_snapshot, delete_conversation_files
from ..errors import InvalidInput
from ..store import Store
from ..store_search import flat_text
from ..transfer import read_import
from . import cli
from .options import open_store
from .render import echo


def read_store() -> Store:
    """The store, opened read-only: nothing a reading command does can change it."""
    return Store.default(read_only=True)


def damage_note(store: Store, cid: int) -> None:
    """One stderr line when conversation ``cid`` has a damaged field (left out of the output)."""
    damaged = store.info(cid, damaged_ok=True).damaged
    if damaged:
        fields = "; ".join(f"its {name} field {why}" for name, why in damaged.items())
        echo(f"note: conversation {cid} is damaged ({fields}); left out here", err=True)


@cli.group()
def conversations() -> None:
    """Saved conversations (every `rolechat chat` and `ask` is saved unless --no-log)."""


@conversations.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def list_(limit: int) -> None:
    """The most recent conversations."""
    table = Table()
    for column in ("id", "title", "turns", "persona", "updated"):
        table.add_column(column)
    damaged = []
    for info in read_store().recent(limit):
        title = info.title
        if info.damaged:
            damaged.append(info.id)
            title = f"{title} [damaged: {', '.join(info.damaged)}]".lstrip()
        table.add_row(str(info.id), Text(title), str(info.turns), info.persona or "",
                      info.updated_at[:19].replace("T", " "))
    Console(width=None if Console().is_terminal else 160).print(table)
    if damaged:
        names = ", ".join(map(str, damaged))
        echo(f"note: conversation(s) {names} are damaged and cannot be continued; "
             f"`rolechat conversations show ID` shows what they hold", err=True)


@conversations.command()
@click.argument("text")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True,
              help="At most this many hits.")
@click.option("--json", "as_json", is_flag=True, help="The hits as a JSON list.")
def search(text: str, limit: int, as_json: bool) -> None:
    """Search every conversation's messages and titles for TEXT (every word of it, anywhere;
    words under 3 characters are matched by a slower scan). One line a hit: conversation id,
    title, role, and where it matched (highlighted on a terminal)."""
    hits = read_store().search(text, limit=limit)
    if as_json:
        click.echo(json.dumps([{"conversation_id": hit.conversation_id, "title": hit.title,
                                **hit.to_json()} for hit in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        echo(f"no conversation holds {text!r}", err=True)
        return
    console = Console(highlight=False, soft_wrap=True)
    for hit in hits:
        line = Text()
        line.append(f"{hit.conversation_id:>4}  ", style="bold")
        line.append(flat_text(hit.title) or "(untitled)", style="cyan")
        line.append(f"  {hit.role or 'title'}: ", style="dim")
        for part, matched in hit.parts:
            line.append(part, style="bold yellow" if matched else "")
        if console.is_terminal:
            console.print(line)
        else:
            click.echo(line.plain)
    cid = hits[0].conversation_id
    echo(f"open one with `rolechat chat --cid {cid}` (`rolechat conversations show {cid}` "
         "prints it)", err=True)


@conversations.command()
@click.argument("cid", type=int)
def show(cid: int) -> None:
    """Print conversation CID as Markdown (every message; interrupted ones marked)."""
    store = read_store()
    text = store.export(cid, "md")
    damage_note(store, cid)
    echo(text)


@conversations.command()
@click.argument("cid", type=int)
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="json",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of stdout.")
def export(cid: int, fmt: str, output: Path | None) -> None:
    """Export conversation CID (json can be imported again)."""
    store = read_store()
    text = store.export(cid, fmt)
    damage_note(store, cid)
    if output is None:
        click.echo(text)  # as it is: a file's content, to be saved or piped
    else:
        output.write_text(text + "\n", encoding="utf-8")
        echo(f"wrote {output}", err=True)


@conversations.command("import")
@click.argument("file", type=click.File("rb"))
def import_(file: BinaryIO) -> None:
    """Import FILE (an OpenAI message list or rolechat's JSON; - for stdin). The whole file is
    checked first, then written at once; a last message without a reply is kept, marked
    interrupted."""
    raw = file.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{file.name} is not UTF-8 text: byte {raw[exc.start]:#04x} at "
                           f"offset {exc.start} cannot be decoded.",
                           "Save the file as UTF-8 (rolechat export writes UTF-8).") from None
    plan = read_import(text)  # checked in full before the store is even opened
    cid = open_store().write_import(plan)
    click.echo(cid)
    if plan.unanswered:
        echo("note: the file's last message has no reply; it is kept as an unanswered "
             "message, marked interrupted (shown and exported, not part of a turn)",
             err=True)
    echo(f"imported as conversation {cid}; continue it with `rolechat chat --cid {cid}`",
         err=True)


@conversations.command()
@click.argument("cid", type=int)
def delete(cid: int) -> None:
    """Delete conversation CID (and its KV snapshot files)."""
    store = open_store()
    store.delete(cid)
    delete_conversation_files(store.kv_root, conversation_snapshot(cid))
    echo(f"deleted conversation {cid}", err=True)
