"""Multi-turn benchmark: rolechat's KV-cache reuse against re-evaluating the whole history.

What it measures
    A scripted 30-turn conversation (fixed user messages, below) on the embedded
    SmolLM2-135M-Instruct at temperature 0, with a fixed ``max_new_tokens``, for three
    approaches that share the model file, context length, thread count and batch size:

    rolechat  one :class:`rolechat.Chat` session, ``chat.stream(text)`` per turn; the engine
              keeps the KV cache of the conversation and evaluates only the new tokens.
    tutorial  the tutorial's way: every turn the full history is rendered with the chat
              template and evaluated from an *empty* KV cache (a separate ``llama_cpp.Llama``,
              ``llm.reset()`` before each ``create_chat_completion(..., stream=True)``).
    raw       plain llama-cpp-python ``create_chat_completion(..., stream=True)`` on its own
              ``Llama`` that is never reset, so its built-in prefix matching applies.

    Each approach keeps its own history, made of its own replies, and all use the ``concise``
    persona's system prompt. The turns are interleaved (the order rotates every turn) after
    one warm-up completion per model object.

    Every approach is timed the same way, from outside: time to first token (TTFT) is the time
    from the call to the first non-empty text chunk; decode speed is (n - 1) / (time from the
    first to the last text chunk), where n is the reply's length in tokens (the reply text
    tokenized again). rolechat's own ``Reply.usage`` numbers are recorded as well. The table's
    ``prompt`` column is rolechat's prompt length; ``cached`` is how many prompt tokens each
    approach took from its KV cache (for raw, the prefix its ``Llama.generate`` matches).

    Targets (printed as PASS/MISS; the script exits 0 either way): rolechat decode speed at
    least 0.95x raw, and rolechat's TTFT at the last turn at most 1/20 of the tutorial's.

Summary memory (``--memory-turns``, default 60; 0 skips it)
    The same script, cycled, in a small context (``--memory-context``, 1,024 tokens) so that
    the window slides, once with plain dropping and once with ``Window(summarize=True)``,
    one after the other on one engine. Reported: the extra time per slide (a slide turn's
    time with the summary, less the plain slide turn's; and the summarization's own time as
    the reply records it), and the cache reuse between slides (cached / prompt tokens on the
    turns that do not slide) for both, as a ratio: summary memory should leave it unchanged.

How to run
    .venv/bin/python benchmarks/multiturn.py            (or: make bench)
    .venv/bin/python benchmarks/multiturn.py --turns 10 --max-new-tokens 32 --out /tmp/r.json

Results (settings, every turn, summary) are written as JSON to
``benchmarks/results/multiturn.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import llama_cpp
import psutil
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from rolechat import Chat, load_engine
from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat.persona import BUILTIN
from rolechat.window import Window

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "multiturn.json"
SYSTEM = BUILTIN["concise"].system
DECODE_TARGET = 0.95  # rolechat decode tok/s / raw decode tok/s, at least
TTFT_TARGET = 1 / 20  # rolechat last-turn TTFT / tutorial last-turn TTFT, at most

#: A conversation that builds on itself: planning a trip to Italy, then cooking for it.
USER_MESSAGES: tuple[str, ...] = (
    "Hi! I'm planning a one-week trip to Italy in May. Where should I start?",
    "I like food and history more than beaches. Which cities fit that?",
    "Let's say Rome and Florence. How many days in each?",
    "What is the best way to travel between Rome and Florence?",
    "Roughly how much does that train ticket cost?",
    "In Rome, which three sights should I not miss?",
    "Do I need to book the Colosseum in advance?",
    "What is a good area to stay in Rome for walking everywhere?",
    "And in Florence?",
    "I'm vegetarian. Will eating out be easy?",
    "Name two vegetarian pasta dishes I should try.",
    "How is cacio e pepe made?",
    "Could I cook it at home before the trip to practise?",
    "Which cheese can replace pecorino if I can't find it?",
    "How much pasta per person should I cook?",
    "Give me a simple shopping list for four people.",
    "What wine would go with it?",
    "Back to the trip: is May crowded in Florence?",
    "Should I visit the Uffizi or the Accademia if I only have time for one?",
    "How long does a visit to the Uffizi take?",
    "Is a day trip to Siena from Florence worth it?",
    "How do I get from Florence to Siena?",
    "What should I pack for Italy in May?",
    "Do shops accept cards, or do I need cash?",
    "How much should I tip in restaurants?",
    "Teach me three useful Italian phrases for ordering food.",
    "How do I say that I am vegetarian in Italian?",
    "Summarise my Rome plan in two sentences.",
    "Now summarise the Florence part in two sentences.",
    "Thanks! What is the one thing I should not forget?",
)


# ----- timing, the same for every approach ----------------------------------------------------
@dataclass(frozen=True)
class TurnResult:
    prompt_tokens: int
    #: Prompt tokens taken from the KV cache instead of being evaluated (an estimate for raw).
    cached_tokens: int
    #: The reply's length in tokens (the reply text tokenized again).
    reply_tokens: int
    ttft_ms: float
    decode_tok_s: float
    total_ms: float
    text: str
    #: rolechat's own Usage for this reply (rolechat only).
    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class Timing:
    text: str
    ttft_s: float
    decode_s: float
    total_s: float


def time_chunks(chunks: Iterable[str], start: float) -> Timing:
    """Drain ``chunks``, noting when the first and the last non-empty chunk arrived."""
    parts: list[str] = []
    first = last = None
    for chunk in chunks:
        if chunk:
            last = time.perf_counter()
            if first is None:
                first = last
            parts.append(chunk)
    end = time.perf_counter()
    if first is None or last is None:
        return Timing("", end - start, 0.0, end - start)
    return Timing("".join(parts), first - start, last - first, end - start)


def result_of(timing: Timing, count: Callable[[str], int], prompt_tokens: int,
              cached_tokens: int, usage: dict[str, Any] | None = None) -> TurnResult:
    n = count(timing.text)
    rate = (n - 1) / timing.decode_s if n > 1 and timing.decode_s > 0 else 0.0
    return TurnResult(prompt_tokens, cached_tokens, n, timing.ttft_s * 1000, rate,
                      timing.total_s * 1000, timing.text, usage)


# ----- the three approaches --------------------------------------------------------------------
class Approach(Protocol):
    name: str

    def turn(self, user: str) -> TurnResult: ...


class RolechatApproach:
    """One Chat session; the engine reuses its KV cache across turns."""

    name = "rolechat"

    def __init__(self, engine: LlamaCppEngine, max_new_tokens: int) -> None:
        self.engine = engine
        params = {"temperature": 0, "max_new_tokens": max_new_tokens}
        Chat(engine, persona="concise", params={**params, "max_new_tokens": 8}).send("Hello!")
        engine.reset_cache()  # the warm-up must not leave a cached prefix behind
        self.chat = Chat(engine, persona="concise", params=params)

    def count(self, text: str) -> int:
        return len(self.engine.tokenize(text, special=False))

    def turn(self, user: str) -> TurnResult:
        start = time.perf_counter()
        stream = self.chat.stream(user)
        timing = time_chunks(stream, start)
        assert stream.reply is not None
        usage = stream.reply.usage
        return result_of(timing, self.count, usage.prompt_tokens, usage.cached_tokens,
                         usage.to_dict())


def content_chunks(stream: Iterator[Any]) -> Iterator[str]:
    """The text of a streamed ``create_chat_completion`` (role and final chunks give '')."""
    for chunk in stream:
        yield chunk["choices"][0]["delta"].get("content") or ""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaApproach:
    """llama-cpp-python's ``create_chat_completion`` on its own ``Llama`` object.

    ``reset_each_turn=True`` is the tutorial's approach: the KV cache is emptied before every
    turn, so the whole rendered history is evaluated again.
    """

    def __init__(self, name: str, engine: LlamaCppEngine, max_new_tokens: int, *,
                 reset_each_turn: bool) -> None:
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.reset_each_turn = reset_each_turn
        n_ctx = engine.context_length
        self.llm = Llama(model_path=str(engine.path), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                         n_threads=engine.n_threads, n_threads_batch=engine.n_threads,
                         n_gpu_layers=-1, verbose=False)
        assert self.llm.n_ctx() == n_ctx
        # The same prompt text and ids that create_chat_completion builds (for token counts).
        model = self.llm._model
        self.formatter = Jinja2ChatFormatter(
            template=self.llm.metadata["tokenizer.chat_template"],
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
            stop_token_ids=[self.llm.token_eos()])
        self.history: list[dict[str, str]] = []
        self._complete([{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "Hello!"}], 8)  # warm-up
        self.llm.reset()

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) \
            if text else 0

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        result = self.formatter(messages=messages)
        return self.llm.tokenize(result.prompt.encode("utf-8"),
                                 add_bos=not result.added_special, special=True)

    def _complete(self, messages: list[dict[str, str]], max_tokens: int) -> Iterator[str]:
        stream = self.llm.create_chat_completion(messages, temperature=0, max_tokens=max_tokens,
                                                 stream=True)  # type: ignore[arg-type]
        return content_chunks(iter(stream))

    def messages_for(self, user: str) -> tuple[list[dict[str, str]], list[int]]:
        """System prompt, as much history as fits (oldest turns dropped first), then ``user``."""
        history = self.history
        while True:
            messages = [{"role": "system", "content": SYSTEM}, *history,
                        {"role": "user", "content": user}]
            ids = self.prompt_ids(messages)
            if len(ids) + self.max_new_tokens <= self.llm.n_ctx() or not history:
                return messages, ids
            history = history[2:]

    def turn(self, user: str) -> TurnResult:
        messages, ids = self.messages_for(user)
        if self.reset_each_turn:
            self.llm.reset()
            if self.llm.n_tokens != 0:
                raise RuntimeError("llm.reset() left tokens in the KV cache")
            cached = 0
        else:  # what Llama.generate's prefix matching will keep
            cached = min(common_prefix(self.llm.input_ids[: self.llm.n_tokens].tolist(), ids),
                         len(ids) - 1)
        start = time.perf_counter()
        timing = time_chunks(self._complete(messages, self.max_new_tokens), start)
        if self.reset_each_turn and self.llm.input_ids[: len(ids)].tolist() != ids:
            raise RuntimeError("the tutorial approach did not evaluate the whole prompt")
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": timing.text}]
        return result_of(timing, self.count, len(ids), cached)


# ----- running and reporting -------------------------------------------------------------------
def run(approaches: Sequence[Approach], turns: int) -> list[dict[str, TurnResult]]:
    """All turns; within a turn the approaches run one after another, in a rotating order."""
    rows: list[dict[str, TurnResult]] = []
    print_header([a.name for a in approaches])
    for index in range(turns):
        user = USER_MESSAGES[index % len(USER_MESSAGES)]
        shift = index % len(approaches)
        order = [*approaches[shift:], *approaches[:shift]]
        row = {a.name: a.turn(user) for a in order}
        rows.append({a.name: row[a.name] for a in approaches})
        print_row(index + 1, rows[-1])
    return rows


def print_header(names: Sequence[str]) -> None:
    cols = "".join(f" | {name + ' ttft ms':>17} {'tok/s':>6} {'cached':>6}" for name in names)
    line = f"{'turn':>4} {'prompt':>6}{cols}"
    print(line)
    print("-" * len(line))


def print_row(turn: int, row: dict[str, TurnResult]) -> None:
    prompt = next(iter(row.values())).prompt_tokens
    cols = "".join(f" | {r.ttft_ms:>17.1f} {r.decode_tok_s:>6.1f} {r.cached_tokens:>6}"
                   for r in row.values())
    print(f"{turn:>4} {prompt:>6}{cols}", flush=True)


def decode_rates(rows: Sequence[dict[str, TurnResult]], name: str) -> list[float]:
    return [row[name].decode_tok_s for row in rows if row[name].decode_tok_s > 0] or [0.0]


def summarize(rows: Sequence[dict[str, TurnResult]]) -> dict[str, Any]:
    names = list(rows[0])
    decode = {name: statistics.fmean(decode_rates(rows, name)) for name in names}
    median = {name: statistics.median(decode_rates(rows, name)) for name in names}
    usage_rates = [r["rolechat"].usage["tokens_per_s"] for r in rows
                   if r["rolechat"].usage and r["rolechat"].usage["tokens_per_s"] > 0]
    last = rows[-1]
    return {
        "mean_decode_tok_s": decode,
        "median_decode_tok_s": median,
        "rolechat_usage_mean_tokens_per_s": statistics.fmean(usage_rates) if usage_rates else 0,
        "last_turn_ttft_ms": {name: last[name].ttft_ms for name in names},
        "last_turn_prompt_tokens": {name: last[name].prompt_tokens for name in names},
        "last_turn_cached_tokens": {name: last[name].cached_tokens for name in names},
        "decode_ratio_rolechat_raw": decode["rolechat"] / decode["raw"],
        "median_decode_ratio_rolechat_raw": median["rolechat"] / median["raw"],
        "ttft_ratio_rolechat_tutorial": last["rolechat"].ttft_ms / last["tutorial"].ttft_ms,
        "ttft_ratio_rolechat_raw": last["rolechat"].ttft_ms / last["raw"].ttft_ms,
        "replies_identical_to_rolechat": {
            name: sum(r[name].text == r["rolechat"].text for r in rows) for name in names},
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_summary(summary: dict[str, Any], turns: int) -> None:
    print()
    for name, rate in summary["mean_decode_tok_s"].items():
        print(f"decode {name:<9} mean {rate:6.1f} tok/s, "
              f"median {summary['median_decode_tok_s'][name]:6.1f} tok/s "
              f"(identical replies to rolechat: {summary['replies_identical_to_rolechat'][name]}"
              f"/{turns})")
    print(f"rolechat's own usage.tokens_per_s, mean: "
          f"{summary['rolechat_usage_mean_tokens_per_s']:.1f} tok/s")
    ratio = summary["decode_ratio_rolechat_raw"]
    print(f"decode rolechat / raw:              {ratio:6.3f}  (target >= {DECODE_TARGET}) "
          f"{verdict(ratio >= DECODE_TARGET)}")
    print(f"  (medians: {summary['median_decode_ratio_rolechat_raw']:.3f})")
    ratio = summary["ttft_ratio_rolechat_tutorial"]
    print(f"turn-{turns} ttft rolechat / tutorial:  {ratio:6.3f}  (target <= {TTFT_TARGET}) "
          f"{verdict(ratio <= TTFT_TARGET)}")
    ratio = summary["ttft_ratio_rolechat_raw"]
    print(f"turn-{turns} ttft rolechat / raw:       {ratio:6.3f}  (no target)")


# ----- summary memory against plain dropping -------------------------------------------------
def memory_run(engine: LlamaCppEngine, memory: str, turns: int,
               max_new_tokens: int) -> list[dict[str, Any]]:
    """One conversation of ``turns`` turns with ``memory``; per turn: time, slide, reuse."""
    engine.reset_cache()
    chat = Chat(engine, persona="concise", params={"temperature": 0,
                                                   "max_new_tokens": max_new_tokens},
                window=Window(summarize=memory == "summary"))
    rows: list[dict[str, Any]] = []
    first = 0
    for index in range(turns):
        start = time.perf_counter()
        reply = chat.send(USER_MESSAGES[index % len(USER_MESSAGES)])
        total = time.perf_counter() - start
        plan, usage = reply.plan, reply.usage
        summary = plan.summary_usage
        rows.append({"turn": index + 1, "slide": plan.first_turn != first, "total_s": total,
                     "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                     "ttft_s": usage.ttft_s,
                     "summary_s": summary.total_s if summary is not None else None,
                     "summary_tokens": summary.generated_tokens if summary is not None else None,
                     "memory_note": plan.memory_note})
        first = plan.first_turn
    if chat.memory.summary:
        print(f"  final summary ({memory}): {chat.memory.summary}")
    return rows


def memory_summary(plain: list[dict[str, Any]], summary: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(values: Iterable[float]) -> float:
        values = list(values)
        return statistics.fmean(values) if values else 0.0

    def reuse(rows: list[dict[str, Any]]) -> float:  # between slides (the first turn aside)
        between = [r for r in rows[1:] if not r["slide"]]
        return mean(r["cached_tokens"] / r["prompt_tokens"] for r in between)

    slide_plain = mean(r["total_s"] for r in plain if r["slide"])
    slide_summary = mean(r["total_s"] for r in summary if r["slide"])
    turn_plain = mean(r["total_s"] for r in plain if not r["slide"])
    return {
        "slides": {"plain": sum(r["slide"] for r in plain),
                   "summary": sum(r["slide"] for r in summary)},
        "summaries_made": sum(r["summary_s"] is not None and not r["memory_note"]
                              for r in summary),
        "summaries_failed": sum(bool(r["memory_note"]) for r in summary),
        "mean_slide_turn_s": {"plain": slide_plain, "summary": slide_summary},
        "extra_s_per_slide": slide_summary - slide_plain,
        "mean_summarization_s": mean(r["summary_s"] for r in summary
                                     if r["summary_s"] is not None),
        "mean_turn_s_between_slides_plain": turn_plain,
        "reuse_between_slides": {"plain": reuse(plain), "summary": reuse(summary)},
        "reuse_ratio_summary_plain": reuse(summary) / reuse(plain) if reuse(plain) else 0.0,
    }


def print_memory(result: dict[str, Any], turns: int, context: int) -> None:
    print(f"\nsummary memory, {turns} turns in a {context}-token context:")
    print(f"slides: plain {result['slides']['plain']}, summary {result['slides']['summary']} "
          f"({result['summaries_made']} summaries made, {result['summaries_failed']} fell back)")
    slide = result["mean_slide_turn_s"]
    between = result["mean_turn_s_between_slides_plain"]
    print(f"slide turn: plain {slide['plain']:.2f} s, summary {slide['summary']:.2f} s; extra "
          f"per slide {result['extra_s_per_slide']:.2f} s = "
          f"{result['extra_s_per_slide'] / between if between else 0:.2f}x a plain turn "
          f"({between:.2f} s); the summarization itself {result['mean_summarization_s']:.2f} s")
    reuse = result["reuse_between_slides"]
    print(f"cache reuse between slides (cached/prompt): plain {reuse['plain']:.3f}, summary "
          f"{reuse['summary']:.3f}; ratio {result['reuse_ratio_summary_plain']:.3f} "
          f"(1.0 = unchanged)")


def settings(engine: LlamaCppEngine, args: argparse.Namespace) -> dict[str, Any]:
    return {"model_path": str(engine.path), "n_ctx": engine.context_length,
            "n_batch": min(512, engine.context_length), "n_threads": engine.n_threads,
            "max_new_tokens": args.max_new_tokens, "turns": args.turns, "temperature": 0,
            "system_prompt": SYSTEM, "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=len(USER_MESSAGES),
                        help="number of turns (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="reply length limit per turn (default %(default)s)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="context length for all three (default: the engine's default)")
    parser.add_argument("--memory-turns", type=int, default=60,
                        help="turns of the summary-memory run (0 skips it; default %(default)s)")
    parser.add_argument("--memory-context", type=int, default=1024,
                        help="context length of the summary-memory run (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON results file (default benchmarks/results/multiturn.json)")
    args = parser.parse_args(argv)
    if args.turns < 1 or args.max_new_tokens < 1:
        parser.error("--turns and --max-new-tokens must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    busy_at_start = psutil.cpu_percent(interval=1.0)  # before this script uses the CPU
    options = {} if args.context_length is None else {"context_length": args.context_length}
    engine = load_engine(**options)
    assert isinstance(engine, LlamaCppEngine)
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
    config = {**settings(engine, args), "cpu_busy_percent_at_start": busy_at_start}
    print(", ".join(f"{k}={v}" for k, v in config.items() if k != "system_prompt"))
    approaches: list[Approach] = [
        RolechatApproach(engine, args.max_new_tokens),
        LlamaApproach("tutorial", engine, args.max_new_tokens, reset_each_turn=True),
        LlamaApproach("raw", engine, args.max_new_tokens, reset_each_turn=False),
    ]
    if busy_at_start > 20:
        print(f"warning: the CPU was {busy_at_start:.0f}% busy before the run; other processes "
              "compete for it, so the timings will be noisy")
    rows = run(approaches, args.turns)
    summary = summarize(rows)
    print_summary(summary, args.turns)
    memory: dict[str, Any] | None = None
    if args.memory_turns:
        engine.close()
        small = load_engine(context_length=args.memory_context)
        assert isinstance(small, LlamaCppEngine)
        plain = memory_run(small, "none", args.memory_turns, args.max_new_tokens)
        with_summary = memory_run(small, "summary", args.memory_turns, args.max_new_tokens)
        memory = {**memory_summary(plain, with_summary), "context_length": args.memory_context,
                  "turns": {"plain": plain, "summary": with_summary}}
        print_memory(memory, args.memory_turns, args.memory_context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"settings": config, "summary": summary, "memory": memory,
            "turns": [{"turn": i + 1, "user": USER_MESSAGES[i % len(USER_MESSAGES)],
                       **{name: asdict(result) for name, result in row.items()}}
                      for i, row in enumerate(rows)]}
    args.out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
