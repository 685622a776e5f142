"""Thread counts: never more than the machine's logical CPUs (issue 19, item 6).

``--threads 1000`` used to start 1,001 threads on 2 cores (8 tokens took 23 s). Every way in —
the engine option schemas, ``set_threads`` and the tutorial's ``threads=`` — refuses a count
above :func:`~rolechat.engines.options.logical_cpus`, naming the limit and the machine's count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rolechat import InvalidInput, InvalidParams, inference
from rolechat.engines import load_engine
from rolechat.engines.llama_cpp import LlamaCppEngine
from rolechat.engines.options import check_options, logical_cpus


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> int:
    """A machine with 2 logical CPUs."""
    monkeypatch.setattr("rolechat.engines.options.os.cpu_count", lambda: 2)
    return 2


@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_the_schema_refuses_more_threads_than_logical_cpus(engine: str, two_cpus: int) -> None:
    with pytest.raises(InvalidParams) as raised:
        check_options(engine, {"n_threads": 1000}, flag=lambda o: "--threads")
    assert raised.value.problems == [
        ("--threads", "must be at most 2, the number of logical CPUs this machine has "
                      "(got 1000)")]
    assert check_options(engine, {"n_threads": 2}).n_threads == 2  # type: ignore[attr-defined]


def test_the_schema_still_refuses_zero_threads() -> None:
    with pytest.raises(InvalidParams, match=r"n_threads: must be a whole number >= 1 \(got 0\)"):
        check_options("llama.cpp", {"n_threads": 0})


def test_load_engine_refuses_before_loading(two_cpus: int) -> None:
    with pytest.raises(InvalidParams, match="at most 2, the number of logical CPUs"):
        load_engine(n_threads=3)


def test_set_threads_refuses_more_than_logical_cpus(engine: LlamaCppEngine) -> None:
    before = engine.n_threads
    too_many = logical_cpus() + 1
    with pytest.raises(InvalidInput) as raised:
        engine.set_threads(too_many)
    assert raised.value.field == "threads"
    assert (f"threads must be at most {logical_cpus()}, the number of logical CPUs this machine "
            f"has (got {too_many})") in str(raised.value)
    assert engine.n_threads == before  # nothing changed


def test_the_tutorials_threads_are_checked(engine: LlamaCppEngine) -> None:
    with pytest.raises(InvalidInput, match=f"at most {logical_cpus()}"):
        inference(engine, None, [], "hi", max_new_tokens=2, threads=logical_cpus() + 1)


def test_transformers_set_threads_refuses_more_than_logical_cpus(tiny_folder: Path) -> None:
    torch = pytest.importorskip("torch")
    from rolechat.engines.transformers import TransformersEngine

    tiny = TransformersEngine.load(tiny_folder, device="cpu")
    before = torch.get_num_threads()
    with pytest.raises(InvalidInput, match=f"at most {logical_cpus()}, the number of logical"):
        tiny.set_threads(logical_cpus() + 1)
    assert torch.get_num_threads() == before
    tiny.close()
