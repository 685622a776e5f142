"""Grammars over a Hugging Face tokenizer's vocabulary, for the transformers engine.

Contract:
- :func:`compile_grammar` takes a grammar in llama.cpp's GBNF dialect (root rule ``root``, as
  llama-cpp-python's ``SchemaConverter`` writes it) and compiles it once per (tokenizer,
  grammar) with llguidance (an optional dependency, in ``rolechat[transformers]``; chosen over
  xgrammar and outlines-core by ``benchmarks/grammar_libraries.py``): its ``gbnf_to_lark``
  turns the GBNF into llguidance's Lark, an ``LLMatcher`` compiles that. The tokenizer's
  vocabulary (~0.4 s for 49k tokens) is kept per tokenizer object (weakly), compiled grammars
  in an LRU of :data:`GRAMMAR_CACHE` per tokenizer keyed by (grammar, triggers, end ids). A
  grammar that does not compile, or a trigger that is not a regular expression, is an
  :class:`~rolechat.errors.InvalidInput` naming the problem; llguidance missing is one too,
  saying what to install.
- :class:`TokenGrammar` is one reply's state (a copy of the compiled pristine matcher:
  microseconds). ``allows(token)`` is the cheap check (about a microsecond; no state change)
  for the sample-first strategy: sample from the whole vocabulary, check the token, and only
  if it is refused ``mask`` the logits (every refused token to -inf, in place, tens of
  microseconds for 49k tokens) and sample again. ``accept(token)`` advances (a refused token
  is an InvalidInput and changes nothing); ``done``: the grammar is complete and only the end
  of generation may follow.
- End of generation: the tokenizer's ``eos_token_id`` and any ``eog`` ids given (the model's
  generation config may name more) are allowed exactly when the grammar is complete (and
  before a lazy grammar's trigger: the reply may end as free text); after one is accepted
  nothing is.
- Never allowed by a grammar: ids past the tokenizer's vocabulary (a model's logits may have
  padding rows), and special (control) tokens other than the end of generation: their text is
  never grammar text.
- Lazy grammars (``triggers``): llguidance has no regex triggers, so laziness lives here, as
  llama.cpp's ``llama_sampler_init_grammar_lazy_patterns`` has it. Until a trigger (a Python
  regular expression) matches the whole reply so far (``fullmatch``; the text of every token,
  control tokens' text included, as llama.cpp's trigger buffer holds it, decoded with
  ``surrogateescape`` so a split character keeps its bytes), every token is allowed. The token
  that makes one match starts the grammar, which is fed the text from the match's first
  non-empty capture group (the whole match without one) on and constrains everything after.
  One exception: a token that would start it with text after the trigger that the grammar
  refuses is refused by ``allows``; the mask cannot afford to try every token against the
  triggers, so before the trigger it refuses only the tokens ``allows`` refused at this
  position (a sample-first loop converges: each refusal rules one more token out).
- A :class:`TokenGrammar` belongs to one reply on one thread; :func:`compile_grammar` may be
  called from any thread.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import LRUCache

from ..errors import InvalidInput
from .tokenizers import hf_lock

if TYPE_CHECKING:
    import torch
    from llguidance import LLMatcher, LLTokenizer

#: Compiled grammars kept per tokenizer.
GRAMMAR_CACHE = 32

_INSTALL = "pip install 'rolechat[transformers]'"
_GBNF_HINT = "Check the grammar: llama.cpp's GBNF, with the root rule named 'root'."


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.gbnf_to_lark
        import llguidance.hf
    except ImportError:
        raise InvalidInput("Constrained replies with the transformers engine need the "
                           "llguidance package, which is not installed.",
                           f"Install it: {_INSTALL}") from None
    return llguidance


def _eos_ids(tokenizer: Any) -> frozenset[int]:
    value = getattr(tokenizer, "eos_token_id", None)
    values = value if isinstance(value, (list, tuple, set)) else [] if value is None else [value]
    return frozenset(int(v) for v in values)


class _Vocab:
    """What llguidance knows of one tokenizer, and the grammars compiled for it."""

    def __init__(self, tokenizer: Any) -> None:
        llguidance = _llguidance()
        self.eos = _eos_ids(tokenizer)
        try:
            with hf_lock(tokenizer):
                self.tokenizer: LLTokenizer = llguidance.hf.from_tokenizer(
                    tokenizer, eos_token=sorted(self.eos) or None)
        except (ValueError, TypeError) as exc:
            raise InvalidInput("Grammars need a fast (Rust) Hugging Face tokenizer: "
                               f"{_first_line(exc)}.",
                               "Load the model's tokenizer with use_fast=True.") from None
        #: Token ids below this are the tokenizer's; higher ones (padding rows) never occur.
        self.size = int(self.tokenizer.vocab_size)
        self.grammars: LRUCache[tuple[str, tuple[str, ...], frozenset[int]],
                                CompiledGrammar] = LRUCache(GRAMMAR_CACHE)
        self.lock = threading.Lock()


_VOCABS: weakref.WeakKeyDictionary[Any, _Vocab] = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def _vocab(tokenizer: Any) -> _Vocab:
    with _VOCABS_LOCK:
        try:
            vocab = _VOCABS.get(tokenizer)
        except TypeError:  # not weakly referable: built for this call alone
            return _Vocab(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = _Vocab(tokenizer)
        return vocab


def _trigger_text(patterns: Sequence[re.Pattern[str]], data: bytes) -> bytes | None:
    """The text a lazy grammar starts from if a trigger matches ``data`` (the whole reply so
    far), else None."""
    text = data.decode("utf-8", "surrogateescape")
    for pattern in patterns:
        match = pattern.fullmatch(text)
        if match is not None:
            start = next((match.start(g) for g in range(1, pattern.groups + 1)
                          if match.end(g) > match.start(g) >= 0), match.start())
            return text[start:].encode("utf-8", "surrogateescape")
    return None


class CompiledGrammar:
    """A grammar compiled for one tokenizer (from :func:`compile_grammar`); shared by every
    reply that follows it."""

    def __init__(self, vocab: _Vocab, gbnf: str, triggers: tuple[str, ...],
                 end: frozenset[int]) -> None:
        llguidance = _llguidance()
        self.gbnf = gbnf
        self.triggers = triggers
        self.vocab = vocab
        patterns = []
        for trigger in triggers:
            try:
                patterns.append(re.compile(trigger))
            except re.error as exc:
                raise InvalidInput(f"The grammar's trigger {trigger!r} is not a regular "
                                   f"expression: {exc}.", "Fix the trigger.",
                                   field="triggers") from None
        self.patterns: tuple[re.Pattern[str], ...] = tuple(patterns)
        try:
            lark = _lark(llguidance, gbnf)
        except Exception as exc:  # the converter raises plain Exception too
            raise InvalidInput(f"The grammar does not compile: {_first_line(exc)}.", _GBNF_HINT,
                               field="grammar") from None
        matcher = llguidance.LLMatcher(vocab.tokenizer,
                                       llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if not matcher.is_error():  # the first mask finds the rest and warms the lexer
            _fill(matcher.deep_copy(), np.empty(self.words, dtype=np.int32))
        if matcher.is_error():
            raise InvalidInput(f"The grammar does not compile: {_first_line(matcher.get_error())}.",
                               _GBNF_HINT, field="grammar")
        #: The pristine matcher; each reply takes a copy.
        self.template: LLMatcher = matcher
        #: End-of-generation ids (those of the vocabulary).
        self.end = frozenset(t for t in end if 0 <= t < vocab.size)
        self.end_ids = np.array(sorted(self.end), dtype=np.intp)

    @property
    def words(self) -> int:
        """32-bit words in a mask of the vocabulary."""
        return (self.vocab.size + 31) // 32


#: llguidance's options for every grammar: no forced tokens. By default, where the grammar
#: forces some text, its mask allows only that text's canonical tokenization while any token
#: spelling it is accepted; without forcing, the mask and ``allows`` agree (llama.cpp's
#: grammars force nothing either).
_OPTIONS = '%llguidance {"no_forcing": true}'


#: Ranges of code points that are not characters (surrogates, past U+10FFFF): llama.cpp's
#: grammars exclude them from a character class (rolechat.schemas' strings do), llguidance's
#: regular expressions cannot name them, and its text never holds them: they go.
_NOT_CHARACTERS = re.compile(r"\\u[dD]800-\\u[dD][fF]{3}|\\U00110000-\\U001[fF]{5}")


def _lark(llguidance: Any, gbnf: str) -> str:
    """``gbnf`` in llguidance's Lark, with :data:`_OPTIONS`."""
    lark = str(llguidance.gbnf_to_lark.gbnf_to_lark(_NOT_CHARACTERS.sub("", gbnf)))
    default = "%llguidance {}"
    return lark.replace(default, _OPTIONS, 1) if default in lark else f"{_OPTIONS}\n{lark}"


