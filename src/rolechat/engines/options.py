"""Engine options: one pydantic schema per engine, and the rule that picks the engine.

Contract:
- :class:`LlamaCppOptions`, :class:`TransformersOptions` and :class:`OpenAIOptions` declare
  every option their engine takes, with ranges and help text (``extra="forbid"``).
  :data:`OPTIONS` maps each engine name to its schema.
- :func:`engine_for` is the one rule that picks an engine: a ``base_url`` means the remote
  ``openai`` engine, a ``.gguf`` file (or no model: the embedded one) llama.cpp, a folder or a
  hub id transformers.
- :func:`check_options` validates options for an engine: a bad value raises
  :class:`~rolechat.errors.InvalidParams` listing every bad field; an option the engine does not
  take raises :class:`~rolechat.errors.InvalidInput` saying which engines take it. The CLI
  derives its model flags and the same errors from these schemas.
- Threads: ``n_threads`` (and :func:`threads_problem`, which every engine's ``set_threads``
  checks) is a whole number from 1 to the machine's logical CPUs (:func:`logical_cpus`): more
  threads than that only wait for each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from ..errors import InvalidInput, InvalidParams, UnknownName
from .kvstore import DEFAULT_RAM_BYTES

ENGINES = ("llama.cpp", "transformers", "openai")


def logical_cpus() -> int:
    """The machine's logical CPUs: the most threads that can run at once."""
    return os.cpu_count() or 1


def _threads_problem(n_threads: object) -> str | None:
    """What is wrong with a thread count, or None."""
    if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 1:
        return "must be a whole number >= 1"
    cpus = logical_cpus()
    if n_threads > cpus:
        return f"must be at most {cpus}, the number of logical CPUs this machine has"
    return None


def threads_problem(n_threads: object) -> str | None:
    """What is wrong with a thread count (the value included), or None: it must be a whole
    number from 1 to :func:`logical_cpus`."""
    problem = _threads_problem(n_threads)
    return None if problem is None else f"{problem} (got {n_threads!r})"


def check_threads(n_threads: object, hint: str = "Leave it out to use the default.") -> int:
    """``n_threads`` if :func:`threads_problem` finds nothing wrong; otherwise
    :class:`~rolechat.errors.InvalidInput` stating the limit and the machine's count."""
    problem = threads_problem(n_threads)
    if problem is not None:
        raise InvalidInput(f"threads {problem}.", hint, field="threads")
    assert isinstance(n_threads, int)
    return n_threads


