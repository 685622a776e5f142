"""A process's replies after its first: four fresh conversations in a row, in one process.

What it measures
    One process loads the embedded model (context 8192, 2 threads, no RAM tier), then streams
    four fresh conversations one after the other, each a different ~340-token opening asking
    for 256 tokens at temperature 0.7, with a pause of ``--pause`` seconds between them (the
    engine's idle work after each reply runs then). Decode tokens/s of each reply, from its
    first token to its last.

    The anchor: raw llama-cpp-python (``Llama.create_completion``, streaming) on the same four
    prompts in a process of its own. The two run in separate processes, taking turns
    (``--rounds``, default 3; the median per reply), so the machine's drift hits both alike.

    This is the loop that caught replies 2-4 decoding at about half speed: a background thread
    that called llama_decode once left a second OpenMP team in the process, and every later
    step's barrier became a sleep and a wake-up.

Target (printed as PASS/MISS; the script exits 0 either way)
    rolechat's replies 2-4 decode at >= 0.95x raw llama-cpp-python's, same prompts, same run.

How to run
    .venv/bin/python benchmarks/fresh_replies.py [--rounds 3]
Results go to ``benchmarks/results/fresh_replies.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import opening

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fresh_replies.json"
CONTEXT, THREADS, TOKENS, TEMPERATURE = 8192, 2, 256, 0.7


def rates_rolechat(pause: float) -> list[float]:
    from rolechat import Chat
    from rolechat.engines.llama_cpp import LlamaCppEngine

    engine = LlamaCppEngine(context_length=CONTEXT, n_threads=THREADS, kv_cache_ram=0)
    rates = []
    for index in range(4):
        chat = Chat(engine, system="You are a helpful assistant.",
                    params={"temperature": TEMPERATURE, "max_new_tokens": TOKENS,
                                    "seed": index})
        stream = chat.stream(opening(index))
        stamps = [time.perf_counter() for _ in stream]
        assert stream.reply is not None
        rates.append(rate(stamps, stream.reply.usage.generated_tokens))
        time.sleep(pause)
    engine.close()
    return rates


def rates_raw(pause: float) -> list[float]:
    from llama_cpp import Llama

    from rolechat.engines.llama_cpp import embedded_model_path

    llm = Llama(str(embedded_model_path()), n_ctx=CONTEXT, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)
    rates = []
    for index in range(4):
        prompt = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
                  f"user\n{opening(index)}<|im_end|>\n<|im_start|>assistant\n")
        stamps, count = [], 0
        for chunk in llm.create_completion(prompt, max_tokens=TOKENS, temperature=TEMPERATURE,
                                           seed=index, stream=True):
            count += 1
            if chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
        rates.append(rate(stamps, count))
        time.sleep(pause)
    llm.close()
    return rates


def rate(stamps: list[float], tokens: int) -> float:
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return (tokens - 1) / span if span > 0 else 0.0


def child(engine: str, pause: float) -> list[float]:
    """One process's four replies (a fresh process each time: nothing carries over)."""
    out = subprocess.run([sys.executable, __file__, "--child", engine, "--pause", str(pause)],
                         capture_output=True, text=True, check=True)
    result: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds between a process's replies")
    parser.add_argument("--child", choices=["rolechat", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.child:
        rates = rates_rolechat(args.pause) if args.child == "rolechat" else rates_raw(args.pause)
        print(json.dumps(rates))
        return
    runs: dict[str, list[list[float]]] = {"rolechat": [], "raw": []}
    for round_ in range(args.rounds):
        for engine in ("raw", "rolechat") if round_ % 2 == 0 else ("rolechat", "raw"):
            runs[engine].append(child(engine, args.pause))
            print(f"  round {round_ + 1} {engine:<9}" + "".join(
                f"{r:8.1f}" for r in runs[engine][-1]) + "  tok/s", flush=True)
    medians = {engine: [statistics.median(run[i] for run in rounds) for i in range(4)]
               for engine, rounds in runs.items()}
    later = [medians["rolechat"][i] / medians["raw"][i] for i in range(1, 4)]
    print("\nmedian decode tokens/s, replies 1-4 of one process:")
    for engine, values in medians.items():
        print(f"  {engine:<9}" + "".join(f"{v:8.1f}" for v in values))
    print("  rolechat / raw: " + "  ".join(f"{medians['rolechat'][i] / medians['raw'][i]:.2f}"
                                             for i in range(4)))
    worst = min(later)
    print(f"\nreplies 2-4, rolechat / raw llama-cpp-python: worst {worst:.2f}  target >= 0.95 "
          f"{'PASS' if worst >= 0.95 else 'MISS'}")
    result: dict[str, Any] = {"runs": runs, "medians": medians, "replies_2_4_ratio": later,
                              "settings": {"context": CONTEXT, "threads": THREADS,
                                           "tokens": TOKENS, "temperature": TEMPERATURE,
                                           "pause_s": args.pause, "rounds": args.rounds}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
