"""A real `rolechat serve` (the embedded model) SIGKILLed in the middle of a detached reply,
then started again on the same home: the message is interrupted, never pending, with the text
the server had saved (every ROLECHAT_CHECKPOINT_S seconds: 0.2 here), and the page in real
Chromium shows that text with Retry, which sends the message again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pages import WIDE, chromium, needs_chromium, open_page
from servers import ROLECHAT, free_port, running

PROMPTS = ["Write a very long story about a dragon who learns to bake bread.",
           "Tell me a long tale about a lighthouse keeper and the sea, in many paragraphs.",
           "Describe, at great length, a journey across a desert with a caravan of camels."]

pytestmark = needs_chromium


def serve(home: Path, port: int) -> Any:
    command = [str(ROLECHAT), "serve", "--port", str(port), "--context-length", "1024",
               "--threads", "1"]
    env = {**os.environ, "ROLECHAT_HOME": str(home), "ROLECHAT_CHECKPOINT_S": "0.2"}
    return running(command, f"http://127.0.0.1:{port}/v1/models", env=env)


def send(base: str, cid: int, prompt: str) -> None:
    """The message, detached (its answer never comes when the server is killed first)."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{base}/v1/conversations/{cid}/messages", timeout=120,
                   json={"content": prompt, "detach": True})


def live_text_until(base: str, cid: int, enough: int, ended: threading.Event) -> str:
    """Follow the conversation until its reply has ``enough`` characters (and a checkpoint
    or two went by); "" if the reply ended first."""
    seen, since = "", None
    with httpx.stream("GET", f"{base}/v1/conversations/{cid}/events", timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "live" in event:
                if event["live"] is None and seen:
                    ended.set()
                    return ""
                if event["live"]:
                    seen = event["live"]["text"]
                    since = since or time.monotonic()
            if since is not None and len(seen) >= enough and time.monotonic() - since > 0.6:
                return seen
    return ""


def test_a_server_killed_mid_reply_leaves_the_saved_text_interrupted_with_retry(
        tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    base = f"http://127.0.0.1:{port}"
    with serve(home, port) as proc:
        for prompt in PROMPTS:  # a reply long enough to be killed in (the model decides)
            cid = httpx.post(f"{base}/v1/conversations", timeout=60,
                             json={"params": {"max_new_tokens": 600}}).json()["id"]
            ended = threading.Event()
            threading.Thread(target=send, args=(base, cid, prompt), daemon=True).start()
            seen = live_text_until(base, cid, 80, ended)
            if seen:
                break
        else:
            pytest.fail("no reply lasted long enough to be killed in the middle")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with serve(home, port):
        messages = httpx.get(f"{base}/v1/conversations/{cid}", timeout=60).json()["messages"]
        assert [(m["role"], m["status"]) for m in messages] == [
            ("user", "interrupted"), ("assistant", "interrupted")]
        kept = messages[1]["content"]
        assert kept and seen.startswith(kept)  # what was saved, a moment before the kill
        errors: list[str] = []
        with chromium() as browser:
            page = open_page(browser, f"{base}/#c={cid}", errors, viewport=WIDE)
            assert page.locator(".msg.pending").count() == 0
            assert page.locator(".msg.user.interrupted").count() == 1
            shown = page.locator(".msg.assistant.interrupted .content").inner_text()
            assert shown.split()[:3] == kept.split()[:3]
            page.click("[data-testid=retry-message]")
            page.wait_for_selector(".msg.assistant[data-id]:not(.interrupted)", timeout=120_000)
        assert not errors, errors
        after = httpx.get(f"{base}/v1/conversations/{cid}", timeout=60).json()
        assert after["turns"] == 1 and after["messages"][2]["content"] == prompt
        assert all(m["status"] != "pending" for m in after["messages"])
