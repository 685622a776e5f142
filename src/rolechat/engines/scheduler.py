"""The scheduler: one thread that steps every sequence of a local engine's context.

Contract:
- Every evaluation of the model — prompt chunks, decode steps, the re-evaluation of an exact
  reply, the next turn's template text evaluated ahead — runs on the scheduler's one thread
  (``rolechat-scheduler``), so the model's threads (llama.cpp's OpenMP team) are the only ones
  in the process. Other threads submit :class:`Request` objects and read what they yield.
- Sequences (:class:`Slot`): the adapter's ``n_seq`` sequences. A conversation stays in its
  sequence between turns (*resident*); when a request needs a sequence and none is free, the
  least recently used idle one is snapshotted into the :class:`~rolechat.engines.kvstore.
  KVStore` (RAM, and its file) and reused (*evicted*).
- A request is admitted to a sequence (its conversation's own, an idle stateless one whose
  tokens it continues, a free one, or an evicted one), in arrival order; one that cannot be
  admitted waits, and its stream is told how many requests are ahead of it (:class:`Waiting`).
  A request for a conversation whose reply is still running waits for it.
- Reuse: when a request's prompt evaluation starts, its sequence keeps the longest prefix it
  shares with the prompt, or takes a longer one from another sequence or a snapshot (the
  conversation's own in RAM or on disk, or any in RAM): a conversation that opens with a popular
  persona copies that persona's evaluated prefix instead of evaluating it again. A snapshot is
  used only up to where its ids equal the prompt's, so it can never change a reply; at least one
  prompt token is evaluated.
- Each loop makes one decode step — the next token of every sequence that is generating, in one
  batch — and evaluates one chunk of one waiting prompt (in arrival order). While replies are
  streaming, the chunk is sized so that their next token comes at most :data:`GAP_FACTOR` times
  later than without it, so they stay smooth while a long prompt is taken in; alone, up to the
  adapter's ``prompt_chunk``. Replies that arrive together start together: one that has shown
  fewer than :data:`STREAMING` tokens waits while prompts wait, so a burst's prompts go in at
  full speed. Between chunks and steps, cancelled requests are dropped: a
  client that leaves frees its sequence at once and the others go on untouched.
- Exact replies (greedy, or with a seed) are the same whatever the cache held: an exact
  request reuses only the *canonical* prefix (keys and values computed the way a prompt batch
  computes them, see :mod:`rolechat.engines.adapter`) and evaluates at least
  ``canonical_batch`` tokens itself. The adapter says which decoded tokens are canonical
  (llama.cpp: all but a long sequence's token decoded alone in its part of the batch), and a
  waiting prompt rides in decode steps only where its tokens would be.
  After an exact reply, its tokens are evaluated again as a prompt when the engine is idle, so
  the next turn reuses all of it; the next turn's template text is evaluated ahead then too.
  A sequence is snapshotted (RAM, and its file once the machine is quiet) when it has been
  idle :data:`SNAPSHOT_AFTER_S`, when another conversation takes it, and before the process
  ends; never when the KV store would keep nothing.
- One reply's tokens go through one loop (:meth:`Scheduler._take`): each sampled token is
  counted; the reply ends at an end-of-generation token, a stop string or ``max_new`` tokens;
  only text that is safe to show is sent (:class:`~rolechat.streaming.ReplyText`). The last
  sampled token is never evaluated.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from ..constraint import Constraint
from ..params import GenerationParams
from ..streaming import ReplyText
from .adapter import Adapter, Sampler
from .base import Cancelled, Completion, FinishReason, KVSource, Timer, Waiting
from .kvcache import KVSnapshot, SnapshotError, as_ids, common_prefix
from .kvstore import Candidate, DamagedSnapshot, KVStore

log = logging.getLogger("rolechat.kv")
T = TypeVar("T")

#: A snapshot is used only when it saves at least this many more tokens.
MIN_RESTORE_GAIN = 8
#: Another sequence's prefix is copied only when it saves at least this many more tokens (a
#: copy reads that whole sequence).
MIN_COPY_GAIN = 32
#: While others stream, a prompt goes in chunks small enough that their next token comes at
#: most this many times later than without it: a step, then a chunk that costs about a step
#: (a call's fixed cost) and a prompt token's time for each token after the first.
GAP_FACTOR = 3.0
#: A reply that has shown this many tokens is streaming: waiting prompts no longer hold it.
STREAMING = 2
#: Beside streaming replies, a prompt chunk smaller than this is not a call of its own: one of
#: its tokens rides in each decode step instead (a call's fixed cost is about a step's, so a
#: small chunk of its own costs the streams more than its tokens are worth).
SEPARATE_CHUNK = 8
#: A sequence is snapshotted once it has been idle this long with nothing else to do: a client
#: that sends its next turn at once never waits behind a snapshot (copying a 1,300-token
#: sequence's state takes ~40 ms on 2 cores), and a person reading the reply never notices one.
SNAPSHOT_AFTER_S = 0.5


def is_exact(params: GenerationParams) -> bool:
    """Whether a reply must not depend on what the cache held: greedy, or seeded."""
    return params.greedy or params.seed is not None


@dataclass(frozen=True)
class Reuse:
    """Where a prompt's cached prefix came from."""

    cached: int
    restored: int
    source: KVSource


