"""Tokenizers shared by the engines, and the one way a prompt becomes token ids.

Contract:
- A :class:`Tokenizer` turns text into ids: ``special=True`` lets control-token text become
  control tokens, ``special=False`` keeps every character plain text; no BOS is added. It
  knows the model's BOS/EOS text, the BOS id to put first when the model expects one the
  template does not write (``bos_id``), and its own chat template (``template_source``).
- :class:`GGUFVocab` is the vocabulary inside a GGUF file (through llama.cpp; the llama.cpp
  engine shares its loaded model's, the remote engine loads one vocabulary-only);
  :class:`HFTokenizer` is a transformers tokenizer (the transformers engine's, or a folder the
  remote engine loads).
- :class:`PromptEncoder` renders messages with a :class:`~rolechat.template.ChatTemplate` and
  tokenizes them piece by piece: template text may hold control tokens, message content never
  does. Pieces are memoized, so a new turn tokenizes only its new text.
- Thread safety: one encoder serves the engine's worker thread and the planners of other
  conversations at once. Its memos are cachetools LRUs under a lock (tokenizing happens outside
  it), and every call into a Hugging Face tokenizer holds that tokenizer's one lock
  (:func:`hf_lock`, shared with whatever else decodes with it): a fast tokenizer used by two
  threads at once raises "Already borrowed", or tokenizes content with the other thread's
  ``split_special_tokens``.
- Engine modules import this module, never each other.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from cachetools import LRUCache

from ..conversation import Message
from ..errors import InvalidInput, ModelLoadError
from ..template import ChatTemplate


class Tokenizer(Protocol):
    bos_id: int | None
    bos_text: str
    eos_text: str
    template_source: str

    def tokenize(self, text: str, *, special: bool) -> list[int]: ...


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to file descriptor 2 (Python exceptions still rise)."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2 at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class GGUFVocab:
    """The tokenizer stored in a GGUF file, through llama.cpp's loaded model (llama-cpp-python's
    ``LlamaModel``: read-only, safe to use from any thread)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._detokenize = model.detokenize
        self.metadata: dict[str, str] = model.metadata()
        bos = model.token_bos()
        self.bos_id = bos if model.add_bos_token() else None
        self.bos_text = self.text_of(bos)
        self.eos_text = self.text_of(model.token_eos())
        self.template_source: str = self.metadata.get("tokenizer.chat_template", "")

    @classmethod
    def load(cls, path: Path) -> GGUFVocab:
        """Only the vocabulary of the GGUF file at ``path`` (no weights)."""
        from .llama_cpp import load_model

        try:
            return cls(load_model(path, vocab_only=True))
        except ModelLoadError as exc:
            raise ModelLoadError(str(path), f"cannot read its tokenizer ({exc.reason})",
                                 "Pass a .gguf file or a Hugging Face tokenizer folder.") from None

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        return list(self.model.tokenize(text.encode("utf-8"), False, special))

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (control tokens give nothing)."""
        return bytes(self._detokenize([token]))

    def text_of(self, token: int) -> str:
        """The text of one token, control tokens included (for BOS/EOS)."""
        if token < 0:
            return ""
        return bytes(self._detokenize([token], special=True)).decode("utf-8", "replace")

    def close(self) -> None:
        self.model.close()


_HF_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_HF_LOCKS_LOCK = threading.Lock()


def hf_lock(tokenizer: Any) -> threading.RLock:
    """The one lock of a Hugging Face tokenizer object: hold it for every call into it."""
    with _HF_LOCKS_LOCK:
        try:
            lock = _HF_LOCKS.get(tokenizer)
            if lock is None:
                lock = _HF_LOCKS[tokenizer] = threading.RLock()
        except TypeError:  # not weakly referable: a lock for this caller alone
            lock = threading.RLock()
        return lock


class HFTokenizer:
    """A Hugging Face (transformers) tokenizer, one call at a time."""

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        #: Held for every call into ``tokenizer`` (:func:`hf_lock`).
        self.lock = hf_lock(tokenizer)
        self.bos_text = tokenizer.bos_token or ""
        self.eos_text = tokenizer.eos_token or ""
        self.template_source = getattr(tokenizer, "chat_template", "") or ""
        with self.lock:
            plain = tokenizer("a", add_special_tokens=False).input_ids
            with_special = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        # The tokenizer puts a BOS first by itself: the prompt needs it too.
        self.bos_id: int | None = (bos if bos is not None
                                   and with_special[:1] == [bos] != plain[:1] else None)

    @classmethod
    def load(cls, path: Path) -> HFTokenizer:
        try:
            from transformers import AutoTokenizer

            return cls(AutoTokenizer.from_pretrained(str(path)))
        except ImportError:
            raise ModelLoadError(str(path), "transformers is not installed",
                                 "pip install 'rolechat[transformers]', or pass a .gguf "
                                 "tokenizer.") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(str(path), f"cannot load its tokenizer ({exc})",
                                 "Pass a Hugging Face tokenizer folder or a .gguf file.") from None

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        with self.lock:  # split_special_tokens is a setting of the shared Rust tokenizer
            return list(self.hf(text, add_special_tokens=False,
                                split_special_tokens=not special).input_ids)


def load_tokenizer(path: Path) -> GGUFVocab | HFTokenizer:
    """A tokenizer from a ``.gguf`` file or a Hugging Face tokenizer folder."""
    if path.is_file():
        return GGUFVocab.load(path)
    if not path.is_dir():
        raise ModelLoadError(str(path), "no such tokenizer file or folder",
                             "Pass a .gguf file or a Hugging Face tokenizer folder.")
    return HFTokenizer.load(path)


def template_for(tokenizer: Tokenizer, override: str | None = None) -> ChatTemplate:
    """The chat template: ``override`` (Jinja text) or the tokenizer's own, with its BOS/EOS."""
    return ChatTemplate(override or tokenizer.template_source, bos_token=tokenizer.bos_text,
                        eos_token=tokenizer.eos_text)


