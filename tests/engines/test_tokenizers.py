"""PromptEncoder and HFTokenizer used from several threads at once (issue 19, item 15).

The server's worker thread and the ``asyncio.to_thread`` planners of other conversations share
one engine's encoder. Its memo used to be hand-written OrderedDict LRUs without a lock
(``move_to_end`` raised after another thread's ``popitem``), and a Hugging Face fast tokenizer
raised "Already borrowed" (or tokenized with another thread's ``split_special_tokens``) when two
threads used it at once. These tests hammer one encoder from several threads, with memos so
small that every call evicts, and compare every result with a single-threaded reference.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rolechat import Message
from rolechat.engines import tokenizers
from rolechat.engines.llama_cpp import embedded_model_path
from rolechat.engines.tokenizers import GGUFVocab, HFTokenizer, PromptEncoder, template_for

THREADS = 6
ROUNDS = 300
#: Texts with control-token text in them: content must never become control tokens.
TEXTS = [f"message {i}: <|im_start|>system {'x' * i} 你好 <|im_end|>" for i in range(24)]


def conversations() -> list[list[Message]]:
    """Prompts that share pieces in different orders, so the memos hit, miss and evict."""
    out = []
    for i in range(len(TEXTS)):
        turns = [Message("system", "Be brief.")]
        for j in range(i % 4):
            turns += [Message("user", TEXTS[(i + j) % len(TEXTS)]),
                      Message("assistant", TEXTS[(i * 7 + j) % len(TEXTS)])]
        out.append([*turns, Message("user", TEXTS[i])])
    return out


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Threads switch after every few bytecodes, so races show at once."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def hammer(work: Callable[[int, int], None]) -> list[BaseException]:
    """Run ``work(thread, round)`` on several threads at once; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(thread: int) -> None:
        start.wait()
        try:
            for round_ in range(ROUNDS):
                work(thread, round_)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


def check_encoder(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    template = template_for(tokenizer)
    prompts = conversations()
    reference = PromptEncoder(tokenizer, template)
    expected = [reference.ids(p) for p in prompts]
    counts = [reference.count_text(text) for text in TEXTS]
    monkeypatch.setattr(tokenizers, "PIECE_MEMO", 3)  # every call evicts
    monkeypatch.setattr(tokenizers, "PROMPT_MEMO", 2)
    shared = PromptEncoder(tokenizer, template)
    wrong: list[tuple[int, int]] = []

    def work(thread: int, round_: int) -> None:
        k = (thread * 31 + round_ * 7) % len(prompts)
        if shared.ids(prompts[k]) != expected[k]:
            wrong.append((thread, k))
        if shared.count_text(TEXTS[k]) != counts[k]:
            wrong.append((thread, -k))

    errors = hammer(work)
    assert errors == [] and wrong == []


def test_one_encoder_from_many_threads_with_the_gguf_vocab(
        switch_often: None, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = GGUFVocab.load(embedded_model_path())
    try:
        check_encoder(vocab, monkeypatch)
    finally:
        vocab.close()


def test_one_encoder_from_many_threads_with_a_hf_tokenizer(
        smol_tokenizer: Any, switch_often: None, monkeypatch: pytest.MonkeyPatch) -> None:
    check_encoder(HFTokenizer(smol_tokenizer), monkeypatch)


def test_a_hf_tokenizer_encodes_and_decodes_on_many_threads(
        smol_tokenizer: Any, switch_often: None) -> None:
    # Content (special=False) and template text (special=True) alternate on every thread, while
    # others decode, as a generating reply does: each call sees its own split_special_tokens.
    hf = HFTokenizer(smol_tokenizer)
    plain = {text: hf.tokenize(text, special=False) for text in TEXTS}
    special = {text: hf.tokenize(text, special=True) for text in TEXTS}
    assert all(plain[t] != special[t] for t in TEXTS)  # the texts hold control-token text
    wrong: list[str] = []

    def work(thread: int, round_: int) -> None:
        text = TEXTS[(thread + round_) % len(TEXTS)]
        if thread % 3 == 2:
            with hf.lock:
                smol_tokenizer.decode(special[text], skip_special_tokens=True)
        elif hf.tokenize(text, special=bool(round_ % 2)) != (special if round_ % 2 else
                                                              plain)[text]:
            wrong.append(text)

    errors = hammer(work)
    assert errors == [] and wrong == []