@dataclass(frozen=True)
class Pending:
    """Work left for an idle moment after a reply: evaluate its tokens again as a prompt
    (``exact``) and the next turn's template text (``ahead``)."""

    exact: bool
    ahead: list[int]


class Request:
    """One reply: a prompt, its parameters, whose conversation it is, and its stream."""

    _tickets = itertools.count()

    def __init__(self, prompt: list[int], params: GenerationParams, name: str | None,
                 max_new: int, *, constraint: Constraint | None = None) -> None:
        self.prompt = prompt
        self.params = params
        self.constraint = constraint
        self.name = name
        self.exact = is_exact(params)
        self.max_new = max_new
        self.ticket = next(self._tickets)
        self.timer = Timer()
        #: What the stream reads: text chunks, Waiting notices, then a Completion (or an
        #: exception).
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = False
        self.slot: Slot | None = None
        #: "queued" → "admitted" → "prompt" → "decode" → "done".
        self.state = "queued"
        self.pos = 0
        self.reuse = Reuse(0, 0, "none")
        self.sampler: Sampler | None = None
        self.text = ReplyText(params.stop)
        #: The last sampled token, evaluated at the next step.
        self.last: int | None = None
        self.ahead: int | None = None
        self._wake: Callable[[], None] | None = None

    def cancel(self) -> None:
        """The reader left: stop at the next step (a no-op once the reply is done)."""
        if not self.cancelled and self.state != "done":
            self.cancelled = True
            if self._wake is not None:
                self._wake()


@dataclass(eq=False)
class Slot:
    """One sequence of the context and what it holds."""

    seq: int
    #: The tokens whose keys and values the sequence holds, in order.
    ids: list[int] = field(default_factory=list)
    #: Leading ids evaluated as a prompt batch (what an exact reply may reuse).
    canonical: int = 0
    #: Whose conversation it holds (a stateless one gets a ``prefix-N`` name).
    name: str | None = None
    request: Request | None = None
    used: float = 0.0
    #: Changes whenever the held tokens do; ``saved`` is the version last snapshotted.
    version: int = 0
    saved: int = 0
    pending: Pending | None = None

    @property
    def idle(self) -> bool:
        return self.request is None

    def hold(self, ids: list[int], canonical: int) -> None:
        self.ids, self.canonical = ids, min(canonical, len(ids))
        self.version += 1


