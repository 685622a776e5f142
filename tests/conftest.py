"""Shared fixtures: an isolated rolechat home for every test, the real embedded engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat.engines.llama_cpp import LlamaCppEngine


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
