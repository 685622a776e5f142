"""Several users at once: `rolechat serve` against llama.cpp's own `llama-server`.

What it measures (one run, side by side, real servers on loopback, streaming requests)
    Bursts: N users (``--users``, default 1, 2, 4 and 8) each send one streaming
    ``/v1/chat/completions`` request at the same moment. Each request is its own conversation:
    a different ~340-token opening (no two share more than the chat template), asking for
    ``--max-tokens`` (default 256) at temperature 0. Per burst: time to first token (TTFT,
    median and worst), the burst's wall time, the aggregate tokens/s (every completion token
    of the burst over its wall time) and each user's decode tokens/s (median).

    Sessions that share a persona: N users each open a rolechat session with the same long
    system prompt (~250 tokens) and send a different ~90-token message at the same moment
    (``POST /v1/conversations/{id}/messages``). llama-server gets the same tokens through its
    stateless endpoint. Median TTFT.

    Smooth streams: one reply is streaming when a 2,000-token prompt arrives; the running
    reply's gaps between tokens while that prompt is taken in (every gap that overlaps the
    intake), at the 95th percentile, against its gaps before it arrived; and how long the
    intake took.

    Servers, each started fresh on the embedded model with 2 threads and ``--parallel``
    sequences (default 4) of ``--context`` tokens (2048):
      1. rolechat, ``rolechat serve --parallel 4`` (continuous batching)
      2. rolechat, ``--parallel 1`` (one request at a time, as before batching)
      3. llama.cpp's ``llama-server -np 4 -c 4x2048`` (its defaults otherwise: continuous
         batching, flash attention auto) — the peer.
    ``--parallel 2`` or ``8`` gives both servers that many sequences (how serve's default was
    chosen: ``--sections stateless --users 1,4,8 --no-one-at-a-time`` at 2, 4 and 8).

Targets, as ratios to llama-server in the same run (printed as PASS/MISS; exit 0 either way)
    N=1 first token <= 1.1x; N=1 decode >= 0.95x; N=4 worst first token <= 1.0x; N=4 wall time
    <= 1.0x; N=4 aggregate tokens/s >= 1.0x; N=4 median first token of sessions sharing a
    persona <= 0.5x; running streams while a 2,000-token prompt is taken in: p95 gap <= 3x
    their gap without it.

Building the peer (about 8 minutes on 2 cores; not part of `make test`)
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server -j 2

How to run
    .venv/bin/python benchmarks/concurrency.py --llama-server PATH/TO/build/bin/llama-server
Results go to ``benchmarks/results/concurrency.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversations import ROLECHAT, free_port, server
from sse import sse_events

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "concurrency.json"
WORDS = ("river", "harbor", "lantern", "orchard", "copper", "meadow", "falcon", "quarry",
         "velvet", "glacier", "saddle", "thunder", "pepper", "marble", "canyon", "willow",
         "engine", "biscuit", "compass", "ember", "garnet", "hollow", "island", "juniper",
         "kettle", "ladder", "mirror", "needle", "oyster", "parrot", "quilt", "ribbon")
PERSONA = ("You are Ada, the support assistant of Nimbus Outfitters, a shop for hiking gear. "
           "Policies you follow in every answer: orders ship within two working days; "
           "returns are free within thirty days if the item is unused and in its box; "
           "worn boots can be exchanged once for another size; refunds go back to the card "
           "used, within five working days; discount codes cannot be combined; gift cards "
           "never expire; repairs of tents and packs are free for two years; we never ask for "
           "a password; we answer in the customer's language; we do not give medical or legal "
           "advice. Be warm, specific and brief. When you do not know, say so and offer to "
           "hand the case to a person. Always end with one question that moves the case on. "
           "Customers may write long messages; read all of them before you answer, and quote "
           "their order number when they give one. Keep a friendly tone, even when the "
           "customer is upset, and never blame the customer or another team.")


def opening(seed: int, words: int = 230) -> str:
    """A deterministic, different ~340-token opening: a list of facts, then a request that
    makes the model write a long answer."""
    rng = random.Random(seed)
    facts = [f"The {a} beside the {b} is older than the {c}."
             for a, b, c in (rng.sample(WORDS, 3) for _ in range(words // 9))]
    return (f"Notes, set {seed}: " + " ".join(facts) +
            " Write a long, detailed story that uses every one of these facts.")


def message(seed: int, words: int = 60) -> str:
    """A different ~90-token customer message."""
    rng = random.Random(seed)
    items = ", ".join(rng.sample(WORDS, 12))
    return (f"Hello, order {1000 + seed}: I bought the {items} set last week. It arrived "
            f"damaged and I want to know all my options, in detail, one by one.")


# ----- one streaming request --------------------------------------------------------------------

@dataclass
class Stream:
    """One streaming request's timings."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # one per content chunk
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent if self.times else float("inf")

    @property
    def decode_tps(self) -> float:
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0


