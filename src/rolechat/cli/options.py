"""Shared CLI options: model, persona and generation flags, and how they become library objects.

Contract: generation flags are generated from :class:`~rolechat.params.GenerationParams`' own
fields (names, help), and their values are validated by that same schema, so the CLI can never
disagree with the library about names, ranges or error wording. Loading a model shows a
spinner on a terminal (stderr) and nothing otherwise.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from ..engines import ENGINES, Engine, engine_for, load_engine
from ..engines.snapshots import (
    DEFAULT_DISK_BYTES,
    DEFAULT_RAM_BYTES,
    DiskTier,
    format_size,
    parse_size,
)
from ..engines.transformers import HUBS
from ..errors import InvalidInput
from ..params import GenerationParams
from ..persona import get_persona
from ..saved import SavedChat
from ..store import Store

F = TypeVar("F", bound=Callable[..., Any])

#: Diagnostics go to stderr so stdout stays clean for answers and pipes.
err_console = Console(stderr=True, highlight=False)

_SHORT = {"temperature": "-t"}


def _click_type(field: str) -> tuple[Any, bool]:
    """(click type, multiple) for a GenerationParams field."""
    annotation = GenerationParams.model_fields[field].annotation
    if field == "stop":
        return str, True
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0], False


def generation_options(func: F) -> F:
    """Add one flag per GenerationParams field (``--max-new-tokens``, ``--temperature``, ...)."""
    for name, info in reversed(GenerationParams.model_fields.items()):
        kind, multiple = _click_type(name)
        flag = "--" + name.replace("_", "-")
        decls = [flag, _SHORT[name]] if name in _SHORT else [flag]
        default = info.default if info.default not in (None, ()) else None
        help_text = (info.description or "") + (f" [default: {default}]" if default is not None
                                                else "")
        if multiple:
            help_text += " Repeat for several."
        func = click.option(*decls, name, type=kind, multiple=multiple, default=None,
                            help=help_text)(func)
    return func


def params_from(options: dict[str, Any]) -> GenerationParams:
    """The flags the user actually gave, validated by the shared schema."""
    given = {}
    for name in GenerationParams.model_fields:
        value = options.pop(name, None)
        if value is not None and value != ():
            given[name] = value
    return GenerationParams(**given)


def model_options(func: F, *, api_key_flag: str = "--api-key") -> F:
    """The engine flags. ``rolechat serve`` names the remote engine's key ``--remote-api-key``:
    there ``--api-key`` is the key clients must present."""
    decorators = [
        click.option("--model", "-m", "model", type=str, default=None,
                     help="A .gguf file, a Hugging Face / ModelScope model folder, or with "
                          "--hub a model id (default: the embedded SmolLM2-135M-Instruct)."),
        click.option("--engine", type=click.Choice(ENGINES), default=None,
                     help="Engine (default: llama.cpp for .gguf, transformers for a folder)."),
        click.option("--hub", type=click.Choice(HUBS), default=None,
                     help="Download --model by id from this hub (transformers engine)."),
        click.option("--device", default=None,
                     help="transformers: cpu, cuda, cuda:N or auto [default: auto]."),
        click.option("--dtype", default=None,
                     help="transformers: auto, bfloat16, float16 or float32 [default: auto]."),
        click.option("--fast-decode/--no-fast-decode", default=None,
                     help="transformers: static KV cache + CUDA graphs [default: on with "
                          "CUDA]."),
        click.option("--context-length", type=click.IntRange(min=16), default=None,
                     help="Context length in tokens (default: the model's trained context, "
                          "capped at 32768)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: all physical cores)."),
        click.option("--chat-template", default=None,
                     help="Override the model's chat template (Jinja text or a file)."),
        click.option("--base-url", default=None,
                     help="openai: the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 "
                          "(implies --engine openai; --model is the served model name)."),
        click.option(api_key_flag, "api_key", default=None,
                     help="openai: the server's API key [default: $OPENAI_API_KEY, or none]."),
        click.option("--tokenizer", default=None,
                     help="openai: a .gguf file or tokenizer folder, for exact token counts "
                          "(default: a safe estimate)."),
        click.option("--kv-cache-ram", type=SIZE, default=None,
                     help="Keep conversations' KV state warm in this much RAM, e.g. 512MB "
                          f"or 0 for none [default: {format_size(DEFAULT_RAM_BYTES)}]."),
        click.option("--kv-cache-disk", type=SIZE, default=None,
                     help="Keep saved conversations' KV state in files beside the store, up "
                          f"to this size (0: none) [default: {format_size(DEFAULT_DISK_BYTES)}]."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


#: click's ParamType (generic in newer click versions, plain in older ones).
_ParamType: Any = click.ParamType


class SizeType(_ParamType):  # type: ignore[misc]
    """A size in bytes: 512MB, 2GiB, 0."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
            raise  # not reached: fail() raises


SIZE = SizeType()


def persona_options(func: F) -> F:
    func = click.option("--system", "-s", default=None,
                        help="System prompt (overrides the persona's).")(func)
    return click.option("--persona", "-p", default=None,
                        help="Persona name (see `rolechat personas`; default: concise).")(func)


