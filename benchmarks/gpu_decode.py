"""GPU decode benchmark for the transformers engine (not a test).

Builds a random-weight model of Qwen2.5-3B-Instruct's exact shape (vocab 151936, hidden 2048,
36 layers, 16 query heads, 2 KV heads, intermediate 11008, tied embeddings, rope theta 1e6,
bf16) directly on the GPU — no download — and prints, in one run:

1. the memory-bandwidth bound: weight bytes / measured device-to-device copy bandwidth
   (bytes read + written), i.e. the most tokens/s any batch-1 decoder can reach;
2. decode tokens/s of plain ``model.generate`` (the tutorial's way), of rolechat's engine on the
   plain path (dynamic cache, eager) and on the fast path (static cache + CUDA graphs), and the
   fast path's fraction of the bound (target >= 50%);
3. that the fast path gives the same greedy tokens as the plain path (a float32 model of the
   same family, where ties cannot flip), and how long the bf16 paths agree;
4. time to first token of a new turn after 500, 2000, 8000 and 16000 tokens of history, with
   the KV cache reused versus re-evaluated.

The tokenizer is a word-level one built here (word ``w<i>`` is token ``i``) with the ChatML
template, so prompts have exact, known lengths. Run on a CUDA machine:

    python benchmarks/gpu_decode.py --out results/gpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rolechat import Chat, Conversation
from rolechat.engines.transformers import TransformersEngine

QWEN25_3B = {"vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 11008,
             "tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "hidden_act": "silu"}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
HISTORY_SIZES = (500, 2000, 8000, 16000)


def build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(dtype: torch.dtype, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**{**QWEN25_3B, **overrides})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: always decode full length
    return model.eval()


def words(n: int, seed: int) -> str:
    """Text of exactly ``n`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), 150000, (n,), generator=g).tolist()
    return " ".join(f"w{i}" for i in ids)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    n = 2 * 1024**3
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(
        n, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times[3:])


def weight_bytes(model: Any) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def generate_rate(model: Any, new_tokens: int) -> float:
    """The tutorial's way: model.generate, eager, dynamic cache. Decode tokens/s measured as
    the difference between generating 1 + N tokens and generating 1 (removes the prefill)."""
    ids = torch.randint(len(SPECIAL), 150000, (1, 32), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)  # warm-up
    return new_tokens / (run(1 + new_tokens) - run(1))


def engine_decode(engine: TransformersEngine, new_tokens: int,
                  repeats: int) -> tuple[float, list[int]]:
    """Median decode tokens/s reported by rolechat's own usage, and the generated token ids of
    the first run (those the engine evaluated into its cache)."""
    rates: list[float] = []
    tokens: list[int] = []
    for i in range(repeats):
        engine.reset_cache()
        chat = Chat(engine, system="Be brief.",
                    params={"temperature": 0.0, "max_new_tokens": new_tokens})
        reply = chat.send(words(32, seed=100 + i))
        rates.append(reply.usage.tokens_per_s)
        tokens = tokens or engine._cache_ids[reply.usage.prompt_tokens:]
    return statistics.median(rates), tokens


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ttft_rows(engine: TransformersEngine, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for size in HISTORY_SIZES:
        turn = 250  # tokens per message
        pairs = [(words(turn, seed=2 * i), words(turn, seed=2 * i + 1))
                 for i in range(max(1, size // (2 * turn)))]
        conversation = Conversation.from_tuples(pairs, system="Be brief.")
        params = {"temperature": 0.0, "max_new_tokens": 16}
        reused, fresh, prompt = [], [], 0
        for r in range(repeats):
            engine.reset_cache()
            chat = Chat(engine, params=params, conversation=conversation.copy())
            chat.send(words(20, seed=900 + r))  # puts the history in the cache
            reply = chat.send(words(20, seed=950 + r))  # a new turn: only new tokens evaluated
            reused.append(reply.usage.ttft_s)
            prompt, cached = reply.usage.prompt_tokens, reply.usage.cached_tokens
            engine.reset_cache()
            again = Chat(engine, params=params, conversation=chat.conversation.copy())
            again.conversation.pop_turn()
            fresh_reply = again.send(words(20, seed=950 + r))  # the same prompt, empty cache
            fresh.append(fresh_reply.usage.ttft_s)
            assert fresh_reply.usage.cached_tokens == 0
        row = {"history_tokens": prompt, "cached_tokens": cached,
               "ttft_reused_ms": 1000 * statistics.median(reused),
               "ttft_reevaluated_ms": 1000 * statistics.median(fresh)}
        row["speedup"] = row["ttft_reevaluated_ms"] / row["ttft_reused_ms"]
        rows.append(row)
        print(f"  history {prompt:6d} tokens: reused {row['ttft_reused_ms']:8.1f} ms "
              f"(cached {cached}) vs re-evaluated {row['ttft_reevaluated_ms']:8.1f} ms  "
              f"= {row['speedup']:.1f}x", flush=True)
    return rows


def check_fast_path(tokenizer: Any, result: dict[str, Any]) -> None:
    """Fast and plain paths give the same greedy tokens (float32: no near-ties to flip)."""
    small = build_model(torch.float32, num_hidden_layers=4, hidden_size=256,
                        intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                        initializer_range=0.1)  # varied tokens, not one repeated token
    small_plain = TransformersEngine(small, tokenizer, context_length=2048, fast_decode=False)
    _, plain_tokens = engine_decode(small_plain, 64, 1)  # before the fast engine changes the
    small_fast = TransformersEngine(small, tokenizer, context_length=2048, fast_decode=True)
    try:  # model's decode attention
        _, fast_tokens = engine_decode(small_fast, 64, 1)
    except Exception as exc:  # report and go on to the speed measurements
        print(f"float32 fast path FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        fast_tokens = []
    result["float32_greedy_identical"] = fast_tokens == plain_tokens
    print(f"float32 model: fast path greedy tokens identical to plain path: "
          f"{fast_tokens == plain_tokens} ({agree(fast_tokens, plain_tokens)}/"
          f"{len(plain_tokens)})", flush=True)
    del small, small_fast, small_plain
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--generate-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gpu_decode.json")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[18432], help="static cache sizes to time decode with; the "
                        "largest (>= 16,500) is used for the time-to-first-token rows")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the float32 fast-vs-plain greedy check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_decode.py needs a CUDA GPU.")
    import transformers

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"{result['device']} · torch {torch.__version__} · transformers "
          f"{transformers.__version__}", flush=True)

    # 3a. Correctness where ties cannot flip: float32, small, same family.
    tokenizer = build_tokenizer(QWEN25_3B["vocab_size"])
    if not args.skip_check:
        check_fast_path(tokenizer, result)

    # 1. The bound.
    bandwidth = copy_bandwidth()
    model = build_model(torch.bfloat16)
    weights = weight_bytes(model)
    bound = bandwidth / weights
    result.update(copy_bandwidth_TBps=bandwidth / 1e12, weight_GB=weights / 1e9,
                  bound_tokens_per_s=bound)
    print(f"weights {weights / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"-> bound {bound:.0f} tokens/s", flush=True)

    # 2. Decode speeds.
    plain_generate = generate_rate(model, args.generate_tokens)
    print(f"model.generate (tutorial):      {plain_generate:7.1f} tokens/s", flush=True)
    plain = TransformersEngine(model, tokenizer, context_length=18432, fast_decode=False)
    plain_rate, plain_words = engine_decode(plain, args.generate_tokens, 1)
    print(f"rolechat plain path:            {plain_rate:7.1f} tokens/s", flush=True)
    del plain
    by_context: dict[int, float] = {}
    for context in sorted(args.contexts, reverse=True):
        engine = TransformersEngine(model, tokenizer, context_length=context, fast_decode=True)
        start = time.perf_counter()
        engine_decode(engine, 8, 1)  # compile + capture the CUDA graph
        warmup = time.perf_counter() - start
        rate, tokens = engine_decode(engine, args.new_tokens, args.repeats)
        by_context[context] = rate
        print(f"rolechat fast path, static cache {context:6d}: {rate:7.1f} tokens/s = "
              f"{rate / bound:.0%} of the bound (warm-up {warmup:.1f} s)", flush=True)
        if context == max(args.contexts):
            fast, fast_rate, fast_words, result["warmup_s"] = engine, rate, tokens, warmup
    result["fast_tokens_per_s_by_context"] = by_context
    result.update(generate_tokens_per_s=plain_generate, plain_tokens_per_s=plain_rate,
                  fast_tokens_per_s=fast_rate, fraction_of_bound=fast_rate / bound,
                  bf16_greedy_agreement=agree(fast_words, plain_words))
    print(f"rolechat fast path:             {fast_rate:7.1f} tokens/s = "
          f"{fast_rate / bound:.0%} of the bound (target >= 50%), "
          f"{fast_rate / plain_generate:.1f}x model.generate", flush=True)
    print(f"bf16 fast vs plain greedy agree for the first "
          f"{result['bf16_greedy_agreement']}/{len(plain_words)} tokens", flush=True)

    # 4. Time to first token with and without the cache.
    print("time to first token of a new turn:", flush=True)
    result["ttft"] = ttft_rows(fast, args.repeats)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nSUMMARY bound {bound:.0f} tok/s | generate {plain_generate:.1f} | plain "
          f"{plain_rate:.1f} | fast {fast_rate:.1f} ({fast_rate / bound:.0%} of bound, "
          f"{fast_rate / plain_generate:.1f}x generate) | float32 identical "
          f"{result.get('float32_greedy_identical')} | wrote {out}")


if __name__ == "__main__":
    main()
