"""Load test for ``rolechat serve``: concurrent clients over real HTTP, on loopback only.

What it measures
    ``--clients`` concurrent clients (default 4) each send ``--requests`` requests (default 5)
    to one ``rolechat serve``, in two modes (both by default, ``--mode`` picks one):

    stateless  ``POST /v1/chat/completions`` (the OpenAI shape, non-streaming) with a short,
               self-contained prompt per request, ``max_tokens`` small (``--max-tokens``,
               default 16) and temperature 0.7.
    sessions   each client creates a conversation (``POST /v1/conversations`` with
               ``{"params": {"max_new_tokens": ..., "temperature": 0.7}}``) and sends its
               requests as successive messages (``POST /v1/conversations/{id}/messages``,
               non-streaming). Afterwards it reads every conversation back
               (``GET /v1/conversations/{id}``) and checks that every message the server
               acknowledged (200) is stored with status ``"complete"`` and followed by its
               assistant reply; any other outcome is a *lost turn*.

    For each mode it reports: requests sent, failures (any non-200 response or exception,
    timeouts included), throughput (successful requests/s and generated tokens/s over the mode's
    wall time), client-side latency p50/p99/max in ms, and the mean of
    ``usage.prompt_tokens_details.cached_tokens`` per request (per session turn); for sessions
    also lost turns (and stored replies that differ from the text the client received).

    Targets (printed as PASS/MISS; the script exits 0 either way): zero failures in every mode,
    and zero lost turns.

    The run is bounded: the whole script (server start included) stops by itself after
    ``--timeout`` seconds (default 300). Requests not started by then are counted as skipped
    and requests cut off count as failures.

How to run
    .venv/bin/python benchmarks/serve_load.py
        starts its own ``rolechat serve`` (the ``rolechat`` script next to this Python) on a
        free 127.0.0.1 port, with a temporary ROLECHAT_HOME, ``--context-length 1024
        --threads 1``, and stops it at the end.
    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 3 --mode sessions
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY
        targets a server that is already running; only loopback hosts are accepted.

Results (settings, per-mode summary, every request) are written as JSON to
``benchmarks/results/serve_load.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve_load.json"
ROLECHAT = Path(sys.executable).parent / "rolechat"
TEMPERATURE = 0.7
SYSTEM = "Be brief."
TOPICS = ["the sea", "a mountain", "bread", "a violin", "the moon", "rain", "a library",
          "coffee", "a bicycle", "winter"]


@dataclass
class Record:
    """One request as the client saw it."""

    mode: str
    client: int
    index: int
    ok: bool
    status: int | None
    latency_ms: float
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class Session:
    client: int
    conversation_id: str | None = None
    #: (sent text, reply text the client received) for every acknowledged (200) message.
    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    lost_turns: int = 0
    reply_mismatches: int = 0
    check_error: str | None = None


# -- loopback guard and server process ---------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_base(url: str) -> str:
    """``http://127.0.0.1:8000`` or ``.../v1`` -> ``http://127.0.0.1:8000/v1``; refuses others."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"--url must be an http(s) URL, not {url!r}")
    if not is_loopback(parts.hostname):
        raise SystemExit(f"Refusing {parts.hostname!r}: this load test targets loopback only "
                         "(127.0.0.1, ::1 or localhost).")
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, headers: dict[str, str], deadline: float,
               proc: subprocess.Popen[bytes] | None = None) -> str:
    """Poll ``GET /v1/models`` until it answers 200; returns the model id."""
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"rolechat serve exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base}/models", headers=headers, timeout=2)
            if r.status_code == 200:
                return str(r.json()["data"][0]["id"])
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise RuntimeError(f"the server at {base} was not ready in time ({last})")


