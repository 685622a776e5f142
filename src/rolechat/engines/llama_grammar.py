"""A reply's llama.cpp sampler chain under a grammar, at nearly the speed of free text.

Contract:
- :class:`GrammarSampler` is a :class:`~rolechat.engines.llama_adapter.LlamaSampler` (the same
  chain, the same seeded draws) whose tokens the constraint's grammar allows: llama.cpp's
  grammar sampler, strict, or lazy at the constraint's trigger patterns. A grammar llama.cpp
  cannot parse is an :class:`~rolechat.errors.InvalidInput` when the sampler is made.
- Sample first, as llama.cpp's common sampler does: the chain picks from the whole vocabulary
  and the grammar checks that one token (microseconds). Only a refused token costs more — and
  on a JSON reply a third are refused (property names and punctuation the model did not
  expect). llama.cpp then applies the grammar to all of the vocabulary (~6 ms for 49k tokens
  here); this sampler applies it only to the tokens that can be allowed at all: those whose
  first byte the grammar takes next (found by trying one single-byte token per byte value:
  a token whose first byte the grammar refuses is refused) and the end-of-generation tokens.
  The refused tokens llama.cpp would have set to minus infinity are simply not there, so the
  chain picks the same token from the same draw. ``sample_first = False`` applies the grammar
  to the whole vocabulary before every pick instead (what both save; benchmarks/structured.py
  measures all three).
- :class:`ByteIndex`, built once per adapter: each token's first byte as llama.cpp's grammar
  spells it (control tokens as their text), and a token for each byte that spells it alone.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constraint import Constraint
from ..errors import InvalidInput
from ..params import GenerationParams
from .llama_adapter import LlamaSampler

if TYPE_CHECKING:
    from .llama_adapter import LlamaAdapter

#: llama.cpp's ``llama_token_data``: id, logit, probability.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class ByteIndex:
    """How each token starts, as llama.cpp's grammar spells it: ``first`` its first byte (-1:
    an end-of-generation token, or one with no text), ``pair`` its first two bytes as one
    number (first * 256 + second; -1: shorter); and the tokens that spell exactly one byte
    (``single``, by byte) or two (``double``, by pair), which the sampler tries."""

    def __init__(self, adapter: LlamaAdapter) -> None:
        api, vocab, n = adapter.api, adapter.model.vocab, adapter.n_vocab
        self.first = np.full(n, -1, dtype=np.int32)
        self.pair = np.full(n, -1, dtype=np.int32)
        self.single = np.full(256, -1, dtype=np.int32)
        self.double = np.full(65536, -1, dtype=np.int32)
        buffer = ctypes.create_string_buffer(256)
        for token in range(n):
            if token in adapter.eog:
                continue
            size = api.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
            if size <= 0:
                continue
            raw = buffer.raw
            self.first[token] = raw[0]
            if size == 1 and self.single[raw[0]] < 0:
                self.single[raw[0]] = token
            if size >= 2:
                pair = raw[0] * 256 + raw[1]
                self.pair[token] = pair
                if size == 2 and self.double[pair] < 0:
                    self.double[pair] = token
        self.eog = np.array(sorted(adapter.eog), dtype=np.int32)
        #: The byte values with a single-byte token, and those tokens.
        self.probe_bytes = np.flatnonzero(self.single >= 0).astype(np.int32)
        self.probe_tokens = self.single[self.probe_bytes]
        #: The pairs with a two-byte token, and those tokens.
        self.pairs = np.flatnonzero(self.double >= 0).astype(np.int32)


def byte_index(adapter: LlamaAdapter) -> ByteIndex:
    index: ByteIndex | None = getattr(adapter, "_byte_index", None)
    if index is None:
        index = ByteIndex(adapter)
        adapter._byte_index = index  # type: ignore[attr-defined]
    return index


class TokenArray:
    """A ``llama_token_data_array`` over a numpy array of up to ``capacity`` candidates."""

    def __init__(self, api: Any, capacity: int) -> None:
        self.api = api
        self.data = np.zeros(capacity, dtype=TOKEN_DATA)
        self.struct = api.llama_token_data_array(
            data=self.data.ctypes.data_as(api.llama_token_data_p), size=capacity, selected=-1,
            sorted=False)

    def fill(self, ids: np.ndarray, logits: np.ndarray) -> Any:
        n = len(ids)
        data = self.data
        data["id"][:n], data["logit"][:n], data["p"][:n] = ids, logits, 0.0
        struct = self.struct
        struct.data, struct.size, struct.selected, struct.sorted = (
            data.ctypes.data_as(self.api.llama_token_data_p), n, -1, False)
        return struct

    def allowed(self) -> np.ndarray:
        """After a grammar was applied: which of the candidates it left."""
        found: np.ndarray = np.isfinite(self.data["logit"][:self.struct.size])
        return found


class GrammarSampler(LlamaSampler):
    """A reply's sampler chain under a grammar (see the module's contract)."""

    #: False: the grammar is applied to every candidate before the chain picks.
    sample_first = True

    def __init__(self, adapter: LlamaAdapter, params: GenerationParams,
                 constraint: Constraint) -> None:
        super().__init__(adapter, params)
        api = adapter.api
        assert constraint.gbnf is not None
        gbnf, root = constraint.gbnf.encode(), b"root"
        if constraint.triggers:
            patterns = (ctypes.c_char_p * len(constraint.triggers))(
                *(t.encode() for t in constraint.triggers))
            grammar = api.llama_sampler_init_grammar_lazy_patterns(
                adapter.model.vocab, gbnf, root, patterns, len(constraint.triggers), None, 0)
        else:
            grammar = api.llama_sampler_init_grammar(adapter.model.vocab, gbnf, root)
        if not grammar:
            self._grammar = None
            super().close()
            raise InvalidInput("llama.cpp could not parse the reply's grammar (GBNF).",
                               "Check the grammar; the server's log names the rule.")
        self._grammar = grammar
        n = adapter.n_vocab
        self._index = byte_index(adapter)
        self._ids = np.arange(n, dtype=np.int32)
        self._all = TokenArray(api, n)
        self._one = TokenArray(api, 1)
        self._probe = TokenArray(api, max(256, len(self._index.pairs)))
        self._ones = np.ones(max(256, len(self._index.pairs)), dtype=np.float32)
        #: Tokens the grammar refused after the chain chose them, and the candidates the
        #: grammar then saw (all of them: the vocabulary each time).
        self.rejected = self.candidates = 0

    def _logits(self, row: int) -> np.ndarray:
        adapter = self._adapter
        return np.ctypeslib.as_array(adapter.api.llama_get_logits_ith(adapter.ctx.ctx, row),
                                     shape=(adapter.n_vocab,))

    def _choose(self, cur: Any) -> int:
        self._adapter.api.llama_sampler_apply(self._chain.sampler, ctypes.byref(cur))
        return int(cur.data[cur.selected].id)

    def _apply(self, cur: Any) -> None:
        self._adapter.api.llama_sampler_apply(self._grammar, ctypes.byref(cur))

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (no state changes)."""
        one = self._one.fill(np.array([token], dtype=np.int32), np.ones(1, dtype=np.float32))
        self._apply(one)
        return bool(self._one.allowed()[0])

    def _possible(self) -> np.ndarray:
        """The ids of every token the grammar may allow next (in id order): the tokens whose
        first byte it takes and whose first two bytes it takes, and the ends. A byte or pair
        with no token of its own to try is taken to be possible."""
        index = self._index
        takes = np.ones(257, dtype=bool)  # by byte; [256] stands for -1: never
        self._apply(self._probe.fill(index.probe_tokens, self._ones[:len(index.probe_tokens)]))
        takes[index.probe_bytes] = self._probe.allowed()
        takes[256] = False
        pairs = index.pairs[takes[index.pairs >> 8]]  # the pairs to try: first byte taken
        pair_takes = np.ones(65537, dtype=bool)  # by pair; [65536] stands for -1: no pair
        self._apply(self._probe.fill(index.double[pairs], self._ones[:len(pairs)]))
        pair_takes[pairs] = self._probe.allowed()
        possible = takes[index.first] & pair_takes[index.pair]
        possible[index.eog] = True
        found: np.ndarray = np.flatnonzero(possible).astype(np.int32)
        return found

    def sample(self, row: int) -> int:
        api, logits = self._adapter.api, self._logits(row)
        if self.sample_first:
            token = self._choose(self._all.fill(self._ids, logits))
            if not self.allows(token):
                self.rejected += 1
                possible = self._possible()
                self.candidates += len(possible)
                cur = self._all.fill(possible, logits[possible])
                self._apply(cur)
                token = self._choose(cur)
        else:
            cur = self._all.fill(self._ids, logits)
            self._apply(cur)
            token = self._choose(cur)
        api.llama_sampler_accept(self._grammar, token)
        api.llama_sampler_accept(self._chain.sampler, token)
        return token

    def close(self) -> None:
        if self._grammar is not None:
            self._adapter.api.llama_sampler_free(self._grammar)
            self._grammar = None
        super().close()
