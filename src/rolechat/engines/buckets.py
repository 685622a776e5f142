"""The transformers engine's fast path: a static KV cache read in length buckets, and
fixed-shape steps made once per bucket (captured in CUDA graphs on a GPU).

Contract:
- :func:`bucket_sizes`: the attended lengths, powers of two from ``smallest`` (512 by default)
  while below the context length, then the context length itself. A step whose last token
  lands at position ``n - 1`` attends over ``bucket_for(sizes, n)`` cache slots, never the whole
  cache, so decode slows down as the conversation grows, not as the context setting does.
- :class:`BucketedCache`: a static cache (one allocation of the context length, made up front
  so its addresses never change) whose layers hand attention a view of the first
  ``span.length`` slots (``keys[:, :, :span]``) and size the mask to it. ``keep``/``reset``/
  snapshots work on it as on transformers' ``StaticCache``. Only models whose layers all use
  full attention (:func:`bucketable`) take the fast path.
- :class:`FastPath` runs the steps: decode (one token) and prompt chunks (a new turn's few
  tokens, padded to the smallest of ``chunks``, 8/32/128 by default); one step per (tokens,
  bucket), made the first time a conversation needs it, with a progress line while it is made
  (``progress``, INFO on the ``rolechat.transformers`` logger by default). Longer prompts run
  eagerly over their bucket. ``capture`` says how steps are made: ``compile`` (the default on
  CUDA: the decode step compiled by ``torch.compile`` and captured in a CUDA graph, chunks
  captured uncompiled), ``graph`` (every step captured without compiling: no compile wait),
  ``off`` (the same steps run eagerly, on any device: what the CPU tests check). The engine
  reads ``$ROLECHAT_CAPTURE`` when it is not given. A step that fails to capture runs eagerly,
  with a warning.
- :func:`gqa_attention`: decode attention that reads the grouped K/V heads in place.

The fast path gives the same greedy tokens as the plain path (dynamic cache, eager SDPA) on a
float32 model, in every bucket and across bucket boundaries (tests/engines/test_buckets.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, StaticLayer

log = logging.getLogger("rolechat.transformers")

#: How the fast path makes its steps (see the module docstring).
CAPTURE_MODES = ("compile", "graph", "off")
#: The smallest attended length on a GPU; below it a step costs about the same anyway.
MIN_BUCKET = 512
#: The padded sizes of a new turn's prompt chunks.
CHUNKS = (8, 32, 128)
#: Warm-up runs before a capture (the first ones compile, or pick kernels).
WARMUPS = 3

#: A step: (tokens [1, T], count [] = how many of them are real; None for decode, T = 1)
#: -> logits [1, 1, V].
Step = Callable[[Tensor, Tensor | None], Tensor]


# ----- buckets ---------------------------------------------------------------------------------

def bucket_sizes(context_length: int, smallest: int = MIN_BUCKET) -> tuple[int, ...]:
    """Powers of two from ``smallest`` while below ``context_length``, then the context
    length: ``bucket_sizes(128, 16) == (16, 32, 64, 128)``."""
    if smallest < 1 or context_length < 1:
        raise ValueError(f"bucket sizes need positive lengths (smallest {smallest}, "
                         f"context {context_length})")
    sizes: list[int] = []
    size = smallest
    while size < context_length:
        sizes.append(size)
        size *= 2
    return (*sizes, context_length)


def bucket_for(sizes: Sequence[int], length: int) -> int:
    """The smallest bucket that holds ``length`` positions."""
    for size in sizes:
        if length <= size:
            return size
    raise ValueError(f"{length} positions do not fit the largest bucket ({sizes[-1]})")


def chunk_for(chunks: Sequence[int], count: int) -> int | None:
    """The smallest chunk size that holds ``count`` prompt tokens (None: too many)."""
    return next((size for size in sorted(chunks) if count <= size), None)


class Span:
    """How many cache slots attention reads now; shared by a cache's bucket layers. Read when
    a step is compiled or captured (each step has its own), and at every eager call."""

    def __init__(self, length: int) -> None:
        self.length = length


class BucketLayer(StaticLayer):  # type: ignore[no-untyped-call]
    """A static layer that returns (and masks) only the first ``span.length`` slots."""

    def __init__(self, max_cache_len: int, span: Span) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.span = span

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        n = self.span.length
        return keys[:, :, :n], values[:, :, :n]  # [B, KV, span, D] views, no copy

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.span.length, 0


def bucketable(config: Any) -> bool:
    """Whether every layer of the model attends over its whole past (no sliding windows, no
    linear attention): the layers a :class:`BucketedCache` holds."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") \
        else config
    types, _ = get_layer_types_and_kwargs(text)
    return all(kind == "full_attention" for kind in types)


