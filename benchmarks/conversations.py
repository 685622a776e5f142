"""Warm conversations: time to first token when one server holds several conversations.

What it measures (one run, side by side, real servers on loopback, streaming requests)
    Workload: ``--conversations`` conversations (default 4), each opening with its own
    ~1,200-token document, then interleaved turn by turn for ``--rounds`` rounds (default 4):
    conversation 1, 2, 3, 4, 1, 2, ... Every turn streams; time to first token (TTFT) is the time
    from sending the request to the first content chunk. Replies are short (``--max-tokens``,
    default 16) at temperature 0.7. Between turns the client waits ``--think`` seconds (default
    1: a person reads the reply before typing the next message; ``--think 0`` sends the next
    turn the moment the last one ends).

    Servers, each started fresh on the embedded model with the same context (8192) and threads:
      1. rolechat sessions with KV snapshots (``rolechat serve``, the default tiers)
      2. rolechat stateless ``/v1/chat/completions`` with KV snapshots (the client sends the
         whole history, as an OpenAI client does)
      3. rolechat sessions without snapshots (``--kv-cache-ram 0 --kv-cache-disk 0``: one live
         KV cache, as before snapshots)
      4. llama-cpp-python's own server with ``--cache true`` (its RAM prompt cache) — the peer

    For each: the median TTFT of the switched-to turns (every turn after a conversation's
    first), and of *continuing* one conversation turn after turn without switching (the
    reference a switched-to turn is held to).

    Resume after a restart: two sessions with different documents of the same length get one
    turn; the server stops; one session's snapshot file is deleted; a new server answers both:
    TTFT restored from disk vs evaluated cold.

Targets (printed as PASS/MISS; the script exits 0 either way)
    - a switched-to turn with snapshots: <= 1.5x the TTFT of continuing the same conversation;
    - resume after a restart, >= 1,000 tokens of history: <= 1/10 of a cold evaluation;
    - rolechat with snapshots: <= 1/5 of llama-cpp-python's server TTFT on the same workload.

How to run
    .venv/bin/python benchmarks/conversations.py [--conversations 4 --rounds 4 --threads 2]
Results go to ``benchmarks/results/conversations.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sse import sse_events

ROLECHAT = Path(sys.executable).parent / "rolechat"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "conversations.json"
CONTEXT = 8192
SYSTEM = "You are a helpful assistant. Answer briefly."
WORDS = ("river", "harbor", "lantern", "orchard", "copper", "meadow", "falcon", "quarry",
         "velvet", "glacier", "saddle", "thunder", "pepper", "marble", "canyon", "willow",
         "engine", "biscuit", "compass", "ember", "garnet", "hollow", "island", "juniper")
TOPICS = ("lighthouses", "bread", "volcanoes", "violins", "bees", "glaciers", "trains", "tea")


def document(index: int, sentences: int = 72) -> str:
    """A deterministic ~1,200-token document, different for every index."""
    rng = random.Random(index)
    lines = [f"Notes on {TOPICS[index % len(TOPICS)]}, part {index + 1}."]
    for n in range(sentences):
        a, b, c = rng.sample(WORDS, 3)
        lines.append(f"Fact {n + 1}: the {a} near the {b} is older than the {c}.")
    return " ".join(lines)


# ----- servers ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(command: list[str], base: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> Iterator[None]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally, after the process
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{command[:3]} did not start:\n{log.read().decode()[-2000:]}")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def rolechat_server(home: Path, threads: int, *extra: str) -> tuple[list[str], str, dict[str, str]]:
    port = free_port()
    command = [str(ROLECHAT), "serve", "--port", str(port), "--context-length", str(CONTEXT),
               "--threads", str(threads), *extra]
    return command, f"http://127.0.0.1:{port}", {**os.environ, "ROLECHAT_HOME": str(home)}


def llama_server(model: str, threads: int) -> tuple[list[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(CONTEXT), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--chat_format", "chatml", "--cache", "true"]
    return command, f"http://127.0.0.1:{port}"


# ----- clients ---------------------------------------------------------------------------------

Event = dict[str, Any]


def stream_ttft(client: httpx.Client, url: str, body: dict[str, Any],
                text_of: Callable[[Event], str | None]) -> tuple[float, str, Event]:
    """POST a streaming request; (seconds to the first content chunk, full text, last event)."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    last: dict[str, Any] = {}
    for event in sse_events(client, url, body):
        last = event
        text = text_of(event)
        if text:
            first = first if first is not None else time.perf_counter()
            parts.append(text)
    return (first or time.perf_counter()) - start, "".join(parts), last


