"""``rolechat serve``: the OpenAI-compatible HTTP server over one engine, run by uvicorn with
the listener's timeouts and connection bound (:mod:`rolechat.server.listen`).

With a GGUF model (llama.cpp), the server can switch to any other model on this machine when a
request names it (:mod:`rolechat.server.switch`): it loads it through :func:`loader_for`, with
the options `serve` was started with; ``--no-switch`` pins the model it started with."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import click

from ..engines import Engine
from ..engines.snapshots import DiskTier, format_size
from ..errors import ModelLoadError
from ..models import is_model_name, resolve_model
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
@click.option("--no-switch", "no_switch", is_flag=True,
              help="Serve only this model: requests naming another one get 404 (by default "
                   "a request may name any model on this machine, and it is loaded).")
@memory_options
def serve(host: str, port: int, server_keys: tuple[str, ...], max_body_bytes: int,
          cors_origins: tuple[str, ...], header_timeout: float, body_timeout: float,
          keep_alive: int, max_connections: int, parallel: int | None, no_switch: bool,
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
    model_options_given = dict(options)  # open_engine takes its options out of the dict
    engine = open_engine(options, api_key_flag="--remote-api-key", kv_disk=disk,
                         parallel=parallel, serving=True)
    switches = not no_switch and engine.kind == "llama.cpp"
    app = create_app(engine, api_keys=keys, max_body_bytes=max_body_bytes,
                     body_timeout=body_timeout, cors_origins=cors_origins, store=store,
                     window=window, model_name=model_options_given.get("model"),
                     loader=loader_for(model_options_given, disk, parallel)
                     if switches else None)
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


def loader_for(options: dict[str, Any], disk: DiskTier | None,
               parallel: int | None) -> Callable[[str | None], Engine]:
    """What loads another model for the server: the engine flags `serve` was started with
    (context length, threads, GPU layers, KV RAM...), the same KV files beside the store (each
    model's under its own identity) and ``--parallel``; ``model`` in place of ``--model``
    (``--chat-template`` only for the model it was given with). Each engine gets a KV store
    of its own."""
    def load(model: str | None) -> Engine:
        given = {**options, "model": model}
        given.pop("pull_yes", None)  # a request never downloads a model, nor asks to
        if model != options.get("model"):  # a chat template is the start model's own
            given.pop("chat_template", None)
        if model is not None and is_model_name(model):
            resolve_model(model)  # still on this machine (else the error, before any prompt)
        engine = open_engine(given, api_key_flag="--remote-api-key", kv_disk=disk,
                             parallel=parallel, serving=True)
        err_console.print(f"rolechat now serving {model or engine.model}", style="dim",
                          markup=False)
        return engine

    return load