class BucketedCache(Cache):
    """A static cache of :class:`BucketLayer` (one per model layer, full attention only; see
    :func:`bucketable`), allocated at once so captured steps see fixed addresses."""

    def __init__(self, layers: int, max_cache_len: int, *, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.span = Span(max_cache_len)
        self.bucket_layers = [BucketLayer(max_cache_len, self.span) for _ in range(layers)]
        super().__init__(layers=[*self.bucket_layers])
        self.device = device
        self.early_initialization(1, kv_heads, head_dim, dtype, device)

    def position(self) -> Tensor:
        """The number of tokens held, as the 0-d device tensor the model reads."""
        return self.bucket_layers[0].cumulative_length

    def advance(self, count: Tensor) -> None:
        """Move every layer's length by ``count`` (a 0-d tensor, may be negative)."""
        for layer in self.bucket_layers:
            layer.cumulative_length.add_(count)

    def rewind(self, length: int) -> None:
        """Set every layer's length (slots past it are rewritten before they are read)."""
        for layer in self.bucket_layers:
            layer.cumulative_length.fill_(length)


# ----- attention ---------------------------------------------------------------------------

#: The attention implementation the fast path installs on the model (see gqa_attention).
GQA_ATTENTION = "rolechat_gqa"


def gqa_attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention for one decoded token over a static cache without copying the keys.

    SDPA with a mask needs as many key/value heads as query heads, so transformers repeats them
    (``repeat_kv``): with a static cache that copies the whole cache, 8x for Qwen2.5-3B, every
    layer and every token — more bytes than the weights at long contexts. Here the query heads
    are grouped by the key/value head they share, so K and V are read once (on an H200 this took
    Qwen2.5-3B's shape from 150 to 217 tokens/s; SDPA on the grouped query with an expanded mask
    fell to its slow path, 58 tokens/s). Prompts (more than one query token) go to
    transformers' SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    q = query.reshape(batch, kv_heads, groups, dim)  # [B, KV, G, D]
    scores = q @ key.transpose(-1, -2)  # [B, KV, G, L]
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # [B, 1, 1, L]: bool (True = attend) or additive
        mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, length)
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    probs = scores.float().softmax(-1).to(value.dtype)
    out = probs @ value  # [B, KV, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None  # [B, 1, H, D]