def openai_delta(event: dict[str, Any]) -> str | None:
    choices = event.get("choices") or []
    return (choices[0].get("delta") or {}).get("content") if choices else None


class Sessions:
    """rolechat's server-side sessions: the server keeps the history."""

    def __init__(self, client: httpx.Client, params: dict[str, Any]) -> None:
        self.client, self.params = client, params

    def open(self, index: int) -> int:
        body = {"system": SYSTEM, "params": self.params}
        return int(self.client.post("/v1/conversations", json=body).json()["id"])

    def turn(self, handle: int, text: str) -> float:
        ttft, _, _ = stream_ttft(self.client, f"/v1/conversations/{handle}/messages",
                                 {"content": text, "stream": True}, lambda e: e.get("delta"))
        return ttft


class Stateless:
    """An OpenAI-style client: it keeps the history and sends all of it every turn."""

    def __init__(self, client: httpx.Client, params: dict[str, Any]) -> None:
        self.client, self.params = client, params
        self.histories: dict[int, list[dict[str, str]]] = {}

    def open(self, index: int) -> int:
        self.histories[index] = [{"role": "system", "content": SYSTEM}]
        return index

    def turn(self, handle: int, text: str) -> float:
        messages = self.histories[handle]
        messages.append({"role": "user", "content": text})
        ttft, reply, _ = stream_ttft(self.client, "/v1/chat/completions", {
            "messages": messages, "stream": True, "max_tokens": self.params["max_new_tokens"],
            "temperature": self.params["temperature"]}, openai_delta)
        messages.append({"role": "assistant", "content": reply})
        return ttft


def questions(index: int, rounds: int) -> list[str]:
    first = f"{document(index)}\n\nRead these notes. What are they about?"
    return [first] + [f"Question {r}: name one fact from the notes." for r in range(1, rounds)]


def interleaved(api: Sessions | Stateless, conversations: int, rounds: int,
                think: float) -> dict[str, Any]:
    """Every conversation's turns, interleaved; returns the TTFTs."""
    handles = [api.open(i) for i in range(conversations)]
    asked = [questions(i, rounds) for i in range(conversations)]
    first_turns, switched = [], []
    for round_ in range(rounds):
        for index, handle in enumerate(handles):
            time.sleep(think)
            ttft = api.turn(handle, asked[index][round_])
            (first_turns if round_ == 0 else switched).append(ttft)
    # Continuing one conversation without switching: the reference for a switched-to turn.
    continuing = []
    for n in range(rounds):
        time.sleep(think)
        continuing.append(api.turn(handles[-1], f"Follow-up {n}: one more fact?"))
    return {"first_turn_s": first_turns, "switched_s": switched, "continuing_s": continuing,
            "switched_median_s": statistics.median(switched),
            "continuing_median_s": statistics.median(continuing)}


def resume_after_restart(home: Path, threads: int, params: dict[str, Any],
                         think: float) -> dict[str, Any]:
    command, base, env = rolechat_server(home, threads)
    with server(command, base, env), httpx.Client(base_url=base, timeout=600) as client:
        api = Sessions(client, params)
        warm, cold = api.open(10), api.open(11)
        api.turn(warm, questions(10, 1)[0])
        api.turn(cold, questions(11, 1)[0])
        history_tokens = client.get(f"/v1/conversations/{warm}").json()["messages"][-1][
            "usage"]["prompt_tokens"]
    for path in (home / "kv").glob(f"*/conversation-{cold}.kv"):
        path.unlink()  # this one must be evaluated from scratch after the restart
    command, base, env = rolechat_server(home, threads)
    with server(command, base, env), httpx.Client(base_url=base, timeout=600) as client:
        api = Sessions(client, params)
        restored = api.turn(warm, "After the restart: name one fact from the notes.")
        time.sleep(think)
        evaluated = api.turn(cold, "After the restart: name one fact from the notes.")
    return {"history_tokens": history_tokens, "restored_from_disk_s": restored,
            "evaluated_cold_s": evaluated, "ratio": restored / evaluated}


