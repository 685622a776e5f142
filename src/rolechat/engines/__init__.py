"""Engines and how one is chosen.

Contract: :func:`load_engine` with no model loads the embedded default (SmolLM2-135M-Instruct
through llama.cpp). With a model it picks the engine from the path — a GGUF file goes to
llama.cpp — unless ``engine=`` names one; a ``base_url=`` option means the ``openai`` engine (a
remote OpenAI-compatible server, see :mod:`rolechat.engines.openai`). Unknown engine names raise
:class:`~rolechat.errors.UnknownName` listing the valid ones; a path that does not exist or is
not a model raises :class:`~rolechat.errors.ModelLoadError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, UnknownName
from .base import Completion, Engine, Generation, Usage

ENGINES = ("llama.cpp", "transformers", "openai")


def engine_for(model: str | Path | None, hub: str | None = None) -> str:
    """The engine that should load ``model``: llama.cpp for a GGUF file (and the embedded
    default), transformers for a model folder or a hub id."""
    if model is None:
        return "llama.cpp"
    if hub is not None:
        return "transformers"
    path = Path(model).expanduser()
    if path.is_file() or path.suffix.lower() == ".gguf":
        return "llama.cpp"
    return "transformers"  # a folder, or an id whose error will suggest --hub


def load_engine(model: str | Path | None = None, *, engine: str | None = None,
                hub: str | None = None, **options: Any) -> Engine:
    """Load a model. ``options`` go to the engine: ``context_length``, ``chat_template`` for
    all; ``n_threads`` for llama.cpp; ``device``, ``dtype``, ``fast_decode`` for transformers;
    ``base_url``, ``api_key``, ``tokenizer`` for openai (``model`` is then the served name).
    ``hub`` ("hf" or "modelscope") downloads ``model`` by id — only when asked."""
    name = engine or ("openai" if options.get("base_url") else engine_for(model, hub))
    if name == "openai":
        if hub is not None:
            raise ModelLoadError(str(model), "the openai engine talks to a server",
                                 "Drop --hub.")
        if not options.get("base_url"):
            raise ModelLoadError(str(model), "the openai engine needs a server URL",
                                 "Pass base_url= (--base-url), e.g. http://127.0.0.1:8000/v1.")
        from .openai import OpenAIEngine

        return OpenAIEngine(None if model is None else str(model), **options)
    if name == "llama.cpp":
        if hub is not None:
            raise ModelLoadError(str(model), "the llama.cpp engine loads local .gguf files only",
                                 "Drop --hub, or use --engine transformers.")
        from .llama_cpp import LlamaCppEngine

        return LlamaCppEngine(Path(model).expanduser() if model is not None else None,
                              **options)
    if name == "transformers":
        from .transformers import TransformersEngine

        if model is None:
            from .llama_cpp import embedded_model_path

            model = embedded_model_path()
        return TransformersEngine.load(model, hub=hub, **options)
    raise UnknownName("engine", name, ENGINES)


__all__ = ["ENGINES", "Completion", "Engine", "Generation", "Usage", "engine_for",
           "load_engine"]
