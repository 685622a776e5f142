"""The KV state of a local engine as an explicit object: the tokens it holds, and their keys
and values.

Contract:
- :class:`KVCache` is a local engine's live cache. ``ids`` are the tokens it holds, in order
  (the prompt and the reply so far, minus the last sampled token, which is never evaluated).
  ``keep(n)`` drops everything after the first ``n`` tokens; ``reset()`` drops everything.
- ``snapshot()`` copies the live state into a :class:`KVSnapshot` (host memory) that the live
  cache no longer touches; ``restore(snapshot, n)`` makes the live cache hold exactly the
  snapshot's first ``n`` tokens. Restoring is bit-for-bit: the restored cache gives the same
  logits as the cache the snapshot was taken from.
- ``dumps(snapshot)`` / ``loads(data, ids)`` turn a snapshot's state into bytes and back, for
  the disk tier (:mod:`rolechat.engines.snapshots`); ``identity()`` names what a snapshot is
  only valid for (model file, context length, cache layout, library versions).
- A snapshot is used only through :func:`common_prefix`: its token ids must match the new
  prompt's ids for every position that is reused, so a stale or foreign snapshot can never
  change a reply (a snapshot's KV at position ``i`` depends only on tokens ``0..i``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Token ids as the KV layer keeps them.
TokenIds = np.ndarray


def as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """A read-only int32 array of token ids (a copy)."""
    array = np.array(ids, dtype=np.int32)
    array.flags.writeable = False
    return array


def common_prefix(held: Sequence[int] | np.ndarray, prompt: Sequence[int] | np.ndarray,
                  limit: int) -> int:
    """How many leading ids ``held`` and ``prompt`` share, at most ``limit``."""
    n = min(len(held), len(prompt), limit)
    if n <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(held[:n]) != np.asarray(prompt[:n]))
    return int(differ[0]) if differ.size else n


class SnapshotError(RuntimeError):
    """A snapshot could not be restored (wrong model or layout, damaged data)."""


@dataclass(frozen=True, eq=False)
class KVSnapshot:
    """A copy of a KV cache in host memory: the token ids it covers and their state."""

    ids: np.ndarray
    #: Engine-specific state (bytes for llama.cpp, CPU tensors for transformers).
    state: Any
    #: Bytes the snapshot takes in memory (state and ids).
    nbytes: int
    #: Leading tokens whose keys and values came from evaluating a prompt (not from decoding
    #: one token at a time): what an exact reply may reuse.
    canonical: int = 0

    def __len__(self) -> int:
        return len(self.ids)


class KVCache(ABC):
    """A local engine's live KV cache."""

    @property
    @abstractmethod
    def ids(self) -> np.ndarray:
        """The tokens the cache holds (a view; copy it to keep it)."""

    @abstractmethod
    def keep(self, n: int) -> None:
        """Keep the first ``n`` tokens, drop the rest."""

    @abstractmethod
    def reset(self) -> None:
        """Drop every token."""

    @abstractmethod
    def snapshot(self) -> KVSnapshot | None:
        """A copy of the live state, or None when there is nothing (or it cannot be copied)."""

    @abstractmethod
    def restore(self, snapshot: KVSnapshot, n: int) -> None:
        """Hold exactly the first ``n`` tokens of ``snapshot``; SnapshotError if it does not fit
        this cache (the live cache is then empty)."""

    @abstractmethod
    def dumps(self, snapshot: KVSnapshot) -> bytes:
        """The snapshot's state as bytes (its ids are stored by the caller)."""

    @abstractmethod
    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        """A snapshot from :meth:`dumps`' bytes; SnapshotError if they cannot be one."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a snapshot of this cache is valid for: JSON-able, equal only for caches whose
        snapshots can be restored into each other."""
