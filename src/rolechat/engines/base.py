"""The engine interface: messages in, a streamed reply out.

Contract:
- :class:`Engine` is what every engine is, the remote one included: ``stream(messages,
  params)`` yields the text chunks of one reply (a :class:`Generation`, whose ``completion`` is
  set after the last chunk); ``complete()`` is a join over it; ``count_tokens`` and ``render``
  serve the window and the prompt preview. ``exact_counts`` is False where counts are only an
  estimate (a remote server without a local tokenizer).
- Engines that hold the model and its KV cache in this process build on
  :class:`~rolechat.engines.local.LocalEngine` (token ids, KV reuse and snapshots).
- ``Usage`` reports, for every reply: prompt tokens, how many were reused rather than evaluated
  (``cached_tokens``), how many of those were restored from a snapshot (``restored_tokens``) and
  where the reused tokens came from (``kv_source``: a ``live`` sequence, ``ram``, ``disk`` or
  ``none``), generated tokens, time to first token and decode speed; ``estimated`` marks
  counts that are estimates.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..constraint import Constraint
from ..conversation import Message
from ..errors import ContextOverflow, InvalidInput
from ..params import GenerationParams
from ..template import ChatTemplate

FinishReason = Literal["stop", "length", "tool_calls"]
#: Where a reply's reused prompt tokens came from: the sequence's own cache or another live
#: sequence, a snapshot in RAM, a snapshot file on disk, or nowhere.
KVSource = Literal["none", "live", "ram", "disk"]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    #: Prompt tokens that were already in the KV cache and were not evaluated again.
    cached_tokens: int
    generated_tokens: int
    #: Seconds from the call to the first generated token (prompt evaluation included).
    ttft_s: float
    #: Decode speed after the first token: (generated_tokens - 1) / decode seconds.
    tokens_per_s: float
    total_s: float
    #: Of the cached tokens, how many were restored from a KV snapshot.
    restored_tokens: int = 0
    #: Where the cached tokens came from: a live sequence, a snapshot in RAM or on disk.
    kv_source: KVSource = "none"
    #: True when the token counts are estimates (a remote server that did not report them).
    estimated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: FinishReason


@dataclass(frozen=True)
class Waiting:
    """A reply waits for the engine, with ``ahead`` requests before it."""

    ahead: int


class Cancelled(RuntimeError):
    """The reply was cancelled (:meth:`Generation.cancel`) before it completed."""


class Generation(Iterator[str]):
    """The text chunks of one reply. After the last chunk, :attr:`completion` is set. While the
    reply waits for the engine (other replies hold every sequence), :attr:`on_wait` is called
    with how many requests are ahead of it. :meth:`cancel` may be called from any thread: the
    reader then gets :class:`Cancelled` instead of the next chunk."""

    def __init__(self, chunks: Generator[str | Waiting, None, Completion],
                 cancel: Callable[[], None] | None = None) -> None:
        self._chunks = chunks
        self._cancel = cancel
        self.completion: Completion | None = None
        self.on_wait: Callable[[int], None] | None = None

    def cancel(self) -> None:
        """Stop the reply soon, from any thread (a no-op where the engine cannot)."""
        if self._cancel is not None:
            self._cancel()

    def __next__(self) -> str:
        try:
            while True:
                item = next(self._chunks)
                if not isinstance(item, Waiting):
                    return item
                if self.on_wait is not None:
                    self.on_wait(item.ahead)
        except StopIteration as stop:
            self.completion = stop.value
            raise StopIteration from None

    def close(self) -> None:
        """Stop generating now; the engine is released and nothing is recorded."""
        self._chunks.close()


class Timer:
    """Collects the timings of one reply."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.tokens = 0

    def token(self) -> None:
        self.tokens += 1
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def usage(self, prompt_tokens: int, cached_tokens: int, *, generated: int | None = None,
              restored_tokens: int = 0, kv_source: KVSource = "none",
              estimated: bool = False) -> Usage:
        """The reply's usage; ``generated`` overrides the tokens counted here (a server's
        own count), the decode speed is measured from the first to the last token."""
        end = time.perf_counter()
        first = self.first if self.first is not None else end
        count = self.tokens if generated is None else generated
        decode_s = (end if generated is None else self.last) - first
        rate = (count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0
        return Usage(prompt_tokens, cached_tokens, count, first - self.start, rate,
                     end - self.start, restored_tokens, kv_source, estimated)


def reply_room(prompt_tokens: int, context_length: int, params: GenerationParams) -> int:
    """How many tokens the reply may have; ContextOverflow if the prompt leaves none."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ContextOverflow(prompt_tokens=prompt_tokens, available_tokens=context_length - 1,
                              context_length=context_length, max_new_tokens=1)
    return min(params.max_new_tokens, room)


class Engine(ABC):
    """A loaded model. Subclasses set the attributes below in ``__init__``."""

    #: Registry name ("llama.cpp", "transformers", "openai").
    kind: str = ""
    #: What was loaded (a path or a model id), for display.
    model: str
    #: Most tokens (prompt + reply) the engine holds.
    context_length: int
    template: ChatTemplate
    #: False when token counts are estimates rather than a tokenizer's exact counts.
    exact_counts: bool = True
    #: Generation parameters the model itself asks for (a transformers generation config, a
    #: GGUF's ``general.sampling.*``): defaults under the persona's and the caller's.
    model_defaults: dict[str, Any] = {}  # noqa: RUF012 - replaced per engine, never mutated

    @abstractmethod
    def stream(self, messages: Sequence[Message], params: GenerationParams, *,
               prompt_ids: Sequence[int] | None = None,
               cache_key: str | None = None,
               constraint: Constraint | None = None) -> Generation:
        """Generate a reply to ``messages`` (which end with a user message), chunk by chunk.
        ``prompt_ids`` are the ids the window already counted (local engines use them instead
        of tokenizing again); ``cache_key`` names the conversation, so that a local engine can
        keep its KV state warm between its turns; ``constraint`` is a grammar the reply must
        follow (:mod:`rolechat.constraint`)."""

    @abstractmethod
    def count_tokens(self, messages: Sequence[Message], *,
                     add_generation_prompt: bool = True) -> int:
        """Tokens of the prompt for ``messages`` (an estimate where ``exact_counts`` is False)."""

    @abstractmethod
    def count_text(self, text: str) -> int:
        """Tokens of one plain text (a message's own share)."""

    def prompt_ids(self, messages: Sequence[Message], *,
                   add_generation_prompt: bool = True) -> list[int] | None:
        """The prompt's token ids when this engine feeds ids to a model here; None otherwise."""
        return None

    def continuation_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids of a prompt that continues the last (assistant) message of ``messages``.
        Only engines that feed ids to a model here can."""
        raise InvalidInput(f"The {self.kind} engine cannot continue a reply (the server "
                           "builds the prompt).", "Ask the model to go on instead.")

    def render(self, messages: Sequence[Message]) -> str:
        """The exact prompt text for ``messages`` (generation prompt appended)."""
        return self.template.render(messages)

    def complete(self, messages: Sequence[Message], params: GenerationParams) -> Completion:
        """The whole reply at once: a join over :meth:`stream`."""
        generation = self.stream(messages, params)
        for _ in generation:
            pass
        assert generation.completion is not None
        return generation.completion

    def set_threads(self, n_threads: int) -> None:
        """Use ``n_threads`` CPU threads from now on (engines that run the model here)."""
        raise InvalidInput(f"The {self.kind} engine does not run the model in this process, so "
                           "it has no threads to set.", "Leave threads out.", field="threads")

    def flush(self, timeout: float = 60.0) -> bool:
        """Finish work kept for later (snapshot files); False if ``timeout`` passed first."""
        return True

    def forget(self, key: str) -> None:  # noqa: B027 - optional hook
        """Drop whatever is kept warm for ``key`` (its conversation was deleted)."""

    def set_aside(self, key: str, name: str) -> None:  # noqa: B027 - optional hook
        """Keep what is warm for ``key`` now under ``key.name`` too (a branch the conversation
        leaves), so that coming back to it restores it rather than evaluating it again."""

    def kv_stats(self) -> dict[str, Any] | None:
        """What the engine keeps warm (live cache, snapshot tiers); None if nothing."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory. The engine is unusable afterwards."""

    def describe(self) -> dict[str, Any]:
        return {"engine": self.kind, "model": self.model, "context_length": self.context_length}