def open_engine(options: dict[str, Any]) -> Engine:
    """Load the engine named by the model flags (popped from ``options``)."""
    model, engine, hub = (options.pop(k, None) for k in ("model", "engine", "hub"))
    engine_options = {k: v for k in ("context_length", "chat_template", "device", "dtype",
                                     "fast_decode", "base_url", "api_key", "tokenizer")
                      if (v := options.pop(k, None)) is not None}
    threads = options.pop("threads", None)
    if threads is not None:
        engine_options["n_threads"] = threads
    ram = options.pop("kv_cache_ram", None)
    if ram is not None:
        engine_options["kv_cache_ram"] = ram
    remote = {"base_url", "api_key", "tokenizer"}
    name = engine or ("openai" if "base_url" in engine_options else engine_for(model, hub))
    if name == "openai":
        misplaced = sorted({"device", "dtype", "fast_decode", "n_threads", "kv_cache_ram"}
                           & set(engine_options))
        if misplaced:
            flags = ", ".join("--" + ("threads" if m == "n_threads" else m.replace("_", "-"))
                              for m in misplaced)
            raise InvalidInput(f"{flags} cannot be used with the openai engine (the server "
                               "decides).", "Drop them.")
        if hub is not None:
            raise InvalidInput("--hub cannot be used with the openai engine.", "Drop it.")
        if "base_url" not in engine_options:
            raise InvalidInput("--engine openai needs --base-url.",
                               "For example: --base-url http://127.0.0.1:8000/v1")
    elif remote & set(engine_options):
        misplaced = sorted(remote & set(engine_options))
        flags = ", ".join("--" + m.replace("_", "-") for m in misplaced)
        verb = "applies" if len(misplaced) == 1 else "apply"
        raise InvalidInput(f"{flags} only {verb} to the openai engine.",
                           "Add --engine openai, or drop them.")
    if name == "llama.cpp":
        misplaced = sorted({"device", "dtype", "fast_decode"} & set(engine_options))
        if misplaced:
            flags = ", ".join("--" + m.replace("_", "-") for m in misplaced)
            verb = "applies" if len(misplaced) == 1 else "apply"
            raise InvalidInput(f"{flags} only {verb} to the transformers engine.",
                               "Add --engine transformers, or drop them.")
    if not err_console.is_terminal:
        return load_engine(model, engine=name, hub=hub, **engine_options)
    label = model or engine_options.get("base_url") or "the embedded model"
    with err_console.status(f"Loading {label}…", spinner="dots"):
        return load_engine(model, engine=name, hub=hub, **engine_options)


def store_options(func: F) -> F:
    """``-c/--continue`` and ``--cid``: resume a saved conversation."""
    func = click.option("--cid", type=int, default=None,
                        help="Continue the saved conversation with this id.")(func)
    return click.option("--continue", "-c", "resume", is_flag=True,
                        help="Continue the most recent conversation.")(func)


def open_chat(options: dict[str, Any], *, log: bool = True,
              save_overrides: bool = True) -> SavedChat:
    """A chat from the persona, system, generation, model and store flags: a new conversation,
    or the one ``-c``/``--cid`` names. With ``log`` its turns are saved in the store (a new
    conversation's row is created with its first turn); persona, system and generation flags
    given with ``-c`` are saved with the conversation only if ``save_overrides``."""
    params = params_from(options)
    persona_name = options.pop("persona", None)
    if persona_name is not None:
        get_persona(persona_name)  # fail fast, before loading a model
    system = options.pop("system", None)
    resume, cid = options.pop("resume", False), options.pop("cid", None)
    store = Store.default() if (log or resume or cid is not None) else None
    if store is not None and resume and cid is None:
        cid = store.latest()
        if cid is None:
            raise InvalidInput("There is no saved conversation to continue.",
                               "Start one with `rolechat chat`.")
    if store is not None and cid is not None:
        store.info(cid)  # an unknown id fails before the model loads
    disk = kv_disk(store if log else None, options.pop("kv_cache_disk", None))
    engine = open_engine(options)
    if store is not None and cid is not None:
        saved = SavedChat.resume(engine, store, cid, persona=persona_name, system=system,
                                 params=params, kv_disk=disk, save=log and save_overrides)
        if not log:
            saved.store = None  # the history came from the store; this exchange stays out
        return saved
    return SavedChat.new(engine, store=store if log else None, persona=persona_name,
                         system=system, params=params, kv_disk=disk)


def kv_disk(store: Store | None, max_bytes: int | None) -> DiskTier | None:
    """The KV snapshot files beside ``store`` (None without a store or with a 0 budget)."""
    if store is None or max_bytes == 0:
        return None
    return DiskTier(store.kv_root, DEFAULT_DISK_BYTES if max_bytes is None else max_bytes)


def usage_line(usage: Any) -> str:
    about = "~" if getattr(usage, "estimated", False) else ""
    cached = f"{usage.cached_tokens} cached"
    if usage.restored_tokens:
        cached += f", restored from {usage.kv_source}"
    return (f"{usage.generated_tokens} tokens · {usage.tokens_per_s:.1f} tok/s · "
            f"first token {usage.ttft_s * 1000:.0f} ms · prompt {about}{usage.prompt_tokens} "
            f"({cached})")
