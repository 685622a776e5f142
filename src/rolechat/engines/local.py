"""Engines that run the model in this process: token ids, the live KV cache and its snapshots.

Contract:
- A :class:`LocalEngine` has a :class:`~rolechat.engines.tokenizers.PromptEncoder`
  (``encoder``: messages → ids, content never control tokens), a live
  :class:`~rolechat.engines.kvcache.KVCache` (``kv``) and a :class:`MemoryTier` of snapshots
  (``memory``). A subclass implements ``_evaluate`` (evaluate prompt tokens as a batch),
  ``_tokens`` (evaluate the prompt after the cache's first ``start`` tokens, then yield sampled
  ids, evaluating each only when the next is wanted) and ``_piece`` (a token's bytes), and sets
  ``_eog`` (end-of-turn ids).
- One reply at a time: the engine lock is held for the whole stream and released in
  ``finally``, also when the consumer stops early.
- KV reuse: a reply's prompt starts from the longest common prefix among the live cache, the
  snapshot of the reply's conversation (``cache_key``: memory, then its file on disk) and every
  snapshot in memory (so a stateless client that alternates between conversations stays warm).
  A snapshot is restored only where its ids match the prompt's, so it can never change a
  reply; at least one prompt token is always evaluated.
- Exact replies (greedy, or with a seed) are the same whatever the cache held. Keys and values
  computed one token at a time while decoding differ in the last bits from those of a prompt
  evaluated in batches, and that can change a sampled token. So the cache counts its
  *canonical* prefix — tokens evaluated as a prompt — and an exact reply reuses only that, and
  evaluates at least two prompt tokens itself. After an exact reply, the background checkpoint
  first re-evaluates the reply's tokens as a prompt (while the user reads; or when the next
  exact reply comes first), so the next turn still reuses everything. Other replies reuse every
  matching token.
- Snapshots are taken off the reply's path: when a reply completes, a background task copies
  the live cache into the memory tier under the reply's key (anonymous replies get a
  ``prefix-N`` key) and writes it to the key's disk tier. If another reply takes the engine
  first and would overwrite that state (another conversation, or a prompt that does not extend
  it), that reply takes the snapshot before it starts. A snapshot that fails to restore is
  dropped with a warning and the prompt is evaluated normally.
- ``Usage`` says how many tokens were reused, how many of them were restored, and from where.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..conversation import Message
from ..params import GenerationParams
from ..streaming import ReplyText
from .base import Completion, Engine, FinishReason, Generation, KVSource, Timer, reply_room
from .kvcache import KVCache, KVSnapshot, SnapshotError, common_prefix
from .snapshots import (
    DEFAULT_RAM_BYTES,
    Background,
    CacheKey,
    DamagedSnapshot,
    DiskEntry,
    DiskTier,
    MemoryTier,
)
from .tokenizers import PromptEncoder

log = logging.getLogger("rolechat.kv")

#: A snapshot is restored only when it saves at least this many more tokens than the live cache.
MIN_RESTORE_GAIN = 8
#: Snapshot files are written once no reply has run for this long (seconds).
IDLE_S = 0.5


@dataclass(frozen=True)
class Ending:
    """How a reply's tokens ended."""

    text: str
    finish: FinishReason
    #: The last sampled token (never evaluated), or None if there was none.
    last: int | None
    #: True when it was an end-of-turn token.
    end_of_turn: bool


def emit_reply(tokens: Iterator[int], piece: Callable[[int], bytes], end_of_turn: set[int],
               params: GenerationParams, max_new: int,
               timer: Timer) -> Generator[str, None, Ending]:
    """The one token loop of every local engine: count each sampled token, stop at an
    end-of-turn token, a stop string or ``max_new`` tokens, and yield safe text. Returns the
    reply text and how it ended. A token the loop stops at is not asked for more, so an engine
    never evaluates the last sampled token."""
    reply = ReplyText(params.stop)
    finish: FinishReason = "stop"  # also when the tokens run out by themselves
    last: int | None = None
    for last in tokens:
        timer.token()
        if last in end_of_turn:
            break
        chunk = reply.push(piece(last))
        if chunk:
            yield chunk
        if reply.stopped:
            break
        if timer.tokens >= max_new:
            finish = "length"
            break
    tail = reply.finish()
    if tail:
        yield tail
    return Ending(reply.text, finish, last, last is not None and last in end_of_turn)


def is_exact(params: GenerationParams) -> bool:
    """Whether a reply must not depend on what the cache held: greedy, or seeded."""
    return params.greedy or params.seed is not None