@contextlib.contextmanager
def own_server(args: argparse.Namespace, deadline: float) -> Iterator[tuple[str, str]]:
    """Start ``rolechat serve`` on a free loopback port; yields (base URL, model id)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rolechat-load-") as home:
        env = {k: v for k, v in os.environ.items() if k != "ROLECHAT_API_KEY"}
        env["ROLECHAT_HOME"] = home
        command = [str(ROLECHAT), "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--context-length", str(args.context_length), "--threads", str(args.threads)]
        if args.api_key:
            command += ["--api-key", args.api_key]
        log_path = Path(home) / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                base = f"http://127.0.0.1:{port}/v1"
                try:
                    model = wait_ready(base, auth(args), deadline, proc)
                except RuntimeError as exc:
                    print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
                    raise SystemExit(str(exc)) from None
                yield base, model
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def auth(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


# -- the clients -------------------------------------------------------------------------------

def remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def usage_of(body: dict[str, Any]) -> tuple[int, int, int]:
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return (int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0),
            int(details.get("cached_tokens") or 0))


def reply_text(body: dict[str, Any]) -> str:
    """The assistant text of a message response, whatever wrapper the server uses."""
    for key in ("message", "reply", "assistant"):
        part = body.get(key)
        if isinstance(part, dict) and isinstance(part.get("content"), str):
            return str(part["content"])
    if isinstance(body.get("content"), str):
        return str(body["content"])
    choices = body.get("choices")
    if isinstance(choices, list) and choices:
        return str((choices[0].get("message") or {}).get("content") or "")
    return ""


def describe(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    return f"HTTP {response.status_code}: {message}"


#: client -> (index, perf_counter at start) of the request it has in flight.
InFlight = dict[int, tuple[int, float]]


async def timed_post(client: httpx.AsyncClient, mode: str, who: int, index: int, url: str,
                     body: dict[str, Any], deadline: float, inflight: InFlight,
                     expect: tuple[int, ...] = (200,)) -> tuple[Record, dict[str, Any] | None]:
    start = time.perf_counter()
    inflight[who] = (index, start)
    try:
        response = await client.post(url, json=body, timeout=max(remaining(deadline), 0.1))
    except (httpx.HTTPError, OSError) as exc:
        inflight.pop(who, None)
        ms = (time.perf_counter() - start) * 1000
        return Record(mode, who, index, False, None, ms, error=f"{type(exc).__name__}: {exc}"), None
    inflight.pop(who, None)
    ms = (time.perf_counter() - start) * 1000
    if response.status_code not in expect:
        return Record(mode, who, index, False, response.status_code, ms,
                      error=describe(response)), None
    try:
        data = response.json()
    except ValueError:
        return Record(mode, who, index, False, 200, ms, error="response is not JSON"), None
    completion, prompt, cached = usage_of(data)
    return (Record(mode, who, index, True, response.status_code, ms, completion, prompt,
                   cached), data)


async def stateless_client(client: httpx.AsyncClient, base: str, model: str, who: int,
                           args: argparse.Namespace, deadline: float,
                           records: list[Record], inflight: InFlight) -> None:
    for i in range(args.requests):
        if remaining(deadline) <= 0:
            return
        topic = TOPICS[(who + i) % len(TOPICS)]
        body = {"model": model, "max_tokens": args.max_tokens, "temperature": TEMPERATURE,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Say one thing about {topic}."}]}
        record, _ = await timed_post(client, "stateless", who, i, f"{base}/chat/completions",
                                     body, deadline, inflight)
        records.append(record)


async def sessions_client(client: httpx.AsyncClient, base: str, who: int,
                          args: argparse.Namespace, deadline: float, records: list[Record],
                          session: Session, inflight: InFlight) -> None:
    params = {"max_new_tokens": args.max_tokens, "temperature": TEMPERATURE}
    record, data = await timed_post(client, "sessions-create", who, -1, f"{base}/conversations",
                                    {"params": params}, deadline, inflight,
                                    expect=(200, 201))  # 201 Created
    if data is None:
        records.append(record)  # a failed create counts as a failure; a good one is not a turn
        session.check_error = f"create failed: {record.error}"
        return
    ident = data.get("id") or (data.get("conversation") or {}).get("id")
    if not ident:
        records.append(Record("sessions", who, -1, False, 200, record.latency_ms,
                              error="create response has no id"))
        session.check_error = "create response has no id"
        return
    session.conversation_id = str(ident)
    for i in range(args.requests):
        if remaining(deadline) <= 0:
            return
        topic = TOPICS[(who + i) % len(TOPICS)]
        text = f"Client {who}, turn {i}: tell me about {topic}."
        record, data = await timed_post(client, "sessions", who, i,
                                        f"{base}/conversations/{ident}/messages",
                                        {"content": text}, deadline, inflight)
        records.append(record)
        if data is not None:
            session.acknowledged.append((text, reply_text(data)))


async def check_session(client: httpx.AsyncClient, base: str, session: Session,
                        deadline: float) -> None:
    """Every acknowledged message is stored, "complete", and followed by its assistant reply."""
    if session.conversation_id is None:
        return
    try:
        response = await client.get(f"{base}/conversations/{session.conversation_id}",
                                    timeout=max(remaining(deadline), 5.0))
    except (httpx.HTTPError, OSError) as exc:
        session.check_error = f"GET failed: {type(exc).__name__}: {exc}"
        session.lost_turns = len(session.acknowledged)
        return
    if response.status_code != 200:
        session.check_error = f"GET failed: {describe(response)}"
        session.lost_turns = len(session.acknowledged)
        return
    data = response.json()
    stored = data.get("messages")
    if stored is None:
        stored = (data.get("conversation") or {}).get("messages") or []
    position = 0
    for sent, received in session.acknowledged:
        found = None
        for j in range(position, len(stored)):
            message = stored[j]
            if message.get("role") == "user" and message.get("content") == sent:
                found = j
                break
        if found is None:
            session.lost_turns += 1
            continue
        position = found + 1
        user = stored[found]
        reply = stored[found + 1] if found + 1 < len(stored) else None
        if (user.get("status") != "complete" or reply is None
                or reply.get("role") != "assistant"
                or reply.get("status", "complete") != "complete"):
            session.lost_turns += 1
            continue
        position = found + 2
        if received and reply.get("content") != received:
            session.reply_mismatches += 1


async def delete_session(client: httpx.AsyncClient, base: str, session: Session) -> None:
    if session.conversation_id is None:
        return
    try:
        response = await client.delete(f"{base}/conversations/{session.conversation_id}",
                                       timeout=10)
        if response.status_code != 200:
            session.check_error = f"DELETE failed: {describe(response)}"
    except (httpx.HTTPError, OSError) as exc:
        session.check_error = f"DELETE failed: {type(exc).__name__}: {exc}"


async def run_mode(mode: str, base: str, model: str, args: argparse.Namespace,
                   deadline: float) -> tuple[list[Record], list[Session], float]:
    records: list[Record] = []
    inflight: InFlight = {}
    sessions = [Session(who) for who in range(args.clients)]
    limits = httpx.Limits(max_connections=args.clients + 2,
                          max_keepalive_connections=args.clients + 2)
    async with httpx.AsyncClient(headers=auth(args), limits=limits) as client:
        start = time.perf_counter()
        if mode == "stateless":
            jobs = [stateless_client(client, base, model, who, args, deadline, records,
                                     inflight) for who in range(args.clients)]
        else:
            jobs = [sessions_client(client, base, who, args, deadline, records, sessions[who],
                                    inflight) for who in range(args.clients)]
        tasks = [asyncio.ensure_future(job) for job in jobs]
        _, pending = await asyncio.wait(tasks, timeout=max(remaining(deadline), 0))
        for task in pending:  # the time limit: stop by ourselves
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                records.append(Record(mode, -1, -1, False, None, 0.0,
                                      error=f"client crashed: {type(exc).__name__}: {exc}"))
        # Requests in flight when the time ran out are failures; unstarted ones are skipped.
        now = time.perf_counter()
        for who, (index, began) in sorted(inflight.items()):
            records.append(Record(mode, who, index, False, None, (now - began) * 1000,
                                  error="cut off by the time limit"))
        wall = time.perf_counter() - start
        if mode == "sessions":
            check_deadline = max(deadline, time.monotonic() + 10)
            await asyncio.gather(*(check_session(client, base, s, check_deadline)
                                   for s in sessions))
            if args.url and not args.keep:  # an own server's store is a temporary folder
                await asyncio.gather(*(delete_session(client, base, s) for s in sessions))
    return records, sessions, wall


# -- summary -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def summarize(mode: str, records: list[Record], sessions: list[Session], wall: float,
              args: argparse.Namespace) -> dict[str, Any]:
    turns = [r for r in records if r.index >= 0 and r.mode == mode]
    good = [r for r in turns if r.ok]
    failures = [r for r in records if not r.ok]
    latencies = [r.latency_ms for r in good]
    generated = sum(r.completion_tokens for r in good)
    planned = args.clients * args.requests
    summary: dict[str, Any] = {
        "mode": mode, "planned": planned, "requests": len(turns), "ok": len(good),
        "failures": len(failures), "skipped": max(planned - len(turns), 0),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(good) / wall, 3) if wall > 0 else None,
        "generated_tokens": generated,
        "tokens_per_s": round(generated / wall, 2) if wall > 0 else None,
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "max": max(latencies) if latencies else None},
        "mean_prompt_tokens": (round(sum(r.prompt_tokens for r in good) / len(good), 1)
                               if good else None),
        "mean_cached_tokens": (round(sum(r.cached_tokens for r in good) / len(good), 1)
                               if good else None),
        "errors": sorted({r.error for r in failures if r.error})[:10],
    }
    for key in ("p50", "p99", "max"):
        value = summary["latency_ms"][key]
        summary["latency_ms"][key] = None if value is None else round(value, 1)
    if mode == "sessions":
        summary["acknowledged_turns"] = sum(len(s.acknowledged) for s in sessions)
        summary["lost_turns"] = sum(s.lost_turns for s in sessions)
        summary["reply_mismatches"] = sum(s.reply_mismatches for s in sessions)
        summary["session_errors"] = [s.check_error for s in sessions if s.check_error]
        summary["conversations"] = [s.conversation_id for s in sessions]
    return summary


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def print_table(summaries: list[dict[str, Any]]) -> None:
    head = (f"{'mode':<10} {'reqs':>5} {'fail':>5} {'skip':>5} {'req/s':>7} {'tok/s':>7} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cached':>7} {'lost':>5}")
    print(head)
    print("-" * len(head))
    for s in summaries:
        lat = s["latency_ms"]
        print(f"{s['mode']:<10} {s['requests']:>5} {s['failures']:>5} {s['skipped']:>5} "
              f"{fmt(s['requests_per_s']):>7} {fmt(s['tokens_per_s']):>7} "
              f"{fmt(lat['p50']):>8} {fmt(lat['p99']):>8} {fmt(lat['max']):>8} "
              f"{fmt(s['mean_cached_tokens']):>7} {fmt(s.get('lost_turns')):>5}")
    print()
    for s in summaries:
        for error in s["errors"]:
            print(f"  {s['mode']} error: {error}")
        for error in s.get("session_errors", []):
            print(f"  {s['mode']} session: {error}")
        if s.get("reply_mismatches"):
            print(f"  {s['mode']}: {s['reply_mismatches']} stored replies differ from the "
                  "text the client received")


def verdicts(summaries: list[dict[str, Any]]) -> dict[str, bool | None]:
    """PASS (True) / MISS (False); None where nothing was checked (no acknowledged turn)."""
    result = {"zero failures": all(s["failures"] == 0 and s["skipped"] == 0
                                   for s in summaries)}
    sessions = [s for s in summaries if s["mode"] == "sessions"]
    if sessions:
        checked = sum(s["acknowledged_turns"] for s in sessions) > 0
        result["zero lost turns"] = (all(s["lost_turns"] == 0 and not s["session_errors"]
                                         for s in sessions) if checked else None)
    return result


# -- main --------------------------------------------------------------------------------------

async def run_all(base: str, model: str, args: argparse.Namespace,
                  deadline: float) -> tuple[list[dict[str, Any]], list[Record]]:
    modes = ["stateless", "sessions"] if args.mode == "both" else [args.mode]
    summaries, every = [], []
    for mode in modes:
        if remaining(deadline) <= 0:
            print(f"time limit reached before mode {mode}", file=sys.stderr)
            records: list[Record] = []
            summaries.append(summarize(mode, records, [Session(w) for w in range(args.clients)],
                                       0.0, args))
            continue
        records, sessions, wall = await run_mode(mode, base, model, args, deadline)
        summaries.append(summarize(mode, records, sessions, wall, args))
        every += records
    return summaries, every


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="target a running server (loopback only), e.g. "
                        "http://127.0.0.1:8000; default: start one")
    parser.add_argument("--api-key", default=os.environ.get("ROLECHAT_API_KEY") or None,
                        help="bearer key (default: $ROLECHAT_API_KEY; with no --url the "
                             "started server requires it)")
    parser.add_argument("--mode", choices=["both", "stateless", "sessions"], default="both")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="total time limit in seconds (server start included)")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true",
                        help="with --url: keep the test conversations (default: delete them)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.timeout <= 0:
        parser.error("--clients, --requests, --max-tokens and --timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.timeout
    if args.url:
        base = api_base(args.url)
        try:
            model = wait_ready(base, auth(args), min(deadline, time.monotonic() + 30))
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        server: contextlib.AbstractContextManager[tuple[str, str]] = (
            contextlib.nullcontext((base, model)))
    else:
        server = own_server(args, deadline)
    with server as (base, model):
        print(f"rolechat serve at {base} ({model}); {args.clients} clients x {args.requests} "
              f"requests, max_tokens {args.max_tokens}, time limit {args.timeout:g} s\n")
        summaries, records = asyncio.run(run_all(base, model, args, deadline))
    print_table(summaries)
    checks = verdicts(summaries)
    print()
    for name, passed in checks.items():
        word = "N/A " if passed is None else "PASS" if passed else "MISS"
        print(f"{word}  {name}" + ("  (no turn was acknowledged)" if passed is None else ""))
    result = {
        "settings": {"url": args.url, "own_server": not args.url, "base": base, "model": model,
                     "clients": args.clients, "requests_per_client": args.requests,
                     "max_tokens": args.max_tokens, "temperature": TEMPERATURE,
                     "timeout_s": args.timeout, "context_length": args.context_length,
                     "threads": args.threads, "python": platform.python_version(),
                     "machine": platform.machine(), "cpus": os.cpu_count()},
        "total_s": round(time.monotonic() - started, 2),
        "summary": summaries,
        "targets": checks,
        "records": [asdict(r) for r in records],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
