"""Structured replies: how often they are valid, what the grammar costs, what tools cost.

What it measures (one run, the embedded model, real servers on loopback)
    1. Validity. ``--prompts`` prompts (default 50) x 3 shapes, sampled (temperature 0.8, a
       seed per prompt), sent to ``rolechat serve`` and to llama-cpp-python's own server (the
       peer; ``--chat_format chatml``) with the same prompts and settings:
         - flat: an object of four bounded fields (``response_format`` json_schema; the peer:
           its ``json_object`` + ``schema``);
         - nested: an object with an enum, an array of objects and bounded integers (same);
         - tool call: two tools, ``tool_choice`` naming one (both servers support a named
           function; its arguments must be valid under the tool's parameters).
       A reply is valid when it parses (strict JSON) and validates against its schema
       (jsonschema); one cut off by ``max_tokens`` counts as invalid.
    2. Decode speed under a grammar: the same prompts, greedy, in process (one engine, the
       engine's own tokens/s per reply), free text against the flat schema's grammar,
       alternating; the ratio of medians (target >= 0.85). Beside it, the grammar applied to
       every candidate before sampling (what sampling first saves).
    3. Time to first token with tools in the prompt (two tools, the generic format's ~250
       tokens in the system message), against the same request without tools: the first
       request (nothing cached) and the median of later ones (the tools' prefix cached).

How to run
    .venv/bin/python benchmarks/structured.py [--prompts 50 --threads 2]
Results go to ``benchmarks/results/structured.json`` (``--out``). No timed assertions: it
prints figures and ratios, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversations import free_port, rolechat_server, server
from sse import sse_events

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "structured.json"
SUBJECTS = ("a lighthouse keeper", "a baker", "a violin maker", "a beekeeper", "a train driver",
            "a tea farmer", "a glacier guide", "a potter", "a sailor", "a librarian",
            "a goat herder", "a clockmaker", "a translator", "a firefighter", "a gardener",
            "a chess player", "a pilot", "a blacksmith", "a nurse", "a painter", "a chef",
            "a miner", "a weaver", "a cartographer", "a mail carrier")
FLAT = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "city": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "retired": {"type": "boolean"}},
    "required": ["name", "city", "age", "retired"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "mood": {"type": "string", "enum": ["happy", "tired", "curious"]},
    "tools": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {
            "tool": {"type": "string", "maxLength": 30},
            "years": {"type": "integer", "minimum": 0, "maximum": 60}},
        "required": ["tool", "years"], "additionalProperties": False}}},
    "required": ["name", "mood", "tools"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
MAX_TOKENS = 300


def prompts(n: int) -> list[str]:
    kinds = ("Describe {s} as JSON.", "Invent {s} and give their details.",
             "Tell me about {s} who lives by the sea.", "Who is {s} in a small town?")
    return [kinds[i % len(kinds)].format(s=SUBJECTS[i % len(SUBJECTS)]) for i in range(n)]


def llama_cpp_server(model: str, threads: int) -> tuple[list[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--chat_format", "chatml"]
    return command, f"http://127.0.0.1:{port}"


def request(shape: str, prompt: str, seed: int, *, peer: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                            "temperature": 0.8, "seed": seed, "max_tokens": MAX_TOKENS}
    if shape == "tool":
        body["messages"] = [{"role": "user", "content": f"{prompt} Then: weather there?"}]
        body.update(tools=[WEATHER, TIME], tool_choice={
            "type": "function", "function": {"name": "get_weather"}})
        if not peer:
            body["parallel_tool_calls"] = False
        return body
    schema = FLAT if shape == "flat" else NESTED
    body["response_format"] = ({"type": "json_object", "schema": schema} if peer else
                               {"type": "json_schema",
                                "json_schema": {"name": shape, "schema": schema}})
    return body


def valid(shape: str, response: dict[str, Any]) -> tuple[bool, str]:
    """Whether a response is a valid reply of its shape, and why not."""
    choice = response["choices"][0]
    message = choice["message"]
    try:
        if shape == "tool":
            calls = message.get("tool_calls") or []
            if len(calls) != 1 or calls[0]["function"]["name"] != "get_weather":
                return False, f"calls: {[c['function']['name'] for c in calls]}"
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]),
                                WEATHER["function"]["parameters"])
        else:
            jsonschema.validate(json.loads(message["content"] or ""),
                                FLAT if shape == "flat" else NESTED)
    except (ValueError, jsonschema.ValidationError) as exc:
        return False, f"{type(exc).__name__} (finish {choice['finish_reason']})"
    return True, ""


def validity(base: str, texts: list[str], *, peer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(timeout=300) as client:
        for shape in ("flat", "nested", "tool"):
            good, why = 0, []
            began = time.perf_counter()
            for i, prompt in enumerate(texts):
                response = client.post(f"{base}/v1/chat/completions",
                                       json=request(shape, prompt, 1000 + i, peer=peer))
                if response.status_code != 200:
                    why.append(f"HTTP {response.status_code}")
                    continue
                ok, reason = valid(shape, response.json())
                good += ok
                if not ok:
                    why.append(reason)
            out[shape] = {"valid": good, "of": len(texts),
                          "seconds": round(time.perf_counter() - began, 1),
                          "failures": sorted({w: why.count(w) for w in why}.items(),
                                             key=lambda kv: -kv[1])[:4]}
            print(f"  {shape:7s} {good}/{len(texts)} valid  {out[shape]['failures']}",
                  flush=True)
    return out


def decode_speed(texts: list[str], threads: int) -> dict[str, Any]:
    from rolechat.constraint import Constraint
    from rolechat.conversation import Message
    from rolechat.engines import load_engine
    from rolechat.engines.llama_grammar import GrammarSampler
    from rolechat.params import GenerationParams

    engine = load_engine(n_threads=threads)
    grammar = Constraint.json(FLAT)
    params = GenerationParams(temperature=0, max_new_tokens=64)
    kinds = (("free", None, True), ("grammar", grammar, True),
             ("grammar applied first", grammar, False))
    speeds: dict[str, list[float]] = {kind: [] for kind, _, _ in kinds}
    try:
        for prompt in texts:
            for kind, constraint, first in kinds:
                GrammarSampler.sample_first = first
                messages = [Message("user", prompt)]
                generation = engine.stream(messages, params, constraint=constraint)
                for _ in generation:
                    pass
                assert generation.completion is not None
                usage = generation.completion.usage
                if usage.generated_tokens >= 16:
                    speeds[kind].append(usage.tokens_per_s)
    finally:
        GrammarSampler.sample_first = True
        engine.close()
    medians = {kind: statistics.median(values) for kind, values in speeds.items()}
    free = medians["free"]
    return {"tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
            "ratio": round(medians["grammar"] / free, 3),
            "ratio_applied_first": round(medians["grammar applied first"] / free, 3),
            "replies": len(speeds["grammar"])}


def tools_ttft(base: str, texts: list[str]) -> dict[str, Any]:
    def ttft(body: dict[str, Any]) -> float:
        began = time.perf_counter()
        with httpx.Client(timeout=300) as client:
            for event in sse_events(client, f"{base}/v1/chat/completions", body):
                delta = event["choices"][0]["delta"] if event["choices"] else {}
                if delta.get("content") or delta.get("tool_calls"):
                    break
        return time.perf_counter() - began

    out: dict[str, Any] = {}
    for kind in ("without", "with"):
        times = []
        for i, prompt in enumerate(texts[:8]):
            body: dict[str, Any] = {"messages": [
                {"role": "system", "content": f"Run {kind} tools. Be brief."},
                {"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": 8, "stream": True}
            if kind == "with":
                body["tools"] = [WEATHER, TIME]
            times.append(ttft(body))
            del i
        out[kind] = {"first_s": round(times[0], 3),
                     "later_median_s": round(statistics.median(times[1:]), 3)}
    out["ratio_first"] = round(out["with"]["first_s"] / out["without"]["first_s"], 2)
    out["ratio_later"] = round(out["with"]["later_median_s"] / out["without"]["later_median_s"],
                               2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from rolechat.engines.llama_cpp import embedded_model_path

    model = str(embedded_model_path())
    texts = prompts(args.prompts)
    results: dict[str, Any] = {"machine": platform.platform(), "prompts": args.prompts,
                               "max_tokens": MAX_TOKENS}
    with tempfile.TemporaryDirectory() as home:
        command, base, env = rolechat_server(Path(home), args.threads)
        print("rolechat serve:", flush=True)
        with server(command, base, env):
            results["rolechat"] = validity(base, texts, peer=False)
            results["tools_ttft"] = tools_ttft(base, texts)
    command, base = llama_cpp_server(model, args.threads)
    print("llama-cpp-python server:", flush=True)
    with server(command, base):
        results["llama_cpp_python"] = validity(base, texts, peer=True)
    results["decode"] = decode_speed(texts[:20], args.threads)
    print(json.dumps({k: results[k] for k in ("tools_ttft", "decode")}, indent=2))
    for name in ("rolechat", "llama_cpp_python"):
        total = sum(r["valid"] for r in results[name].values())
        of = sum(r["of"] for r in results[name].values())
        print(f"{name}: {total}/{of} valid ({100 * total / of:.1f} %)")
    decode = results["decode"]
    print(f"decode with a grammar: {decode['ratio']:.2f}x free text (target 0.85); "
          f"applied before sampling: {decode['ratio_applied_first']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