class EngineOptions(BaseModel):
    """Options every engine takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context_length: int | None = Field(
        None, ge=16, description="Context length in tokens (default: the model's trained "
                                 "context, capped at 32768).")
    chat_template: str | None = Field(
        None, description="Override the model's chat template (Jinja text or a file).")


class LocalOptions(EngineOptions):
    """Options of the engines that run the model in this process."""

    kv_cache_ram: int = Field(
        DEFAULT_RAM_BYTES, ge=0, description="Keep conversations' KV state warm in this much "
                                             "RAM (bytes; 0: none).")
    n_threads: int | None = Field(None, description="CPU threads, at most the machine's "
                                                    "logical CPUs (default: all physical "
                                                    "cores).")

    @field_validator("n_threads")
    @classmethod
    def _threads_fit_the_machine(cls, value: int | None) -> int | None:
        problem = None if value is None else _threads_problem(value)
        if problem is not None:
            # PydanticCustomError's message is used as is (a ValueError's gets a prefix).
            raise PydanticCustomError("threads", problem.replace("{", "{{").replace("}", "}}"))
        return value


class LlamaCppOptions(LocalOptions):
    """llama.cpp (GGUF files)."""

    n_gpu_layers: int = Field(-1, ge=-1, description="Layers to offload to a GPU (-1: all).")
    parallel: int = Field(
        1, ge=1, le=64, description="Replies generated at once, batched on one context: its "
                                    "sequences, each holding the whole context length.")


class TransformersOptions(LocalOptions):
    """transformers (Hugging Face / ModelScope folders)."""

    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (CUDA when present).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights' dtype (auto: the checkpoint's).")
    fast_decode: bool | None = Field(
        None, description="Static KV cache + CUDA graphs (default: on with CUDA).")
    capture: Literal["compile", "graph", "off"] | None = Field(
        None, description="How the fast path makes its steps: compile (torch.compile, then a "
                          "CUDA graph), graph (a CUDA graph, not compiled) or off (eagerly, "
                          "also on the CPU). Default: $ROLECHAT_CAPTURE, else compile.")


class OpenAIOptions(EngineOptions):
    """A remote OpenAI-compatible server."""

    base_url: str = Field(..., min_length=1,
                          description="The server, e.g. http://127.0.0.1:8000/v1.")
    api_key: str | None = Field(None, description="The server's API key (default: "
                                                  "$OPENAI_API_KEY, or none).")
    tokenizer: str | None = Field(None, description="A .gguf file or tokenizer folder, for "
                                                    "exact token counts (default: an estimate).")
    timeout: float = Field(600.0, gt=0, description="Seconds to wait for the server.")
    max_retries: int = Field(1, ge=0, description="Retries on connection errors.")


OPTIONS: dict[str, type[EngineOptions]] = {
    "llama.cpp": LlamaCppOptions, "transformers": TransformersOptions, "openai": OpenAIOptions}


def engine_for(model: str | Path | None, hub: str | None = None,
               base_url: str | None = None) -> str:
    """The engine that should load ``model``: the remote ``openai`` engine when there is a
    server URL, llama.cpp for a GGUF file (the embedded default, and a model on this machine
    by its name: :mod:`rolechat.models`), transformers for a model folder or a hub id."""
    if base_url:
        return "openai"
    if model is None:
        return "llama.cpp"
    from ..models import is_model_name
    from ..pulling import is_pullable

    if is_pullable(model):  # an alias or hf:/modelscope: name: a GGUF, pulled from --hub
        return "llama.cpp"
    if hub is not None:
        return "transformers"

    if is_model_name(model):  # rolechat models list names GGUFs only
        return "llama.cpp"
    path = Path(model).expanduser()
    if path.is_file() or path.suffix.lower() == ".gguf":
        return "llama.cpp"
    return "transformers"  # a folder, or an id whose error will suggest --hub


def takers(option: str) -> list[str]:
    """The engines that take ``option``."""
    return [name for name, schema in OPTIONS.items() if option in schema.model_fields]


def check_options(engine: str, options: dict[str, Any],
                  flag: Any = None) -> EngineOptions:
    """``options`` validated for ``engine``. ``flag(name)`` names an option in messages (the
    CLI passes its flag names)."""
    schema = OPTIONS.get(engine)
    if schema is None:
        raise UnknownName("engine", engine, ENGINES)
    name_of = flag or (lambda option: option)
    foreign = sorted(set(options) - set(schema.model_fields))
    if foreign:
        others = sorted({e for o in foreign for e in takers(o)}, key=ENGINES.index)
        names = ", ".join(name_of(o) for o in foreign)
        one = len(foreign) == 1
        verb, it = ("applies", "it") if one else ("apply", "them")
        if not others:
            raise InvalidInput(f"{names}: no engine takes {it}.",
                               f"Valid options for {engine}: {', '.join(schema.model_fields)}.")
        kind = " and ".join(others) + (" engine" if len(others) == 1 else " engines")
        raise InvalidInput(f"{names} only {verb} to the {kind}, not {engine}.",
                           f"Use --engine {others[0]}, or drop {it}.")
    try:
        return schema(**options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "options"
            msg = err["msg"]  # "Input should be ...": only its first letter is lowered
            problems.append((name_of(field), f"{msg[:1].lower()}{msg[1:]} (got "
                                             f"{err['input']!r})"))
        raise InvalidParams(problems, what=f"{engine} engine options") from None
