"""The app in-process (no model): an unexpected failure is a 500 in OpenAI's error shape under
/v1, and the page keeps its own 404s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from fakes import FakeEngine
from rolechat.server import create_app
from rolechat.store import Store


class BrokenEngine(FakeEngine):
    def describe(self) -> dict[str, Any]:
        raise RuntimeError("the engine's description broke")


def test_an_unexpected_error_is_an_openai_500(tmp_path: Path) -> None:
    app = create_app(BrokenEngine(), store=Store(tmp_path / "db"))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/status")
        assert response.status_code == 500
        assert response.json() == {"error": {"message": "Internal error: RuntimeError.",
                                             "type": "server_error", "param": None,
                                             "code": None}}
        page = client.get("/no-such-page.html")
        assert page.status_code == 404 and "error" not in page.text  # the page's own 404
        assert client.get("/").status_code == 200
