"""Engines that run the model in this process: prompts become token ids, and a scheduler steps
them on the model.

Contract:
- A :class:`LocalEngine` is an :class:`~rolechat.engines.adapter.Adapter` (the model and its
  context of sequences), a :class:`~rolechat.engines.tokenizers.PromptEncoder` (messages → ids,
  content never control tokens), a :class:`~rolechat.engines.kvstore.KVStore` (snapshots in RAM
  and on disk) and the :class:`~rolechat.engines.scheduler.Scheduler` that owns the sequences.
  Subclasses (llama.cpp, transformers, the tests' fake) only build those.
- ``stream(messages, params, prompt_ids=, cache_key=)`` submits one request and returns its
  :class:`~rolechat.engines.base.Generation` at once: the text chunks arrive as the scheduler
  makes them, beside every other request's. ``cache_key`` names the conversation, so its KV
  state stays warm (in its sequence, else in the KV store). While the request waits for a
  sequence, the generation's ``on_wait`` hears how many requests are ahead. Closing the
  generation (the reader left, Ctrl-C, Stop) cancels the request: the scheduler frees its
  sequence at the next step and nothing else is affected.
- Many threads may call ``stream`` at once; the tokenizer and the template are safe to share.
- ``Usage`` says how many prompt tokens were reused, how many of them were restored (from
  another sequence, RAM or disk), and from where.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from typing import Any

from ..constraint import Constraint
from ..conversation import Message
from ..params import GenerationParams
from .adapter import Adapter
from .base import Completion, Engine, Generation, Waiting, reply_room
from .kvstore import DEFAULT_RAM_BYTES, KVStore
from .scheduler import Request, Scheduler
from .tokenizers import PromptEncoder


class LocalEngine(Engine):
    """A model in this process. Subclasses call :meth:`start` once the adapter, the encoder
    and the template exist."""

    encoder: PromptEncoder
    adapter: Adapter

    def start(self, adapter: Adapter, encoder: PromptEncoder, *,
              kv_store: KVStore | None = None, kv_cache_ram: int = DEFAULT_RAM_BYTES) -> None:
        self.adapter = adapter
        self.encoder = encoder
        self.kv = kv_store if kv_store is not None else KVStore(kv_cache_ram)
        self._turn_header: list[int] | None = None
        self._header_lock = threading.Lock()
        self.scheduler = Scheduler(adapter, self.kv, self.turn_header)

    @property
    def parallel(self) -> int:
        """How many replies the engine generates at once (its sequences)."""
        return self.adapter.n_seq

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

    def turn_header(self) -> list[int]:
        """The ids of the template text between an assistant message and the next user
        message (empty if the template cannot be traced): evaluated ahead after a reply."""
        with self._header_lock:
            if self._turn_header is None:
                self._turn_header = self._trace_header()
            return self._turn_header

    def _trace_header(self) -> list[int]:
        try:
            messages = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
            segments = self.template.segments(messages, add_generation_prompt=False)
        except Exception:  # a template that refuses these messages: no pre-evaluation
            return []
        if segments is None:
            return []
        pieces = [text for text, _ in segments]
        contents = [i for i, (_, is_content) in enumerate(segments) if is_content]
        if len(contents) == 3 and contents[2] == contents[1] + 2:
            return self.tokenize(pieces[contents[1] + 1], special=True)
        return []

    # ----- generation --------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], params: GenerationParams, *,
               prompt_ids: Sequence[int] | None = None,
               cache_key: str | None = None,
               constraint: Constraint | None = None) -> Generation:
        ids = list(prompt_ids) if prompt_ids is not None else self.prompt_ids(messages)
        max_new = reply_room(len(ids), self.context_length, params)
        request = self.scheduler.submit(Request(ids, params, cache_key, max_new,
                                                constraint=constraint))
        return Generation(_read(request), request.cancel)

    # ----- the KV state ------------------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int], cache_key: str | None = None, *,
                exact: bool = False) -> int:
        """Make a sequence hold the longest reusable prefix of ``prompt_ids`` (at least one
        token is left to evaluate, two for an ``exact`` reply); return its length. Tests and
        benchmarks call this to see what a reply would reuse; a reply does it itself."""
        return self.scheduler.call(
            lambda: self.scheduler.prefill(list(prompt_ids), cache_key, exact))

    def flush(self, timeout: float = 60.0) -> bool:
        """Finish the work kept for idle moments now (re-evaluations, snapshots, files);
        False if ``timeout`` passed first."""
        self.scheduler.call(self.scheduler.flush, timeout)
        return self.kv.flush(timeout)

    def reset_cache(self) -> None:
        """Forget every idle sequence and the snapshots in RAM: the next reply evaluates its
        whole prompt unless a snapshot file on disk is restored."""
        self.flush()
        self.scheduler.call(self.scheduler.reset)

    def forget(self, key: str) -> None:
        self.scheduler.call(lambda: self.scheduler.forget(key))

    def set_aside(self, key: str, name: str) -> None:
        def aside() -> None:
            self.scheduler.flush()  # the live sequence's snapshot, taken now
            self.kv.ram.copy(key, f"{key}.{name}")

        self.scheduler.call(aside)

    def set_threads(self, n_threads: int) -> None:
        from .options import check_threads

        n_threads = check_threads(n_threads)
        self.scheduler.call(lambda: self.adapter.set_threads(n_threads))

    def kv_stats(self) -> dict[str, Any]:
        return {**self.scheduler.call(self.scheduler.stats), **self.kv.stats()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "parallel": self.parallel, **self.adapter.describe()}

    def close(self) -> None:
        self.flush()
        self.scheduler.close()
        self.kv.close()
        self.adapter.close()


def _read(request: Request) -> Generator[str | Waiting, None, Completion]:
    """A request's stream, as the reader sees it; leaving it early cancels the request."""
    try:
        while True:
            item = request.out.get()
            if isinstance(item, Completion):
                return item
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        request.cancel()
