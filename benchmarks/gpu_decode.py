"""GPU decode benchmark for the transformers engine (not a test).

Builds a random-weight model of Qwen2.5-3B-Instruct's exact shape (vocab 151936, hidden 2048,
36 layers, 16 query heads, 2 KV heads, intermediate 11008, tied embeddings, rope theta 1e6,
bf16) directly on the GPU — no download — and prints, in one run (sections, in this order):

- ``check``: the fast path gives the same greedy tokens as the plain path on a float32 model
  of the same family (where ties cannot flip), across bucket boundaries, in each capture mode;
- ``bound``: the memory-bandwidth bound, weight bytes / measured device-to-device copy
  bandwidth (bytes read + written): the most tokens/s any batch-1 decoder can reach; then
  decode tokens/s of plain ``model.generate`` (the tutorial's way) and of rolechat's plain
  path (dynamic cache, eager);
- ``lengths``: for each capture mode (``graph``: steps captured without torch.compile;
  ``compile``: the decode step compiled, then captured), with the context set to 32,768 and
  conversations of 500, 2,000, 8,000 and 16,000 tokens: decode tokens/s and its fraction of
  the bound (targets on an H200: >= 50 % at 2,000, >= 40 % at 16,000), the time to first token
  of a new turn with the cache reused (target <= 25 ms) and with it re-evaluated, the buckets
  used and how long the first reply at that length took (it makes the bucket's steps);
- ``start``: first-start and second-start times — a fresh process builds the model and the
  engine and answers a short prompt; seconds to its first token and to its second (the decode
  step made) — twice, the second reusing the first's compile caches (targets <= 20 s and
  <= 10 s). The model is built in memory, so loading weights from disk is not included.

Every figure is written to ``--out`` (JSON) as soon as its section ends, so a run cut short
still leaves what it measured. The tokenizer is a word-level one built here (word ``w<i>`` is
token ``i``) with the ChatML template, so prompts have exact, known lengths.

On a CUDA machine (compile mode costs one torch.compile per decode bucket, 40-80 s each, so
by default it is measured at 2,000 tokens only; ``--compile-lengths`` widens it):

    python benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode.json

A smoke run of the script itself on the CPU (a tiny model, capture off; the numbers mean
nothing):

    python benchmarks/gpu_decode.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
#: --tiny: the same family and vocabulary, a few MB of other weights.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128}
#: The float32 model of the greedy check: small, varied tokens (not one repeated token).
CHECK = {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
         "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.1}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
SECTIONS = ("check", "bound", "lengths", "start")


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


def build_model(dtype: torch.dtype, device: str, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**{**QWEN25_3B, **overrides})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: always decode full length
    return model.eval()


def words(n: int, seed: int) -> str:
    """Text of exactly ``n`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), 150000, (n,), generator=g).tolist()
    return " ".join(f"w{i}" for i in ids)


def history(tokens: int, seed: int = 0) -> Conversation:
    """A conversation of about ``tokens`` tokens, in turns of at most ~500."""
    pairs = max(1, round(tokens / 500))
    per = max(1, (tokens - 12 * pairs) // (2 * pairs))  # ChatML adds ~5 tokens a message
    return Conversation.from_tuples([(words(per, seed + 2 * i), words(per, seed + 2 * i + 1))
                                     for i in range(pairs)], system="Be brief.")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    n = (2 if device == "cuda" else 1 / 4) * 1024**3
    src = torch.empty(int(n), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    del src, dst
    if device == "cuda":
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
    ids = torch.randint(len(SPECIAL), 150000, (1, 32), device=model.device)

    def run(n: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       do_sample=False)
        sync()
        return time.perf_counter() - t

    run(4)  # warm-up
    return new_tokens / (run(1 + new_tokens) - run(1))


def reply_tokens(engine: TransformersEngine, new_tokens: int, seed: int) -> tuple[float,
                                                                                   list[int]]:
    """One greedy reply to a 32-word prompt on an empty cache: rolechat's own decode
    tokens/s, and the token ids the engine evaluated into its cache."""
    engine.reset_cache()
    reply = Chat(engine, system="Be brief.",
                 params={"temperature": 0.0, "max_new_tokens": new_tokens}).send(
        words(32, seed=seed))
    return reply.usage.tokens_per_s, engine.adapter.kv.held[reply.usage.prompt_tokens:]


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fast_engine(model: Any, tokenizer: Any, args: argparse.Namespace, capture: str,
                context: int | None = None, min_bucket: int | None = None) -> TransformersEngine:
    return TransformersEngine(model, tokenizer, context_length=context or args.context,
                              fast_decode=True, capture=capture,
                              min_bucket=min_bucket or args.min_bucket)


def free(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- sections ----------------------------------------------------------------------------

def check_section(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Fast and plain paths give the same greedy tokens (float32: no near-ties to flip), with
    a 16-token smallest bucket so that 64 tokens cross several buckets."""
    small = build_model(torch.float32, args.device, **{**(TINY if args.tiny else {}), **CHECK})
    plain = TransformersEngine(small, tokenizer, context_length=2048, fast_decode=False)
    _, reference = reply_tokens(plain, 64, 100)  # before a fast engine changes the model's
    out: dict[str, Any] = {}                      # decode attention
    for mode in args.modes:
        try:
            engine = fast_engine(small, tokenizer, args, mode, context=2048, min_bucket=16)
            _, tokens = reply_tokens(engine, 64, 100)
            assert engine.fast is not None
            buckets = sorted({bucket for _, bucket in engine.fast.made})
        except Exception as exc:  # report and go on to the speed measurements
            print(f"float32 check, {mode}: FAILED {type(exc).__name__}: {str(exc)[:300]}",
                  flush=True)
            tokens, buckets = [], []
        out[mode] = {"identical": tokens == reference, "agree": agree(tokens, reference),
                     "of": len(reference), "buckets": buckets}
        print(f"float32 check, {mode}: greedy tokens identical to the plain path: "
              f"{tokens == reference} ({agree(tokens, reference)}/{len(reference)}), "
              f"buckets {buckets}", flush=True)
    free(small, plain)
    return out


def bound_section(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    bandwidth = copy_bandwidth(args.device)
    weights = weight_bytes(model)
    bound = bandwidth / weights
    print(f"weights {weights / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"-> bound {bound:.0f} tokens/s", flush=True)
    generate = generate_rate(model, args.generate_tokens)
    print(f"model.generate (tutorial):   {generate:7.1f} tokens/s", flush=True)
    plain = TransformersEngine(model, tokenizer, context_length=args.context, fast_decode=False)
    plain_rate, _ = reply_tokens(plain, args.generate_tokens, 7)
    print(f"rolechat plain path:         {plain_rate:7.1f} tokens/s", flush=True)
    free(plain)
    return {"copy_bandwidth_TBps": bandwidth / 1e12, "weight_GB": weights / 1e9,
            "bound_tokens_per_s": bound, "generate_tokens_per_s": generate,
            "plain_tokens_per_s": plain_rate}


def length_row(engine: TransformersEngine, length: int, args: argparse.Namespace,
               bound: float | None) -> dict[str, Any]:
    """A conversation of ``length`` tokens: its first reply (evaluates the history, makes the
    buckets' steps), then ``repeats + 1`` new turns with the cache reused (the reader's pause
    is a flush: the background checkpoint runs first); then the last turn re-evaluated."""
    assert engine.fast is not None
    params = {"temperature": 0.0, "max_new_tokens": args.new_tokens}
    engine.reset_cache()
    made = len(engine.fast.made)
    chat = Chat(engine, params=params, conversation=history(length))
    start = time.perf_counter()
    first = chat.send(words(20, seed=900))
    first_s = time.perf_counter() - start
    rates, ttfts, replies = [], [], []
    for i in range(args.repeats + 1):
        engine.flush()
        reply = chat.send(words(20, seed=950 + i))
        replies.append(reply)
        rates.append(reply.usage.tokens_per_s)
        if i:  # the first new turn may make the bucket's prompt step
            ttfts.append(reply.usage.ttft_s)
    engine.flush()
    engine.reset_cache()
    again = Chat(engine, params=params, conversation=chat.conversation.copy())
    again.conversation.pop_turn()
    cold = again.send(words(20, seed=950 + args.repeats))  # the same prompt, empty cache
    last = replies[-1].usage
    rate = statistics.median(rates)
    row = {"history_tokens": first.usage.prompt_tokens, "last_prompt_tokens": last.prompt_tokens,
           "last_cached_tokens": last.cached_tokens,
           "decode_positions": [first.usage.prompt_tokens, last.prompt_tokens + args.new_tokens],
           "decode_tokens_per_s": rate,
           "fraction_of_bound": rate / bound if bound else None,
           "ttft_reused_ms": 1000 * statistics.median(ttfts),
           "ttft_first_new_turn_ms": 1000 * replies[0].usage.ttft_s,
           "ttft_reevaluated_ms": 1000 * cold.usage.ttft_s,
           "first_reply_s": first_s,
           "steps_made": [list(key) for key in engine.fast.made[made:]]}
    of_bound = f" = {rate / bound:5.1%} of the bound" if bound else ""
    print(f"  {length:6d} tokens (prompts {row['history_tokens']}..{last.prompt_tokens}): "
          f"decode {rate:7.1f} tokens/s{of_bound} | TTFT reused {row['ttft_reused_ms']:6.1f} ms "
          f"(first new turn {row['ttft_first_new_turn_ms']:.1f}), re-evaluated "
          f"{row['ttft_reevaluated_ms']:7.1f} ms | first reply {first_s:5.1f} s, steps "
          f"{row['steps_made']}", flush=True)
    return row


def lengths_section(args: argparse.Namespace, model: Any, tokenizer: Any,
                    bound: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in args.modes:
        lengths = args.compile_lengths if mode == "compile" else args.lengths
        print(f"fast path, capture {mode!r}, context {args.context}:", flush=True)
        engine = fast_engine(model, tokenizer, args, mode)
        rows = []
        for length in lengths:
            try:
                rows.append({"length": length, **length_row(engine, length, args, bound)})
            except Exception as exc:
                print(f"  {length}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                rows.append({"length": length, "error": f"{type(exc).__name__}: {exc}"[:500]})
        out[mode] = rows
        free(engine)
    return out


def start_section(args: argparse.Namespace) -> dict[str, Any]:
    """Each mode: two fresh processes, the second reusing the first's compile caches (torch's
    in the rolechat home, Triton's), both started clean of this process's caches."""
    out: dict[str, Any] = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
            env.update(ROLECHAT_HOME=f"{tmp}/home", TRITON_CACHE_DIR=f"{tmp}/triton")
            runs = []
            for attempt in ("first", "second"):
                command = [sys.executable, __file__, "--start-probe", "--modes", mode,
                           "--device", args.device, "--context", str(args.context),
                           "--min-bucket", str(args.min_bucket), "--t0", repr(time.time())]
                if args.tiny:
                    command.append("--tiny")
                done = subprocess.run(command, capture_output=True, text=True, env=env,
                                      timeout=args.start_timeout, check=False)
                if done.returncode != 0:
                    print(f"  {mode} {attempt} start FAILED: {done.stderr[-500:]}", flush=True)
                    break
                times = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append(times)
                print(f"  {mode} {attempt} start: engine ready {times['ready_s']:5.1f} s, "
                      f"first token {times['first_token_s']:5.1f} s, second token "
                      f"{times['second_token_s']:5.1f} s", flush=True)
            out[mode] = runs
    return out


def start_probe(args: argparse.Namespace) -> None:
    """The child of --start: seconds since the parent started it (``--t0``) to the engine, to
    the first token and to the second token of a short reply; one JSON line."""
    stamps = {}
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tokenizer = build_tokenizer(QWEN25_3B["vocab_size"])
    model = build_model(dtype, args.device, **(TINY if args.tiny else {}))
    engine = fast_engine(model, tokenizer, args, args.modes[0])
    stamps["ready_s"] = time.time() - args.t0
    decode_one = engine.adapter.decode_one

    def timed_decode(token: torch.Tensor) -> torch.Tensor:  # the second token's logits
        logits = decode_one(token)
        sync()
        stamps.setdefault("second_token_s", time.time() - args.t0)
        return logits

    engine.adapter.decode_one = timed_decode
    chat = Chat(engine, system="Be brief.", params={"temperature": 0.0, "max_new_tokens": 2})
    sent = time.time()
    reply = chat.send(words(20, seed=1))
    stamps["first_token_s"] = sent + reply.usage.ttft_s - args.t0
    print(json.dumps(stamps), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model of the same family (smoke runs)")
    parser.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS),
                        help=f"what to run, comma-separated (default: {','.join(SECTIONS)})")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=None,
                        help="capture modes (default: graph,compile on CUDA, off on the CPU)")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--min-bucket", type=int, default=512)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[500, 2000, 8000, 16000], help="conversation lengths (tokens)")
    parser.add_argument("--compile-lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[2000], help="the lengths for capture mode 'compile'")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--generate-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--out", default="benchmarks/results/gpu_decode.json")
    parser.add_argument("--start-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_decode.py needs a CUDA GPU (or --device cpu --tiny for a smoke run).")
    if args.modes is None:
        args.modes = ["graph", "compile"] if args.device.startswith("cuda") else ["off"]
    if args.tiny and args.context == parser.get_default("context"):  # small enough for a CPU
        args.context, args.min_bucket = 1024, 64
        args.lengths, args.compile_lengths = [100, 400], [100]
        args.new_tokens, args.generate_tokens, args.repeats = 16, 8, 2
    if args.start_probe:
        start_probe(args)
        return
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result: dict[str, Any] = {"device": device, "torch": torch.__version__,
                              "transformers": transformers.__version__, "context": args.context,
                              "tiny": args.tiny, "modes": args.modes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    print(f"{device} · torch {torch.__version__} · transformers {transformers.__version__} · "
          f"modes {args.modes}", flush=True)
    tokenizer = build_tokenizer(QWEN25_3B["vocab_size"])
    if "check" in args.sections:
        result["float32_check"] = check_section(args, tokenizer)
        save()
    model = build_model(torch.float32 if args.tiny else torch.bfloat16, args.device,
                        **(TINY if args.tiny else {}))
    bound = None
    if "bound" in args.sections:
        result.update(bound_section(args, model, tokenizer))
        bound = result["bound_tokens_per_s"]
        save()
    if "lengths" in args.sections:
        result["lengths"] = lengths_section(args, model, tokenizer, bound)
        save()
    free(model)
    if "start" in args.sections:
        print("start times (fresh processes):", flush=True)
        result["start"] = start_section(args)
        save()
    print(f"\nSUMMARY {json.dumps(summary(result))} | wrote {out}")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's targets name, one line."""
    line: dict[str, Any] = {key: round(result[key], 1) for key in
                            ("bound_tokens_per_s", "generate_tokens_per_s",
                             "plain_tokens_per_s") if key in result}
    for mode, rows in result.get("lengths", {}).items():
        for row in rows:
            if "decode_tokens_per_s" in row:
                line[f"{mode}@{row['length']}"] = (
                    f"{row['decode_tokens_per_s']:.0f} tok/s"
                    + (f" ({row['fraction_of_bound']:.0%})" if row["fraction_of_bound"] else "")
                    + f", TTFT {row['ttft_reused_ms']:.1f} ms")
    for mode, runs in result.get("start", {}).items():
        line[f"start {mode}"] = [round(run.get("first_token_s", 0), 1) for run in runs]
    for mode, check in result.get("float32_check", {}).items():
        line[f"identical {mode}"] = check["identical"]
    return line


if __name__ == "__main__":
    main()