def stream(client: httpx.Client, path: str, body: dict[str, Any], result: Stream,
           on_chunk: Any = None) -> None:
    result.sent = time.perf_counter()
    try:
        for event in sse_events(client, path, body):
            choices = event.get("choices") or []
            text = (choices[0].get("delta") or {}).get("content") if choices else \
                event.get("delta")
            if text:
                result.times.append(time.perf_counter())
                if on_chunk is not None:
                    on_chunk(len(result.times))
            usage = event.get("usage")
            if usage:
                result.tokens = int(usage.get("completion_tokens", 0))
    except Exception as exc:  # recorded; the burst goes on
        result.error = f"{type(exc).__name__}: {exc}"
    if not result.tokens:
        result.tokens = len(result.times)


def burst(base: str, bodies: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Send every request at the same moment; the burst's numbers."""
    results = [Stream() for _ in bodies]
    gate = threading.Barrier(len(bodies) + 1)

    def run(index: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as client:
            gate.wait()
            path, body = bodies[index]
            stream(client, path, body, results[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = max((r.times[-1] if r.times else time.perf_counter()) for r in results) - start
    errors = [r.error for r in results if r.error]
    ttfts = sorted(r.ttft for r in results)
    tokens = sum(r.tokens for r in results)
    return {"users": len(bodies), "ttft_median_s": statistics.median(ttfts),
            "ttft_worst_s": ttfts[-1], "wall_s": wall, "tokens": tokens,
            "aggregate_tps": tokens / wall if wall > 0 else 0.0,
            "decode_tps_median": statistics.median(r.decode_tps for r in results),
            "errors": errors}


def chat_body(content: str, max_tokens: int, system: str | None = None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": content}]
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


# ----- the measurements -------------------------------------------------------------------------

def stateless_bursts(base: str, users: list[int], max_tokens: int, seed: int,
                     repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in users:
        runs = []
        for _ in range(repeats if n <= 4 else 1):
            seed += 100
            bodies = [("/v1/chat/completions", chat_body(opening(seed + i), max_tokens))
                      for i in range(n)]
            runs.append(burst(base, bodies))
        out[str(n)] = median_run(runs)
        print(f"    N={n}: " + line_of(out[str(n)]), flush=True)
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose wall time is the median (its own numbers, not a mix of runs)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[len(ordered) // 2], "runs": len(runs)}


def line_of(run: dict[str, Any]) -> str:
    text = (f"TTFT median {run['ttft_median_s']:.2f} s, worst {run['ttft_worst_s']:.2f} s · "
            f"wall {run['wall_s']:.1f} s · {run['aggregate_tps']:.1f} tok/s all users · "
            f"{run['decode_tps_median']:.1f} tok/s each")
    return text + (f" · ERRORS {run['errors']}" if run["errors"] else "")


def persona_burst(base: str, n: int, max_tokens: int, seed: int, sessions: bool) -> dict[str, Any]:
    if sessions:
        bodies = []
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(n):
                cid = client.post("/v1/conversations", json={
                    "system": PERSONA, "params": {"temperature": 0,
                                                  "max_new_tokens": max_tokens}}).json()["id"]
                bodies.append((f"/v1/conversations/{cid}/messages",
                               {"content": message(seed + i), "stream": True}))
    else:
        bodies = [("/v1/chat/completions", chat_body(message(seed + i), max_tokens, PERSONA))
                  for i in range(n)]
    run = burst(base, bodies)
    print(f"    persona, N={n}: " + line_of(run), flush=True)
    return run


def smoothness(base: str, seed: int) -> dict[str, Any]:
    """A streaming reply's gaps between tokens before and while a 2,000-token prompt is taken
    in beside it."""
    arrived = threading.Event()
    result, late = Stream(), Stream()

    def intake(count: int) -> None:
        if count == 40 and not arrived.is_set():
            arrived.set()
            threading.Thread(target=lambda: stream(
                httpx.Client(base_url=base, timeout=600), "/v1/chat/completions",
                chat_body(opening(seed + 1, words=1530), 8), late)).start()

    with httpx.Client(base_url=base, timeout=600) as client:
        stream(client, "/v1/chat/completions", chat_body(opening(seed), 700), result, intake)
    deadline = time.monotonic() + 600
    while not late.times and late.error is None and time.monotonic() < deadline:
        time.sleep(0.1)
    end = late.times[0] if late.times else time.perf_counter()
    gaps = list(itertools.pairwise(result.times))
    before = [b - a for a, b in gaps if b < late.sent]
    during = [b - a for a, b in gaps if b > late.sent and a < end]  # overlapping the intake
    out = {"gap_p95_before_s": p95(before[-30:]), "gap_p95_during_s": p95(during),
           "intake_s": late.ttft, "steps_during": len(during), "error": late.error}
    out["ratio"] = out["gap_p95_during_s"] / out["gap_p95_before_s"]
    print(f"    smooth: p95 gap {out['gap_p95_before_s'] * 1000:.0f} ms before, "
          f"{out['gap_p95_during_s'] * 1000:.0f} ms while a 2,000-token prompt went in "
          f"({out['steps_during']} tokens in {out['intake_s']:.1f} s): {out['ratio']:.2f}x",
          flush=True)
    return out


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank): with few values, the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else float("nan")


# ----- servers ----------------------------------------------------------------------------------

def rolechat_command(home: Path, context: int, parallel: int,
                     threads: int) -> tuple[list[str], str, dict[str, str]]:
    port = free_port()
    command = [str(ROLECHAT), "serve", "--port", str(port), "--context-length", str(context),
               "--parallel", str(parallel), "--threads", str(threads), "--kv-cache-disk", "0"]
    return command, f"http://127.0.0.1:{port}", {**os.environ, "ROLECHAT_HOME": str(home)}


def peer_command(binary: str, model: str, context: int, parallel: int,
                 threads: int) -> tuple[list[str], str]:
    port = free_port()
    command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
               "-c", str(context * parallel), "-np", str(parallel), "-t", str(threads),
               "-tb", str(threads), "--log-disable"]
    return command, f"http://127.0.0.1:{port}"


def measure(name: str, command: list[str], base: str, env: dict[str, str] | None,
            args: argparse.Namespace, *, sessions: bool) -> dict[str, Any]:
    print(f"  {name}", flush=True)
    with server(command, base, env, timeout=300):
        with httpx.Client(base_url=base, timeout=600) as client:  # warm the model up
            client.post("/v1/chat/completions", json={**chat_body("Hi", 4), "stream": False})
        result: dict[str, Any] = {"command": command[:1] + command[2:]}
        if "stateless" in args.sections:
            result["stateless"] = stateless_bursts(base, args.users, args.max_tokens,
                                                   args.seed, args.repeats)
        if "persona" in args.sections:
            result["persona"] = persona_burst(base, 4, args.max_tokens, args.seed + 50,
                                              sessions)
        if "smooth" in args.sections:
            result["smooth"] = smoothness(base, args.seed + 70)
    return result


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    rows = []
    if "persona" in ours:
        rows.append(("N=4 median first token, sessions sharing a persona",
                     ours["persona"]["ttft_median_s"] / peer["persona"]["ttft_median_s"],
                     "<= 0.5"))
    mine, theirs = ours.get("stateless", {}), peer.get("stateless", {})
    if "1" in mine:
        one, p1 = mine["1"], theirs["1"]
        rows += [("N=1 first token", one["ttft_median_s"] / p1["ttft_median_s"], "<= 1.1"),
                 ("N=1 decode tokens/s", one["decode_tps_median"] / p1["decode_tps_median"],
                  ">= 0.95")]
    if "4" in mine:
        four, p4 = mine["4"], theirs["4"]
        rows += [("N=4 worst first token", four["ttft_worst_s"] / p4["ttft_worst_s"], "<= 1.0"),
                 ("N=4 wall time", four["wall_s"] / p4["wall_s"], "<= 1.0"),
                 ("N=4 aggregate tokens/s", four["aggregate_tps"] / p4["aggregate_tps"],
                  ">= 1.0")]
    out = []
    for label, value, target in rows:
        bound = float(target.split()[1])
        ok = value <= bound if target.startswith("<=") else value >= bound
        out.append((label, value, target, ok))
    if "smooth" in ours:
        value = ours["smooth"]["ratio"]
        out.append(("running streams' p95 gap, 2,000-token prompt beside / without", value,
                    "<= 3.0", value <= 3.0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", required=True,
                        help="llama.cpp's llama-server binary (see the docstring to build it)")
    parser.add_argument("--users", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--context", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4,
                        help="sequences of both servers (rolechat --parallel, llama-server -np)")
    parser.add_argument("--repeats", type=int, default=2, help="bursts of N <= 4 (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sections", type=lambda s: s.split(","),
                        default=["stateless", "persona", "smooth"],
                        help="what to measure: stateless,persona,smooth")
    parser.add_argument("--no-one-at-a-time", dest="sequential", action="store_false",
                        help="skip rolechat --parallel 1")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from rolechat.engines.llama_cpp import embedded_model_path

    model = str(embedded_model_path())
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "platform": platform.platform()},
                               "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as home:
        parallel = args.parallel
        command, base, env = rolechat_command(Path(home) / "a", args.context, parallel,
                                              args.threads)
        results["rolechat"] = measure(f"rolechat serve --parallel {parallel}", command, base,
                                      env, args, sessions=True)
        command, base = peer_command(args.llama_server, model, args.context, parallel,
                                     args.threads)
        results["llama-server"] = measure(f"llama-server -np {parallel}", command, base, None,
                                          args, sessions=False)
        if args.sequential:
            command, base, env = rolechat_command(Path(home) / "b", args.context, 1,
                                                  args.threads)
            results["rolechat-parallel-1"] = measure(
                "rolechat serve --parallel 1", command, base, env, args, sessions=True)
    rows = ratios(results["rolechat"], results["llama-server"])
    results["ratios"] = {label: value for label, value, _, _ in rows}
    print(f"\nrolechat (--parallel {parallel}) / llama-server (-np {parallel}), same run:")
    for label, value, target, ok in rows:
        print(f"  {label:<62} {value:6.2f}  target {target:<7} {'PASS' if ok else 'MISS'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