# ----- main ------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--think", type=float, default=1.0,
                        help="seconds between turns (a person reading the reply)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    params = {"temperature": 0.7, "max_new_tokens": args.max_tokens}
    from rolechat.engines.llama_cpp import embedded_model_path

    model = str(embedded_model_path())
    results: dict[str, Any] = {
        "settings": {**vars(args), "out": str(args.out), "context": CONTEXT,
                     "machine": platform.platform(), "cpus": os.cpu_count()}}
    work = Path(tempfile.mkdtemp(prefix="rolechat-bench-"))
    try:
        runs: list[tuple[str, Callable[[httpx.Client], Sessions | Stateless], tuple[str, ...]]] = [
            ("rolechat sessions, snapshots", lambda c: Sessions(c, params), ()),
            ("rolechat stateless, snapshots", lambda c: Stateless(c, params), ()),
            ("rolechat sessions, no snapshots", lambda c: Sessions(c, params),
             ("--kv-cache-ram", "0", "--kv-cache-disk", "0")),
        ]
        for n, (name, make, extra) in enumerate(runs):
            command, base, env = rolechat_server(work / f"home{n}", args.threads, *extra)
            with server(command, base, env), httpx.Client(base_url=base, timeout=600) as client:
                results[name] = interleaved(make(client), args.conversations, args.rounds,
                                            args.think)
            print(f"{name}: done", file=sys.stderr)
        command, base = llama_server(model, args.threads)
        with server(command, base), httpx.Client(base_url=base, timeout=600) as client:
            results["llama-cpp-python server --cache"] = interleaved(
                Stateless(client, params), args.conversations, args.rounds, args.think)
        print("llama-cpp-python: done", file=sys.stderr)
        results["resume after restart"] = resume_after_restart(work / "resume", args.threads,
                                                               params, args.think)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.conversations} conversations x {args.rounds} rounds, ~1,200-token documents, "
          f"{args.max_tokens}-token replies, {args.think:g} s between turns, {args.threads} "
          f"threads, context {CONTEXT}\n")
    print(f"{'server':<36} {'first turn':>11} {'switched':>10} {'continuing':>11}  (median TTFT)")
    for name, run in results.items():
        if isinstance(run, dict) and "switched_median_s" in run:
            print(f"{name:<36} {statistics.median(run['first_turn_s']) * 1000:>9.0f}ms "
                  f"{run['switched_median_s'] * 1000:>8.0f}ms "
                  f"{run['continuing_median_s'] * 1000:>9.0f}ms")
    ours = results["rolechat sessions, snapshots"]
    stateless = results["rolechat stateless, snapshots"]
    before = results["rolechat sessions, no snapshots"]
    peer = results["llama-cpp-python server --cache"]
    resume = results["resume after restart"]
    ratios = {
        "switched / continuing (sessions)": ours["switched_median_s"] / ours["continuing_median_s"],
        "switched / continuing (stateless)": (stateless["switched_median_s"]
                                              / stateless["continuing_median_s"]),
        "sessions / llama-cpp-python server": ours["switched_median_s"] / peer["switched_median_s"],
        "stateless / llama-cpp-python server": (stateless["switched_median_s"]
                                                / peer["switched_median_s"]),
        "sessions with / without snapshots": (ours["switched_median_s"]
                                              / before["switched_median_s"]),
        "resume from disk / cold evaluation": resume["ratio"],
    }
    targets = {"switched / continuing (sessions)": 1.5,
               "switched / continuing (stateless)": 1.5,
               "sessions / llama-cpp-python server": 0.2,
               "stateless / llama-cpp-python server": 0.2,
               "resume from disk / cold evaluation": 0.1}
    print(f"\nresume after restart ({resume['history_tokens']} tokens of history): restored "
          f"{resume['restored_from_disk_s'] * 1000:.0f} ms, "
          f"cold {resume['evaluated_cold_s'] * 1000:.0f} ms")
    print("\nratios (same run)")
    for name, value in ratios.items():
        target = targets.get(name)
        verdict = "" if target is None else ("PASS" if value <= target else "MISS") + \
            f" (target <= {target})"
        print(f"  {name:<38} {value:6.3f}  {verdict}")
    results["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
