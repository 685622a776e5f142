"""``rolechat models``: the models on this machine (``list``), one of them (``show``), and
removing one rolechat pulled (``rm``).

``list`` reads each GGUF's header only (no model is loaded): the embedded model, and the GGUFs
in the Hugging Face and ModelScope caches, Ollama's store and LM Studio's folder
(:mod:`rolechat.models`). Every name it prints works as ``--model NAME``. ``show NAME`` prints
the header's facts, the chat template and the sampling defaults the file asks for. ``rm NAME``
deletes a model ``rolechat pull`` downloaded, and refuses, saying whose it is, any other.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..models import find_models, resolve_model
from . import cli
from .render import echo


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


@cli.group()
def models() -> None:
    """The models on this machine: rolechat's own and those other tools downloaded."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_models(as_json: bool) -> None:
    """List every model rolechat can chat with now (use a NAME with --model)."""
    from ..pulling import pulled

    found = find_models()
    ours = {p for record in pulled() for p in record.get("paths", [])}
    rows = [{"name": m.name, "size": m.size, "pulled": str(m.path) in ours,
             "quantization": m.info.quantization,
             "architecture": m.info.architecture, "context_length": m.info.context_length,
             "source": m.source, "ref": m.ref, "path": str(m.path)} for m in found.models]
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        table = Table(show_lines=False)
        for column in ("name", "size", "quant", "context", "where"):
            table.add_column(column)
        for m in found.models:
            where = m.location + (" (pulled)" if str(m.path) in ours else "")
            table.add_row(m.name, _size(m.size), m.info.quantization or "?",
                          str(m.info.context_length or "?"), where)
        console = Console(width=None if Console().is_terminal else 200)
        console.print(table)
        console.print("Chat with one: rolechat chat --model NAME", style="dim")
    for path, why in found.problems:
        echo(f"warning: {path} left out: {why}", err=True)


@models.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(name: str, as_json: bool) -> None:
    """Show one model: its file, header, chat template and sampling defaults."""
    from ..engines.llama_cpp import gguf_sampling
    from ..engines.tokenizers import GGUFVocab

    model = resolve_model(name)
    vocab = GGUFVocab.load(model.path)
    details: dict[str, Any] = {
        "name": model.name, "path": str(model.path), "where": model.location,
        "size": model.size, "architecture": model.info.architecture,
        "model": model.info.name, "parameters": model.info.size_label,
        "quantization": model.info.quantization, "context_length": model.info.context_length,
        "sampling_defaults": gguf_sampling(vocab.metadata),
        "chat_template": vocab.template_source}
    if as_json:
        click.echo(json.dumps(details, ensure_ascii=False, indent=2))
        return
    for key, value in details.items():
        if key != "chat_template":
            click.echo(f"{key}: {value}")
    click.echo("chat_template:")
    click.echo(details["chat_template"] or "(none)")


@models.command()
@click.argument("name")
def rm(name: str) -> None:
    """Delete a model rolechat pulled (other tools' models are left alone)."""
    from ..pulling import remove

    removed, size = remove(name)
    if removed:
        echo(f"Removed {name} ({_size(size)}): " + ", ".join(str(p) for p in removed))
    else:
        echo(f"Removed {name}'s record: its files were already gone.")
