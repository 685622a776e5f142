"""The llama.cpp adapter: one GGUF model, one context of ``n_seq`` sequences, batches of tokens.

Contract (see :mod:`rolechat.engines.adapter`):
- The context is made with llama.cpp's C API through llama-cpp-python (its ``_internals``
  wrappers): ``n_seq`` sequences of ``context_length`` tokens each, every sequence in its own
  stream of the KV cache (``kv_unified`` off), flash attention on, and never more than
  :data:`MAX_QUERIES` tokens of one sequence in one batch where they must be canonical (up to
  :data:`MAX_BATCH`, ``loose_batch``, where not: faster). With those settings a token's keys,
  values and logits come out the same bit for bit whether it was evaluated in a prompt batch of
  2 to 63 tokens (however the prompt was split), or decoded beside neighbouring sequences, or
  decoded alone while its sequence holds fewer than :data:`LONE_LIMIT` tokens: all of those are
  *canonical* (measured: docs/architecture.md, "Exact replies"). Two cases are not, and
  :meth:`LlamaAdapter.canonical` says so token by token: a single token of a sequence alone in
  its part of the batch once the sequence is longer (llama.cpp then splits its attention over
  the KV cells between threads), and from 64 queries on (a tiled kernel). With flash attention
  off, one query and several differ at any length.
- ``evaluate`` and ``step`` fill one ``llama_batch`` and call ``llama_decode`` once (``step``
  in sequence order, so that running sequences with consecutive ids make one graph);
  ``sample`` runs the reply's own sampler chain (penalties, top-k, typical, top-p, min-p,
  temperature and a seeded distribution, or greedy) on a row of that batch's logits — the
  chain llama-cpp-python's ``Llama.generate`` builds, so replies match its.
- Snapshots copy one sequence's cells with ``llama_state_seq_get_data`` / ``set_data`` (no
  logits). llama.cpp writes one entry per stream of the context (all empty but the
  sequence's own); a snapshot keeps only that one (:func:`one_stream`), so it restores into any
  sequence of a context with any number of sequences.
- Threads: unless fixed, each stretch of work after a pause uses the physical cores that other
  processes leave free (:class:`FreeCores`); a light load (the reply's own client, a ``top``)
  never takes a thread away.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..constraint import Constraint
from ..params import GenerationParams
from .adapter import Adapter, Sampler
from .kvcache import KVSnapshot, SnapshotError, as_ids

#: llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF
#: The penalties look at this many of the reply's last tokens (llama-cpp-python's default).
PENALTY_LAST_N = 64
#: Most tokens of one sequence in one llama_decode call: llama.cpp's flash attention computes
#: up to 63 queries of a sequence the way it computes one (its tiled kernel starts at 64).
MAX_QUERIES = 63
#: The batch's capacity: a decode step holds one token of every sequence.
MAX_BATCH = 512
#: From this position on, one token of a sequence alone in its part of a batch is not
#: canonical: llama.cpp then splits the attention over the KV cells between its threads (its
#: split-KV path, taken for a single query once the stream spans 512 padded cells, i.e. more
#: than 256 used), and adds the parts up in another order than a batch of queries does. Kept
#: below 256 for cells a sequence's stream leaves unused in the middle.
LONE_LIMIT = 224


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover
        cores = None
    return max(1, cores or os.cpu_count() or 1)


class FreeCores:
    """How many cores other processes left free since the last look, from the system's and this
    process's CPU times (psutil): the rest of the machine's load, whatever runs it."""

    #: Shorter intervals say too little; the last decision stands.
    MIN_INTERVAL_S = 0.5
    #: Other processes must keep this much of a core busy before a thread is given up: a
    #: streaming client or a monitor uses a fraction of one, and giving a thread up for it
    #: halves the speed on an otherwise idle machine.
    SLACK = 0.7

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

    def look(self) -> int | None:
        """The threads to use now (None: too soon to tell; keep the last decision)."""
        if time.monotonic() - self._last[0] < self.MIN_INTERVAL_S:
            return None  # cheap: no reading of the system's counters at every step
        now = self._sample()
        wall = now[0] - self._last[0]
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        return max(1, min(self._cores, int(self._cores - others + self.SLACK)))


_EMPTY = struct.pack("<I", 0)
#: What a sequence's state starts with: llama.cpp's magic number and the sequence's id.
_HEAD = struct.Struct("<Ii")
_MAGIC = 0xAF143CD8


def one_stream(blob: bytes | bytearray | memoryview) -> bytearray | None:
    """A sequence's state as llama.cpp writes it — its magic number and sequence id, the
    number of streams, then for each stream its cell count and, where there are cells, their
    metadata and data — reduced to the one stream that holds cells (None if none does). Every
    stream after it is empty."""
    magic, _ = _HEAD.unpack_from(blob, 0)
    if magic != _MAGIC:
        raise ValueError(f"not a sequence state llama.cpp wrote (magic {magic:#x})")
    (streams,) = struct.unpack_from("<I", blob, _HEAD.size)
    offset = _HEAD.size + 4
    for index in range(streams):
        (count,) = struct.unpack_from("<I", blob, offset)
        if count:
            end = len(blob) - 4 * (streams - index - 1)
            if blob[end:] != _EMPTY * (streams - index - 1):
                raise ValueError("more than one stream holds cells")
            return bytearray(blob[offset:end])
        offset += 4
    return None


def all_streams(state: bytes | bytearray, streams: int, seq: int) -> bytearray:
    """:func:`one_stream`'s state, for sequence ``seq`` of a context of ``streams`` streams:
    llama.cpp restores the cells into the sequence it is asked to, whichever stream they are
    listed under."""
    return (bytearray(_HEAD.pack(_MAGIC, seq)) + struct.pack("<I", streams) + state
            + _EMPTY * (streams - 1))


class LlamaSampler(Sampler):
    """One reply's sampler chain, and the vocabulary's spelling of its tokens."""

    def __init__(self, adapter: LlamaAdapter, params: GenerationParams) -> None:
        from llama_cpp import _internals

        self._adapter = adapter
        chain = _internals.LlamaSampler()  # type: ignore[no-untyped-call]
        chain.add_penalties(n_vocab=adapter.n_vocab, penalty_last_n=PENALTY_LAST_N,
                            penalty_repeat=params.repetition_penalty,
                            penalty_freq=params.frequency_penalty,
                            penalty_present=params.presence_penalty)
        if params.greedy:
            chain.add_greedy()  # type: ignore[no-untyped-call]
        else:
            chain.add_top_k(params.top_k)
            chain.add_typical(1.0, 1)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(0.0, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(params.seed if params.seed is not None else RANDOM_SEED)
        self._chain = chain

    def sample(self, row: int) -> int:
        return int(self._adapter.api.llama_sampler_sample(self._chain.sampler,
                                                           self._adapter.ctx.ctx, row))

    def piece(self, token: int) -> bytes:
        return self._adapter.piece(token)

    def close(self) -> None:
        self._chain.close()  # type: ignore[no-untyped-call]


class LlamaAdapter(Adapter):
    """A GGUF model's context of ``n_seq`` sequences."""

    canonical_batch = 2
    max_batch = prompt_chunk = MAX_QUERIES
    loose_batch = MAX_BATCH

    def __init__(self, model: Any, model_identity: dict[str, Any], *, context_length: int,
                 n_seq: int = 1, n_threads: int | None = None) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.api = llama_cpp
        self.model = model
        self.n_seq = n_seq
        threads = n_threads or physical_cores()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_length * n_seq
        params.n_batch = params.n_ubatch = max(MAX_BATCH, n_seq)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        self.ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        # llama.cpp rounds the allocation up; each sequence holds what was asked, at most.
        self.context_length = min(context_length, int(llama_cpp.llama_n_ctx_seq(self.ctx.ctx)))
        self._batch: Any = llama_cpp.llama_batch_init(int(params.n_batch), 0, 1)
        vocab = model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self._pieces: dict[int, bytes] = {}
        self.n_threads = self.max_threads = self._fitted = threads
        self._free = FreeCores(threads) if n_threads is None else None
        version = importlib.metadata.version("llama-cpp-python")
        self._identity = {"model": model_identity, "engine": "llama.cpp",
                          "context_length": self.context_length,
                          "type_k": int(params.type_k), "type_v": int(params.type_v),
                          # what a snapshot's canonical count means (older files counted
                          # every decoded token)
                          "attention": f"flash, at most {MAX_QUERIES} queries a sequence, "
                                       f"lone decodes canonical below {LONE_LIMIT}",
                          "library": f"llama-cpp-python {version}"}

    # ----- evaluation --------------------------------------------------------------------
    def _decode(self, count: int) -> None:
        self._batch.n_tokens = count
        code = self.api.llama_decode(self.ctx.ctx, self._batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed (code {code})")

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def evaluate(self, seq: int, ids: Sequence[int], start: int) -> int:
        count = len(ids) - start
        assert 0 < count <= self.loose_batch
        for i in range(count):
            self._put(i, ids[start + i], start + i, seq, i == count - 1)
        self._decode(count)
        return count - 1

    def step(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        # In sequence order: llama.cpp puts a run of consecutive sequences into one part of
        # the batch (one graph), and starts a new part at every gap or step back.
        order = sorted(range(len(entries)), key=lambda i: entries[i][0])
        rows = [0] * len(entries)
        for row, i in enumerate(order):
            seq, token, pos, logits = entries[i]
            self._put(row, token, pos, seq, logits)
            rows[i] = row
        self._decode(len(entries))
        return rows

    def canonical(self, entries: Sequence[tuple[int, int]]) -> list[bool]:
        """A token is canonical unless its sequence is alone in its part of the batch (no
        neighbouring sequence id beside it) at :data:`LONE_LIMIT` or further."""
        seqs = {seq for seq, _ in entries}
        return [pos < LONE_LIMIT or seq - 1 in seqs or seq + 1 in seqs
                for seq, pos in entries]

    def sampler(self, params: GenerationParams, prompt: Sequence[int] = (),
                constraint: Constraint | None = None) -> Sampler:
        if constraint is not None and constraint.gbnf is not None:
            from .llama_grammar import GrammarSampler

            return GrammarSampler(self, params, constraint)
        return LlamaSampler(self, params)

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (control tokens give nothing)."""
        data = self._pieces.get(token)
        if data is None:
            data = self._pieces[token] = bytes(self.model.detokenize([token]))
        return data

    # ----- the KV cells ------------------------------------------------------------------
    def keep(self, seq: int, n: int) -> int:
        self.api.llama_memory_seq_rm(self._memory, seq, max(n, 0), -1)
        return max(n, 0)

    def snapshot(self, seq: int, ids: np.ndarray) -> KVSnapshot | None:
        if not len(ids):
            return None
        api, ctx = self.api, self.ctx.ctx
        self.keep(seq, len(ids))  # exactly the tokens the ids describe
        size = api.llama_state_seq_get_size(ctx, seq)
        blob = bytearray(size)
        written = api.llama_state_seq_get_data(
            ctx, (ctypes.c_uint8 * size).from_buffer(blob), size, seq)
        if written == 0 or written > size:
            return None
        try:
            state = one_stream(memoryview(blob)[:written])
        except ValueError as exc:
            raise SnapshotError(str(exc)) from None
        if state is None:
            return None
        ids = as_ids(ids)
        return KVSnapshot(ids, state, len(state) + ids.nbytes)

    def restore(self, seq: int, snapshot: KVSnapshot, n: int) -> None:
        self.keep(seq, 0)
        state = all_streams(snapshot.state, self.n_seq, seq)
        size = len(state)
        read = self.api.llama_state_seq_set_data(
            self.ctx.ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq)
        if read != size:
            self.keep(seq, 0)
            raise SnapshotError(f"llama.cpp refused the state ({read} of {size} bytes read)")
        self.keep(seq, min(n, len(snapshot.ids)))

    def dumps(self, snapshot: KVSnapshot) -> bytes:
        return bytes(snapshot.state)

    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        return KVSnapshot(as_ids(ids), bytearray(data), len(data) + 4 * len(ids))

    def identity(self) -> dict[str, Any]:
        return self._identity

    # ----- threads -----------------------------------------------------------------------
    def fit_threads(self, *, steady: bool = False) -> None:
        """One thread per core that other processes leave free (all of them under a light
        load), unless the caller fixed the count. ``steady``: all of them whatever the load,
        because the next step's result depends on the thread count — llama.cpp's split-KV
        attention (a long sequence's token decoded alone, see :data:`LONE_LIMIT`) gives each
        thread a share of the cells, so an exact reply must always split them alike."""
        wanted = self._free.look() if self._free is not None else None
        if wanted is not None:
            self._fitted = wanted
        target = self.max_threads if steady else self._fitted
        if target != self.n_threads:
            self.api.llama_set_n_threads(self.ctx.ctx, target, target)
            self.n_threads = target

    def set_threads(self, n_threads: int) -> None:
        self.api.llama_set_n_threads(self.ctx.ctx, n_threads, n_threads)
        self.n_threads = self.max_threads = self._fitted = n_threads
        self._free = None  # the caller decides from now on

    @property
    def kv_bytes(self) -> int:
        """The KV cache's size: every sequence's keys and values (16-bit) for its context."""
        api, model = self.api, self.model.model
        heads = max(1, int(api.llama_model_n_head(model)))
        per_token = (2 * int(api.llama_model_n_layer(model)) * int(api.llama_model_n_head_kv(model))
                     * (int(api.llama_model_n_embd(model)) // heads) * 2)
        return per_token * self.context_length * self.n_seq

    def describe(self) -> dict[str, Any]:
        return {"threads": self.n_threads, "kv_cache_bytes": self.kv_bytes}

    def close(self) -> None:
        if self._batch is not None:
            self.api.llama_batch_free(self._batch)
            self._batch = None
        self.ctx.close()  # type: ignore[no-untyped-call]
