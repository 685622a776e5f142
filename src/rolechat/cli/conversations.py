"""``rolechat conversations``: list, show, export, import and delete saved conversations."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import click
from rich.console import Console
from rich.table import Table

from ..errors import InvalidInput
from . import cli
from .options import open_store


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
    for info in open_store().recent(limit):
        table.add_row(str(info.id), info.title, str(info.turns), info.persona or "",
                      info.updated_at[:19].replace("T", " "))
    Console(width=None if Console().is_terminal else 160).print(table)


@conversations.command()
@click.argument("cid", type=int)
def show(cid: int) -> None:
    """Print conversation CID as Markdown."""
    click.echo(open_store().export(cid, "md"))


@conversations.command()
@click.argument("cid", type=int)
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="json",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of stdout.")
def export(cid: int, fmt: str, output: Path | None) -> None:
    """Export conversation CID (json can be imported again)."""
    text = open_store().export(cid, fmt)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


@conversations.command("import")
@click.argument("file", type=click.File("rb"))
def import_(file: BinaryIO) -> None:
    """Import FILE (an OpenAI message list or rolechat's JSON; - for stdin)."""
    raw = file.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{file.name} is not UTF-8 text: byte {raw[exc.start]:#04x} at "
                           f"offset {exc.start} cannot be decoded.",
                           "Save the file as UTF-8 (rolechat export writes UTF-8).") from None
    cid = open_store().import_file(text)
    click.echo(cid)
    click.echo(f"imported as conversation {cid}; continue it with `rolechat chat --cid {cid}`",
               err=True)


@conversations.command()
@click.argument("cid", type=int)
def delete(cid: int) -> None:
    """Delete conversation CID."""
    open_store().delete(cid)
    click.echo(f"deleted conversation {cid}", err=True)