def _first_line(error: object) -> str:
    return str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else "unknown"


def _fill(matcher: LLMatcher, words: np.ndarray) -> None:
    matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)


def compile_grammar(tokenizer: Any, gbnf: str, *, triggers: Sequence[str] = (),
                    eog: Collection[int] = ()) -> CompiledGrammar:
    """``gbnf`` compiled for ``tokenizer`` (cached), strict or lazy (``triggers``); ``eog``:
    end-of-generation ids beside the tokenizer's ``eos_token_id``. InvalidInput if it does not
    compile."""
    vocab = _vocab(tokenizer)
    key = (gbnf, tuple(triggers), vocab.eos | frozenset(int(t) for t in eog))
    with vocab.lock:
        compiled = vocab.grammars.get(key)
    if compiled is None:
        compiled = CompiledGrammar(vocab, *key)
        with vocab.lock:
            vocab.grammars[key] = compiled
    return compiled


class TokenGrammar:
    """One reply's grammar over a Hugging Face tokenizer's vocabulary."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self._compiled = compiled
        self._llt = compiled.vocab.tokenizer
        self._size = compiled.vocab.size
        self._matcher = compiled.template.deep_copy()
        self._words = np.empty(compiled.words, dtype=np.int32)
        self._ended = False
        #: Lazy: waiting for a trigger; the reply's bytes so far, and the tokens ``allows``
        #: refused at this position.
        self._waiting = bool(compiled.patterns)
        self._text = bytearray()
        self._refused: set[int] = set()
        self._started: tuple[int, bytes | None] | None = None  # (token, its trigger text)

    # ----- lazy grammars ---------------------------------------------------------------------
    def _starts(self, token: int) -> bytes | None:
        """The text the grammar would start from if ``token`` came next (None: no trigger)."""
        if self._started is None or self._started[0] != token:
            data = bytes(self._text) + self._llt.decode_bytes([token])
            self._started = (token, _trigger_text(self._compiled.patterns, data))
        return self._started[1]

    def _valid_start(self, text: bytes) -> list[int] | None:
        """The tokens of ``text`` if the grammar accepts it from its start, else None."""
        ids = self._llt.tokenize_bytes(text) if text else []
        return ids if self._matcher.validate_tokens(ids) == len(ids) else None

    # ----- the API ---------------------------------------------------------------------------
    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (cheap; no state change)."""
        if self._ended:
            return False
        if self._waiting:
            if token in self._compiled.end:
                return True
            if not 0 <= token < self._size:
                return False
            text = self._starts(token)
            if text is None or self._valid_start(text) is not None:
                return True
            self._refused.add(token)
            return False
        if token in self._compiled.end:
            return bool(self._matcher.is_accepting())
        return 0 <= token < self._size and self._matcher.validate_tokens([token]) == 1

    def mask(self, logits: torch.Tensor) -> None:
        """Set to -inf, in place, the logits (1-D, vocab size; may be longer than the
        tokenizer's vocab: padding rows) of every token the grammar refuses next."""
        import torch

        n = int(logits.shape[-1])
        if self._waiting:
            if n > self._size:
                logits[self._size:] = float("-inf")
            refused = [t for t in self._refused if t < n]
            if refused:
                logits[refused] = float("-inf")
            return
        keep = np.zeros(n, dtype=np.bool_)
        if not self._ended:
            _fill(self._matcher, self._words)
            if self._matcher.is_error():
                raise InvalidInput(f"The grammar failed: {_first_line(self._matcher.get_error())}.",
                                   _GBNF_HINT, field="grammar")
            bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
            shown = min(n, self._size)
            keep[:shown] = bits[:shown].view(np.bool_)
            end = self._compiled.end_ids
            keep[end[end < n]] = self._matcher.is_accepting()
        logits.masked_fill_(torch.from_numpy(~keep).to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance over ``token`` (which must be allowed; lazy: free text is accepted and
        watched for the trigger)."""
        if not self.allows(token):
            raise InvalidInput(f"The reply's grammar refuses token {token} here.",
                               "Sample only tokens the grammar allows.")
        if self._waiting:
            text = None if token in self._compiled.end else self._starts(token)
            self._refused.clear()
            self._started = None
            if token in self._compiled.end:  # the reply ended as free text
                self._ended = True
            elif text is None:
                self._text += self._llt.decode_bytes([token])
            else:
                ids = self._valid_start(text)
                assert ids is not None  # allows() checked it
                self._waiting, self._text = False, bytearray()
                if ids:
                    self._matcher.consume_tokens(ids)
        elif token in self._compiled.end:
            self._ended = True
        else:
            self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Whether the grammar is complete and only end-of-generation is allowed."""
        return self._ended or (not self._waiting and bool(self._matcher.is_stopped()))