class Scheduler:
    """Steps the sequences of one adapter on one thread."""

    def __init__(self, adapter: Adapter, kv: KVStore,
                 turn_header: Callable[[], list[int]] | None = None) -> None:
        self.adapter = adapter
        self.kv = kv
        self._turn_header = turn_header or (lambda: [])
        self.slots = [Slot(seq) for seq in range(adapter.n_seq)]
        self._cond = threading.Condition()
        self._incoming: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._queue: list[Request] = []
        self._anonymous = itertools.count(1)
        self._closed = False
        #: Measured costs: seconds per decode step and per prompt token (moving averages);
        #: ``measure`` False keeps them as they are set (tests).
        self.step_s = 0.012
        self.token_s = 0.004
        self.measure = True
        self.steps = self.chunks = self.done = self.cancelled = 0
        # The thread holds the scheduler weakly while it waits, so an engine nobody uses any
        # more (and its model) can be collected; then the thread ends.
        self._thread = threading.Thread(target=_loop, args=(weakref.ref(self), self._cond),
                                        name="rolechat-scheduler", daemon=True)
        self._thread.start()
        weakref.finalize(self, _wake_up, self._cond)
        _LIVE.add(self)

    # ----- what other threads call -------------------------------------------------------
    def submit(self, request: Request) -> Request:
        request._wake = self._wake
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._incoming.append(request)
            self._cond.notify()
        return request

    def call(self, func: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``func`` on the scheduler's thread between steps; its result."""
        if threading.current_thread() is self._thread:
            return func()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._calls.append((func, future))
            self._cond.notify()
        return future.result(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ----- the loop ----------------------------------------------------------------------
    def _round(self) -> bool:
        """One round of the loop (the condition held on entry, released inside); False when
        the scheduler is closed."""
        if self._closed and not self._calls:
            return False
        if self._busy():  # calls alone (a status read) leave the quiet moment running
            self.kv.quiet.busy(True)
        calls = list(self._calls)
        self._calls.clear()
        self._queue.extend(self._incoming)
        self._incoming.clear()
        self._cond.release()
        try:
            self._drop_cancelled()  # a call made after a cancel sees it done
            for func, future in calls:
                self._answer(func, future)
            self._cycle()
        except Exception:  # a bug here must not kill the thread that every reply needs
            log.exception("the scheduler's step failed")
        finally:
            self._cond.acquire()
        return True

    def _has_work(self) -> bool:
        return bool(self._incoming or self._calls or self._queue or self._closed
                    or any(s.request is not None for s in self.slots)
                    or any(s.pending is not None for s in self.slots)
                    or self._snapshot_in() == 0.0)

    def _busy(self) -> bool:
        """Whether this round works the model (a reply, a prompt or a snapshot): what the file
        writer waits out."""
        return bool(self._incoming or self._queue
                    or any(s.request is not None or s.pending is not None for s in self.slots)
                    or self._snapshot_in() == 0.0)

    def _unsaved(self) -> list[Slot]:
        """Idle sequences with nothing left to evaluate that changed since their snapshot."""
        return [s for s in self.slots if s.idle and s.pending is None and s.ids
                and s.name is not None and s.saved != s.version]

    def _snapshot_in(self) -> float | None:
        """Seconds until an idle sequence is due for its snapshot (None: none is waiting)."""
        unsaved = self._unsaved()
        if not unsaved:
            return None
        due = min(s.used for s in unsaved) + SNAPSHOT_AFTER_S
        return max(0.0, due - time.monotonic())

    @staticmethod
    def _answer(func: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(func())
        except BaseException as exc:
            future.set_exception(exc)

    def _cycle(self) -> None:
        """One round: admit, one decode step, one prompt chunk; when nothing else is to be done,
        one piece of idle work. Replies that started together start together: while a prompt
        waits, replies that have shown only their first token do not step yet, so every
        prompt of a burst is taken in at full speed; replies already streaming step at every
        round, and the prompt comes in small chunks between their steps."""
        self._admit()
        prompt = min((s.request for s in self.slots if s.request is not None
                      and s.request.state in ("admitted", "prompt")),
                     key=lambda r: r.ticket, default=None)
        decoding = [s for s in self.slots if s.request is not None
                    and s.request.state == "decode"]
        self.adapter.fit_threads(steady=self._steady(decoding))
        streaming = [s for s in decoding if s.request is not None
                     and s.request.timer.tokens >= STREAMING]
        # Beside streams, a chunk too small to be worth a call of its own rides in the step.
        ride = prompt if prompt is not None and streaming and self._rides(prompt, decoding) \
            and self._chunk_size(len(prompt.prompt), True) < SEPARATE_CHUNK else None
        if decoding and (prompt is None or streaming):
            self._decode(decoding, ride)
        if prompt is not None and ride is None:
            self._prompt_chunk(prompt, others=bool(streaming))
        if not decoding and prompt is None and not self._queue:
            busy = next((s for s in self.slots if s.pending is not None), None)
            if busy is not None:
                self._checkpoint(busy, yielding=True)
            elif self._snapshot_in() == 0.0:
                self._save(min(self._unsaved(), key=lambda s: s.used))

    def _steady(self, decoding: list[Slot]) -> bool:
        """Whether an exact reply's next token would not be canonical: its result then depends
        on the thread count, which must not change with the machine's load."""
        canonical = self.adapter.canonical([(s.seq, len(s.ids)) for s in decoding])
        return any(s.request is not None and s.request.exact and not flag
                   for s, flag in zip(decoding, canonical))

    def _rides(self, prompt: Request, decoding: list[Slot]) -> bool:
        """Whether ``prompt``'s tokens would come out canonical riding in the decode steps."""
        if prompt.slot is None:
            return False
        entries = [(s.seq, len(s.ids)) for s in decoding]
        return self.adapter.canonical([*entries, (prompt.slot.seq, len(prompt.prompt))])[-1]

    def _new_work(self) -> bool:
        """A request arrived (idle work makes way for it; calls wait their turn)."""
        return bool(self._incoming)

    # ----- admission ---------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        """Drop what was cancelled; its reader (if it still reads) gets Cancelled."""
        for request in [r for r in self._queue if r.cancelled]:
            self._queue.remove(request)
            self._stopped(request)
        for slot in self.slots:
            running = slot.request
            if running is not None and running.cancelled:
                self._release(slot, Pending(False, []))
                self._stopped(running)

    def _stopped(self, request: Request) -> None:
        request.state = "done"
        self.cancelled += 1
        if request.sampler is not None:
            request.sampler.close()
        request.out.put(Cancelled("the reply was cancelled"))

    def _admit(self) -> None:
        for request in list(self._queue):
            slot = self._slot_for(request)
            if slot is None:
                continue
            self._queue.remove(request)
            try:  # a grammar that does not compile fails its request, nothing else
                request.sampler = self.adapter.sampler(request.params, request.prompt,
                                                       request.constraint)
            except Exception as exc:
                request.state = "done"
                request.out.put(exc)
                continue
            self._occupy(slot, request)
            slot.request, request.state = request, "admitted"
        for ahead, request in enumerate(self._queue):
            if request.ahead != ahead:
                request.ahead = ahead
                request.out.put(Waiting(ahead))

    def _occupy(self, slot: Slot, request: Request) -> None:
        """Give ``slot`` to ``request``: the conversation it held is snapshotted first, unless
        the request continues it (a continued stateless sequence keeps its name)."""
        if not self._continues(slot, request):
            if slot.name not in (None, request.name):
                self._evict(slot)
            slot.name = request.name
        slot.pending, request.slot = None, slot

    def _slot_for(self, request: Request) -> Slot | None:
        """The sequence a request may take now, or None (it waits)."""
        if request.name is not None:
            own = next((s for s in self.slots if s.name == request.name), None)
            if own is not None:
                return own if own.idle else None
        idle = [s for s in self.slots if s.idle]
        if not idle:
            return None
        if request.name is None:  # a stateless request: the stateless sequence it continues
            limit = self._limit(request)
            best = max(((self._reusable(s, request, limit), s) for s in idle
                        if self._continues(s, request)),
                       key=lambda pair: pair[0], default=(0, None))
            if best[1] is not None and best[0] >= MIN_RESTORE_GAIN:
                return best[1]
        free = next((s for s in idle if s.name is None and not s.ids), None)
        return free or min(idle, key=lambda s: s.used)

    @staticmethod
    def _continues(slot: Slot, request: Request) -> bool:
        """A stateless request that continues what a stateless sequence holds (all of it but
        at most :data:`MIN_COPY_GAIN` tokens, such as the template's text evaluated ahead): it
        takes the sequence over, and what it does not continue is not worth a snapshot. Any
        other sequence it takes is snapshotted first, and a free one is taken before it."""
        return request.name is None and slot.name is not None and \
            slot.name.startswith("prefix-") and \
            common_prefix(slot.ids, request.prompt, len(request.prompt)) >= \
            len(slot.ids) - MIN_COPY_GAIN

    def _evict(self, slot: Slot) -> None:
        """Keep the conversation ``slot`` holds in the KV store before another takes it."""
        if slot.pending is not None or slot.saved != slot.version:
            self._save(slot)
        slot.pending = None

    # ----- prompts -----------------------------------------------------------------------
    def _limit(self, request: Request) -> int:
        """How much of a prompt may be reused: at least one token is evaluated, and an exact
        reply evaluates at least a canonical batch itself."""
        least = max(1, self.adapter.canonical_batch) if request.exact else 1
        return len(request.prompt) - least

    @staticmethod
    def _reusable(slot: Slot, request: Request, limit: int) -> int:
        n = common_prefix(slot.ids, request.prompt, limit)
        return min(n, slot.canonical) if request.exact else n

    def _start(self, request: Request) -> None:
        """Make the request's sequence hold the longest reusable prefix of its prompt."""
        slot = request.slot
        assert slot is not None
        limit = self._limit(request)
        own = self._reusable(slot, request, limit)
        best: Candidate | None = None
        reach = own + MIN_RESTORE_GAIN - 1
        for candidate in self._candidates(slot, request.name):
            n = common_prefix(candidate.ids, request.prompt, limit)
            if request.exact:
                n = min(n, candidate.canonical)
            gain = MIN_COPY_GAIN - MIN_RESTORE_GAIN if candidate.source == "live" else 0
            if n > reach + gain:
                best, reach = candidate, n
        reuse = Reuse(own, 0, "live" if own else "none")
        if best is not None:
            try:
                snapshot = best.load()
                self.adapter.restore(slot.seq, snapshot, reach)
            except (SnapshotError, DamagedSnapshot, OSError) as exc:
                best.drop(str(exc))
                self.adapter.keep(slot.seq, 0)
                slot.hold([], 0)
                reuse = Reuse(0, 0, "none")
            else:
                slot.hold([int(t) for t in snapshot.ids[:reach]], snapshot.canonical)
                reuse = Reuse(reach, reach, best.source)
        if best is None or reuse.source == "none":
            held = self.adapter.keep(slot.seq, reuse.cached)
            if held < reuse.cached:  # a cache that could not be cropped there
                reuse = Reuse(held, 0, "live" if held else "none")
            slot.hold(slot.ids[:held], slot.canonical)
        request.reuse, request.pos, request.state = reuse, reuse.cached, "prompt"

    def _candidates(self, slot: Slot, name: str | None) -> Iterable[Candidate]:
        """What else may hold the prompt's prefix: the other sequences, then the KV store's
        snapshots (the conversation's own in RAM or on disk, every one in RAM)."""
        for other in self.slots:
            if other is not slot and other.ids:
                yield Candidate(as_ids(other.ids), other.canonical, "live",
                                partial(self._copy, other), self._copy_failed)
        yield from self.kv.candidates(name, self.adapter.identity(), self.adapter.loads)

    def _copy(self, other: Slot) -> KVSnapshot:
        snapshot = self.adapter.snapshot(other.seq, as_ids(other.ids))
        if snapshot is None:
            raise SnapshotError("the sequence could not be copied")
        return KVSnapshot(snapshot.ids, snapshot.state, snapshot.nbytes, other.canonical)

    @staticmethod
    def _copy_failed(why: str) -> None:
        log.warning("copying another sequence's prefix failed (%s); the prompt is evaluated "
                    "normally", why)

    def _prompt_chunk(self, request: Request, *, others: bool) -> None:
        """Evaluate the next chunk of ``request``'s prompt (sized to keep others smooth);
        after the last, sample its first token."""
        slot = request.slot
        assert slot is not None
        try:
            if request.state == "admitted":
                self._start(request)
            prompt, pos = request.prompt, request.pos
            n = self._chunk_size(len(prompt) - pos, others, loose=not request.exact)
            began = time.perf_counter()
            row = self.adapter.evaluate(slot.seq, prompt[:pos + n], pos)
            if 8 <= n <= self.adapter.max_batch and self.measure:
                self.token_s += 0.2 * ((time.perf_counter() - began) / n - self.token_s)
            self.chunks += 1
        except Exception as exc:
            self._fail([slot], exc)
            return
        self._advance(request, slot, n, row, self._batch_canonical(slot, pos, n))

    def _batch_canonical(self, slot: Slot, pos: int, n: int) -> bool:
        """Whether a prompt batch of ``n`` tokens at ``pos`` gives canonical keys and values."""
        if n > self.adapter.max_batch:
            return False
        if n >= self.adapter.canonical_batch:
            return True
        return n == 1 and self.adapter.canonical([(slot.seq, pos)])[0]

    def _chunk_size(self, left: int, others: bool, *, idle: bool = False,
                    loose: bool = False) -> int:
        """How many prompt tokens to evaluate now: all of them up to the limits, never leaving
        a last chunk smaller than a canonical batch. Idle work takes a quarter of a prompt's
        chunk, so that a request that arrives waits little for it. A ``loose`` prompt (for a
        reply that is not exact) alone takes the adapter's ``loose_batch`` at once: its keys
        and values need not be canonical, and bigger batches evaluate faster."""
        cap = self.adapter.max_batch
        if others:
            size = 1 + int((GAP_FACTOR - 2) * self.step_s / max(self.token_s, 1e-6))
        elif loose and self.adapter.loose_batch > cap and not idle:
            size = cap = self.adapter.loose_batch
        else:
            size = self.adapter.prompt_chunk // (4 if idle else 1)
        size = max(size, self.adapter.canonical_batch, 2)
        size = min(size, cap, left)
        rest = left - size
        if 0 < rest < self.adapter.canonical_batch:
            size = left if left <= cap else size - self.adapter.canonical_batch
        return max(size, 1)

    # ----- decoding ----------------------------------------------------------------------
    def _decode(self, slots: list[Slot], ride: Request | None = None) -> None:
        """One token for every generating sequence, in one batch; with ``ride``, the next token
        of that waiting prompt too (where a decode step's KV is canonical)."""
        entries = []
        for slot in slots:
            request = slot.request
            assert request is not None and request.last is not None
            entries.append((slot.seq, request.last, len(slot.ids), True))
        rider = None
        if ride is not None:
            if ride.state == "admitted":
                self._start(ride)
            rider = ride.slot
            assert rider is not None
            entries.append((rider.seq, ride.prompt[ride.pos], ride.pos,
                            ride.pos == len(ride.prompt) - 1))
        began = time.perf_counter()
        try:
            rows = self.adapter.step(entries)
        except Exception as exc:
            self._fail(slots + ([rider] if rider is not None else []), exc)
            return
        if self.measure:
            self.step_s += 0.2 * (time.perf_counter() - began - self.step_s)
        self.steps += 1
        canonical = self.adapter.canonical([(seq, pos) for seq, _, pos, _ in entries])
        for slot, row, exact in zip(slots, rows, canonical):
            request = slot.request
            assert request is not None and request.last is not None and request.sampler
            if exact and slot.canonical == len(slot.ids):
                slot.canonical += 1
            slot.ids.append(request.last)
            slot.version += 1
            try:
                token = request.sampler.sample(row)
            except Exception as exc:
                self._fail([slot], exc)
                continue
            self._take(request, token)
        if ride is not None and rider is not None:
            self._advance(ride, rider, 1, rows[-1], canonical[-1])

    def _advance(self, request: Request, slot: Slot, n: int, row: int, exact: bool) -> None:
        """``n`` more of ``request``'s prompt tokens are in its sequence (canonical where
        ``exact``); after the last one, its first token is sampled from ``row``."""
        prompt, pos = request.prompt, request.pos
        canonical = pos + n if slot.canonical >= pos and exact else slot.canonical
        slot.hold(prompt[:pos + n], canonical)
        request.pos = pos + n
        if request.pos == len(prompt):
            request.state = "decode"
            assert request.sampler is not None
            try:
                token = request.sampler.sample(row)
            except Exception as exc:
                self._fail([slot], exc)
                return
            self._take(request, token)

    def _take(self, request: Request, token: int) -> None:
        """The one token loop: count the token; end at an end-of-generation token, a stop
        string or ``max_new`` tokens; send the text that is safe to show."""
        timer, text = request.timer, request.text
        timer.token()
        assert request.sampler is not None
        if token in self.adapter.eog:
            self._finish(request, "stop", token, end_of_turn=True)
            return
        chunk = text.push(request.sampler.piece(token))
        if chunk:
            request.out.put(chunk)
        if text.stopped:
            self._finish(request, "stop", token)
        elif timer.tokens >= request.max_new:
            self._finish(request, "length", token)
        else:
            request.last = token

    def _finish(self, request: Request, finish: FinishReason, last: int, *,
                end_of_turn: bool = False) -> None:
        tail = request.text.finish()
        if tail:
            request.out.put(tail)
        slot = request.slot
        assert slot is not None and request.sampler is not None
        request.sampler.close()
        header = self._turn_header() if len(slot.ids) + 8 < self.adapter.context_length else []
        if not header:
            ahead = []
        elif end_of_turn:  # the template writes its own end-of-turn text
            ahead = header
        elif finish == "length":  # the reply's last token, then the template's text
            ahead = [last, *header]
        else:  # cut at a stop string: the sequence holds tokens the next prompt will not
            ahead = []
        self._release(slot, Pending(request.exact, ahead))
        usage = request.timer.usage(len(request.prompt), request.reuse.cached,
                                    restored_tokens=request.reuse.restored,
                                    kv_source=request.reuse.source)
        request.state = "done"
        self.done += 1
        request.out.put(Completion(request.text.text, usage, finish))

    def _release(self, slot: Slot, pending: Pending) -> None:
        slot.request, slot.used, slot.pending = None, time.monotonic(), pending
        if slot.name is None:
            slot.name = f"prefix-{next(self._anonymous)}"

    def _fail(self, slots: list[Slot], exc: BaseException) -> None:
        """The model failed inside a batch: its sequences cannot be trusted any more."""
        for slot in slots:
            request = slot.request
            self.adapter.keep(slot.seq, 0)
            slot.hold([], 0)
            slot.request, slot.pending, slot.name = None, None, None
            if request is not None:
                request.state = "done"
                if request.sampler is not None:
                    request.sampler.close()
                request.out.put(exc)

    # ----- idle work ---------------------------------------------------------------------
    def _checkpoint(self, slot: Slot, *, yielding: bool) -> None:
        """After a reply, while nothing else runs: evaluate an exact reply's tokens again as a
        prompt (so they are canonical) and the next turn's template text, then snapshot the
        sequence. With ``yielding``, a new request interrupts it between (small) chunks; what
        is left to evaluate stays pending, to be done at the next idle moment."""
        pending = slot.pending
        assert pending is not None
        slot.pending = None
        ids = list(slot.ids)
        start = slot.canonical if pending.exact and slot.canonical < len(ids) else len(ids)
        extra = pending.ahead if len(ids) + len(pending.ahead) < self.adapter.context_length \
            else []
        target = ids + extra
        if start < len(target):
            least = self.adapter.canonical_batch
            if len(target) - start < least:
                start = max(0, len(target) - least)
            start = self.adapter.keep(slot.seq, start)
            slot.hold(ids[:start], slot.canonical)
            while start < len(target):
                if yielding and self._new_work():
                    slot.pending = Pending(False, target[start:])  # the rest, later
                    return
                n = self._chunk_size(len(target) - start, others=False, idle=True)
                try:
                    self.adapter.evaluate(slot.seq, target[:start + n], start)
                except Exception:
                    log.exception("evaluating a reply again failed; its sequence is dropped")
                    self._fail([slot], RuntimeError("checkpoint failed"))
                    return
                canonical = start + n if slot.canonical >= start and \
                    self._batch_canonical(slot, start, n) else slot.canonical
                start += n
                slot.hold(target[:start], canonical)

    def _save(self, slot: Slot) -> None:
        """Snapshot the sequence into the KV store (RAM, and its file for a conversation)."""
        if not slot.ids or slot.name is None:
            return
        persistent = not slot.name.startswith("prefix-")
        if not self.kv.keeps(persistent=persistent):
            slot.saved = slot.version
            return
        snapshot = self.adapter.snapshot(slot.seq, as_ids(slot.ids))
        if snapshot is None:
            return
        snapshot = KVSnapshot(snapshot.ids, snapshot.state, snapshot.nbytes,
                              min(slot.canonical, len(snapshot)))
        data = self.adapter.dumps(snapshot) if persistent and self.kv.disk is not None else None
        self.kv.save(slot.name, snapshot, self.adapter.identity(), data)
        slot.saved = slot.version

    # ----- operations for the engine (run on this thread through call()) ----------------
    def flush(self) -> None:
        """Do every piece of idle work now, and snapshot every sequence that changed since
        its last snapshot (the caller then flushes the KV store)."""
        for slot in self.slots:
            if slot.idle and slot.pending is not None:
                self._checkpoint(slot, yielding=False)
            if slot.idle and slot.saved != slot.version:
                self._save(slot)

    def forget(self, name: str) -> None:
        for slot in self.slots:
            if slot.name == name and slot.idle:
                self.adapter.keep(slot.seq, 0)
                slot.hold([], 0)
                slot.name, slot.pending = None, None
        self.kv.forget(name)

    def reset(self) -> None:
        """Forget every idle sequence and the snapshots in RAM."""
        for slot in self.slots:
            if slot.idle:
                self.adapter.keep(slot.seq, 0)
                slot.hold([], 0)
                slot.name, slot.pending = None, None
        self.kv.ram.clear()

    def prefill(self, prompt: list[int], name: str | None, exact: bool) -> int:
        """Plan a prompt's reuse as a request would, without generating: how many tokens the
        sequence then holds (tests and benchmarks)."""
        params = GenerationParams(temperature=0.0) if exact else GenerationParams()
        request = Request(list(prompt), params, name, 1)
        slot = self._slot_for(request)
        if slot is None:
            raise RuntimeError("every sequence is busy")
        self._occupy(slot, request)
        self._start(request)
        return request.reuse.cached

    def stats(self) -> dict[str, Any]:
        sequences = []
        for slot in self.slots:
            request = slot.request
            state = (request.state if request is not None else
                     "idle" if slot.ids else "free")
            sequences.append({"sequence": slot.seq, "conversation": slot.name,
                              "tokens": len(slot.ids), "state": state,
                              "generated": request.timer.tokens if request is not None else 0})
        return {"sequences": sequences, "queued": len(self._queue) + len(self._incoming),
                "steps": self.steps, "prompt_chunks": self.chunks, "done": self.done,
                "cancelled": self.cancelled}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)


def _loop(ref: weakref.ref[Scheduler], cond: threading.Condition) -> None:
    """The scheduler's thread: a round whenever there is work, else wait, holding the scheduler
    only weakly while it waits."""
    with cond:
        while True:
            scheduler = ref()
            if scheduler is None:
                return
            if scheduler._has_work():
                if not scheduler._round():
                    return
            else:
                scheduler.kv.quiet.busy(False)
                timeout = scheduler._snapshot_in()
                del scheduler
                cond.wait(timeout)


def _wake_up(cond: threading.Condition) -> None:
    with cond:
        cond.notify_all()


_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Finish the idle work (snapshots) before the process ends; the KV store's own exit
    handler, registered before this one, runs after it and writes the files."""
    try:
        for scheduler in list(_LIVE):
            if scheduler._thread.is_alive() and not scheduler._closed:
                scheduler.call(scheduler.flush, timeout=30)
    except (KeyboardInterrupt, concurrent.futures.TimeoutError, RuntimeError):
        pass

