"""Which model serves, what else the server can serve, and switching models on request (one
loaded at a time).

Contract:
- :func:`setup` fills the state's :class:`~rolechat.server.state.Models` when the app is made.
  The model `serve` started with keeps the id it always had: its ``--model`` name, else its
  file's name (``SmolLM2-135M-Instruct.Q4_1.gguf``); its path and file name are accepted too.
- :func:`choices` lists what the server can serve: the loaded model first, then (with a loader)
  the model it started with and every model :func:`rolechat.models.find_models` lists, each by
  its name (an alias's, ``qwen2.5:3b``, where one names it; its store name is accepted too).
  The start model's own entry there (the embedded ``smollm2:135m`` for the default) is the
  start model, and its names are more names for it. Without a loader (a remote or
  transformers engine, ``serve --no-switch``) it lists the loaded model only and any other
  model is 404 ``model_not_found`` naming the choices. Only listed models load: a request
  never makes the server open a file by its path. :func:`model_body` is one entry as
  ``/v1/models`` shows it.
- Every request that uses the engine holds a :class:`Lease` on it, from before it plans until
  the worker is done with its reply (:func:`take`, :func:`leased`), taken before any
  conversation lock. A request naming a listed model that is not loaded switches to it:
  from then on other requests are refused; the replies on the old model finish (at most
  :data:`DRAIN_S` seconds, else the switch is called off and the asker gets 503
  ``model_busy``: the old model goes on serving); the old engine is closed (its KV snapshot
  files written first); the sessions' live chats are dropped (rebuilt from the store on the new
  engine at their next request; a turn waiting for tool results is left interrupted); the new
  model is loaded by the loader `serve` gave (its options: context length, threads, parallel,
  KV tiers); then the request that asked goes on, on the new model. If the load fails, the old
  model is loaded again and the asker gets the load's error. The switch runs as a task of its
  own, so an asker that leaves does not leave it half done.
- While a switch is under way, every other request that needs the model gets 503
  ``model_loading`` with ``Retry-After`` (OpenAI's clients retry such answers by themselves;
  the web page says "Loading MODEL…" and retries). Requests that do not need the model
  (``/v1/models``, ``/v1/status``, reading conversations) answer at once; ``/v1/status`` says
  what is loading.
- KV snapshots never cross models: each engine has a KV store of its own (its RAM tier goes
  with it), and the disk tier keeps files under a hash of the model's identity (file, size,
  header hash) and checks that identity before a restore. Names that are one file (links)
  are one model and share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..engines.gguf import read_gguf_info
from ..errors import ModelLoadError, UnknownName
from ..models import LocalModel, find_models, is_model_name
from .state import Choice, Loader, Loading, Models, ServerState
from .wire import Unavailable
from .worker import Job

log = logging.getLogger("rolechat.server")

#: Seconds a switch waits for the replies on the old model to finish.
DRAIN_S = 60.0
#: How fast a model is expected to load (for ``Retry-After``): bytes a second, plus a second.
LOAD_BYTES_PER_S = 500e6
#: The longest ``Retry-After`` the server sends.
MAX_RETRY_AFTER = 30


def model_id(engine_model: str) -> str:
    """The id a served model had before switching existed: its file's (or folder's) name."""
    return Path(engine_model).name or engine_model


def setup(state: ServerState, loader: Loader | None, model_name: str | None) -> None:
    """The start model (``model_name``: what ``--model`` said; None: the default) and the
    loader; ``state.model_id`` becomes the start model's id."""
    engine = state.engine
    start_id = (model_name if model_name is not None and is_model_name(model_name)
                else model_id(engine.model))
    path = getattr(engine, "path", None)
    path = path if isinstance(path, Path) else None
    aliases = {engine.model, model_id(engine.model), *([model_name] if model_name else [])}
    start = Choice(start_id, model_name, frozenset(aliases - {start_id}), path,
                   gguf_facts(path) if path is not None and path.is_file() else {})
    state.model_id = start_id
    state.models = Models(loader=loader, loaded=start, start=start)


# ----- what can be served ------------------------------------------------------------------

def facts_of(model: LocalModel) -> dict[str, Any]:
    return {"source": model.source, "location": model.location, "size": model.size,
            "quantization": model.info.quantization, "architecture": model.info.architecture,
            "trained_context_length": model.info.context_length}


