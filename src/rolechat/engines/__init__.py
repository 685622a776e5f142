"""Engines and how one is chosen.

Contract: :func:`load_engine` with no model loads the embedded default (SmolLM2-135M-Instruct
through llama.cpp). With a model it picks the engine by :func:`~rolechat.engines.options.
engine_for` — a ``base_url`` means the remote ``openai`` engine, a GGUF file llama.cpp, a folder
or hub id transformers — unless ``engine=`` names one. Options are validated by that engine's
schema (:mod:`rolechat.engines.options`) before anything loads: unknown engine names raise
:class:`~rolechat.errors.UnknownName` listing the valid ones, options another engine takes
raise :class:`~rolechat.errors.InvalidInput`, bad values
:class:`~rolechat.errors.InvalidParams`; a path that does not exist or is not a model raises
:class:`~rolechat.errors.ModelLoadError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .base import Completion, Engine, Generation, Usage
from .kvstore import KVStore
from .options import ENGINES, check_options, engine_for


def load_engine(model: str | Path | None = None, *, engine: str | None = None,
                hub: str | None = None, kv_store: KVStore | None = None,
                **options: Any) -> Engine:
    """Load a model. ``options`` are the engine's (see :mod:`rolechat.engines.options`):
    ``context_length``, ``chat_template`` for all; ``n_threads``, ``kv_cache_ram`` for the
    local engines; ``n_gpu_layers``, ``parallel`` for llama.cpp; ``device``, ``dtype``,
    ``fast_decode``, ``capture`` for transformers; ``base_url``, ``api_key``, ``tokenizer``,
    ``timeout``, ``max_retries`` for openai (``model`` is then the served name). ``model`` may
    name a model on this machine as ``rolechat models list`` does (``ollama:qwen2.5:3b``,
    ``hf:OWNER/REPO:FILE``, ...: :mod:`rolechat.models`). ``hub`` ("hf"
    or "modelscope") downloads ``model`` by id — only when asked. ``kv_store`` is the KV store
    a local engine keeps its snapshots in (default: its own, in RAM only, of ``kv_cache_ram``
    bytes)."""
    if hub is None and not options.get("base_url") and model is not None:
        from ..models import is_model_name, resolve_model

        if is_model_name(model):  # a model on this machine, by the name models list gives
            model = resolve_model(str(model)).path
    name = engine or engine_for(model, hub, options.get("base_url"))
    if hub is not None and name != "transformers":
        raise ModelLoadError(str(model), f"the {name} engine does not download models",
                             "Drop --hub, or use --engine transformers.")
    checked = check_options(name, options).model_dump()
    if name == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine(None if model is None else str(model), **checked)
    checked["kv_store"] = kv_store
    if name == "llama.cpp":
        from .llama_cpp import LlamaCppEngine

        return LlamaCppEngine(Path(model).expanduser() if model is not None else None,
                              **checked)
    from .transformers import TransformersEngine

    if model is None:
        from .llama_cpp import embedded_model_path

        model = embedded_model_path()
    return TransformersEngine.load(model, hub=hub, **checked)


__all__ = ["ENGINES", "Completion", "Engine", "Generation", "KVStore", "Usage", "engine_for",
           "load_engine"]
