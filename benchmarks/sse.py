"""The benchmarks' one reader of a streaming response: POST a request, yield its server-sent
``data:`` events as dicts (``[DONE]`` and comments skipped); an event carrying ``error`` raises
RuntimeError, a non-2xx status raises httpx's error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


def sse_events(client: httpx.Client, url: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event: dict[str, Any] = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            yield event
