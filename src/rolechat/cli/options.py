"""Shared CLI options: model, persona and generation flags, and how they become library objects.

Contract: generation flags are generated from :class:`~rolechat.params.GenerationParams`' own
fields (names, help), and their values are validated by that same schema, so the CLI can never
disagree with the library about names, ranges or error wording. Loading a model shows a
spinner on a terminal (stderr) and nothing otherwise; Ctrl-C during the load always stops it
(:func:`interrupt_kept`), and nothing is sent or saved.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from ..engines import Engine, load_engine
from ..engines.kvstore import DEFAULT_RAM_BYTES, KVStore
from ..engines.options import ENGINES, OPTIONS, check_options, engine_for, takers
from ..engines.snapshots import (
    DEFAULT_DISK_BYTES,
    DiskTier,
    format_size,
    parse_size,
)
from ..engines.transformers import HUBS
from ..errors import InvalidInput
from ..params import GenerationParams
from ..persona import get_persona
from ..pulling import is_pullable
from ..saved import SavedChat
from ..store import Store
from ..window import MEMORY_MODES, MEMORY_SETTINGS, Window

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


#: Engine options whose flag is not ``--`` + the option's name.
FLAG_NAMES = {"n_threads": "--threads"}


#: Engine options with a flag of their own on one command only (``serve --parallel``).
OWN_FLAGS = {"parallel"}


def engine_fields() -> dict[str, Any]:
    """Every engine option (pydantic field info), in a stable order: shared ones first."""
    fields: dict[str, Any] = {}
    for schema in OPTIONS.values():
        for name, info in schema.model_fields.items():
            fields.setdefault(name, info)
    return fields


def flag_of(option: str, api_key_flag: str = "--api-key") -> str:
    if option == "api_key":
        return api_key_flag
    return FLAG_NAMES.get(option) or "--" + option.replace("_", "-")


def lower_first(text: str) -> str:
    """``text`` going on after a prefix: its first letter lowercased, unless its first word is
    an acronym (``CPU threads``, ``KV state``)."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[:2].isupper():
        return text
    return text[:1].lower() + text[1:]


def _engine_flag(name: str, info: Any, api_key_flag: str) -> Callable[[F], F]:
    flag = flag_of(name, api_key_flag)
    engines = takers(name)
    prefix = "" if len(engines) == len(OPTIONS) else " and ".join(engines) + ": "
    default = info.default
    shown = format_size(default) if name == "kv_cache_ram" else default
    description = info.description or ""
    help_text = prefix + (lower_first(description) if prefix else description)
    if default is not None and not info.is_required() and name not in (
            "context_length", "n_threads"):
        help_text += f" [default: {shown}]"
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    literal = next((a for a in (annotation, *args)  # Literal[...], or Literal[...] | None
                    if typing.get_origin(a) is typing.Literal), None)
    if name == "kv_cache_ram":
        kind: Any = SIZE
    elif literal is not None:
        kind = click.Choice(typing.get_args(literal))
    else:
        kind = args[0]
    if kind is bool:
        negative = "--no-" + flag[2:]
        return click.option(f"{flag}/{negative}", name, default=None, help=help_text)
    return click.option(flag, name, type=kind, default=None, help=help_text)


