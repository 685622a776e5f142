"""The window's memory mode keeps its user-facing names (``--memory none|summary``, a persona's
``[window] memory``, a session's ``params.memory`` and ``PATCH {"memory"}``, the stored
record's ``mode``) while the library calls it ``Window.summarize``: each edge maps to it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat import Chat, Window
from rolechat.cli.options import window_from
from rolechat.errors import InvalidParams
from rolechat.saved import SavedChat
from rolechat.server import create_app
from rolechat.store import Store
from rolechat.window import MEMORY_MODES, memory_mode, summarizes, window_fields


def test_the_conversion() -> None:
    assert MEMORY_MODES == ("none", "summary")
    assert summarizes("summary") is True and summarizes("none") is False
    assert memory_mode(True) == "summary" and memory_mode(False) == "none"
    assert window_fields({"memory": "summary", "summary_tokens": 40}) == {
        "summarize": True, "summary_tokens": 40}
    with pytest.raises(InvalidParams, match="memory: must be one of none, summary"):
        summarizes(True)


def test_the_memory_flag_and_a_persona_file(rolechat_home: Path) -> None:
    options = {"memory": "summary", "summary_tokens": 40, "temperature": 0.5}
    window = window_from(options, None)
    assert window == Window(summarize=True, summary_tokens=40)
    assert options == {"temperature": 0.5}  # the window's flags were taken
    assert window_from({"memory": "none"}, None) == Window(summarize=False)
    assert window_from({}, None) is None

    folder = rolechat_home / "personas"
    folder.mkdir(parents=True)
    (folder / "remembers.toml").write_text('system = "x"\n[window]\nmemory = "summary"\n',
                                           encoding="utf-8")
    assert Chat(FakeEngine(), persona="remembers").window.summarize
    assert not window_from({"memory": "none"}, "remembers").summarize  # the flag wins


def test_a_session_and_the_stored_record(tmp_path: Path) -> None:
    store = Store(tmp_path / "rolechat.db")
    with TestClient(create_app(FakeEngine(), store=store),
                    base_url="http://testserver/v1") as client:
        made = client.post("/conversations", json={"params": {"memory": "summary"}})
        assert made.status_code == 201, made.text
        assert made.json()["memory"]["mode"] == "summary"
        cid = made.json()["id"]
        got = client.get(f"/conversations/{cid}").json()
        assert got["memory"]["mode"] == "summary" and got["memory"]["pins"] == []
        assert SavedChat.resume(FakeEngine(), store, cid).chat.window.summarize

        changed = client.patch(f"/conversations/{cid}", json={"memory": "none"})
        assert changed.status_code == 200 and changed.json()["memory"]["mode"] == "none"
        assert not SavedChat.resume(FakeEngine(), store, cid).chat.window.summarize
        plain = client.post("/conversations", json={}).json()["id"]
        assert client.get(f"/conversations/{plain}").json()["memory"].get("mode", "none") == \
            "none"
    store.close()
