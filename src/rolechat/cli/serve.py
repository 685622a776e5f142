"""``rolechat serve``: the OpenAI-compatible HTTP server over one engine."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import click

from ..errors import ModelLoadError
from . import cli
from .options import (
    err_console,
    kv_disk,
    kv_disk_option,
    memory_options,
    model_options,
    open_engine,
    open_store,
    window_from,
)


@cli.command()
@partial(model_options, api_key_flag="--remote-api-key")
@kv_disk_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (127.0.0.1 keeps it on this machine).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", "server_keys", multiple=True,
              help="Require this bearer key on /v1 routes (repeat; or ROLECHAT_API_KEY).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=1_000_000,
              show_default=True, help="Refuse larger request bodies (413).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser requests from this origin (repeat; default: none).")
@memory_options
def serve(host: str, port: int, server_keys: tuple[str, ...], max_body_bytes: int,
          cors_origins: tuple[str, ...], **options: Any) -> None:
    """Serve the model over an OpenAI-compatible API (POST /v1/chat/completions)."""
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as exc:
        raise ModelLoadError("server", f"{exc.name} is not installed",
                             "Install the extra: pip install 'rolechat[server]'") from None
    keys = list(server_keys) or [k for k in [os.environ.get("ROLECHAT_API_KEY", "")] if k]

    window = window_from(options, None)
    store = open_store()
    disk = kv_disk(store, options.pop("kv_cache_disk", None))
    engine = open_engine(options, api_key_flag="--remote-api-key")
    app = create_app(engine, api_keys=keys, max_body_bytes=max_body_bytes,
                     cors_origins=cors_origins, store=store, kv_disk=disk, window=window)
    err_console.print(f"rolechat serving {engine.model} on http://{host}:{port}/v1"
                      + (" (API key required)" if keys else ""), style="dim")
    uvicorn.run(app, host=host, port=port, log_level="warning")
