"""``rolechat personas``: list the built-in and user personas."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ..persona import DEFAULT_PERSONA, load_personas, persona_dir
from . import cli
from .render import echo


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def personas(as_json: bool) -> None:
    """List personas (built-ins, and TOML files in the personas folder)."""
    found, broken = load_personas()
    if as_json:
        click.echo(json.dumps([
            {"name": p.name, "description": p.description, "system": p.system,
             "params": p.params.explicit(), "source": p.source} for p in found.values()
        ], ensure_ascii=False, indent=2))
    else:
        table = Table(show_lines=False)
        for column in ("name", "description", "params", "source"):
            table.add_column(column)
        for p in found.values():
            params = ", ".join(f"{k}={v}" for k, v in p.params.explicit().items())
            mark = " (default)" if p.name == DEFAULT_PERSONA else ""
            table.add_row(p.name + mark, p.description, params, p.source)
        console = Console(width=None if Console().is_terminal else 160)
        console.print(table)
        console.print(f"Add your own: {persona_dir()}/NAME.toml", style="dim")
    for name, exc in broken.items():
        echo(f"warning: persona {name!r} is broken: {exc}", err=True)
