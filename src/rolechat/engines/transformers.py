"""Hugging Face / ModelScope models through transformers — the tutorial's own path.

Contract:
- :meth:`TransformersEngine.load` opens a local model folder (config, safetensors, tokenizer with
  its chat template), a GGUF file (transformers' ``gguf_file`` support), or — only when ``hub``
  is given — a Hugging Face (``hf``) or ModelScope (``modelscope``) id. Device ``auto`` picks
  CUDA when present; dtype ``auto`` takes the checkpoint's. ``TransformersEngine(model,
  tokenizer)`` wraps objects the caller already loaded (the tutorial's ``model_instruct``).
- The same accounting as every engine: streaming, stop at an end-of-turn token, prompt /
  reused / generated tokens, time to first token, tokens/s.
- KV reuse, snapshots and scheduling as for every local engine (:mod:`rolechat.engines.local`),
  through :class:`~rolechat.engines.torch_adapter.TorchAdapter`: one sequence, so one reply at a
  time (the scheduler queues the others); its cache is an :class:`HFKVCache`, cropped to the
  longest common prefix; snapshots copy each layer's keys and values to host memory.
- Fast decode on CUDA (default there, ``fast_decode=False`` turns it off): a static KV cache
  sized to the context and read in length buckets, with fixed-shape steps per bucket made on
  first use (the decode step compiled and captured in a CUDA graph, as in pytorch-labs'
  gpt-fast; a new turn's few prompt tokens padded to a chunk step) — see
  :mod:`rolechat.engines.buckets`. ``capture`` (or ``$ROLECHAT_CAPTURE``): ``compile``
  (default), ``graph`` (no torch.compile), ``off`` (the same steps eagerly; the only mode on the
  CPU, for tests). It yields the same greedy tokens as the plain path (a dynamic cache, eager
  SDPA).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput, ModelLoadError, UnknownName
from ..params import valid_defaults
from ..template import read_template_option
from .kvstore import DEFAULT_RAM_BYTES, KVStore
from .local import LocalEngine
from .tokenizers import HFTokenizer, PromptEncoder, template_for
from .torch_adapter import HFKVCache, IncrementalDetokenizer, TorchAdapter, sample

if TYPE_CHECKING:
    import torch

    from .buckets import FastPath

HUBS = ("hf", "modelscope")
DEFAULT_MAX_CONTEXT = 32768
#: How the fast path makes its steps when ``capture`` is not given (compile, graph or off).
CAPTURE_ENV = "ROLECHAT_CAPTURE"


def _import_torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("transformers engine", f"{exc.name or exc} is not installed",
                             "Install the extra: pip install 'rolechat[transformers]' "
                             "(make test installs it).") from None
    return torch


def resolve_hub(model_id: str, hub: str) -> Path:
    """Download ``model_id`` from a hub (only ever called when the user asked for one)."""
    if hub not in HUBS:
        raise UnknownName("hub", hub, HUBS)
    try:
        if hub == "modelscope":
            from modelscope import snapshot_download
        else:
            from huggingface_hub import snapshot_download
    except ImportError:
        extra = "modelscope" if hub == "modelscope" else "transformers"
        raise ModelLoadError(model_id, f"the {hub} hub client is not installed",
                             f"pip install 'rolechat[{extra}]'") from None
    try:
        return Path(snapshot_download(model_id))
    except Exception as exc:  # the hub clients raise many kinds; all mean "could not get it"
        raise ModelLoadError(model_id, f"could not download it from {hub} "
                             f"({type(exc).__name__}: {str(exc)[:200]})",
                             "Check the id and the network (are you offline?), or download "
                             "the folder yourself and pass its path.") from None


def generation_defaults(model: Any) -> dict[str, Any]:
    """What the model's ``generation_config.json`` sets, as GenerationParams fields: the values
    ``model.generate`` would use where the caller says nothing (``do_sample: false`` is
    greedy)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    try:
        given = config.to_diff_dict()
    except Exception:  # an odd config object: no defaults from it
        return {}
    values = {name: given.get(name) for name in ("temperature", "top_p", "top_k",
                                                 "repetition_penalty", "max_new_tokens")}
    if given.get("do_sample") is False:
        values["temperature"] = 0.0
    return valid_defaults(values)