def ref_of(model: LocalModel) -> str:
    """The model's name in its store (``hf:OWNER/REPO:FILE``) where it is listed by an alias."""
    return str(getattr(model, "ref", "") or model.name)


def gguf_facts(path: Path) -> dict[str, Any]:
    """A GGUF file's facts from its header (nothing if it cannot be read)."""
    try:
        info = read_gguf_info(path)
        size = path.stat().st_size
    except (ModelLoadError, OSError):
        return {}
    return {"size": size, "quantization": info.quantization,
            "architecture": info.architecture, "trained_context_length": info.context_length}


def loaded_choice(state: ServerState) -> Choice:
    return state.models.loaded or Choice(state.model_id, None)


def choices(state: ServerState) -> list[Choice]:
    """What the server can serve, the loaded model first (blocking: reads the models' headers).
    """
    models, loaded = state.models, loaded_choice(state)
    if models.loader is None:
        return [loaded]
    found = find_models().models
    listed: list[Choice] = []
    start = models.start
    if start is not None:
        own = next((m for m in found if start.load_as in (m.name, ref_of(m))), None)
        if own is None and not is_model_name(start.load_as) and start.path is not None:
            own = next((m for m in found if m.path == start.path), None)
        if own is not None:
            found.remove(own)
            start = dataclasses.replace(start, aliases=start.aliases | {own.name, ref_of(own)},
                                        facts=facts_of(own))
        listed.append(start)
    listed += [Choice(m.name, m.name, frozenset({ref_of(m)} - {m.name}), m.path, facts_of(m))
               for m in found]
    first = next((c for c in listed if c.id == loaded.id), loaded)
    return [first, *(c for c in listed if c.id != first.id)]


def model_body(state: ServerState, choice: Choice) -> dict[str, Any]:
    """One ``/v1/models`` entry: OpenAI's fields, whether it is loaded (or loading), its
    context length (the loaded one's as served; another's as trained) and its file's facts."""
    loaded = choice.id == state.model_id and not state.models.empty
    loading = state.models.loading
    facts = dict(choice.facts)
    context = state.engine.context_length if loaded else facts.get("trained_context_length")
    return {"id": choice.id, "object": "model", "created": 0, "owned_by": "rolechat",
            "context_length": context, "loaded": loaded,
            "loading": loading is not None and loading.choice.id == choice.id, **facts}


def find(state: ServerState, wanted: str) -> Choice:
    """The listed model ``wanted`` names; UnknownName (404) names the choices."""
    listed = choices(state)
    for choice in listed:
        if wanted == choice.id or wanted in choice.aliases:
            return choice
    raise UnknownName("model", wanted, [c.id for c in listed])


def serves(state: ServerState, wanted: str | None) -> bool:
    """Whether the loaded model answers to ``wanted`` (None: whatever is loaded)."""
    if state.models.empty:
        return False
    if wanted is None:
        return True
    loaded = loaded_choice(state)
    return wanted == state.model_id or wanted in loaded.aliases or wanted in (
        state.engine.model, model_id(state.engine.model))


# ----- using the engine --------------------------------------------------------------------

class Lease:
    """A request's hold on the engine (and the id of the model it serves): no switch closes
    it until every lease is released. Released on the event loop, once."""

    def __init__(self, state: ServerState) -> None:
        self.state, self.engine, self.model_id = state, state.engine, state.model_id
        self._held = True
        state.models.users += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self.state.models.users -= 1

    def release_after(self, job: Job) -> None:
        """Release once the worker is done with ``job`` (its reply completed, failed or was
        cancelled), whenever that is."""
        async def wait() -> None:
            try:
                await job.finished.wait()
            finally:
                self.release()

        task = asyncio.get_running_loop().create_task(wait())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)


#: Tasks that must not be collected before they end.
_TASKS: set[asyncio.Task[Any]] = set()


