"""Warm conversations through a real `rolechat serve` (real HTTP, the embedded model): sessions
that alternate between more conversations than the server has sequences restore their KV
snapshots from RAM, stateless clients stay in their sequences, greedy replies match evaluations
from an empty cache, a restarted server resumes from disk, and GET /v1/status shows the
sequences and the tiers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cold import cold_reply as reference
from rolechat import Conversation
from rolechat.engines.llama_cpp import LlamaCppEngine
from servers import rolechat_serve

GREEDY = {"temperature": 0, "max_new_tokens": 4}
TOPICS = ("the sea", "mountains", "bread", "the moon")
#: Each conversation comes back five times after others took its sequence (more rounds only
#: repeat the same switch, and cost the suite a cold reply each).
ROUNDS = 6
#: The stateless endpoint shares the engine code the sessions prove over ROUNDS rounds.
STATELESS_ROUNDS = 4


@pytest.fixture(scope="module")
def cold() -> Iterator[LlamaCppEngine]:
    """The reference: the server's context, no snapshots, the cache emptied every time (all
    cores: the server is idle while it runs; threads do not change llama.cpp's results)."""
    engine = LlamaCppEngine(context_length=1024, kv_cache_ram=0)
    yield engine
    engine.close()


def cold_reply(cold: LlamaCppEngine, conversation: Conversation, text: str) -> str:
    return reference(cold, conversation, text, GREEDY)


def kv_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "kv").glob("*/*.kv"))


@pytest.mark.slow
def test_interleaved_sessions_stay_warm_and_match_cold_replies(
        tmp_path: Path, cold: LlamaCppEngine) -> None:
    home = tmp_path / "home"
    # Two sequences, four conversations: each one comes back after two others took them.
    with rolechat_serve(home, "--parallel", "2") as base, httpx.Client(base_url=f"{base}/v1",
                                                                         timeout=120) as client:
        sessions: list[tuple[int, Conversation]] = []
        for topic in TOPICS:
            body = client.post("/conversations", json={
                "system": f"You like {topic}.",
                "params": GREEDY}).json()
            sessions.append((body["id"], Conversation.from_tuples([], system=body["system"])))
        for round_ in range(ROUNDS):
            for (cid, history), topic in zip(sessions, TOPICS):
                text = f"{round_}: more on {topic}?"
                response = client.post(f"/conversations/{cid}/messages", json={"content": text})
                assert response.status_code == 200, response.text
                data = response.json()
                reply = data["message"]["content"]
                assert reply == cold_reply(cold, history, text), (round_, topic)
                if round_:
                    usage, extra = data["usage"], data["rolechat"]
                    assert extra["kv_source"] == "ram", (round_, topic, data)
                    assert extra["restored_tokens"] == usage["prompt_tokens_details"][
                        "cached_tokens"]
                    assert usage["prompt_tokens"] - extra["restored_tokens"] < 40
                history.append_turn(text, reply)

        status = client.get("/status").json()
        # The files are written in the engine's quiet moments (half a second idle), which a
        # fast machine's back-to-back turns may not have left: wait for the writer.
        deadline = time.monotonic() + 60
        while status["kv_cache"]["disk"]["files"] < len(TOPICS) and time.monotonic() < deadline:
            time.sleep(0.2)
            status = client.get("/status").json()
        sequences = status["scheduler"]["sequences"]
        assert len(sequences) == 2 and all(s["state"] == "idle" for s in sequences)
        assert {s["conversation"] for s in sequences} <= {f"conversation-{cid}"
                                                          for cid, _ in sessions}
        kv = status["kv_cache"]
        assert kv["ram"]["entries"] == len(TOPICS)
        assert kv["ram"]["hits"] >= len(TOPICS) * (ROUNDS - 1)
        assert kv["ram"]["bytes"] <= kv["ram"]["max_bytes"]
        assert kv["disk"]["files"] == len(TOPICS)
        assert kv["disk"]["bytes"] <= kv["disk"]["max_bytes"]
        assert kv_files(home) == sorted(f"conversation-{cid}.kv" for cid, _ in sessions)

        deleted = sessions[0][0]
        assert client.delete(f"/conversations/{deleted}").status_code == 200
        assert f"conversation-{deleted}.kv" not in kv_files(home)

    # A restarted server resumes a session from its file on disk.
    cid, history = sessions[1]
    with rolechat_serve(home) as base, httpx.Client(base_url=f"{base}/v1",
                                                     timeout=120) as client:
        text = "And now, after a restart?"
        data = client.post(f"/conversations/{cid}/messages", json={"content": text}).json()
        assert data["rolechat"]["kv_source"] == "disk"
        assert data["rolechat"]["restored_tokens"] > 100
        assert data["message"]["content"] == cold_reply(cold, history, text)
        assert client.get("/status").json()["kv_cache"]["disk"]["hits"] == 1


def test_a_stateless_client_alternating_conversations_stays_warm(
        tmp_path: Path, cold: LlamaCppEngine) -> None:
    with rolechat_serve(tmp_path / "home", "--parallel", "4") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        histories: list[list[dict[str, str]]] = [
            [{"role": "system", "content": f"You like {topic}. Answer in one short sentence."}]
            for topic in TOPICS]
        for round_ in range(STATELESS_ROUNDS):
            for messages, topic in zip(histories, TOPICS):
                messages.append({"role": "user", "content": f"Round {round_}: {topic}?"})
                response = client.chat.completions.create(
                    model=model, messages=messages, temperature=0,  # type: ignore[arg-type]
                    max_tokens=GREEDY["max_new_tokens"])
                reply = response.choices[0].message.content or ""
                before = Conversation.from_openai(messages[:-1])
                assert reply == cold_reply(cold, before, messages[-1]["content"])
                extra: dict[str, Any] = response.model_extra["rolechat"]  # type: ignore[index]
                if round_:  # four sequences: each conversation stays in its own
                    assert extra["kv_source"] == "live", (round_, topic, extra)
                    assert extra["restored_tokens"] == 0
                    usage = response.usage
                    assert usage is not None and usage.prompt_tokens_details is not None
                    assert usage.prompt_tokens - (usage.prompt_tokens_details.cached_tokens
                                                  or 0) < 40
                messages.append({"role": "assistant", "content": reply})
