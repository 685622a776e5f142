"""Stores of models as other tools lay them out (the Hugging Face and ModelScope caches, Ollama,
LM Studio), built in a temp home from the embedded GGUF (symlinks): for tests/test_models.py
and tests/cli/test_cli_models.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rolechat.engines.llama_cpp import embedded_model_path

GGUF = embedded_model_path()
#: The names the stores' models are listed under, and their source.
NAMES = {"hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q4_1.gguf": "hf",
         "modelscope:Qwen/Tiny-GGUF:tiny-q4_1.gguf": "modelscope",
         "modelscope:Owner/Small-GGUF:small-q4_1.gguf": "modelscope",
         "ollama:smollm2:135m": "ollama", "ollama:someone/tiny:latest": "ollama",
         "lmstudio:lmstudio-community/Tiny-GGUF:Tiny-Q4_1.gguf": "lmstudio"}
#: The variables that would point the discovery elsewhere than the home's stores.
STORE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "MODELSCOPE_CACHE", "OLLAMA_MODELS",
                   "LMSTUDIO_MODELS")


def link(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(GGUF)


def build_stores(home: Path) -> None:
    """Each tool's store in ``home`` holding the embedded model, beside things that are not
    models: a repo's other files, a later shard, an Ollama template layer, a broken file."""
    hf = home / ".cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    link(hf / "snapshots/abc123/smollm2-135m-instruct-q4_1.gguf")
    (hf / "refs").mkdir(parents=True)
    (hf / "refs/main").write_text("abc123")
    ms = home / ".cache/modelscope/hub/models/Qwen/Tiny-GGUF"
    link(ms / "tiny-q4_1.gguf")
    (ms / "configuration.json").write_text("{}")
    link(ms / "tiny-big-00002-of-00002.gguf")  # a later shard: not a model of its own
    # modelscope 1.3x's own layout: models/OWNER--REPO/snapshots/REVISION/FILE
    new = home / ".cache/modelscope/hub/models/Owner--Small-GGUF/snapshots/master"
    link(new / "small-q4_1.gguf")
    (new / "small-q4_1.gguf.incomplete").write_bytes(b"a download still under way")
    ollama = home / ".ollama/models"
    digest = "sha256:" + hashlib.sha256(b"weights").hexdigest()
    link(ollama / "blobs" / digest.replace(":", "-"))
    for namespace, model, tag in (("library", "smollm2", "135m"), ("someone", "tiny", "latest")):
        manifest = ollama / "manifests/registry.ollama.ai" / namespace / model / tag
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"},
            {"mediaType": "application/vnd.ollama.image.model", "digest": digest}]}))
    link(home / ".lmstudio/models/lmstudio-community/Tiny-GGUF/Tiny-Q4_1.gguf")
    broken = home / ".lmstudio/models/lmstudio-community/Broken-GGUF/broken.gguf"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a gguf")
