"""A deterministic fake engine for fast unit tests, with exact, byte-level token counting.

Tokens: one per UTF-8 byte of plain text; ``<|im_start|>`` and ``<|im_end|>`` are single
control tokens (ids 256 and 257) only where special tokens are allowed. Replies are queued by
the test (``engine.replies.append("...")``) or echo the user's message. A simulated KV cache
reports cached tokens the same way a real engine does (longest common prefix).
"""

from __future__ import annotations

from collections.abc import Generator

from rolechat.engines.base import Completion, Engine, Timer
from rolechat.params import GenerationParams
from rolechat.streaming import ReplyText
from rolechat.template import ChatTemplate

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = {"<|im_start|>": 256, "<|im_end|>": 257}


class FakeEngine(Engine):
    kind = "fake"

    def __init__(self, context_length: int = 2048, fail_after: int | None = None) -> None:
        super().__init__()
        self.model = "fake"
        self.context_length = context_length
        self.template = ChatTemplate(CHATML)
        self.replies: list[str] = []
        self.prompts: list[list[int]] = []
        self.cache: list[int] = []
        self.fail_after = fail_after  # raise after this many chunks

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

    def _generate(self, prompt_ids: list[int],
                  params: GenerationParams) -> Generator[str, None, Completion]:
        self.prompts.append(prompt_ids)
        cached = 0
        for a, b in zip(self.cache, prompt_ids[:-1]):
            if a != b:
                break
            cached += 1
        self.cache = list(prompt_ids)
        text = self.replies.pop(0) if self.replies else "echo"
        timer = Timer()
        reply = ReplyText(params.stop)
        finish = "stop"
        for index, char in enumerate(text):
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("engine failed mid-reply")
            if timer.tokens >= params.max_new_tokens:
                finish = "length"
                break
            timer.token()
            chunk = reply.push(char.encode("utf-8"))
            self.cache.append(ord(char) % 256)
            if chunk:
                yield chunk
            if reply.stopped:
                break
        tail = reply.finish()
        if tail:
            yield tail
        return Completion(reply.text, timer.usage(len(prompt_ids), cached), finish)