async def take(state: ServerState, wanted: str | None) -> Lease:
    """A lease on the engine that serves ``wanted`` (a model's id or other name; None: the
    loaded one), switching to it first if it is not loaded. Raises UnknownName (404) for a
    model that is not listed, :class:`Unavailable` (503) during another request's switch."""
    choice = None
    if not serves(state, wanted):
        choice = (await asyncio.to_thread(find, state, wanted) if wanted is not None
                  else loaded_choice(state))  # no model loaded: load the last one again
    models = state.models
    if models.loading is not None:
        raise loading_error(state, models.loading)
    if choice is None or serves(state, choice.id):
        return Lease(state)
    switching = asyncio.get_running_loop().create_task(switch(state, choice))
    _TASKS.add(switching)
    switching.add_done_callback(_TASKS.discard)
    try:
        return await asyncio.shield(switching)
    except asyncio.CancelledError:  # the asker left: the switch goes on, its lease is dropped
        switching.add_done_callback(_drop_lease)
        raise


def _drop_lease(task: asyncio.Task[Lease]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()


@contextlib.asynccontextmanager
async def leased(state: ServerState, wanted: str | None = None) -> AsyncIterator[Lease]:
    """:func:`take` for the length of a block (short work: planning, a dry run, a PATCH)."""
    lease = await take(state, wanted)
    try:
        yield lease
    finally:
        lease.release()


async def switch(state: ServerState, choice: Choice) -> Lease:
    """Make ``choice`` the loaded model (see the module's contract); a lease on it, taken
    before any other request can ask for another."""
    models = state.models
    assert models.loader is not None
    loader = models.loader
    loading = models.loading = Loading(choice, int(choice.facts.get("size") or 0))
    try:
        if not await drained(models, DRAIN_S):
            raise Unavailable(
                f"The server did not switch to the model {choice.id}: {models.users} "
                f"request(s) on {state.model_id} were still running after {DRAIN_S:g} s.",
                f"Try again when they finish, or ask for {state.model_id}.",
                code="model_busy", retry_after=5)
        loading.phase = "loading"
        old, previous = state.engine, loaded_choice(state)
        state.chats.clear()
        if not models.empty:
            log.info("switching from %s to %s", previous.id, choice.id)
            await asyncio.to_thread(old.close)  # writes its snapshot files, frees its memory
            models.empty = True
        try:
            engine = await asyncio.to_thread(loader, choice.load_as)
        except Exception:
            if previous.id != choice.id:
                await put_back(state, loader, previous)
            raise
        state.engine, state.model_id, models.loaded = engine, choice.id, choice
        models.empty = False
        models.switches += 1
        return Lease(state)
    finally:
        models.loading = None


async def put_back(state: ServerState, loader: Loader, previous: Choice) -> None:
    """After a failed load: the model that served before, loaded again (if that fails too, the
    server has none until a request loads one)."""
    try:
        engine = await asyncio.to_thread(loader, previous.load_as)
    except Exception:
        log.exception("loading %s again failed; the next request loads a model", previous.id)
        return
    state.engine = engine
    state.models.empty = False


async def drained(models: Models, timeout: float) -> bool:
    """Wait until no request uses the engine; False if ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while models.users:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def retry_after(loading: Loading) -> int:
    """Seconds until the load is expected to be done (at least 1)."""
    expected = 1 + loading.size / LOAD_BYTES_PER_S + (2 if loading.phase == "draining" else 0)
    left = expected - (time.monotonic() - loading.since)
    return int(min(MAX_RETRY_AFTER, max(1, math.ceil(left))))


def loading_error(state: ServerState, loading: Loading) -> Unavailable:
    wait = retry_after(loading)
    return Unavailable(
        f"Loading the model {loading.choice.id} (another request asked for it): the server "
        "answers no requests for a model until it is loaded.",
        f"Retry in {wait} s (the Retry-After header); GET /v1/status shows the load.",
        code="model_loading", retry_after=wait)


def status_body(state: ServerState) -> dict[str, Any]:
    """What ``/v1/status`` says of models: whether the server switches, how many times it
    did, and the switch under way (the model, its phase, seconds so far)."""
    models, loading = state.models, state.models.loading
    return {"can_switch": models.loader is not None, "switches": models.switches,
            "loading": None if loading is None else {
                "model": loading.choice.id, "from": state.model_id, "phase": loading.phase,
                "seconds": round(time.monotonic() - loading.since, 2)}}


__all__ = ["DRAIN_S", "Lease", "Loader", "choices", "find", "leased", "model_body",
           "model_id", "setup", "status_body", "take"]
