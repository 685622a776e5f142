"""Constrained-decoding libraries for the transformers engine, side by side (not a test).

What it measures, for each library that is installed (``llguidance``, ``xgrammar``; and for
``outlines-core`` only what applies: it has no context-free grammars, so it cannot take a GBNF
grammar at all), with the embedded SmolLM2-135M tokenizer (49,152 tokens, built from the GGUF
by transformers as the tests' ``smol_tokenizer`` fixture builds it):

- ``install``: the installed distribution's size on disk and its hard requirements (what
  ``pip install`` would add to an environment that has rolechat[transformers]); with
  ``--wheels`` also whether PyPI has a CPython 3.11 manylinux wheel for x86_64 and aarch64
  (``pip download --only-binary=:all: --platform ...``, into a temporary folder);
- ``tokenizer``: seconds to build the library's tokenizer info once;
- ``compile``: milliseconds to compile three grammars, each GBNF as llama-cpp-python's
  ``SchemaConverter`` writes it (``json_schema_to_gbnf``): a flat object, a nested object with
  arrays and enums, and a tool call (``root ::= "<tool_call>\\n" call "\\n</tool_call>"``,
  ``call`` an object schema); then the first mask, the per-reply matcher (a fresh matcher on
  the compiled grammar) and its first mask;
- ``per token``: over a valid ~100-token JSON reply of the nested schema, tokenized by the
  tokenizer, microseconds per token for the full vocabulary mask (the library's bitmask
  filled, then advancing over the token) and for the sample-first strategy llama.cpp uses
  (check only the sampled token, then advance; the mask is needed only on a rejection); and,
  common to all, applying a bitmask to a logits row in torch on the CPU;
- ``GBNF``: whether each library takes ``SchemaConverter``'s output without edits (objects
  with enums, arrays, nesting, ``pattern``, ``format``, min/max items and lengths, ``$ref``,
  ``anyOf``, ``const``, ``additionalProperties``, any JSON; the tool call; and llama.cpp's own
  syntax: ``{m,n}``, ``\\x`` escapes, comments) and whether it then accepts a valid instance
  and refuses an invalid one, token by token; and whether a broken grammar is reported;
- ``lazy``: whether the library has llama.cpp's lazy grammars (regex triggers matched against
  the whole reply so far) itself.

The numbers are medians over ``--reps`` runs; nothing is asserted. Timings depend on the
machine: compare libraries within one run.

llguidance compiles each grammar with ``no_forcing``, as ``rolechat.engines.hf_grammar`` does.

How to run (15 s on 2 cores; libraries that are not installed are reported so). rolechat's
``transformers`` extra installs llguidance; for the others, without the CUDA packages xgrammar
asks for (triton), in a scratch environment:

    pip install --no-deps xgrammar apache-tvm-ffi outlines-core
    .venv/bin/python benchmarks/grammar_libraries.py [--reps 5] [--wheels]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rolechat.engines.llama_cpp import embedded_model_path

# ----- the grammars -------------------------------------------------------------------------

FLAT = {"type": "object", "properties": {"name": {"type": "string"},
                                         "age": {"type": "integer"},
                                         "admin": {"type": "boolean"}},
        "required": ["name", "age", "admin"]}
NESTED = {"type": "object", "required": ["user", "items"], "properties": {
    "user": {"type": "object", "required": ["id", "role"], "properties": {
        "id": {"type": "integer"}, "role": {"enum": ["admin", "user", "guest"]},
        "emails": {"type": "array", "items": {"type": "string"}}}},
    "items": {"type": "array", "items": {"type": "object", "required": ["sku", "qty"],
                                         "properties": {"sku": {"type": "string"},
                                                        "qty": {"type": "number"},
                                                        "size": {"enum": ["S", "M", "L"]}}}}}}
CALL = {"type": "object", "required": ["name", "arguments"], "properties": {
    "name": {"const": "get_weather"},
    "arguments": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}}}}}

#: (name, schema, a valid instance, an invalid one) for the GBNF checks.
CHECKS: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("flat object", FLAT, {"name": "Ann", "age": 41, "admin": False},
     {"name": "Ann", "age": "41", "admin": False}),
    ("nested, arrays, enums", NESTED,
     {"user": {"id": 7, "role": "guest", "emails": ["a@b.c"]},
      "items": [{"sku": "X", "qty": 1.5, "size": "L"}]},
     {"user": {"id": 7, "role": "root"}, "items": []}),
    ("pattern, format", {"type": "object", "required": ["code", "date"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
        "date": {"type": "string", "format": "date"}}},
     {"code": "ABC-123", "date": "2024-02-29"}, {"code": "AB-123", "date": "2024-02-29"}),
    ("min/max items, lengths", {"type": "object", "required": ["tags", "short"], "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3},
        "short": {"type": "string", "minLength": 2, "maxLength": 5}}},
     {"tags": ["a", "bb"], "short": "abc"}, {"tags": [], "short": "abc"}),
    ("$ref, anyOf, const", {
        "$defs": {"pt": {"type": "object", "required": ["x", "y"],
                         "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}},
        "type": "object", "required": ["a", "b", "c"], "properties": {
            "a": {"$ref": "#/$defs/pt"}, "b": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pt"}]},
            "c": {"const": "fixed"}}},
     {"a": {"x": 1, "y": -2.5}, "b": None, "c": "fixed"},
     {"a": {"x": 1, "y": -2.5}, "b": None, "c": "other"}),
    ("additionalProperties", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"a": 1, "b": 2}, {"a": 1.5}),
    ("any JSON object", {}, {"k": [1, "two", None, {"x": True}]}, [1, 2]),
]

#: llama.cpp's own GBNF syntax, which SchemaConverter in llama.cpp (not llama-cpp-python's
#: copy) writes: bounded repetition, hex escapes, comments.
UPSTREAM = r'''# llama.cpp's syntax
root ::= "{" ws "\"a\"" ws ":" ws str ws "}"  # a comment
str ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ["\\/bfnrt] ){0,20} "\""
ws ::= [ \t\n]{0,4}
'''
BROKEN = {"undefined rule": 'root ::= "a" missing', "syntax error": 'root ::= "a" ('}


def gbnf(schema: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(json.dumps(schema)))


def tool_call_gbnf() -> str:
    call = re.sub(r"^root ::=", "call ::=", gbnf(CALL), flags=re.M)
    return 'root ::= "<tool_call>\\n" call "\\n</tool_call>"\n' + call


def reply_text() -> str:
    """A valid reply of the nested schema, about 100 tokens."""
    return json.dumps({"user": {"id": 4172, "role": "admin",
                                "emails": ["ann.lee@example.com", "ops@example.org"]},
                       "items": [{"sku": "TEA-GREEN-250", "qty": 2, "size": "M"},
                                 {"sku": "MUG-01", "qty": 1},
                                 {"sku": "KETTLE-1.7L", "qty": 0.5, "size": "L"}]})


# ----- the libraries, behind one small interface --------------------------------------------

class Library:
    name = ""
    package = ""

    def info(self, tokenizer: Any) -> Any:
        raise NotImplementedError

    def compile(self, info: Any, grammar: str) -> Any:
        """The compiled grammar; raises on an error."""
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def check_advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def complete(self, matcher: Any) -> bool:
        raise NotImplementedError

    lazy = ""


class LLGuidance(Library):
    name = package = "llguidance"
    lazy = "none in its API (no triggers): laziness in the wrapper"

    def __init__(self) -> None:
        import llguidance
        import llguidance.gbnf_to_lark
        import llguidance.hf

        self.llg = llguidance
        self.to_lark = llguidance.gbnf_to_lark.gbnf_to_lark
        self.from_tokenizer = llguidance.hf.from_tokenizer

    def info(self, tokenizer: Any) -> Any:
        return self.from_tokenizer(tokenizer)

    def compile(self, info: Any, grammar: str) -> Any:
        # As rolechat.engines.hf_grammar does: no forced tokens (the mask then allows every
        # token that spells the forced text, as validate_tokens does).
        lark = self.to_lark(grammar).replace("%llguidance {}", '%llguidance {"no_forcing": true}')
        matcher = self.llg.LLMatcher(info, self.llg.LLMatcher.grammar_from_lark(lark),
                                     log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher  # a pristine matcher: each reply takes a copy

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def check_advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.validate_tokens([token]) == 1 and matcher.consume_token(token))

    def complete(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())


class XGrammar(Library):
    name = package = "xgrammar"
    lazy = ("literal-string triggers only (structural tags, triggered_tags); "
            "no regex triggers: laziness in the wrapper")

    def __init__(self) -> None:
        import xgrammar

        self.xgr = xgrammar
        self._compiler: tuple[Any, Any] | None = None

    def info(self, tokenizer: Any) -> Any:
        return self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))

    def compile(self, info: Any, grammar: str) -> Any:
        if self._compiler is None or self._compiler[0] is not info:
            # No cache: every compile is timed in full.
            self._compiler = (info, self.xgr.GrammarCompiler(info, cache_enabled=False))
        return self._compiler[1].compile_grammar(self.xgr.Grammar.from_ebnf(grammar))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask.view(1, -1))

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    check_advance = advance  # accept_token refuses without a state change

    def complete(self, matcher: Any) -> bool:
        return bool(matcher.is_completed())


LIBRARIES: dict[str, Callable[[], Library]] = {"llguidance": LLGuidance, "xgrammar": XGrammar}


# ----- measurements -------------------------------------------------------------------------

def footprint(dist: str) -> tuple[str, str]:
    """(installed size, hard requirements) of an installed distribution."""
    meta = importlib.metadata.distribution(dist)
    size = sum(Path(str(f.locate())).stat().st_size for f in meta.files or ()
               if Path(str(f.locate())).is_file())
    needs = [r.split(";")[0].strip() for r in meta.requires or ()
             if "extra ==" not in r]
    return f"{size / 2**20:.1f} MiB", ", ".join(needs) or "none"


def wheels(dist: str, version: str) -> str:
    found = []
    for arch in ("x86_64", "aarch64"):
        platforms = [f"--platform=manylinux_2_{v}_{arch}" for v in (17, 24, 26, 27, 28, 31, 34)]
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", "--python-version=3.11", *platforms, "-d", folder,
                 f"{dist}=={version}"], capture_output=True, text=True)
            names = [p.name for p in Path(folder).iterdir()]
        if done.returncode == 0 and names:
            tag = re.search(r"manylinux_2_\d+", names[0])
            found.append(f"{arch} ({tag.group(0) if tag else names[0]})")
        else:
            found.append(f"{arch}: none")
    return ", ".join(found)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f}"


def apply_mask(logits: torch.Tensor, bitmask: np.ndarray) -> None:
    """Set to -inf every logit whose bit is 0, as ``rolechat.engines.hf_grammar`` does."""
    n = logits.numel()
    keep = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n].view(np.bool_)
    logits.masked_fill_(torch.from_numpy(~keep), float("-inf"))


def per_token(lib: Library, compiled: Any, tokens: list[int], words: int,
              reps: int) -> tuple[float, float, float]:
    """Microseconds per token: mask + advance (median of the reps' means, and the slowest
    single mask), check + advance (median of the reps' means)."""
    bitmask = torch.full((words,), -1, dtype=torch.int32)
    masked, worst, checked = [], 0.0, []
    for _ in range(reps):
        matcher = lib.matcher(compiled)
        total = 0.0
        for token in tokens:
            start = time.perf_counter()
            lib.fill(matcher, bitmask)
            seconds = time.perf_counter() - start
            assert lib.advance(matcher, token)
            worst = max(worst, seconds)
            total += time.perf_counter() - start
        masked.append(total / len(tokens))
        assert lib.complete(matcher)
        matcher = lib.matcher(compiled)
        start = time.perf_counter()
        for token in tokens:
            assert lib.check_advance(matcher, token)
        checked.append((time.perf_counter() - start) / len(tokens))
        assert lib.complete(matcher)
    return statistics.median(masked) * 1e6, worst * 1e6, statistics.median(checked) * 1e6


def accepts(lib: Library, compiled: Any, tokenizer: Any, value: Any) -> bool:
    matcher = lib.matcher(compiled)
    ids = tokenizer.encode(json.dumps(value), add_special_tokens=False)
    return all(lib.advance(matcher, t) for t in ids) and lib.complete(matcher)


def reason(exc: BaseException) -> str:
    """An error's first line, without a log prefix."""
    text = str(exc).strip().splitlines()[0]
    return re.sub(r"^\[[\d:]+\] \S+: ", "", text)[:70]


def gbnf_checks(lib: Library, info: Any, tokenizer: Any) -> list[tuple[str, str]]:
    rows = []
    for name, schema, good, bad in CHECKS:
        try:
            compiled = lib.compile(info, gbnf(schema))
        except Exception as exc:  # any failure is the answer
            rows.append((name, f"refused: {reason(exc)}"))
            continue
        ok, no = accepts(lib, compiled, tokenizer, good), accepts(lib, compiled, tokenizer, bad)
        rows.append((name, "yes" if ok and not no else
                     f"compiles; valid {'accepted' if ok else 'REFUSED'}, "
                     f"invalid {'ACCEPTED' if no else 'refused'}"))
    for name, text in (("tool call", tool_call_gbnf()), ("llama.cpp syntax", UPSTREAM)):
        try:
            lib.compile(info, text)
            rows.append((name, "yes"))
        except Exception as exc:
            rows.append((name, f"refused: {reason(exc)}"))
    for name, text in BROKEN.items():
        try:
            lib.compile(info, text)
            rows.append((f"broken: {name}", "NOT reported"))
        except Exception as exc:
            rows.append((f"broken: {name}", f"error: {reason(exc)}"))
    return rows


def measure(lib: Library, tokenizer: Any, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    words = (len(tokenizer) + 31) // 32
    bitmask = torch.full((words,), -1, dtype=torch.int32)
    grammars = {"flat": gbnf(FLAT), "nested": gbnf(NESTED), "tool call": tool_call_gbnf()}
    seconds, info = timed(lambda: lib.info(tokenizer))
    out["tokenizer info (s)"] = f"{seconds:.2f}"
    seconds, compiled = timed(lambda: lib.compile(info, grammars["flat"]))
    first = timed(lambda: lib.fill(lib.matcher(compiled), bitmask))[0]
    out["first compile after it, + first mask (ms)"] = (
        f"{seconds * 1e3:.1f} + {first * 1e3:.2f}")
    done = {}
    for name, text in grammars.items():
        compiles, firsts, copies, copy_firsts = [], [], [], []
        for _ in range(reps):
            seconds, done[name] = timed(lambda text=text: lib.compile(info, text))
            compiles.append(seconds)
            matcher = lib.matcher(done[name])
            firsts.append(timed(lambda matcher=matcher: lib.fill(matcher, bitmask))[0])
            seconds, matcher = timed(lambda name=name: lib.matcher(done[name]))
            copies.append(seconds)
            copy_firsts.append(timed(lambda matcher=matcher: lib.fill(matcher, bitmask))[0])
        out[f"compile {name} (ms)"] = median_ms(compiles)
        out[f"  {name}: first mask; per reply: matcher + first mask (ms)"] = (
            f"{median_ms(firsts)}; {median_ms(copies)} + {median_ms(copy_firsts)}")
    tokens = tokenizer.encode(reply_text(), add_special_tokens=False)
    mask_us, worst_us, check_us = per_token(lib, done["nested"], tokens, words, reps)
    out[f"mask + advance (µs/token, {len(tokens)}-token reply)"] = f"{mask_us:.1f}"
    out["  slowest single mask (µs)"] = f"{worst_us:.0f}"
    out["check one token + advance (µs/token)"] = f"{check_us:.1f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--wheels", action="store_true",
                        help="ask PyPI (pip download) for each library's wheels")
    args = parser.parse_args()

    import transformers

    path = embedded_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                           gguf_file=path.name)
    torch.set_num_threads(1)
    print(f"tokenizer: {path.name}, {len(tokenizer)} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread; python {sys.version.split()[0]}")

    columns: dict[str, dict[str, Any]] = {}
    for dist in ("llguidance", "xgrammar", "outlines-core"):
        column: dict[str, Any] = {}
        columns[dist] = column
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            column["version"] = "not installed"
            continue
        column["version"] = version
        column["installed size"], column["requires"] = footprint(dist)
        if args.wheels:
            column["py3.11 manylinux wheels"] = wheels(dist, version)
        if dist not in LIBRARIES:
            importlib.import_module(dist.replace("-", "_"))
            column["GBNF / context-free grammars"] = "no (regex and JSON Schema only)"
            column["lazy triggers"] = "no"
            continue
        lib = LIBRARIES[dist]()
        column.update(measure(lib, tokenizer, args.reps))
        info = lib.info(tokenizer)
        column.update({f"GBNF: {name}": verdict
                       for name, verdict in gbnf_checks(lib, info, tokenizer)})
        column["lazy triggers"] = lib.lazy

    # Applying a bitmask to logits is the wrapper's own torch code, the same for all.
    logits = torch.randn(len(tokenizer))
    random = np.random.default_rng(0)
    bitmask = random.integers(-2**31, 2**31 - 1, (len(tokenizer) + 31) // 32, dtype=np.int32)
    runs = [timed(lambda: apply_mask(logits.clone(), bitmask))[0] for _ in range(200)]
    apply_us = statistics.median(runs) * 1e6

    rows = list(dict.fromkeys(key for column in columns.values() for key in column))
    width = max(len(r) for r in rows) + 2
    names = list(columns)
    print()
    print(f"{'':{width}}" + " | ".join(names))
    for row in rows:
        cells = [str(columns[n].get(row, "-")) for n in names]
        print(f"{row:{width}}" + " | ".join(cells))
    print(f"\napply a bitmask to one logits row (torch, CPU, {len(tokenizer)} logits): "
          f"{apply_us:.1f} µs")


if __name__ == "__main__":
    main()
