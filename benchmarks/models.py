"""Pulling and switching models: what rolechat adds to the hubs' own clients, and what a switch
costs a server.

What it measures (one run, loopback only: the tests' stand-in hub, tests/hubstub.py, serving
the embedded GGUF, 98 MB, under Qwen's repo and file names)
    1. Pull. ``huggingface_hub.hf_hub_download`` straight into a fresh cache (the anchor)
       against ``rolechat.pull`` of the same file (the listing, the choice of file, the download
       by the same function, then the SHA-256 check rolechat adds for Hugging Face and the
       record of the pull); then ModelScope: ``model_file_download`` against ``rolechat.pull``
       from ModelScope (which verifies its own SHA-256). Medians of ``--runs``.
    2. Switch. ``rolechat serve`` in a temp home holding the model under two names: the time of
       a one-token request on the loaded model (the anchor), against the same request naming
       the other model (the server closes one engine, loads the other, then replies), and
       against a cold start of ``rolechat serve`` until its first reply.

How to run
    .venv/bin/python benchmarks/models.py [--runs 5]
Results go to ``benchmarks/results/models.json`` (``--out``). No timed assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hubstub import HubStub, hub_env, modelscope_config  # noqa: E402
from rolechat.engines.llama_cpp import embedded_model_path  # noqa: E402
from servers import ROLECHAT, free_port, running  # noqa: E402

REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"


def timed(call: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - started


def pulls(runs: int) -> dict[str, Any]:
    import huggingface_hub
    from huggingface_hub import hf_hub_download
    from modelscope.hub.file_download import model_file_download

    from rolechat import pull

    huggingface_hub.constants.HF_HUB_OFFLINE = False
    times: dict[str, list[float]] = {"hf_hub_download": [], "rolechat_hf": [],
                                     "model_file_download": [], "rolechat_modelscope": []}
    with HubStub() as stub:
        stub.add_repo(REPO, {FILE: embedded_model_path()})
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                env = {**os.environ, **hub_env(stub, root), "HOME": str(root),
                       "ROLECHAT_HOME": str(root / "rolechat")}
                os.environ.update(env)  # modelscope reads its home and cache from here
                times["hf_hub_download"].append(timed(
                    hf_hub_download, REPO, FILE, endpoint=stub.url, cache_dir=root / "anchor"))
                times["rolechat_hf"].append(timed(pull, f"hf:{REPO}:{FILE}", env=env))
                with modelscope_config(stub, root / "ms-anchor"):
                    times["model_file_download"].append(timed(
                        model_file_download, REPO, FILE, revision="master",
                        cache_dir=str(root / "ms-anchor")))
                times["rolechat_modelscope"].append(timed(
                    pull, f"modelscope:{REPO}:{FILE}", env=env))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": medians, "bytes": embedded_model_path().stat().st_size,
            "ratio_hf": medians["rolechat_hf"] / medians["hf_hub_download"],
            "ratio_modelscope": medians["rolechat_modelscope"] / medians["model_file_download"]}


def first_reply(base: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    started = time.perf_counter()
    response = httpx.post(f"{base}/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    assert response.json()["model"] == model, response.text
    return time.perf_counter() - started


def switches(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        lms = home / ".lmstudio/models/pub"
        names = []
        for repo in ("One-GGUF", "Two-GGUF"):
            (lms / repo).mkdir(parents=True)
            os.link(embedded_model_path(), lms / repo / "m-q4_1.gguf")  # two files, one model
            names.append(f"lmstudio:pub/{repo}:m-q4_1.gguf")
        env = {**os.environ, "HOME": str(home), "ROLECHAT_HOME": str(home / "rolechat")}
        for variable in ("HF_HOME", "HF_HUB_CACHE", "MODELSCOPE_CACHE", "OLLAMA_MODELS",
                         "LMSTUDIO_MODELS"):
            env.pop(variable, None)
        cold = []
        for _ in range(runs):
            port = free_port()
            started = time.perf_counter()
            with running([str(ROLECHAT), "serve", "--port", str(port), "-m", names[0]],
                         f"http://127.0.0.1:{port}/v1/models", env=env):
                first_reply(f"http://127.0.0.1:{port}/v1", names[0])
                cold.append(time.perf_counter() - started)
        port = free_port()
        with running([str(ROLECHAT), "serve", "--port", str(port), "-m", names[0]],
                     f"http://127.0.0.1:{port}/v1/models", env=env):
            base = f"http://127.0.0.1:{port}/v1"
            loaded, switched = [], []
            current = 0
            for _ in range(runs):
                loaded.append(first_reply(base, names[current]))
                current = 1 - current
                switched.append(first_reply(base, names[current]))
    medians = {"loaded": statistics.median(loaded), "switch": statistics.median(switched),
               "cold_serve": statistics.median(cold)}
    return {"seconds": medians, "switch_over_loaded": medians["switch"] / medians["loaded"],
            "switch_over_cold_serve": medians["switch"] / medians["cold_serve"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/models.json")
    args = parser.parse_args()
    results = {"pull": pulls(args.runs), "switch": switches(args.runs)}
    pull_s, switch_s = results["pull"]["seconds"], results["switch"]["seconds"]
    print(f"pull of {results['pull']['bytes'] / 1e6:.0f} MB over loopback (median of "
          f"{args.runs}):")
    print(f"  hf_hub_download {pull_s['hf_hub_download']:.2f} s, rolechat pull "
          f"{pull_s['rolechat_hf']:.2f} s: {results['pull']['ratio_hf']:.2f}x")
    print(f"  model_file_download {pull_s['model_file_download']:.2f} s, rolechat pull "
          f"{pull_s['rolechat_modelscope']:.2f} s: {results['pull']['ratio_modelscope']:.2f}x")
    print("switch (one-token reply):")
    print(f"  on the loaded model {switch_s['loaded']:.3f} s; naming the other "
          f"{switch_s['switch']:.3f} s ({results['switch']['switch_over_loaded']:.1f}x); "
          f"a cold rolechat serve to its first reply {switch_s['cold_serve']:.2f} s "
          f"(switch = {results['switch']['switch_over_cold_serve']:.2f}x of it)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
