"""The transformers adapter: a Hugging Face model and its one KV cache, for the scheduler.

Contract (see :mod:`rolechat.engines.adapter`):
- One sequence (``n_seq = 1``): the transformers engine generates one reply at a time; the
  scheduler queues the others. Its KV cache is an :class:`HFKVCache` (the transformers cache
  object and the ids it holds), cropped to the longest common prefix; snapshots copy each
  layer's keys and values to host memory. ``keep`` says how many tokens it really kept (a cache
  with sliding-window layers past its window cannot be cropped, and is emptied).
- ``evaluate`` runs a prompt in one forward pass (on the fast path, through its chunk steps);
  ``step`` decodes one token; both keep only the last position's logits.
- Sampling (:func:`sample`) follows transformers' ``generate``: the repetition penalty over the
  prompt and the reply, OpenAI's frequency and presence penalties over the reply, temperature,
  top-k, top-p, a seeded generator; greedy at temperature 0. Text comes from an
  :class:`IncrementalDetokenizer` per reply.
- Every call runs on the scheduler's thread, PyTorch's thread count included (it is per
  thread with OpenMP).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constraint import Constraint
from ..params import GenerationParams
from .adapter import Adapter, Sampler
from .kvcache import KVCache, KVSnapshot, SnapshotError, as_ids
from .tokenizers import hf_lock

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .buckets import FastPath
    from .hf_grammar import TokenGrammar


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


class TorchSampler(Sampler):
    """One reply's sampling state: its generator, the ids the penalties look at, its text."""

    def __init__(self, adapter: TorchAdapter, params: GenerationParams,
                 prompt: Sequence[int], constraint: Constraint | None = None) -> None:
        torch = adapter.torch
        self._grammar: TokenGrammar | None = None
        if constraint is not None and constraint.gbnf is not None:
            from .hf_grammar import TokenGrammar, compile_grammar

            self._grammar = TokenGrammar(compile_grammar(
                adapter.tokenizer, constraint.gbnf, triggers=constraint.triggers,
                eog=adapter.eog))
        self._adapter = adapter
        self._params = params
        self._generator = torch.Generator(device=adapter.device).manual_seed(
            params.seed if params.seed is not None else random.getrandbits(63))
        self._seen = torch.tensor(list(prompt), device=adapter.device)
        penalized = bool(params.frequency_penalty or params.presence_penalty)
        self._counts = torch.zeros(adapter.vocab_size, device=adapter.device) \
            if penalized else None
        self._detok = IncrementalDetokenizer(adapter.tokenizer)

    def sample(self, row: int) -> int:
        logits = self._adapter.rows[row]
        token = sample(logits, self._params, self._generator, self._seen, self._counts)
        grammar = self._grammar
        if grammar is not None:
            # Sample first; only a refused token costs a mask and another draw (a lazy
            # grammar's trigger may refuse one more token each time: the loop converges).
            while not grammar.allows(int(token)):
                masked = logits.clone()
                grammar.mask(masked)
                token = sample(masked, self._params, self._generator, self._seen, self._counts)
            grammar.accept(int(token))
        if self._params.repetition_penalty != 1.0:
            self._seen = self._adapter.torch.cat([self._seen, token.view(1)])
        if self._counts is not None:
            self._counts[token] += 1
        return int(token)  # waits for the device: the text must stream now

    def piece(self, token: int) -> bytes:
        return self._detok.push(token).encode("utf-8")


class TorchAdapter(Adapter):
    """A transformers model, its cache, and (on CUDA) its fast path."""

    n_seq = 1

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int, name: str,
                 eog: set[int], static: bool, cache_arg: str) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length = context_length
        # A prompt runs in one forward pass (the scheduler sends it whole).
        self.max_batch = self.prompt_chunk = context_length
        self.eog = eog
        #: The fast path (a static cache read in buckets, CUDA graphs), set by the engine.
        self.fast: FastPath | None = None
        self._cache_arg = cache_arg
        self.kv = HFKVCache(model, static=static, max_len=context_length, name=name)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0]) \
            if model.get_output_embeddings() is not None else len(tokenizer)
        #: The logits rows of the last evaluate/step ([V] tensors on the device).
        self.rows: list[Tensor] = []

    # ----- evaluation --------------------------------------------------------------------
    def evaluate(self, seq: int, ids: Sequence[int], start: int) -> int:
        self.rows = [self.prompt(list(ids), start)]
        return 0

    def prompt(self, prompt_ids: list[int], start: int) -> Tensor:
        """Evaluate ``prompt_ids[start:]`` after the cache's first ``start`` tokens; return
        the last position's logits [V]."""
        torch = self.torch
        cache = self.kv.ensure()
        start = min(start, len(self.kv.held))
        with torch.no_grad():
            if self.fast is not None:
                logits: Tensor = self.fast.prompt(list(prompt_ids[start:]), start)
            else:
                rest = torch.tensor([prompt_ids[start:]], device=self.device)  # [1, new]
                logits = self.model(input_ids=rest, use_cache=True, logits_to_keep=1,
                                    **{self._cache_arg: cache}).logits[0, -1]  # [V]
        self.kv.held = list(prompt_ids)
        return logits

    def step(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        (_, token, position, _), = entries
        assert position == len(self.kv.held)
        self.rows = [self.decode_one(self.torch.tensor(token, device=self.device))]
        return [0]

    def decode_one(self, token: Tensor) -> Tensor:
        """Evaluate one token (0-d tensor on the device); return the next logits [V]."""
        position = len(self.kv.held)  # the cache slot this token goes to
        self.kv.held.append(int(token))
        with self.torch.no_grad():
            if self.fast is not None:
                return self.fast.decode(token, position)
            logits: Tensor = self.model(input_ids=token.view(1, 1), use_cache=True,
                                        logits_to_keep=1,
                                        **{self._cache_arg: self.kv.ensure()}).logits
            return logits[0, -1]

    def sampler(self, params: GenerationParams, prompt: Sequence[int] = (),
                constraint: Constraint | None = None) -> Sampler:
        return TorchSampler(self, params, prompt, constraint)

    # ----- the cache ---------------------------------------------------------------------
    def keep(self, seq: int, n: int) -> int:
        self.kv.keep(n)
        return len(self.kv.held)

    def snapshot(self, seq: int, ids: np.ndarray) -> KVSnapshot | None:
        return self.kv.snapshot()

    def restore(self, seq: int, snapshot: KVSnapshot, n: int) -> None:
        self.kv.restore(snapshot, n)

    def dumps(self, snapshot: KVSnapshot) -> bytes:
        return self.kv.dumps(snapshot)

    def loads(self, data: bytes, ids: np.ndarray) -> KVSnapshot:
        return self.kv.loads(data, ids)

    def identity(self) -> dict[str, Any]:
        return self.kv.identity()

    def set_threads(self, n_threads: int) -> None:
        self.torch.set_num_threads(n_threads)

    def describe(self) -> dict[str, Any]:
        return {"threads": self.torch.get_num_threads()}
