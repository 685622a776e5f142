"""Hugging Face / ModelScope models through transformers — the tutorial's own path.

Contract:
- :meth:`TransformersEngine.load` opens a local model folder (config, safetensors, tokenizer with
  its chat template), a GGUF file (transformers' ``gguf_file`` support), or — only when ``hub``
  is given — a Hugging Face (``hf``) or ModelScope (``modelscope``) id. Device ``auto`` picks
  CUDA when present; dtype ``auto`` takes the checkpoint's. ``TransformersEngine(model,
  tokenizer)`` wraps objects the caller already loaded (the tutorial's ``model_instruct``).
- The same accounting as every engine: streaming, stop at an end-of-turn token, prompt /
  reused / generated tokens, time to first token, tokens/s.
- KV reuse and snapshots as for every local engine (:mod:`rolechat.engines.local`): the live
  cache is an :class:`HFKVCache` (the transformers cache object and the ids it holds), cropped to
  the longest common prefix; snapshots copy each layer's keys and values to host memory.
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

import hashlib
import inspect
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInput, ModelLoadError, UnknownName
from ..params import GenerationParams, valid_defaults
from ..template import read_template_option
from .kvcache import KVCache, KVSnapshot, SnapshotError, as_ids
from .local import LocalEngine
from .snapshots import DEFAULT_RAM_BYTES
from .tokenizers import HFTokenizer, PromptEncoder, hf_lock, template_for

if TYPE_CHECKING:
    import torch
    from torch import Tensor

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


class IncrementalDetokenizer:
    """Turns generated ids into text pieces, decoding a small sliding window each step (the
    approach of vLLM and transformers' TextStreamer), so that multi-token characters and
    word-boundary spaces come out right at a constant cost per token."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = hf_lock(tokenizer)  # planners on other threads tokenize with it
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that gives context for the next piece
        self._read = 0  # ids before this have been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        decode = self._tokenizer.decode
        with self._lock:
            before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
            now = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return str(now[len(before):])
        return ""


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None,
           seen: torch.Tensor | None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """One token id (a 0-d tensor, still on the device) from the last position's logits [V].
    ``seen``: the ids the repetition penalty looks at (prompt and reply); ``counts`` [V]: how
    often the reply used each token, for the frequency and presence penalties (OpenAI's
    definition, as llama.cpp applies them to the reply's tokens)."""
    import torch

    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits = (logits.float() - params.frequency_penalty * counts
                  - params.presence_penalty * (counts > 0).float())
    if seen is not None and params.repetition_penalty != 1.0:
        scores = logits[seen]
        penalty = params.repetition_penalty
        logits = logits.scatter(0, seen, torch.where(scores < 0, scores * penalty,
                                                     scores / penalty))
    if params.greedy:
        return logits.argmax()
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the first token always
        logits = logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[0]


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


class HFKVCache(KVCache):
    """A transformers cache object (dynamic, or on the fast path a static one read in
    buckets, :class:`~rolechat.engines.buckets.BucketedCache`) and the ids in it.

    Snapshots copy each layer's keys and values (``[1, kv_heads, tokens, head_dim]``) to host
    memory; restoring copies them back in place (a static cache keeps its addresses, so a
    captured decode graph stays valid). Models with sliding-window layers are not snapshotted:
    their cache does not hold every position."""

    def __init__(self, model: Any, *, static: bool, max_len: int, name: str) -> None:
        import torch
        import transformers

        self._torch = torch
        self._model = model
        self._static = static
        self._max_len = max_len
        self.cache: Any = None
        #: The token ids the cache holds.
        self.held: list[int] = []
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        heads = int(config.num_attention_heads)
        self._layers = int(config.num_hidden_layers)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self._dtype = model.dtype
        config_hash = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
        self._identity = {"model": {"path": name, "config_sha256": config_hash},
                          "engine": "transformers", "context_length": max_len,
                          "dtype": str(self._dtype).removeprefix("torch."),
                          "layout": [self._layers, self._kv_heads, self._head_dim],
                          "library": f"transformers {transformers.__version__}, "
                                     f"torch {torch.__version__}"}

    def ensure(self) -> Any:
        """The cache object (made on first use)."""
        if self.cache is None:
            from transformers import DynamicCache

            config = self._model.config
            if self._static:
                from .buckets import BucketedCache

                self.cache = BucketedCache(self._layers, self._max_len, kv_heads=self._kv_heads,
                                           head_dim=self._head_dim, dtype=self._dtype,
                                           device=self._model.device)
            else:
                self.cache = DynamicCache(config=config)
        return self.cache

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.held, dtype=np.int32)

    def keep(self, n: int) -> None:
        held = len(self.held)
        if n >= held:
            return
        if n <= 0:
            self.reset()
            return
        try:
            self.ensure().crop(n - held)  # a negative count removes that many tokens
        except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
            self.reset()
            return
        del self.held[n:]

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()  # in place: a captured decode graph stays valid
        self.held = []

    def _layer_tensors(self) -> list[tuple[Any, Any]] | None:
        layers = getattr(self.cache, "layers", None)
        if not layers or any(getattr(layer, "is_sliding", False) for layer in layers):
            return None
        return [(layer.keys, layer.values) for layer in layers]

    def snapshot(self) -> KVSnapshot | None:
        n = len(self.held)
        tensors = self._layer_tensors() if self.cache is not None and n else None
        if tensors is None:
            return None
        host = [(k[:, :, :n].to("cpu", copy=True), v[:, :, :n].to("cpu", copy=True))
                for k, v in tensors]  # [1, kv_heads, n, head_dim] each
        nbytes = sum(k.nbytes + v.nbytes for k, v in host) + 4 * n
        return KVSnapshot(as_ids(self.held), tuple(host), nbytes)

    def restore(self, snapshot: KVSnapshot, n: int) -> None:
        host = snapshot.state
        if len(host) != self._layers:
            raise SnapshotError(f"{len(host)} layers in the snapshot, {self._layers} here")
        count = min(n, len(snapshot.ids))
        if self._static:
            self.ensure().reset()
        else:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self._model.config)
        self.held = []
        device = self._model.device
        try:
            for index, (k, v) in enumerate(host):
                self.cache.layers[index].update(k[:, :, :count].to(device, self._dtype),
                                                v[:, :, :count].to(device, self._dtype))
        except (RuntimeError, IndexError, TypeError) as exc:
            self.reset()
            raise SnapshotError(f"the cache refused the state ({exc})") from None
        self.held = [int(t) for t in snapshot.ids[:count]]

    def dumps(self, snapshot: KVSnapshot) -> bytes:
        torch = self._torch
        parts = [t.contiguous().view(torch.uint8).numpy().tobytes()
                 for pair in snapshot.state for t in pair]
        return b"".join(parts)

    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        torch = self._torch
        n = len(ids)
        shape = (1, self._kv_heads, n, self._head_dim)
        size = int(np.prod(shape)) * torch.empty((), dtype=self._dtype).element_size()
        if len(data) != 2 * self._layers * size:
            raise SnapshotError(f"{len(data)} state bytes, {2 * self._layers * size} expected")
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        tensors = [flat[i * size:(i + 1) * size].view(self._dtype).view(shape)
                   for i in range(2 * self._layers)]
        host = tuple((tensors[2 * i], tensors[2 * i + 1]) for i in range(self._layers))
        return KVSnapshot(as_ids(ids), host, len(data) + 4 * n)

    def identity(self) -> dict[str, Any]:
        return self._identity


