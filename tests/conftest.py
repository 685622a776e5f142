"""Shared fixtures: an isolated rolechat home for every test, the real embedded engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat.engines.llama_cpp import LlamaCppEngine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a test marked ``slow`` run first. pytest-xdist hands out whole files
    (``--dist loadfile``) in collection order, so the long ones start at once on both workers
    and the short ones fill in around them, instead of one worker running a long file alone at
    the end while the other waits."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: file order kept otherwise


@pytest.fixture(autouse=True)
def rolechat_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("ROLECHAT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def engine() -> Iterator[LlamaCppEngine]:
    """The real embedded model (SmolLM2-135M-Instruct Q4_1), loaded once."""
    loaded = LlamaCppEngine()
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def small_engine() -> Iterator[LlamaCppEngine]:
    """The real embedded model with a small 1024-token context, for window tests."""
    loaded = LlamaCppEngine(context_length=1024)
    yield loaded
    loaded.close()


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()