@dataclass(frozen=True)
class Candidate:
    """A snapshot that may hold a prompt's prefix."""

    ids: np.ndarray
    canonical: int
    source: KVSource
    #: The snapshot itself (a file is read and checked only now).
    load: Callable[[], KVSnapshot]
    #: Throw it away, with a warning saying why.
    drop: Callable[[str], None]


@dataclass(frozen=True)
class Pending:
    """A finished reply whose KV state has not been snapshotted yet."""

    version: int
    exact: bool
    #: Tokens to evaluate ahead for the next turn (see :meth:`LocalEngine._next_turn`).
    ahead: list[int]


@dataclass(frozen=True)
class Reuse:
    """Where a prompt's cached prefix came from."""

    cached: int
    restored: int
    source: KVSource


class LocalEngine(Engine):
    """A model in this process. Subclasses set ``encoder``, ``kv`` and ``_eog``."""

    encoder: PromptEncoder
    kv: KVCache
    _eog: set[int]

    def __init__(self, *, kv_cache_ram: int = DEFAULT_RAM_BYTES) -> None:
        self._lock = threading.Lock()
        self.memory = MemoryTier(kv_cache_ram)
        self._background = Background()
        #: Whose state the live cache holds (None: a stateless request's).
        self._owner: CacheKey | None = None
        #: Leading live tokens whose keys and values came from evaluating a prompt.
        self._canonical = 0
        #: Changes whenever the live cache does; a checkpoint is only valid for its version.
        self._version = 0
        #: A finished reply whose state is not snapshotted yet.
        self._pending: Pending | None = None
        self._anonymous = itertools.count(1)
        self._turn_header: list[int] | None = None
        #: Snapshot files waiting to be written, newest per key, and the thread that writes
        #: them once the engine has been idle for a moment (file writes take CPU time that
        #: a reply starting right now should not share).
        self._unwritten: dict[CacheKey, tuple[KVSnapshot, dict[str, Any]]] = {}
        self._writer = Background("rolechat-kv-writer")
        self._last_reply = time.monotonic()

    # ----- what a subclass provides ------------------------------------------------------
    @abstractmethod
    def _evaluate(self, ids: list[int], start: int) -> None:
        """Evaluate ``ids[start:]`` as a prompt (in batches), after the cache's first
        ``start`` tokens; the cache then holds ``ids``."""

    @abstractmethod
    def _tokens(self, prompt_ids: list[int], start: int,
                params: GenerationParams) -> Iterator[int]:
        """Evaluate ``prompt_ids[start:]`` after the cache's first ``start`` tokens, then yield
        sampled token ids; each is evaluated only when the next one is asked for."""

    @abstractmethod
    def _piece(self, token: int) -> bytes:
        """The bytes of one generated token."""

    # ----- tokens ------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return self.encoder.tokenizer.bos_id

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text`` (``special``: control-token text may become control tokens)."""
        return self.encoder.tokenizer.tokenize(text, special=special)

    def prompt_ids(self, messages: Sequence[Message], *,
                   add_generation_prompt: bool = True) -> list[int]:
        return self.encoder.ids(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, messages: Sequence[Message], *,
                     add_generation_prompt: bool = True) -> int:
        return len(self.prompt_ids(messages, add_generation_prompt=add_generation_prompt))

    def continuation_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.encoder.open_ids(messages)

    def count_text(self, text: str) -> int:
        return self.encoder.count_text(text)

    # ----- generation --------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], params: GenerationParams, *,
               prompt_ids: Sequence[int] | None = None,
               cache_key: CacheKey | None = None) -> Generation:
        ids = list(prompt_ids) if prompt_ids is not None else self.prompt_ids(messages)
        return Generation(self._locked(ids, params, cache_key))

    def _locked(self, prompt_ids: list[int], params: GenerationParams,
                key: CacheKey | None) -> Generator[str, None, Completion]:
        with self._lock:
            try:
                return (yield from self._run(prompt_ids, params, key))
            finally:
                self._last_reply = time.monotonic()

    def _run(self, prompt_ids: list[int], params: GenerationParams,
             key: CacheKey | None) -> Generator[str, None, Completion]:
        max_new = reply_room(len(prompt_ids), self.context_length, params)
        exact = is_exact(params)
        timer = Timer()
        try:
            reuse = self._prefill(prompt_ids, key, exact)
            ending = yield from emit_reply(
                self._tokens(prompt_ids, reuse.cached, params), self._piece, self._eog, params,
                max_new, timer)
        except GeneratorExit:  # the caller stopped at a chunk: the cache is consistent
            self._pending = Pending(self._version, False, [])
            raise
        except BaseException:  # inside the model (Ctrl-C, out of memory): layers may
            self._drop_live()  # disagree, so the cache cannot be trusted any more
            raise
        self._pending = Pending(self._version, exact, self._next_turn(ending))
        self._background.submit(partial(self._checkpoint_later, self._version))
        usage = timer.usage(len(prompt_ids), reuse.cached, restored_tokens=reuse.restored,
                            kv_source=reuse.source)
        return Completion(ending.text, usage, ending.finish)

    def _next_turn(self, ending: Ending) -> list[int]:
        """Tokens the next prompt will almost surely continue the cache with: the template's
        text between a reply and the next user message (``<|im_end|>\n<|im_start|>user\n``),
        after the last sampled token where the template does not write that one itself. The
        checkpoint evaluates them ahead; a prompt that differs just does not reuse them."""
        header = self.turn_header()
        if not header or ending.last is None:
            return []
        if ending.end_of_turn:  # the template writes its own end-of-turn text
            return header
        if ending.finish == "length":  # the reply's last token, then the template's text
            return [ending.last, *header]
        return []  # cut at a stop string: the cache holds tokens the prompt will not

    def turn_header(self) -> list[int]:
        """The ids of the template text between an assistant message and the next user
        message (empty if the template cannot be traced)."""
        if self._turn_header is None:
            self._turn_header = []
            try:
                messages = [Message("user", "a"), Message("assistant", "b"),
                            Message("user", "c")]
                segments = self.template.segments(messages, add_generation_prompt=False)
            except Exception:  # a template that refuses these messages: no pre-evaluation
                segments = None
            if segments is not None:
                pieces = [text for text, is_content in segments]
                contents = [i for i, (_, is_content) in enumerate(segments) if is_content]
                if len(contents) == 3 and contents[2] == contents[1] + 2:
                    self._turn_header = self.tokenize(pieces[contents[1] + 1], special=True)
        return self._turn_header

    # ----- the KV cache ------------------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int], cache_key: CacheKey | None = None, *,
                exact: bool = False) -> int:
        """Make the cache hold the longest reusable prefix of ``prompt_ids`` (at least one
        token is left to evaluate, two for an ``exact`` reply); return its length. Tests and
        benchmarks call this to see what a reply would reuse; a reply does it itself."""
        with self._lock:
            return self._prefill(list(prompt_ids), cache_key, exact).cached

    def _prefill(self, prompt_ids: list[int], key: CacheKey | None, exact: bool) -> Reuse:
        if self._pending is not None:
            held = self.kv.ids
            extends = common_prefix(held, prompt_ids, len(held)) == len(held)
            # The background checkpoint has not run yet. Take it now if this reply would
            # overwrite the state, or if both replies are exact (its re-evaluation of the last
            # reply is what this one needs); else this reply supersedes it.
            if not (key == self._owner and extends) or (exact and self._pending.exact):
                self._checkpoint(ahead=False)
            self._pending = None
        limit = len(prompt_ids) - (2 if exact else 1)
        live = common_prefix(self.kv.ids, prompt_ids, limit)
        if exact:
            live = min(live, self._canonical)
        best: Candidate | None = None
        reach = live + MIN_RESTORE_GAIN - 1
        for candidate in self._candidates(key):
            n = common_prefix(candidate.ids, prompt_ids, limit)
            if exact:
                n = min(n, candidate.canonical)
            if n > reach:
                best, reach = candidate, n
        self._owner, self._version = key, self._version + 1
        evaluated = len(prompt_ids) - (reach if best is not None else live)
        if best is not None:
            try:
                snapshot = best.load()
                self.kv.restore(snapshot, reach)
            except (SnapshotError, DamagedSnapshot, OSError) as exc:
                best.drop(str(exc))
                self.kv.reset()
                self._canonical = 0
                return Reuse(0, 0, "none")
            self._canonical = self._after_prompt(min(snapshot.canonical, reach), reach,
                                                 evaluated)
            return Reuse(reach, reach, best.source)
        self.kv.keep(live)
        self._canonical = self._after_prompt(min(self._canonical, live), live, evaluated)
        return Reuse(live, 0, "live" if live else "none")

    @staticmethod
    def _after_prompt(canonical: int, reused: int, evaluated: int) -> int:
        """The canonical prefix once the prompt is evaluated: all of it if every reused token
        was canonical and the rest is evaluated as a batch (more than one token)."""
        return reused + evaluated if canonical == reused and evaluated > 1 else canonical

    def _candidates(self, key: CacheKey | None) -> Iterator[Candidate]:
        """Snapshots that may hold the prompt's prefix: the key's own (memory, else its file),
        then every snapshot in memory."""
        own = self.memory.get(key) if key is not None and self.memory.max_bytes else None
        if own is None and key is not None and key.disk is not None:
            entry = key.disk.open(self.kv.identity(), key.name)
            if entry is not None:
                yield Candidate(entry.ids, entry.canonical, "disk",
                                partial(self._load_file, key.disk, entry),
                                partial(self._drop_file, key.disk, entry))
        for other, snapshot in self.memory.entries():
            yield Candidate(snapshot.ids, snapshot.canonical, "memory",
                            partial(self.memory.hit, other, snapshot),
                            partial(self._drop_memory, other))

    def _load_file(self, disk: DiskTier, entry: DiskEntry) -> KVSnapshot:
        snapshot = self.kv.loads(disk.read(entry), entry.ids)
        return dataclasses.replace(snapshot, canonical=min(entry.canonical, len(entry.ids)))

    @staticmethod
    def _drop_file(disk: DiskTier, entry: DiskEntry, why: str) -> None:
        disk.discard_damaged(entry.path, why)

    def _drop_memory(self, key: CacheKey, why: str) -> None:
        log.warning("a KV snapshot in memory could not be restored (%s); it was dropped, and "
                    "the prompt is evaluated normally", why)
        self.memory.discard(key)

    def _drop_live(self) -> None:
        self.kv.reset()
        self._owner, self._version, self._canonical, self._pending = (
            None, self._version + 1, 0, None)

    # ----- checkpoints -------------------------------------------------------------------
    def _checkpoint_later(self, version: int) -> None:
        """The background task after a reply: snapshot its state unless a newer reply came."""
        with self._lock:
            if self._pending is not None and self._pending.version == version == self._version:
                self._checkpoint(ahead=True)

    def _checkpoint(self, *, ahead: bool) -> None:
        """Snapshot the live cache into the memory tier (and its key's disk tier). After an
        exact reply, its tokens are first evaluated again as a prompt, so the snapshot and the
        live cache are canonical; with ``ahead``, the next turn's template text is evaluated
        too. Lock held."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        ids = [int(t) for t in self.kv.ids]
        start = len(ids)
        if pending.exact and self._canonical < len(ids):
            start = self._canonical
        extra = pending.ahead if ahead and len(ids) + len(pending.ahead) < self.context_length \
            else []
        if start < len(ids) or extra:
            if len(ids) + len(extra) - start < 2:
                start -= 1  # a prompt batch of at least two tokens
            if start >= 0:
                canonical = self._canonical >= start
                self.kv.keep(start)
                try:
                    self._evaluate(ids + extra, start)
                except BaseException:
                    self._drop_live()  # half evaluated: the cache cannot be trusted
                    raise
                if canonical:
                    self._canonical = len(ids) + len(extra)
        snapshot = self.kv.snapshot()
        if snapshot is None:
            return
        snapshot = dataclasses.replace(snapshot, canonical=min(self._canonical, len(snapshot)))
        key = self._owner or CacheKey(f"prefix-{next(self._anonymous)}")
        self._owner = key
        if self.memory.max_bytes:
            self.memory.put(key, snapshot)
        if key.disk is not None and key.disk.max_bytes:
            self._unwritten[key] = (snapshot, self.kv.identity())
            self._writer.submit(partial(self._write_when_idle, key))

    def _write_when_idle(self, key: CacheKey) -> None:
        """Write ``key``'s newest snapshot file once no reply has started for a moment (or at
        once when flushing)."""
        while not self._writer.hurry and (self._lock.locked() or
                                          time.monotonic() - self._last_reply < IDLE_S):
            time.sleep(0.02)
        entry = self._unwritten.pop(key, None)
        if entry is None or key.disk is None:
            return  # a newer task wrote it already
        snapshot, identity = entry
        key.disk.write(identity, key.name, snapshot.ids, self.kv.dumps(snapshot),
                       snapshot.canonical)

    def flush(self, timeout: float = 60.0) -> bool:
        """Finish pending snapshot work now (copies and file writes); False on timeout."""
        done = self._background.flush(timeout)  # checkpoints first: they queue file writes
        return self._writer.flush(timeout, hurry=True) and done

    def reset_cache(self) -> None:
        """Forget the live cache and every snapshot in memory: the next reply evaluates its
        whole prompt unless a snapshot file on disk is restored."""
        self.flush()
        with self._lock:
            self._drop_live()
            self.memory.clear()

    def forget(self, key: CacheKey) -> None:
        self.flush()
        with self._lock:
            self.memory.discard(key)
            if self._owner == key:
                self._drop_live()
            if key.disk is not None:
                key.disk.delete(self.kv.identity(), key.name)

    def kv_stats(self) -> dict[str, Any]:
        owner = self._owner.name if self._owner is not None else None
        return {"live": {"tokens": len(self.kv.ids), "conversation": owner},
                "memory": self.memory.stats()}

    def close(self) -> None:
        self.flush()