def model_options(func: F, *, api_key_flag: str = "--api-key") -> F:
    """The engine flags, one per engine option (:mod:`rolechat.engines.options`). ``rolechat
    serve`` names the remote engine's key ``--remote-api-key``: there ``--api-key`` is the key
    clients must present."""
    decorators = [
        click.option("--model", "-m", "model", type=str, default=None,
                     help="A name from `rolechat models list` or `rolechat pull` (qwen2.5:3b), "
                          "a .gguf file, a Hugging Face / ModelScope model folder, or with "
                          "--hub a model id (default: the embedded SmolLM2-135M-Instruct)."),
        click.option("--engine", type=click.Choice(ENGINES), default=None,
                     help="Engine (default: llama.cpp for .gguf, transformers for a folder, "
                          "openai with --base-url)."),
        click.option("--hub", type=click.Choice(HUBS), default=None,
                     help="The hub to pull --model from (an alias or NAME not here yet), or "
                          "to download a model id from (transformers engine)."),
        click.option("--yes", "-y", "pull_yes", is_flag=True, default=False,
                     help="Pull --model without asking when it is not on this machine yet."),
        *(_engine_flag(name, info, api_key_flag) for name, info in engine_fields().items()
          if name not in OWN_FLAGS),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def kv_disk_option(func: F) -> F:
    """``--kv-cache-disk``: the budget of the KV snapshot files beside the store."""
    return click.option(
        "--kv-cache-disk", type=SIZE, default=None,
        help="Keep saved conversations' KV state in files beside the store, up to this size "
             f"(0: none) [default: {format_size(DEFAULT_DISK_BYTES)}].")(func)


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


def memory_options(func: F) -> F:
    """``--memory`` and ``--summary-tokens``: what the window keeps of the turns it drops."""
    func = click.option("--summary-tokens", type=click.IntRange(min=8), default=None,
                        help="The running summary's token cap [default: 1/16 of the context]."
                        )(func)
    return click.option("--memory", type=click.Choice(MEMORY_MODES), default=None,
                        help="What the window keeps of dropped turns: nothing, or a running "
                        "summary made when it slides [default: the persona's, else none]."
                        )(func)


def window_from(options: dict[str, Any], persona: str | None) -> Window | None:
    """The window the memory flags (popped from ``options``) ask for, over the persona's
    ``[window]`` settings (``--memory summary``: a window that summarizes); None when no flag
    is given."""
    given = {name: value for name in MEMORY_SETTINGS
             if (value := options.pop(name, None)) is not None}
    return get_persona(persona).window_for(given) if given else None


#: How many replies `rolechat serve` generates at once with llama.cpp unless --parallel says.
SERVE_PARALLEL = 4


def warn_if_too_big(model: str | None, engine: str) -> None:
    """Before loading a GGUF: say so when its weights need more RAM than is free."""
    from ..engines.snapshots import format_size
    from ..models import is_model_name, ram_shortfall, resolve_model

    if engine != "llama.cpp" or model is None:
        return
    path = resolve_model(model).path if is_model_name(model) else Path(model).expanduser()
    short = ram_shortfall(path) if path.is_file() else None
    if short is not None:
        needed, free = short
        err_console.print(f"warning: this model's weights take {format_size(needed)} and "
                          f"{format_size(free)} of RAM is free now: it may swap or fail to "
                          "load. A smaller model or quantization fits better "
                          "(rolechat models list).", style="yellow", markup=False)


def pulled_or_pull(name: str, hub: str | None, yes: bool) -> str:
    """``name`` (an alias or a hub name) when it is on this machine; else pulled once the user
    says yes (``--yes``, or a yes at the terminal's prompt). Nothing is downloaded otherwise:
    the NotPulled error says how to pull it."""
    from ..errors import NotPulled
    from ..hubs import HUB_NAMES
    from ..models import resolve_model
    from ..pulling import parse
    from .pull import pull_now

    try:
        return resolve_model(name).name
    except NotPulled:
        if not yes:
            if not (sys.stdin.isatty() and err_console.is_terminal):
                raise
            parsed = parse(name, hub)
            size = f", about {parsed.alias.download / 1e9:.1f} GB" if parsed.alias else ""
            if not click.confirm(f"{name} is not on this machine. Pull it from "
                                 f"{HUB_NAMES[parsed.hub]}{size}?", default=True,
                                 err=True):
                raise
    return pull_now(name, hub)


def open_engine(options: dict[str, Any], *, api_key_flag: str = "--api-key",
                kv_disk: DiskTier | None = None, parallel: int | None = None,
                serving: bool = False) -> Engine:
    """Load the engine named by the model flags (popped from ``options``). Which flags apply
    to which engine comes from the engines' option schemas. A local engine keeps its KV
    snapshots in RAM and in ``kv_disk``; ``parallel`` (``serve --parallel``) is how many
    replies llama.cpp generates at once (when ``serving`` and not given:
    :data:`SERVE_PARALLEL`)."""
    model, engine, hub = (options.pop(k, None) for k in ("model", "engine", "hub"))
    yes = bool(options.pop("pull_yes", False))
    if model is not None and engine in (None, "llama.cpp") and is_pullable(model):
        model, hub = pulled_or_pull(model, hub, yes), None
    given = {name: value for name in engine_fields()
             if (value := options.pop(name, None)) is not None}
    name = engine or engine_for(model, hub, given.get("base_url"))
    if parallel is not None:
        given["parallel"] = parallel
    elif serving and name in takers("parallel"):
        given["parallel"] = SERVE_PARALLEL
    if hub is not None and name != "transformers":
        raise InvalidInput(f"--hub only applies to the transformers engine, not {name}.",
                           "Drop --hub, or use --engine transformers.")
    if name == "openai" and "base_url" not in given:
        raise InvalidInput("--engine openai needs --base-url.",
                           "For example: --base-url http://127.0.0.1:8000/v1")
    checked = check_options(name, given, flag=lambda option: flag_of(option, api_key_flag))
    kv_store = None
    if name != "openai":  # the engine's RAM tier, and the files beside the store
        kv_store = KVStore(getattr(checked, "kv_cache_ram", DEFAULT_RAM_BYTES), kv_disk)
        given.pop("kv_cache_ram", None)
    warn_if_too_big(model, name)
    if not err_console.is_terminal:
        with interrupt_kept():
            loaded = load_engine(model, engine=name, hub=hub, kv_store=kv_store, **given)
    else:
        label = model or given.get("base_url") or "the embedded model"
        with err_console.status(f"Loading {label}…", spinner="dots"), interrupt_kept():
            loaded = load_engine(model, engine=name, hub=hub, kv_store=kv_store, **given)
    fast = getattr(loaded, "fast", None)
    if fast is not None:  # a GPU step being compiled or captured says so on stderr
        fast.progress = lambda text: err_console.print(text, style="dim", markup=False)
    return loaded


@contextlib.contextmanager
def interrupt_kept() -> Iterator[None]:
    """Ctrl-C while this runs ends it with KeyboardInterrupt, always. Native code calls back
    into Python (llama.cpp's log callback runs all through a model load); a KeyboardInterrupt
    raised inside such a ctypes callback is printed and dropped, and the load would go on as if
    nothing had happened. Here the signal is noted when it arrives and raised again once the
    native code returns (the dropped one is not printed)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # only the main thread gets signals; SIG_IGN: Ctrl-C does nothing here
        return
    pressed: list[int] = []

    def on_interrupt(signum: int, frame: Any) -> None:
        pressed.append(signum)
        previous(signum, frame)  # Python's own handler: raises KeyboardInterrupt

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)

    hook = sys.unraisablehook
    signal.signal(signal.SIGINT, on_interrupt)
    sys.unraisablehook = unraisable
    try:
        yield
    except Exception:
        if pressed:  # whatever the interrupted code made of it, it was Ctrl-C
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
    if pressed:
        raise KeyboardInterrupt


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
    window = window_from(options, persona_name)
    resume, cid = options.pop("resume", False), options.pop("cid", None)
    store = open_store() if (log or resume or cid is not None) else None
    if store is not None and resume and cid is None:
        cid = store.latest()
        if cid is None:
            raise InvalidInput("There is no saved conversation to continue.",
                               "Start one with `rolechat chat`.")
    if store is not None and cid is not None:
        store.info(cid)  # an unknown id fails before the model loads
    disk = kv_disk(store if log else None, options.pop("kv_cache_disk", None))
    engine = open_engine(options, kv_disk=disk)
    if store is not None and cid is not None:
        saved = SavedChat.resume(engine, store, cid, persona=persona_name, system=system,
                                 params=params, kv_disk=disk, save=log and save_overrides,
                                 window=window)
        if not log:
            saved.store = None  # the history came from the store; this exchange stays out
        return saved
    return SavedChat.new(engine, store=store if log else None, persona=persona_name,
                         system=system, params=params, kv_disk=disk, window=window)


def open_store() -> Store:
    """The conversation store in the rolechat home; a wait for another process's lock is
    announced on stderr, never silent."""
    store = Store.default()
    store.on_wait = lambda text: err_console.print(text, style="dim", markup=False)
    if store.restored:
        err_console.print(f"saved {store.restored} turn(s) kept from a time the store was "
                          "busy", style="dim")
    return store


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