def use_gqa_attention(model: Any) -> None:
    """Install :func:`gqa_attention` on ``model`` (prompts still go to SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)


# ----- steps -------------------------------------------------------------------------------

class FastPath:
    """The steps of one engine's static-cache path, made on first use per (tokens, bucket).

    ``made`` lists the (tokens, bucket) of every step in the order they were made, and ``runs``
    counts each step's calls (tokens 1 is decode), so tests and benchmarks see which buckets a
    conversation used."""

    def __init__(self, model: Any, cache: Callable[[], BucketedCache], *, context_length: int,
                 capture: str, min_bucket: int = MIN_BUCKET,
                 chunks: Sequence[int] = CHUNKS, cache_arg: str = "cache") -> None:
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture mode {capture!r}")
        self.model = model
        self._cache = cache
        self.capture = capture
        self.buckets = bucket_sizes(context_length, min_bucket)
        self.chunks = tuple(sorted(chunks))
        self._cache_arg = cache_arg
        self._steps: dict[tuple[int, int], Step] = {}
        self.made: list[tuple[int, int]] = []
        self.runs: Counter[tuple[int, int]] = Counter()
        #: Where the "making a step" lines go.
        self.progress: Callable[[str], None] = log.info

    @property
    def cache(self) -> BucketedCache:
        return self._cache()

    # ----- what the engine calls ---------------------------------------------------------
    def prompt(self, new: list[int], start: int) -> Tensor:
        """Evaluate ``new`` after the cache's first ``start`` tokens; the last logits [V]. A
        few tokens go through a padded chunk step, more run eagerly over their bucket."""
        cache, device = self.cache, self.cache.device
        size = chunk_for(self.chunks, len(new))
        if size is not None and start + size <= self.buckets[-1]:
            tokens = torch.tensor([new + [0] * (size - len(new))], device=device)  # [1, size]
            count = torch.tensor(len(new), device=device)
            return self._run(size, start + size, tokens, count)[0, -1]
        cache.span.length = bucket_for(self.buckets, start + len(new))
        out = self.model(input_ids=torch.tensor([new], device=device), use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: cache})
        logits: Tensor = out.logits[0, -1]  # [V]
        return logits

    def decode(self, token: Tensor, position: int) -> Tensor:
        """Evaluate one token (0-d tensor) at ``position``; the next logits [V]."""
        return self._run(1, position + 1, token.view(1, 1), None)[0, -1]

    # ----- steps -------------------------------------------------------------------------
    def _run(self, size: int, end: int, tokens: Tensor, count: Tensor | None) -> Tensor:
        key = (size, bucket_for(self.buckets, end))
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._make(*key)
            self.made.append(key)
        self.runs[key] += 1
        return step(tokens, count)

    def _forward(self, tokens: Tensor, count: Tensor | None) -> Tensor:
        """One step over the cache's current bucket: ``tokens`` [1, T] written from the current
        position on. For a chunk (T > 1) only the first ``count`` are real: the logits are
        the last real token's and the length advances by ``count`` (the padding's slots lie
        past it and are rewritten before they are read)."""
        cache = self.cache
        size, span = tokens.shape[1], cache.span.length
        # Causal over the bucket: position p sees slot j if j <= p.
        positions = cache.position() + torch.arange(size, device=tokens.device)  # [T]
        slots = torch.arange(span, device=tokens.device)  # [span]
        mask = (slots[None, :] <= positions[:, None]).view(1, 1, size, span)
        keep = 1 if count is None else (count - 1).view(1)
        logits: Tensor = self.model(input_ids=tokens, attention_mask=mask, use_cache=True,
                                    logits_to_keep=keep, **{self._cache_arg: cache}).logits
        if count is not None:
            cache.advance(count - size)
        return logits  # [1, 1, V]

    def _make(self, size: int, bucket: int) -> Step:
        what = ("the decode step" if size == 1 else f"the {size}-token prompt step") + \
            f" for KV bucket {bucket:,}"
        compiled = self.capture == "compile" and size == 1
        how = ("compiling and capturing" if compiled else
               "preparing" if self.capture == "off" else "capturing")
        self.progress(f"{how} {what} (once per bucket)...")
        started = time.perf_counter()
        if self.capture == "off":
            step = self._eager(bucket)
        else:
            try:
                step = self._captured(size, bucket, compiled)
            except RuntimeError as exc:  # e.g. a host sync inside the capture
                log.warning("could not capture %s (%s: %s); it runs eagerly", what,
                            type(exc).__name__, str(exc)[:200])
                step = self._eager(bucket)
        self.progress(f"{what} ready in {time.perf_counter() - started:.1f} s")
        return step

    def _eager(self, bucket: int) -> Step:
        def run(tokens: Tensor, count: Tensor | None) -> Tensor:
            self.cache.span.length = bucket
            return self._forward(tokens, count)
        return run

    def _captured(self, size: int, bucket: int, compiled: bool) -> Step:
        """Warm the step up at the current position (off the capture stream), rewind the
        cache, and capture it in a CUDA graph: a call copies its inputs in and replays it. The
        cache's keys, values and lengths have fixed addresses, so a replay reads and advances
        the current position. The warm-ups write only slots past the current position."""
        cache = self.cache
        held = int(cache.position())
        cache.span.length = bucket  # read while compiling/capturing: fixed in this step
        forward: Step = self._forward
        if compiled:
            _compile_settings()
            forward = torch.compile(self._forward, dynamic=False, fullgraph=False)
        device = cache.device
        tokens = torch.zeros((1, size), dtype=torch.long, device=device)  # static inputs
        # 0 real tokens: a chunk's warm-up leaves the length as it was
        count = torch.zeros((), dtype=torch.long, device=device) if size > 1 else None
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUPS):
                    forward(tokens, count)
                    cache.rewind(held)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = forward(tokens, count)  # recorded, not run: the cache is untouched
        finally:
            torch.cuda.synchronize()
            cache.rewind(held)

        def replay(new_tokens: Tensor, new_count: Tensor | None) -> Tensor:
            tokens.copy_(new_tokens)
            if count is not None and new_count is not None:
                count.copy_(new_count)
            graph.replay()
            return logits
        return replay


def _compile_settings() -> None:
    """One compiled entry per decode bucket (the default limit, 8, is below a 32k context's
    seven buckets plus graph breaks), and compiled artifacts kept in the rolechat home
    (``torch-compile/``) so a later start reads them instead of compiling — unless
    ``$TORCHINDUCTOR_CACHE_DIR`` names another folder than torch's default (which torch
    writes into the environment itself when transformers imports it)."""
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..paths import home_dir

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is None or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(home_dir("torch-compile"))