class TransformersEngine(LocalEngine):
    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, chat_template: str | None = None,
                 fast_decode: bool | None = None, name: str | None = None,
                 kv_cache_ram: int = DEFAULT_RAM_BYTES, capture: str | None = None,
                 min_bucket: int | None = None, chunks: Sequence[int] | None = None,
                 n_threads: int | None = None, kv_store: KVStore | None = None) -> None:
        _import_torch()
        self.hf_model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.model = name or str(getattr(model.config, "_name_or_path", "") or "model")
        trained = getattr(model.config, "max_position_embeddings", None) or 4096
        self.trained_context_length = int(trained)
        self.context_length = int(context_length or min(self.trained_context_length,
                                                         max_context))
        hf = HFTokenizer(tokenizer)
        source = read_template_option(chat_template) or hf.template_source
        if not source:
            raise ModelLoadError(self.model, "its tokenizer has no chat template",
                                 "Use an instruct/chat model, or pass --chat-template.")
        self.template = template_for(hf, source)
        self.model_defaults = generation_defaults(model)
        self.fast_decode = _fast_decode(model, self.device, fast_decode)
        capture = capture or os.environ.get(CAPTURE_ENV) or "compile"
        if self.fast_decode and capture not in ("compile", "graph", "off"):
            raise UnknownName("capture mode", capture, ("compile", "graph", "off"))
        if self.fast_decode and self.device.type != "cuda" and capture != "off":
            raise InvalidInput("fast_decode needs a CUDA device.",
                               "Leave it off on the CPU (capture='off' runs its steps eagerly, "
                               "for tests).")
        adapter = self._adapter(model, tokenizer, capture, min_bucket, chunks)
        self.start(adapter, PromptEncoder(hf, self.template), kv_store=kv_store,
                   kv_cache_ram=kv_cache_ram)
        if n_threads is not None:  # PyTorch's thread count is the scheduler thread's own
            self.set_threads(n_threads)

    def _adapter(self, model: Any, tokenizer: Any, capture: str, min_bucket: int | None,
                 chunks: Sequence[int] | None) -> TorchAdapter:
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either version.
        forward = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in forward else "past_key_values"
        adapter = TorchAdapter(model, tokenizer, context_length=self.context_length,
                               name=self.model, eog=self._end_of_turn_ids(),
                               static=self.fast_decode, cache_arg=cache_arg)
        if self.fast_decode:
            from .buckets import CHUNKS, MIN_BUCKET, FastPath, use_gqa_attention

            use_gqa_attention(model)
            adapter.fast = FastPath(model, adapter.kv.ensure,
                                    context_length=self.context_length, capture=capture,
                                    cache_arg=cache_arg, min_bucket=min_bucket or MIN_BUCKET,
                                    chunks=CHUNKS if chunks is None else chunks)
        return adapter

    @property
    def fast(self) -> FastPath | None:
        """The fast path's buckets and steps (None on the plain path)."""
        return self.adapter.fast  # type: ignore[attr-defined, no-any-return]

    # ----- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path, *, device: str = "auto", dtype: str = "auto",
             hub: str | None = None, gguf_file: str | None = None,
             n_threads: int | None = None, **options: Any) -> TransformersEngine:
        """Load a folder, a GGUF file, or (with ``hub``) a hub id. ``n_threads`` sets PyTorch's
        CPU threads, which are shared by the whole process."""
        path = Path(model).expanduser()
        if hub is not None:
            path = resolve_hub(str(model), hub)
        elif not path.exists():
            raise ModelLoadError(str(model), "no such file or folder",
                                 "Check the path; to download by id pass --hub hf or "
                                 "--hub modelscope.")
        if path.is_file():
            gguf_file, path = path.name, path.parent
        elif not (path / "config.json").is_file():
            raise ModelLoadError(str(path), "the folder has no config.json",
                                 "Pass a Hugging Face / ModelScope model folder.")
        torch = _import_torch()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(str(path), f"device {device!r} is not available (no CUDA)",
                                 "Use --device cpu, or auto.")
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise UnknownName("dtype", dtype, ("auto", "bfloat16", "float16", "float32"))
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), **extra)
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype="auto" if dtype == "auto" else getattr(torch, dtype), **extra)
            hf_model.to(torch.device(device))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(str(path / (gguf_file or "")),
                                 str(exc).splitlines()[0][:300].rstrip("."),
                                 "Check that the folder holds a complete causal-LM "
                                 "checkpoint.") from None
        return cls(hf_model, tokenizer, name=str(path / (gguf_file or "")), n_threads=n_threads,
                   **options)

    # ----- tokens ------------------------------------------------------------------------
    def _end_of_turn_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.hf_model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device),
                "dtype": str(self.hf_model.dtype).removeprefix("torch."),
                "fast_decode": self.fast_decode,
                **({"capture": self.fast.capture} if self.fast is not None else {}),
                "trained_context_length": self.trained_context_length}


def _fast_decode(model: Any, device: torch.device, wanted: bool | None) -> bool:
    """Whether to take the fast path: asked for, or by default on CUDA when the model's layers
    all use full attention (the bucketed static cache holds no sliding-window layers)."""
    from .buckets import bucketable

    if wanted is None:
        return device.type == "cuda" and bucketable(model.config)
    if wanted and not bucketable(model.config):
        raise InvalidInput("fast_decode needs a model whose layers all use full attention "
                           "(this one has sliding-window or linear-attention layers).",
                           "Leave fast_decode off for this model.")
    return wanted


def wrap(model: Any, tokenizer: Any) -> TransformersEngine:
    """The engine for a transformers model and tokenizer the caller loaded. It is kept on the
    model object, so repeated ``inference(model, tokenizer, ...)`` calls share one KV cache and
    the engine goes away with the model."""
    engine: TransformersEngine | None = getattr(model, "_rolechat_engine", None)
    if engine is None or engine.tokenizer is not tokenizer:
        engine = TransformersEngine(model, tokenizer)
        model._rolechat_engine = engine
    return engine


__all__ = ["HFKVCache", "IncrementalDetokenizer", "TransformersEngine", "is_transformers_model",
           "sample", "wrap"]


def is_transformers_model(obj: Any) -> bool:
    """True for a transformers PreTrainedModel, without importing transformers."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(obj).__mro__)