class TransformersEngine(LocalEngine):
    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, chat_template: str | None = None,
                 fast_decode: bool | None = None, name: str | None = None,
                 kv_cache_ram: int = DEFAULT_RAM_BYTES, capture: str | None = None,
                 min_bucket: int | None = None, chunks: Sequence[int] | None = None) -> None:
        super().__init__(kv_cache_ram=kv_cache_ram)
        torch = _import_torch()
        self.torch = torch
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
        self.encoder = PromptEncoder(hf, self.template)
        self._eog = self._end_of_turn_ids()
        self.model_defaults = generation_defaults(model)
        self.fast_decode = _fast_decode(model, self.device, fast_decode)
        capture = capture or os.environ.get(CAPTURE_ENV) or "compile"
        if self.fast_decode and capture not in ("compile", "graph", "off"):
            raise UnknownName("capture mode", capture, ("compile", "graph", "off"))
        if self.fast_decode and self.device.type != "cuda" and capture != "off":
            raise InvalidInput("fast_decode needs a CUDA device.",
                               "Leave it off on the CPU (capture='off' runs its steps eagerly, "
                               "for tests).")
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either version.
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.kv: HFKVCache = HFKVCache(model, static=self.fast_decode,
                                       max_len=self.context_length, name=self.model)
        self._detok = IncrementalDetokenizer(tokenizer)
        #: The fast path's buckets and steps (None on the plain path).
        self.fast: FastPath | None = None
        if self.fast_decode:
            from .buckets import CHUNKS, MIN_BUCKET, FastPath, use_gqa_attention

            use_gqa_attention(model)
            self.fast = FastPath(model, self.kv.ensure, context_length=self.context_length,
                                 capture=capture, cache_arg=self._cache_arg,
                                 min_bucket=min_bucket or MIN_BUCKET,
                                 chunks=CHUNKS if chunks is None else chunks)

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

        if n_threads is not None:
            torch.set_num_threads(n_threads)
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
        return cls(hf_model, tokenizer, name=str(path / (gguf_file or "")), **options)

    # ----- tokens ------------------------------------------------------------------------
    def _end_of_turn_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.hf_model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    # ----- evaluation --------------------------------------------------------------------
    def evaluate(self, prompt_ids: list[int], start: int) -> torch.Tensor:
        """Evaluate ``prompt_ids[start:]`` after the cache's first ``start`` tokens (which
        :meth:`prefill` chose); return the last position's logits [V]."""
        torch = self.torch
        cache = self.kv.ensure()
        # keep() empties a cache it cannot crop (a sliding-window layer past its window): then
        # the whole prompt is evaluated, never the rest of it at the wrong positions.
        start = min(start, len(self.kv.held))
        with torch.no_grad():
            if self.fast is not None:
                logits: Tensor = self.fast.prompt(list(prompt_ids[start:]), start)
            else:
                rest = torch.tensor([prompt_ids[start:]], device=self.device)  # [1, new tokens]
                logits = self.hf_model(input_ids=rest, use_cache=True, logits_to_keep=1,
                                       **{self._cache_arg: cache}).logits[0, -1]  # [V]
        self.kv.held = list(prompt_ids)
        return logits

    def decode_one(self, token: torch.Tensor) -> torch.Tensor:
        """Evaluate one token (0-d tensor on the device); return the next logits [V]."""
        position = len(self.kv.held)  # the cache slot this token goes to
        self.kv.held.append(int(token))
        with self.torch.no_grad():
            if self.fast is not None:
                return self.fast.decode(token, position)
            return self._step(token.view(1, 1))[0, -1]

    def _step(self, step: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf_model(input_ids=step, use_cache=True, logits_to_keep=1,
                                             **{self._cache_arg: self.kv.ensure()}).logits
        return logits  # [1, 1, V]

    def set_threads(self, n_threads: int) -> None:
        """PyTorch's CPU threads (shared by the whole process)."""
        from .options import check_threads

        self.torch.set_num_threads(check_threads(n_threads,
                                                 "Leave it out to keep PyTorch's default."))

    # ----- generation --------------------------------------------------------------------
    def _evaluate(self, ids: list[int], start: int) -> None:
        self.evaluate(ids, start)

    def _piece(self, token: int) -> bytes:
        return self._detok.push(token).encode("utf-8")

    def _tokens(self, prompt_ids: list[int], start: int,
                params: GenerationParams) -> Iterator[int]:
        """Sample a token, hand it out, and evaluate it only when the next one is wanted."""
        torch = self.torch
        self._detok = IncrementalDetokenizer(self.tokenizer)
        logits = self.evaluate(prompt_ids, start)
        generator = torch.Generator(device=self.device).manual_seed(
            params.seed if params.seed is not None else random.getrandbits(63))
        seen = torch.tensor(prompt_ids, device=self.device)
        penalized = bool(params.frequency_penalty or params.presence_penalty)
        counts = torch.zeros(logits.shape[-1], device=self.device) if penalized else None
        while True:
            token = sample(logits, params, generator, seen, counts)
            yield int(token)  # waits for the device: the text must stream now
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, token.view(1)])
            if counts is not None:
                counts[token] += 1
            logits = self.decode_one(token)

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


def is_transformers_model(obj: Any) -> bool:
    """True for a transformers PreTrainedModel, without importing transformers."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(obj).__mro__)
