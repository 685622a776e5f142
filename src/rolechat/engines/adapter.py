"""What a model backend gives the scheduler: sequences of KV cells it evaluates in batches.

Contract:
- An :class:`Adapter` holds one model and one context of ``n_seq`` sequences, each up to
  ``context_length`` tokens. It knows nothing about conversations, templates or text: token ids
  in, logits rows out (nanochat's engine "knows nothing about tokenization").
- ``evaluate(seq, ids, start)`` evaluates ``ids[start:]`` (one batch, at most ``max_batch``
  tokens, or ``loose_batch`` where they need not be canonical) as a prompt at positions
  ``start...`` of sequence ``seq`` and returns the row of the last token's logits;
  ``step(entries)`` evaluates one token for each ``(seq, token, position, logits)`` in one
  batch and returns a row for each (meaningful where ``logits`` is true). A row is valid until
  the next call.
- Numerics: keys and values a prompt batch of at least ``canonical_batch`` tokens computes are
  *canonical* — the same whatever the batch's size, its company or how the prompt was split;
  a decode step's are canonical too where ``decode_canonical`` says so, else they differ in the
  last bits; ``canonical(entries)`` says it token by token for one call (llama.cpp computes a
  long sequence's single token with another kernel when no neighbouring sequence shares its
  part of the batch). The scheduler tracks which tokens are canonical, so that exact replies
  (greedy or seeded) are the same whatever the cache held.
- ``keep(seq, n)`` drops the sequence's cells from position ``n`` on and says how many it
  holds (fewer than ``n`` where a cache cannot be cropped there); ``snapshot(seq, ids)``
  copies its state to host memory, ``restore(seq, snapshot, n)`` makes it hold exactly the
  snapshot's first ``n`` tokens, bit for bit; ``dumps``/``loads``/``identity`` serve the disk
  tier.
- ``sampler(params, prompt, constraint)`` makes one reply's :class:`Sampler`: it draws tokens
  from rows (with the reply's own random state, penalties and seed, and only tokens the
  constraint's grammar allows) and spells them (``piece``).
- Every call happens on the scheduler's thread, except ``identity``, ``dumps`` and ``loads``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..constraint import Constraint
from ..params import GenerationParams
from .kvcache import KVSnapshot


class Sampler(ABC):
    """One reply's sampling state."""

    @abstractmethod
    def sample(self, row: int) -> int:
        """Draw the next token from logits row ``row`` (and remember it for penalties)."""

    @abstractmethod
    def piece(self, token: int) -> bytes:
        """The bytes a generated token adds to the reply (control tokens add nothing)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the sampler holds."""


class Adapter(ABC):
    """A model and its context of ``n_seq`` sequences."""

    #: How many sequences the context holds.
    n_seq: int = 1
    #: Most tokens one sequence holds.
    context_length: int
    #: Most tokens one ``evaluate`` or ``step`` call takes.
    max_batch: int = 512
    #: Prompt tokens evaluated in one chunk when no other sequence is generating (a client that
    #: leaves stops its prompt within one chunk).
    prompt_chunk: int = 256
    #: Most tokens one ``evaluate`` call takes where its keys and values need not be canonical
    #: (a prompt for a reply that is not exact, with no other sequence generating); batches
    #: above ``max_batch`` are never canonical. 0: no more than ``max_batch``.
    loose_batch: int = 0
    #: A prompt batch of at least this many tokens gives canonical keys and values.
    canonical_batch: int = 2
    #: Whether a decode step's keys and values are canonical too (then nothing is ever
    #: evaluated again).
    decode_canonical: bool = False
    #: End-of-generation token ids.
    eog: set[int]

    @abstractmethod
    def evaluate(self, seq: int, ids: Sequence[int], start: int) -> int:
        """Evaluate ``ids[start:]`` at positions ``start...`` of ``seq`` (which holds exactly
        ``ids[:start]``); the row of the last token's logits."""

    @abstractmethod
    def step(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        """Evaluate one ``(seq, token, position, logits)`` per entry in one batch; their rows
        (a row is meaningful where ``logits`` is true)."""

    def canonical(self, entries: Sequence[tuple[int, int]]) -> list[bool]:
        """For one call evaluating one token of each ``(seq, position)`` (a decode step, or a
        one-token prompt batch): whether each token's keys and values come out canonical."""
        return [self.decode_canonical] * len(entries)

    @abstractmethod
    def sampler(self, params: GenerationParams, prompt: Sequence[int],
                constraint: Constraint | None = None) -> Sampler:
        """A new reply's sampler, for a reply to ``prompt`` that follows ``constraint``;
        InvalidInput where its grammar cannot be applied."""

    @abstractmethod
    def keep(self, seq: int, n: int) -> int:
        """Drop ``seq``'s cells from position ``n`` on (``n = 0``: all of them); how many
        tokens it holds now (at most ``n``)."""

    @abstractmethod
    def snapshot(self, seq: int, ids: np.ndarray) -> KVSnapshot | None:
        """A copy of ``seq``'s state, which holds ``ids`` (None if it cannot be copied)."""

    @abstractmethod
    def restore(self, seq: int, snapshot: KVSnapshot, n: int) -> None:
        """Make ``seq`` hold exactly ``snapshot``'s first ``n`` tokens; SnapshotError if the
        snapshot does not fit this context (``seq`` is then empty)."""

    @abstractmethod
    def dumps(self, snapshot: KVSnapshot) -> bytes:
        """A snapshot's state as bytes (its ids are stored by the caller)."""

    @abstractmethod
    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        """A snapshot from :meth:`dumps`' bytes; SnapshotError if they cannot be one."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a snapshot of this context is valid for (model, context length, cache layout,
        library versions): JSON-able, equal only where snapshots restore into each other."""

    def fit_threads(self, *, steady: bool = False) -> None:  # noqa: B027 - optional hook
        """Before each step: use the threads the machine can give now; with ``steady``, the
        same number every time (the next step holds an exact reply's token whose result
        depends on it)."""

    def set_threads(self, n_threads: int) -> None:  # noqa: B027 - optional hook
        """Use ``n_threads`` CPU threads from now on."""

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the context and the model."""
