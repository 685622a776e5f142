"""``rolechat serve``: the OpenAI-compatible HTTP server over one engine, run by uvicorn with
the listener's timeouts and connection bound (:mod:`rolechat.server.listen`)."""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Any

import click

from ..engines.snapshots import format_size
from ..errors import ModelLoadError
from . import cli
from .options import (
    SERVE_PARALLEL,
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
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True,
              help="Seconds a request's headers may take to arrive (else 408, connection closed).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=20.0,
              show_default=True,
              help="Seconds a request's body may take to arrive after its headers (else 408).")
@click.option("--keep-alive", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seconds an idle connection stays open between requests.")
@click.option("--max-connections", type=click.IntRange(min=1), default=100, show_default=True,
              help="Open connections at most; one more is answered 503 and closed.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="llama.cpp: replies generated at once, batched (each holds a whole "
                   f"context; more wait in a queue) [default: {SERVE_PARALLEL}].")
@memory_options
def serve(host: str, port: int, server_keys: tuple[str, ...], max_body_bytes: int,
          cors_origins: tuple[str, ...], header_timeout: float, body_timeout: float,
          keep_alive: int, max_connections: int, parallel: int | None,
          **options: Any) -> None:
    """Serve the model over an OpenAI-compatible API (POST /v1/chat/completions)."""
    try:
        import uvicorn

        from ..server import create_app
        from ..server.listen import config
    except ImportError as exc:
        raise ModelLoadError("server", f"{exc.name} is not installed",
                             "Install the extra: pip install 'rolechat[server]'") from None
    keys = list(server_keys) or [k for k in [os.environ.get("ROLECHAT_API_KEY", "")] if k]

    window = window_from(options, None)
    store = open_store()
    disk = kv_disk(store, options.pop("kv_cache_disk", None))
    engine = open_engine(options, api_key_flag="--remote-api-key", kv_disk=disk,
                         parallel=parallel, serving=True)
    app = create_app(engine, api_keys=keys, max_body_bytes=max_body_bytes,
                     body_timeout=body_timeout, cors_origins=cors_origins, store=store,
                     window=window)
    described = engine.describe()
    batched, kv = described.get("parallel", 1), described.get("kv_cache_bytes")
    err_console.print(f"rolechat serving {engine.model} on http://{host}:{port}/v1"
                      + (f" · {batched} replies at once" if batched > 1 else "")
                      + (f" · KV cache {format_size(kv)}" if kv else "")
                      + (" (API key required)" if keys else ""), style="dim")
    server = uvicorn.Server(config(app, host=host, port=port, header_timeout=header_timeout,
                                   body_timeout=body_timeout, keep_alive=keep_alive,
                                   max_connections=max_connections))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:  # uvicorn logged why (the port is taken, ...)
        raise SystemExit(3)
