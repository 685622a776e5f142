"""The llama.cpp grammar sampler (engines/llama_grammar.py) on the embedded model: a refused
token sends only the tokens that can be allowed through the grammar — and the replies are
the same, token for token, as with the whole vocabulary (llama.cpp's own way), greedy and
sampled, with top-k and without."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from rolechat.constraint import Constraint
from rolechat.conversation import Message
from rolechat.engines import llama_grammar, load_engine
from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat.params import GenerationParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "mood": {"type": "string", "enum": ["happy", "tired"]},
    "scores": {"type": "array", "maxItems": 3,
               "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
    "required": ["name", "mood", "scores"], "additionalProperties": False}
PROMPTS = ["Describe a baker as JSON.", "Who is the lighthouse keeper?", "A sailor, please."]
SETTINGS = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5},
            {"temperature": 1.0, "seed": 9, "top_k": 0}, {"temperature": 0.7, "seed": 3,
                                                             "presence_penalty": 0.5}]


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    loaded = load_engine(n_threads=1)
    assert isinstance(loaded, LlamaCppEngine)
    yield loaded
    loaded.close()


def replies(engine: LlamaCppEngine) -> list[str]:
    out = []
    for settings in SETTINGS:
        for prompt in PROMPTS:
            params = GenerationParams(max_new_tokens=150, **settings)  # room to end: bounded
            generation = engine.stream([Message("user", prompt)], params,
                                       constraint=Constraint.json(SCHEMA))
            out.append("".join(generation))
    return out


def test_narrowed_passes_give_the_whole_vocabulary_s_tokens(
        engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    close = llama_grammar.GrammarSampler.close

    def keep(self: Any) -> None:
        made.append((self.rejected, self.candidates))
        close(self)

    monkeypatch.setattr(llama_grammar.GrammarSampler, "close", keep)
    narrowed = replies(engine)
    rejected = sum(r for r, _ in made)
    seen = sum(c for _, c in made)
    assert rejected > 10  # the model wanted what the grammar refused, often
    assert seen < rejected * engine.adapter.n_vocab / 20  # far fewer than the vocabulary
    monkeypatch.setattr(llama_grammar.GrammarSampler, "_possible", lambda self: self._ids)
    whole = replies(engine)
    assert narrowed == whole
    for text in narrowed:  # and every one is valid
        value = json.loads(text)
        assert set(value) == {"name", "mood", "scores"} and len(value["scores"]) <= 3
