"""A deterministic fake engine for fast unit tests, with exact, byte-level token counting.

Tokens: one per UTF-8 byte of plain text; ``<|im_start|>`` and ``<|im_end|>`` are single
control tokens (ids 256 and 257) only where special tokens are allowed. Replies are queued by
the test (``engine.replies.append("...")``) or are ``echo``; each character of a reply is one
generated token, and ``<|im_end|>`` ends it, as a chat model's end-of-turn token does. The
engine is a real :class:`~rolechat.engines.local.LocalEngine` — the production scheduler and KV
store — over :class:`FakeAdapter`, whose sequences' "state" is the ids themselves, so batching,
KV reuse and snapshots (RAM and disk) run the production code with exact token arithmetic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rolechat.constraint import Constraint
from rolechat.engines.adapter import Adapter, Sampler
from rolechat.engines.kvcache import KVSnapshot, SnapshotError, as_ids
from rolechat.engines.kvstore import KVStore
from rolechat.engines.local import LocalEngine
from rolechat.engines.tokenizers import PromptEncoder
from rolechat.memory import SUMMARY_SYSTEM
from rolechat.params import GenerationParams
from rolechat.template import ChatTemplate

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = {"<|im_start|>": 256, "<|im_end|>": 257}
#: Generated characters outside ASCII get ids from here on.
WIDE = 1000


class ByteTokenizer:
    bos_id = None
    bos_text = eos_text = ""
    template_source = CHATML

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for literal, token in SPECIAL.items():
                if special and text.startswith(literal, i):
                    ids.append(token)
                    i += len(literal)
                    break
            else:
                ids += list(text[i].encode("utf-8"))
                i += 1
        return ids


class FakeSampler(Sampler):
    """Spells one queued reply, a character a token, then the end-of-turn token."""

    def __init__(self, engine: FakeEngine, text: str) -> None:
        self._engine = engine
        self._tokens: list[int] = []
        for char in text:
            data = char.encode("utf-8")
            token = data[0] if len(data) == 1 else WIDE + len(engine.wide)
            if len(data) > 1:
                engine.wide[token] = data
            self._tokens.append(token)
        self._tokens.append(SPECIAL["<|im_end|>"])
        self._given = 0

    def sample(self, row: int) -> int:
        fail_after = self._engine.fail_after
        if fail_after is not None and self._given >= fail_after:
            raise RuntimeError("engine failed mid-reply")
        token = self._tokens[min(self._given, len(self._tokens) - 1)]
        self._given += 1
        return token

    def piece(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else self._engine.wide.get(token, b"")


class FakeAdapter(Adapter):
    """Sequences whose state is their token ids; every call checks the scheduler's account."""

    def __init__(self, engine: FakeEngine, n_seq: int, context_length: int, model: str) -> None:
        self._engine = engine
        self.n_seq = n_seq
        self.context_length = context_length
        self.eog = {SPECIAL["<|im_end|>"]}
        self.cells: list[list[int]] = [[] for _ in range(n_seq)]
        self._identity = {"model": {"path": model}, "engine": "fake",
                          "context_length": context_length}
        #: Tests may hold the model inside a prompt evaluation: ``entered`` is set when one
        #: begins, and it waits for ``gate`` (None: never waits).
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        #: The threads that evaluated anything (the scheduler's, and only it).
        self.threads: set[int] = set()
        #: Tests may meter decode steps: each takes a permit (None: free).
        self.steps: threading.Semaphore | None = None

    def evaluate(self, seq: int, ids: Sequence[int], start: int) -> int:
        self.threads.add(threading.get_ident())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        assert self.cells[seq] == list(ids[:start]), "the sequence holds what was reused"
        self._engine.evaluated.append((seq, len(ids) - start))
        self._engine.events.append(("prompt", seq, len(ids) - start))
        self.cells[seq] = list(ids)
        return seq

    def step(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        if self.steps is not None:
            self.steps.acquire(timeout=30)
        self.threads.add(threading.get_ident())
        self._engine.batches.append(len(entries))
        self._engine.events.append(("step", *sorted(seq for seq, _, _, _ in entries)))
        for seq, token, position, _ in entries:
            assert len(self.cells[seq]) == position
            self.cells[seq].append(token)
        return [seq for seq, _, _, _ in entries]

    def sampler(self, params: GenerationParams, prompt: Sequence[int],
                constraint: Constraint | None = None) -> Sampler:
        if constraint is not None:
            self._engine.constraints.append(constraint)
        return self._engine.make_sampler(list(prompt))

    def keep(self, seq: int, n: int) -> int:
        del self.cells[seq][max(n, 0):]
        return len(self.cells[seq])

    def snapshot(self, seq: int, ids: np.ndarray) -> KVSnapshot | None:
        assert self.cells[seq] == [int(t) for t in ids]
        if not self.cells[seq]:
            return None
        held = as_ids(self.cells[seq])
        return KVSnapshot(held, held.tobytes(), 2 * held.nbytes)

    def restore(self, seq: int, snapshot: KVSnapshot, n: int) -> None:
        state = np.frombuffer(snapshot.state, dtype=np.int32)
        if not np.array_equal(state, snapshot.ids):
            self.cells[seq] = []
            raise SnapshotError("the state does not match its ids")
        self._engine.restores += 1
        self.cells[seq] = [int(t) for t in snapshot.ids[:n]]

    def dumps(self, snapshot: KVSnapshot) -> bytes:
        return bytes(snapshot.state)

    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        if len(data) != 4 * len(ids):
            raise SnapshotError("wrong state length")
        return KVSnapshot(as_ids(ids), bytes(data), 2 * len(data))

    def identity(self) -> dict[str, Any]:
        return self._identity


class FakeEngine(LocalEngine):
    kind = "fake"

    def __init__(self, context_length: int = 2048, fail_after: int | None = None,
                 kv_cache_ram: int = 1 << 30, model: str = "fake", parallel: int = 1,
                 kv_store: KVStore | None = None, canonical_decode: bool = False) -> None:
        self.model = model
        self.context_length = context_length
        self.template = ChatTemplate(CHATML)
        self.replies: list[str] = []
        #: The prompt of every reply, as ids.
        self.prompts: list[list[int]] = []
        self.fail_after = fail_after  # raise after this many sampled tokens
        self.wide: dict[int, bytes] = {}
        #: (sequence, tokens) of every prompt evaluation, and the size of every decode step.
        self.evaluated: list[tuple[int, int]] = []
        self.batches: list[int] = []
        #: Both, in order: ("prompt", sequence, tokens) and ("step", sequence, ...).
        self.events: list[tuple[Any, ...]] = []
        self.restores = 0
        #: The constraint of every constrained reply (the fake spells its queued replies
        #: whatever the grammar: tests queue replies that follow it).
        self.constraints: list[Constraint] = []
        adapter = FakeAdapter(self, parallel, context_length, model)
        if canonical_decode:  # as llama.cpp's: every evaluation canonical, riders allowed
            adapter.canonical_batch, adapter.decode_canonical = 1, True
        self.start(adapter, PromptEncoder(ByteTokenizer(), self.template), kv_store=kv_store,
                   kv_cache_ram=kv_cache_ram)
        # Fixed costs, not measured (the fake takes microseconds): beside a running reply, a
        # prompt chunk is 200 tokens (tests that want small chunks set their own).
        self.scheduler.measure = False
        self.scheduler.step_s, self.scheduler.token_s = 0.01, 0.0001

    def make_sampler(self, prompt: list[int]) -> Sampler:
        self.prompts.append(prompt)
        return FakeSampler(self, self.replies.pop(0) if self.replies else "echo")

    def busy(self) -> bool:
        """Whether a reply holds a sequence (a closed stream's is freed before any later call
        to the engine)."""
        return any(s["state"] not in ("idle", "free") for s in self.kv_stats()["sequences"])

    @property
    def cache(self) -> list[int]:
        """Sequence 0's tokens."""
        return self.adapter.cells[0]  # type: ignore[attr-defined, no-any-return]


class Summarizer(FakeEngine):
    """Answers summary requests with ``S<n>`` (n: how many it made) and other prompts from
    the queue or with a fixed reply; can fail the next summaries."""

    def __init__(self, context_length: int = 1200) -> None:
        super().__init__(context_length)
        self.summaries = 0
        self.fail_summaries = 0
        self.summary_prompts: list[str] = []

    def make_sampler(self, prompt: list[int]) -> Sampler:
        text = bytes(t for t in prompt if t < 256).decode("utf-8", "replace")
        if SUMMARY_SYSTEM in text:
            self.summary_prompts.append(text)
            if self.fail_summaries:
                self.fail_summaries -= 1
                raise RuntimeError("out of memory")
            self.summaries += 1
            self.replies.insert(0, f"S{self.summaries}: the user asked questions.")
        elif not self.replies:
            self.replies.append("An answer of some length here.")
        return super().make_sampler(prompt)


class PacedSampler(FakeSampler):
    def __init__(self, engine: FakeEngine, text: str, pace: float) -> None:
        super().__init__(engine, text)
        self.pace = pace

    def sample(self, row: int) -> int:
        time.sleep(self.pace)
        return super().sample(row)


class PacedEngine(FakeEngine):
    """The fake, a token every ``pace`` seconds (tests watch a reply being written); with no
    reply queued it writes :attr:`reply`."""

    pace = 0.02
    reply = ("A reply long enough to be watched while it is written, one character a token, "
             "so that the stream shows it growing and a client can leave in the middle of it.")

    def make_sampler(self, prompt: list[int]) -> Sampler:
        self.prompts.append(prompt)
        return PacedSampler(self, self.replies.pop(0) if self.replies else self.reply,
                            self.pace)
