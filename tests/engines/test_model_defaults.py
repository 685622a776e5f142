"""Generation defaults from the model: a transformers folder's generation_config.json and a
GGUF's general.sampling.* fill in what the user, persona or request left unset, as
model.generate would; each value says where it came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fakes import FakeEngine
from rolechat import Chat, load_engine
from rolechat.engines.llama_cpp import gguf_sampling

pytest.importorskip("transformers")

QWEN_LIKE = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
             "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def configured(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("configured") / "model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **QWEN_LIKE}))
    return folder


def test_the_generation_config_supplies_what_nobody_set(configured: Path) -> None:
    engine = load_engine(configured)
    assert engine.model_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                     "repetition_penalty": 1.05}
    chat = Chat(engine, persona="expert", params={"top_p": 0.5})
    params = chat.effective_params()
    # The persona's temperature and the caller's top_p win; the model fills in the rest.
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        0.3, 0.5, 20, 1.05)
    sources = chat.params_from(params)
    assert (sources["temperature"], sources["top_p"], sources["top_k"],
            sources["max_new_tokens"]) == ("persona", "you", "model", "rolechat")
    reply = chat.send("hi", max_new_tokens=4)
    assert reply.params is not None and reply.params.top_k == 20
    assert reply.params_from is not None and reply.params_from["max_new_tokens"] == "this reply"
    # The tutorial's call: temperature given, the rest from the model's config.
    from rolechat import inference

    assert Chat(engine).effective_params(temperature=0.9).top_k == 20
    result = inference(engine, None, [], "hi", 4, 0.9)
    assert result["generated_tokens_count"] <= 4


def test_do_sample_false_is_greedy(tiny_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "greedy"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    engine = load_engine(folder)
    assert engine.model_defaults["temperature"] == 0.0
    assert Chat(engine).effective_params().greedy


def test_a_plain_generation_config_sets_nothing(tiny_folder: Path) -> None:
    assert load_engine(tiny_folder).model_defaults == {}


def test_gguf_sampling_defaults() -> None:
    metadata = {"general.sampling.temp": "0.6", "general.sampling.top_k": "30",
                "general.sampling.top_p": "0.9", "general.sampling.penalty_repeat": "1.1",
                "general.sampling.min_p": "0.05", "general.name": "x"}
    assert gguf_sampling(metadata) == {"temperature": 0.6, "top_k": 30, "top_p": 0.9,
                                       "repetition_penalty": 1.1}
    assert gguf_sampling({"general.sampling.temp": "hot", "general.sampling.top_p": "7"}) == {}


def test_the_embedded_gguf_stores_none(engine: object) -> None:
    assert engine.model_defaults == {}  # type: ignore[attr-defined]


def test_params_show_where_each_value_comes_from() -> None:
    fake = FakeEngine()
    fake.model_defaults = {"top_k": 7}
    chat = Chat(fake, params={"temperature": 0.2})
    assert chat.params_from() == {
        "max_new_tokens": "rolechat", "temperature": "you", "top_p": "rolechat",
        "top_k": "model", "repetition_penalty": "rolechat", "frequency_penalty": "rolechat",
        "presence_penalty": "rolechat", "seed": "rolechat", "stop": "rolechat"}
