"""Engines and how one is chosen.

Contract: :func:`load_engine` with no model loads the embedded default (SmolLM2-135M-Instruct
through llama.cpp). With a model it picks the engine from the path — a GGUF file goes to
llama.cpp — unless ``engine=`` names one. Unknown engine names raise
:class:`~rolechat.errors.UnknownName` listing the valid ones; a path that does not exist or is
not a model raises :class:`~rolechat.errors.ModelLoadError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, UnknownName
from .base import Completion, Engine, Generation, Usage

ENGINES = ("llama.cpp",)


def engine_for(model: str | Path | None) -> str:
    """The engine that should load ``model``."""
    if model is None:
        return "llama.cpp"
    path = Path(model).expanduser()
    if path.is_dir():
        raise ModelLoadError(str(path), "it is a folder; Hugging Face / ModelScope folders need "
                             "the transformers engine, which this version does not have yet",
                             "Pass a .gguf file instead (llama.cpp's convert_hf_to_gguf.py "
                             "converts a folder).")
    return "llama.cpp"


def load_engine(model: str | Path | None = None, *, engine: str | None = None,
                **options: Any) -> Engine:
    """Load a model. ``options`` go to the engine (e.g. ``context_length``, ``n_threads``,
    ``chat_template``)."""
    name = engine or engine_for(model)
    if name == "llama.cpp":
        from .llama_cpp import LlamaCppEngine

        return LlamaCppEngine(Path(model).expanduser() if model is not None else None,
                              **options)
    raise UnknownName("engine", name, ENGINES)


__all__ = ["ENGINES", "Completion", "Engine", "Generation", "Usage", "engine_for",
           "load_engine"]
