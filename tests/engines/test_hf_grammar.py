"""Grammars over a Hugging Face tokenizer (rolechat.engines.hf_grammar), on the CPU.

The embedded SmolLM2 tokenizer (49,152 tokens; no model weights) and JSON-Schema grammars as
llama-cpp-python writes them drive a sample-first loop over random logits (seeded), longer than
the vocabulary by padding rows: every reply parses and validates; ``allows`` agrees with
``mask`` token for token; the end of generation comes exactly when the grammar is complete;
lazy grammars let free text through until the trigger and then enforce the call; a grammar
that does not compile is an InvalidInput.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llama_cpp.llama_grammar import json_schema_to_gbnf  # noqa: E402

from rolechat.engines.hf_grammar import (  # noqa: E402
    CompiledGrammar,
    TokenGrammar,
    compile_grammar,
)
from rolechat.errors import InvalidInput  # noqa: E402

EOS = 2  # <|im_end|>
PADDING = 64  # logits rows past the tokenizer's vocabulary, as a model's may have

#: Every string, array and number is bounded, so random sampling ends.
SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["name", "age", "role", "tags", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "maxLength": 10},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
CALL: dict[str, Any] = {
    "type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"enum": ["get_weather", "get_time"]},
        "arguments": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TRIGGER = r"[\s\S]*?(<tool_call>)[\s\S]*"


def gbnf(schema: dict[str, Any]) -> str:
    return str(json_schema_to_gbnf(json.dumps(schema)))


def tool_call_gbnf() -> str:
    call = re.sub(r"^root ::=", "call ::=", gbnf(CALL), flags=re.M)
    return 'root ::= "<tool_call>\\n" call "\\n</tool_call>"\n' + call


def parse(text: str) -> Any:
    # llama-cpp-python's converter lets strings hold raw control characters (its ``char`` is
    # [^"\\]; llama.cpp's own excludes \x00-\x1F), which strict JSON refuses.
    return json.loads(text, strict=False)


def pick(grammar: TokenGrammar, vocab: int, generator: Any) -> int:
    """The sample-first strategy: sample from every row; only if the grammar refuses the token,
    mask and sample again (until allowed: before a lazy trigger each refusal rules one out)."""
    logits = torch.randn(vocab + PADDING, generator=generator) * 4
    while True:
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if grammar.allows(token):
            return token
        grammar.mask(logits)
        assert logits[token] == float("-inf")


def sample(grammar: TokenGrammar, vocab: int, generator: Any, steps: int = 2000) -> list[int]:
    """Tokens until the end of generation (not included)."""
    ids: list[int] = []
    for _ in range(steps):
        token = pick(grammar, vocab, generator)
        grammar.accept(token)
        if token == EOS:
            assert grammar.done and not grammar.allows(EOS)
            return ids
        ids.append(token)
    raise AssertionError(f"no end after {steps} tokens: {ids[-20:]}")


def allowed_by_mask(grammar: TokenGrammar, vocab: int) -> set[int]:
    logits = torch.zeros(vocab + PADDING)
    grammar.mask(logits)
    return {int(t) for t in torch.nonzero(torch.isfinite(logits)).flatten()}


def allowed_one_by_one(grammar: TokenGrammar, vocab: int) -> set[int]:
    return {t for t in range(vocab + PADDING) if grammar.allows(t)}


@pytest.fixture(scope="module")
def compiled(smol_tokenizer: Any) -> CompiledGrammar:
    return compile_grammar(smol_tokenizer, gbnf(SCHEMA))


def test_random_replies_parse_and_validate(smol_tokenizer: Any,
                                           compiled: CompiledGrammar) -> None:
    vocab = len(smol_tokenizer)
    special = set(smol_tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(1234)
    total = 0
    for _ in range(12):
        ids = sample(TokenGrammar(compiled), vocab, generator)
        total += len(ids)
        assert not special & set(ids) and max(ids) < vocab
        reply = parse(smol_tokenizer.decode(ids))
        jsonschema.validate(reply, SCHEMA)
    assert total > 300  # many steps, not a few short replies


def test_allows_agrees_with_mask(smol_tokenizer: Any, compiled: CompiledGrammar) -> None:
    vocab = len(smol_tokenizer)
    grammar = TokenGrammar(compiled)
    text = '{"name": "Ann \\"Lee\\"", "age": 41, "role": "guest", "tags": ["x"], ' \
           '"address": {"city": "Oslo", "zip": "01234"}}'
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    checked = 0
    for i, token in enumerate(ids):
        if i % 4 == 0 or i == len(ids) - 1:  # the start, inside strings, numbers, enums
            by_mask = allowed_by_mask(grammar, vocab)
            assert by_mask == allowed_one_by_one(grammar, vocab)
            assert token in by_mask and EOS not in by_mask
            assert not any(t >= vocab for t in by_mask)
            checked += 1
        grammar.accept(token)
    assert checked >= 8
    # Complete, and the optional space may still follow: the end of generation, or " ".
    assert not grammar.done
    both = allowed_by_mask(grammar, vocab)
    assert both == allowed_one_by_one(grammar, vocab) and EOS in both
    assert {smol_tokenizer.decode([t]) for t in both - {EOS}} == {" "}
    grammar.accept(smol_tokenizer.encode(" ", add_special_tokens=False)[0])
    assert grammar.done
    assert allowed_by_mask(grammar, vocab) == allowed_one_by_one(grammar, vocab) == {EOS}
    grammar.accept(EOS)
    assert grammar.done and allowed_by_mask(grammar, vocab) == set()
    assert not grammar.allows(EOS)


def test_more_end_ids_and_refused_tokens(smol_tokenizer: Any) -> None:
    vocab = len(smol_tokenizer)
    compiled = compile_grammar(smol_tokenizer, 'root ::= "yes" | "no"', eog=[0])
    grammar = TokenGrammar(compiled)
    assert not grammar.allows(0) and not grammar.allows(EOS)
    assert not grammar.allows(1)  # <|im_start|>: control tokens are never grammar text
    assert not grammar.allows(vocab) and not grammar.allows(vocab + 5)  # padding rows
    with pytest.raises(InvalidInput, match="refuses token"):
        grammar.accept(EOS)
    for token in smol_tokenizer.encode("yes", add_special_tokens=False):
        grammar.accept(token)
    assert grammar.done
    assert allowed_by_mask(grammar, vocab) == allowed_one_by_one(grammar, vocab) == {0, EOS}
    grammar.accept(0)
    assert grammar.done and not grammar.allows(EOS)


def test_lazy_tool_call(smol_tokenizer: Any) -> None:
    vocab = len(smol_tokenizer)
    compiled = compile_grammar(smol_tokenizer, tool_call_gbnf(), triggers=[TRIGGER])
    generator = torch.Generator().manual_seed(99)
    for reply in range(4):
        grammar = TokenGrammar(compiled)
        # Free text: every token is allowed (padding rows are not tokens), nothing is masked.
        ids = []
        for _ in range(30):
            logits = torch.randn(vocab + PADDING, generator=generator)
            before = logits.clone()
            grammar.mask(logits)
            assert torch.equal(logits[:vocab], before[:vocab])
            assert torch.isinf(logits[vocab:]).all()
            token = int(torch.randint(3, vocab, (), generator=generator))
            assert grammar.allows(token) and not grammar.done
            grammar.accept(token)
            ids.append(token)
        prose = smol_tokenizer.decode(ids)
        assert "<tool_call>" not in prose
        # The trigger, spread over five tokens; the grammar starts at its capture group.
        for token in smol_tokenizer.encode(" Let me look. <tool_call>", add_special_tokens=False):
            assert grammar.allows(token)
            grammar.accept(token)
            ids.append(token)
        assert allowed_by_mask(grammar, vocab) == allowed_one_by_one(grammar, vocab)
        ids += sample(grammar, vocab, generator)
        text = smol_tokenizer.decode(ids)
        assert text.startswith(prose + " Let me look. <tool_call>\n"), (reply, text)
        call = text[len(prose + " Let me look. "):]
        assert call.endswith("\n</tool_call>"), call
        body = call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        jsonschema.validate(parse(body), CALL)


def test_lazy_trigger_with_refused_text_after_it(smol_tokenizer: Any) -> None:
    """A token that completes the trigger but carries text the grammar refuses (">,") is
    refused; the mask rules it out once ``allows`` has; one with good text starts it."""
    vocab = len(smol_tokenizer)
    compiled = compile_grammar(smol_tokenizer, tool_call_gbnf(), triggers=[TRIGGER])
    grammar = TokenGrammar(compiled)
    for token in smol_tokenizer.encode("ok <tool_call", add_special_tokens=False):
        grammar.accept(token)
    bad = smol_tokenizer.convert_tokens_to_ids(">,")
    assert smol_tokenizer.decode([bad]) == ">,"
    assert not grammar.allows(bad)
    logits = torch.zeros(vocab + PADDING)
    grammar.mask(logits)
    assert logits[bad] == float("-inf") and int(torch.isinf(logits).sum()) == PADDING + 1
    with pytest.raises(InvalidInput):
        grammar.accept(bad)
    good = smol_tokenizer.encode(">", add_special_tokens=False)[0]
    assert grammar.allows(good)
    grammar.accept(good)
    newline = smol_tokenizer.encode("\n", add_special_tokens=False)[0]
    assert allowed_by_mask(grammar, vocab) == allowed_one_by_one(grammar, vocab) == {newline}


def test_lazy_reply_may_end_as_free_text(smol_tokenizer: Any) -> None:
    grammar = TokenGrammar(compile_grammar(smol_tokenizer, tool_call_gbnf(), triggers=[TRIGGER]))
    for token in smol_tokenizer.encode("No tool needed.", add_special_tokens=False):
        grammar.accept(token)
    assert grammar.allows(EOS) and not grammar.done
    grammar.accept(EOS)
    assert grammar.done and not grammar.allows(EOS)


def test_compiled_once(smol_tokenizer: Any, compiled: CompiledGrammar) -> None:
    assert compile_grammar(smol_tokenizer, gbnf(SCHEMA)) is compiled
    lazy = compile_grammar(smol_tokenizer, gbnf(SCHEMA), triggers=[TRIGGER])
    assert lazy is not compiled and lazy.triggers == (TRIGGER,)


@pytest.mark.parametrize(("grammar", "triggers", "says"), [
    ('root ::= "a" (', (), "Expected ')'"),
    ('root ::= "a" missing', (), "missing"),
    ('start ::= "a"', (), "root"),
    ('root ::= "\\q"', (), "escape"),
    ('root ::= "a"', ("(<tool_call>",), "not a regular expression"),
])
def test_bad_grammar_is_invalid_input(smol_tokenizer: Any, grammar: str,
                                      triggers: tuple[str, ...], says: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(says)) as caught:
        compile_grammar(smol_tokenizer, grammar, triggers=triggers)
    assert caught.value.field in ("grammar", "triggers")


def test_missing_library_says_what_to_install(smol_tokenizer: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(InvalidInput, match=re.escape("rolechat[transformers]")):
        compile_grammar(smol_tokenizer, 'root ::= "never compiled before"')
