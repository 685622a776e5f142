"""A deterministic fake engine for fast unit tests, with exact, byte-level token counting.

Tokens: one per UTF-8 byte of plain text; ``<|im_start|>`` and ``<|im_end|>`` are single
control tokens (ids 256 and 257) only where special tokens are allowed. Replies are queued by
the test (``engine.replies.append("...")``) or are ``echo``; each character of a reply is one
generated token. The engine is a real :class:`~rolechat.engines.local.LocalEngine`: its KV
cache is simulated (:class:`FakeKVCache`: the "state" is the ids themselves), so KV reuse and
snapshots (memory and disk tiers) run the production code with exact token arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from rolechat.engines.kvcache import KVCache, KVSnapshot, SnapshotError, as_ids
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


class FakeKVCache(KVCache):
    """A simulated cache whose state is its token ids."""

    def __init__(self, model: str = "fake", context_length: int = 2048) -> None:
        self.held: list[int] = []
        self.identity_ = {"model": {"path": model}, "engine": "fake",
                          "context_length": context_length}
        #: Snapshots restored (for tests that count them).
        self.restores = 0

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.held, dtype=np.int32)

    def keep(self, n: int) -> None:
        del self.held[max(n, 0):]

    def reset(self) -> None:
        self.held = []

    def snapshot(self) -> KVSnapshot | None:
        if not self.held:
            return None
        ids = as_ids(self.held)
        return KVSnapshot(ids, ids.tobytes(), 2 * ids.nbytes)

    def restore(self, snapshot: KVSnapshot, n: int) -> None:
        state = np.frombuffer(snapshot.state, dtype=np.int32)
        if not np.array_equal(state, snapshot.ids):
            self.held = []
            raise SnapshotError("the state does not match its ids")
        self.restores += 1
        self.held = [int(t) for t in snapshot.ids[:n]]

    def dumps(self, snapshot: KVSnapshot) -> bytes:
        return bytes(snapshot.state)

    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        if len(data) != 4 * len(ids):
            raise SnapshotError("wrong state length")
        return KVSnapshot(as_ids(ids), bytes(data), 2 * len(data))

    def identity(self) -> dict[str, Any]:
        return self.identity_


class FakeEngine(LocalEngine):
    kind = "fake"

    def __init__(self, context_length: int = 2048, fail_after: int | None = None,
                 kv_cache_ram: int = 1 << 30, model: str = "fake") -> None:
        super().__init__(kv_cache_ram=kv_cache_ram)
        self.model = model
        self.context_length = context_length
        self.template = ChatTemplate(CHATML)
        self.encoder = PromptEncoder(ByteTokenizer(), self.template)
        self.kv = FakeKVCache(model, context_length)
        self._eog: set[int] = set()
        self.replies: list[str] = []
        self.prompts: list[list[int]] = []
        self.fail_after = fail_after  # raise after this many chunks
        self._wide: dict[int, bytes] = {}
        #: Tokens evaluated by each background re-evaluation (after exact replies).
        self.evaluations: list[int] = []

    @property
    def cache(self) -> list[int]:
        return self.kv.held

    def _evaluate(self, ids: list[int], start: int) -> None:
        assert self.kv.held == ids[:start]
        self.evaluations.append(len(ids) - start)
        self.kv.held = list(ids)

    def _piece(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else self._wide[token]

    def _tokens(self, prompt_ids: list[int], start: int,
                params: GenerationParams) -> Iterator[int]:
        assert self.kv.held == prompt_ids[:start]  # the cache holds exactly what was reused
        self.prompts.append(list(prompt_ids))
        self.kv.held = list(prompt_ids)
        text = self.replies.pop(0) if self.replies else "echo"
        for index, char in enumerate(text):
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("engine failed mid-reply")
            data = char.encode("utf-8")
            token = data[0] if len(data) == 1 else WIDE + len(self._wide)
            if len(data) > 1:
                self._wide[token] = data
            yield token
            self.kv.held.append(token)  # evaluated only when the next token is wanted


class Summarizer(FakeEngine):
    """Answers summary requests with ``S<n>`` (n: how many it made) and other prompts from
    the queue or with a fixed reply; can fail the next summaries."""

    def __init__(self, context_length: int = 1200) -> None:
        super().__init__(context_length)
        self.summaries = 0
        self.fail_summaries = 0
        self.summary_prompts: list[str] = []

    def _tokens(self, prompt_ids: list[int], start: int,
                params: GenerationParams) -> Iterator[int]:
        text = bytes(t for t in prompt_ids if t < 256).decode("utf-8", "replace")
        if SUMMARY_SYSTEM in text:
            self.summary_prompts.append(text)
            if self.fail_summaries:
                self.fail_summaries -= 1
                raise RuntimeError("out of memory")
            self.summaries += 1
            self.replies.insert(0, f"S{self.summaries}: the user asked questions.")
        elif not self.replies:
            self.replies.append("An answer of some length here.")
        return super()._tokens(prompt_ids, start, params)
