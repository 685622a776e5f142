"""The engine interface: a model, its tokenizer and its KV cache behind one small API.

Contract:
- An engine implements :meth:`Engine.tokenize` and one generator, :meth:`Engine._generate`,
  which yields text chunks of one reply and returns a :class:`Completion`. Everything else —
  :meth:`Engine.stream`, :meth:`Engine.complete`, prompt tokenization, token counting,
  rendering — is derived here, once.
- Prompts are tokenized piece by piece (see :meth:`ChatTemplate.segments`): text the template
  writes may become control tokens; message content never does.
- One engine serves one reply at a time (a lock is held for the whole stream and released in
  ``finally``, also when the consumer stops early).
- ``Usage`` reports, for every reply: prompt tokens, how many of them were reused from the KV
  cache, generated tokens, time to first token and decode speed.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..conversation import Message
from ..errors import ContextOverflow, InvalidInput
from ..params import GenerationParams
from ..streaming import ReplyText
from ..template import ChatTemplate

FinishReason = Literal["stop", "length"]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: FinishReason


class Generation(Iterator[str]):
    """The text chunks of one reply. After the last chunk, :attr:`completion` is set."""

    def __init__(self, chunks: Generator[str, None, Completion]) -> None:
        self._chunks = chunks
        self.completion: Completion | None = None

    def __next__(self) -> str:
        try:
            return next(self._chunks)
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
        self.tokens = 0

    def token(self) -> None:
        self.tokens += 1
        if self.first is None:
            self.first = time.perf_counter()

    def usage(self, prompt_tokens: int, cached_tokens: int) -> Usage:
        end = time.perf_counter()
        first = self.first if self.first is not None else end
        decode_s = end - first
        rate = (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0
        return Usage(prompt_tokens, cached_tokens, self.tokens, first - self.start, rate,
                     end - self.start)


def reply_room(prompt_tokens: int, context_length: int, params: GenerationParams) -> int:
    """How many tokens the reply may have; ContextOverflow if the prompt leaves none."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ContextOverflow(prompt_tokens=prompt_tokens, available_tokens=context_length - 1,
                              context_length=context_length, max_new_tokens=1)
    return min(params.max_new_tokens, room)


def emit_reply(tokens: Iterator[int], piece: Callable[[int], bytes], end_of_turn: set[int],
               params: GenerationParams, max_new: int,
               timer: Timer) -> Generator[str, None, tuple[str, FinishReason]]:
    """The one token loop of every local engine: count each sampled token, stop at an
    end-of-turn token, a stop string or ``max_new`` tokens, and yield safe text. Returns the
    reply text and why it ended. A token the loop stops at is not asked for more, so an engine
    never evaluates the last sampled token."""
    reply = ReplyText(params.stop)
    finish: FinishReason = "length"
    for token in tokens:
        timer.token()
        if token in end_of_turn:
            finish = "stop"
            break
        chunk = reply.push(piece(token))
        if chunk:
            yield chunk
        if reply.stopped:
            finish = "stop"
            break
        if timer.tokens >= max_new:
            break
    tail = reply.finish()
    if tail:
        yield tail
    return reply.text, finish


class Engine(ABC):
    """A loaded model. Subclasses set the attributes below in ``__init__``."""

    #: Registry name ("llama.cpp", "transformers", "openai").
    kind: str = ""
    #: What was loaded (a path or a model id), for display.
    model: str
    #: Most tokens (prompt + reply) the engine holds.
    context_length: int
    template: ChatTemplate

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._piece_memo: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self._prompt_memo: OrderedDict[tuple[Message | bool, ...], list[int]] = OrderedDict()

    # ----- what a subclass provides ------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text``; ``special=True`` lets control-token text become control
        tokens, ``special=False`` treats every character as plain text. No BOS is added."""

    @abstractmethod
    def _generate(self, prompt_ids: list[int],
                  params: GenerationParams) -> Generator[str, None, Completion]:
        """Yield the reply's text chunks (already UTF-8 safe and stop-checked, see
        :class:`~rolechat.streaming.ReplyText`) and return its :class:`Completion`."""

    #: Token id put first when the model expects a BOS token that the template does not write.
    bos_id: int | None = None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory. The engine is unusable afterwards."""

    # ----- derived -----------------------------------------------------------------------
    def render(self, messages: Sequence[Message]) -> str:
        """The exact prompt text for ``messages`` (generation prompt appended)."""
        return self.template.render(messages)

    def prompt_ids(self, messages: Sequence[Message], *,
                   add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids: template text may hold control tokens, content never."""
        key: tuple[Message | bool, ...] = (*messages, add_generation_prompt)
        ids = self._prompt_memo.get(key)
        if ids is None:
            ids = self._tokenize_prompt(messages, add_generation_prompt)
            self._prompt_memo[key] = ids
            if len(self._prompt_memo) > 8:
                self._prompt_memo.popitem(last=False)
        return ids

    def _tokenize_prompt(self, messages: Sequence[Message],
                         add_generation_prompt: bool) -> list[int]:
        segments = self.template.segments(messages, add_generation_prompt=add_generation_prompt)
        if segments is None:
            # The template rewrites content, so pieces cannot be traced: refuse content that
            # would turn into control tokens, then tokenize the whole text.
            for m in messages:
                if self.tokenize(m.content, special=True) != self.tokenize(m.content,
                                                                           special=False):
                    raise InvalidInput(f"A {m.role} message contains control-token text, and "
                                       "this model's template cannot keep it as plain text.",
                                       "Remove the special tokens from the message.")
            text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
            ids = self.tokenize(text, special=True)
        else:
            ids = []
            for text, is_content in segments:
                ids += self._piece_ids(text, not is_content)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _piece_ids(self, text: str, special: bool) -> list[int]:
        """Token ids of one prompt piece, memoized: a new turn tokenizes only its new text."""
        key = (text, special)
        ids = self._piece_memo.get(key)
        if ids is None:
            ids = self._piece_memo[key] = self.tokenize(text, special=special)
            if len(self._piece_memo) > 4096:
                self._piece_memo.popitem(last=False)
        else:
            self._piece_memo.move_to_end(key)
        return ids

    def count_tokens(self, messages: Sequence[Message], *,
                     add_generation_prompt: bool = True) -> int:
        return len(self.prompt_ids(messages, add_generation_prompt=add_generation_prompt))

    def stream(self, messages: Sequence[Message], params: GenerationParams) -> Generation:
        """Generate a reply to ``messages`` (which end with a user message), chunk by chunk."""
        return Generation(self._locked(self.prompt_ids(messages), params))

    def _locked(self, prompt_ids: list[int],
                params: GenerationParams) -> Generator[str, None, Completion]:
        with self._lock:
            return (yield from self._generate(prompt_ids, params))

    def complete(self, messages: Sequence[Message], params: GenerationParams) -> Completion:
        """The whole reply at once: a join over :meth:`stream`."""
        generation = self.stream(messages, params)
        for _ in generation:
            pass
        assert generation.completion is not None
        return generation.completion

    def describe(self) -> dict[str, Any]:
        return {"engine": self.kind, "model": self.model, "context_length": self.context_length}
