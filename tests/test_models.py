"""Models already on disk (rolechat.models, rolechat models list/show): the stores of the
Hugging Face and ModelScope caches, Ollama and LM Studio, laid out as those tools lay them out
in a temp home from the embedded GGUF, are listed with their facts, and each chats by its
name. Nothing here downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_stores import GGUF, NAMES, STORE_VARIABLES, build_stores
from rolechat import Chat, UnknownName, load_engine
from rolechat.models import EMBEDDED, find_models, resolve_model


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    build_stores(home)
    for name in STORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_every_store_is_listed_with_its_facts(stores: Path) -> None:
    found = find_models()
    by_name = {m.name: m for m in found.models}
    assert set(by_name) == {EMBEDDED, *NAMES}
    for name, source in NAMES.items():
        model = by_name[name]
        assert model.source == source and model.path.resolve() == GGUF.resolve()
        assert model.size == GGUF.stat().st_size
        assert (model.info.architecture, model.info.quantization,
                model.info.context_length) == ("llama", "Q4_1", 8192)
    assert [(p.name, "magic" in why) for p, why in found.problems] == [("broken.gguf", True)]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_chats_by_its_name(stores: Path, name: str) -> None:
    engine = load_engine(name, n_threads=1)
    try:
        assert Path(engine.model).resolve() == GGUF.resolve()
        reply = Chat(engine, params={"temperature": 0, "max_new_tokens": 6}).send("Hi")
        assert reply.text and reply.usage.generated_tokens > 0
    finally:
        engine.close()


def test_an_unknown_name_lists_the_models_there_are(stores: Path) -> None:
    with pytest.raises(UnknownName) as caught:
        resolve_model("ollama:qwen2.5:3b")
    assert "ollama:smollm2:135m" in caught.value.hint and EMBEDDED in caught.value.hint