#: Pieces kept in the memo (the texts of about a thousand recent messages and their headers).
PIECE_MEMO = 4096
#: Whole prompts kept in the memo (the window counts a few candidates per turn).
PROMPT_MEMO = 8


class PromptEncoder:
    """Messages → prompt token ids, through the chat template, piece by piece. Safe to use
    from several threads at once."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._lock = threading.Lock()  # guards the memos only, never held while tokenizing
        self._pieces: LRUCache[tuple[str, bool], list[int]] = LRUCache(PIECE_MEMO)
        self._prompts: LRUCache[tuple[Message | bool, ...], list[int]] = LRUCache(PROMPT_MEMO)

    def ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids (a fresh list the caller may keep)."""
        key: tuple[Message | bool, ...] = (*messages, add_generation_prompt)
        with self._lock:
            ids = self._prompts.get(key)
        if ids is None:
            ids = self._encode(messages, add_generation_prompt)
            with self._lock:
                self._prompts[key] = ids
        return list(ids)

    def open_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids of ``messages`` with the last one left open, right after its content (no
        end-of-turn text): a prompt that continues that message. InvalidInput where the
        template cannot be traced."""
        segments = self.template.segments(messages, add_generation_prompt=False)
        if segments is None or not messages or not segments[-1:] or not any(
                is_content for _, is_content in segments):
            raise InvalidInput("This model's chat template cannot continue a reply.",
                               "Ask the model to go on instead (e.g. \"Continue.\").")
        last = max(i for i, (_, is_content) in enumerate(segments) if is_content)
        ids: list[int] = []
        for text, is_content in segments[:last + 1]:
            ids += self._piece(text, not is_content)
        bos = self.tokenizer.bos_id
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def count_text(self, text: str) -> int:
        """Tokens of one plain text (a message's own share, without its template)."""
        return len(self._piece(text, False))

    def _encode(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        tokenize = self.tokenizer.tokenize
        segments = self.template.segments(messages, add_generation_prompt=add_generation_prompt)
        if segments is None:
            # The template rewrites content, so pieces cannot be traced: refuse content that
            # would turn into control tokens, then tokenize the whole text.
            for m in messages:
                if tokenize(m.content, special=True) != tokenize(m.content, special=False):
                    raise InvalidInput(f"A {m.role} message contains control-token text, and "
                                       "this model's template cannot keep it as plain text.",
                                       "Remove the special tokens from the message.")
            text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
            ids = tokenize(text, special=True)
        else:
            ids = []
            for text, is_content in segments:
                ids += self._piece(text, not is_content)
        bos = self.tokenizer.bos_id
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _piece(self, text: str, special: bool) -> list[int]:
        """The ids of one piece (the memo's list: callers copy, never change it)."""
        key = (text, special)
        with self._lock:
            ids = self._pieces.get(key)
        if ids is None:
            ids = self.tokenizer.tokenize(text, special=special)
            with self._lock:
                self._pieces[key] = ids
        return ids
