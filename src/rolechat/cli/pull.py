"""``rolechat pull [NAME]``: download a model by its alias or hub name (:mod:`rolechat.pulling`).

With a NAME, the model's GGUF goes into its hub's own cache, with the hub library's progress bar,
and the command ends by saying how to chat with it. With no NAME, the curated aliases are listed
with their download size, the RAM each needs and its licence, and the best one for this machine's
RAM is suggested. ``--hub`` picks the hub for an alias (default: ``$ROLECHAT_HUB``, else
ModelScope in a mainland-Chinese locale, else Hugging Face).
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ..catalog import ALIASES, suggest
from ..hubs import HUB_NAMES, default_hub
from . import cli
from .render import echo


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def total_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def pull_now(name: str, hub: str | None) -> str:
    """Pull ``name``, telling the user on stderr; the name to chat with it by."""
    from ..catalog import ALIASES
    from ..pulling import pull

    alias = ALIASES.get(name)
    if alias is not None and alias.ram > total_ram():
        echo(f"warning: {name} needs about {_gb(alias.ram)} of RAM to chat and this machine "
             f"has {_gb(total_ram())}: it may not load. rolechat pull (no name) suggests one "
             "that fits.", err=True)
    model = pull(name, hub, say=lambda line: echo(line, err=True))
    return model.name


@cli.command("pull")
@click.argument("name", required=False)
@click.option("--hub", type=click.Choice(tuple(HUB_NAMES)), default=None,
              help="Where to pull an alias from [default: $ROLECHAT_HUB, else modelscope in a "
                   "zh_CN locale, else hf].")
@click.option("--json", "as_json", is_flag=True, help="With no NAME: print the aliases as JSON.")
def pull_command(name: str | None, hub: str | None, as_json: bool) -> None:
    """Download a model: an alias (qwen2.5:3b), hf:OWNER/REPO[:QUANT] or
    modelscope:OWNER/REPO[:QUANT]. With no NAME, list the aliases and suggest one."""
    if name is None:
        _list_aliases(as_json)
        return
    chosen = pull_now(name, hub)
    echo(f"Ready. Chat with it: rolechat chat --model {chosen}")


def _list_aliases(as_json: bool) -> None:
    from ..models import find_models

    here = {m.name for m in find_models().models}
    ram = total_ram()
    best = suggest(ram)
    rows = [{"name": a.name, "model": a.title, "quantization": a.quant,
             "download": a.download, "ram": a.ram, "licence": a.licence,
             "hubs": list(a.repos), "pulled": a.name in here} for a in ALIASES.values()]
    if as_json:
        click.echo(json.dumps({"aliases": rows, "suggested": best.name, "ram": ram},
                              ensure_ascii=False, indent=2))
        return
    table = Table()
    for column in ("alias", "model", "download", "RAM needed", "licence", "hubs", ""):
        table.add_column(column)
    for alias in ALIASES.values():
        mark = "pulled" if alias.name in here else ("fits" if alias.ram <= ram else "")
        table.add_row(alias.name, alias.title, _gb(alias.download), _gb(alias.ram),
                      alias.licence, ", ".join(alias.repos), mark)
    console = Console(width=None if Console().is_terminal else 200)
    console.print(table)
    echo(f"This machine has {_gb(ram)} of RAM: rolechat pull {best.name} suits it "
         f"(from {HUB_NAMES[best.repo_on(default_hub())[0]]}; --hub to choose).")
    echo("Any GGUF repo works too: rolechat pull hf:OWNER/REPO[:QUANT] or "
         "modelscope:OWNER/REPO[:QUANT].")
