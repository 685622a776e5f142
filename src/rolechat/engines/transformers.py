"""Hugging Face / ModelScope models through transformers — the tutorial's own path.

Contract:
- :meth:`TransformersEngine.load` opens a local model folder (config, safetensors, tokenizer with
  its chat template), a GGUF file (transformers' ``gguf_file`` support), or — only when ``hub``
  is given — a Hugging Face (``hf``) or ModelScope (``modelscope``) id. Device ``auto`` picks
  CUDA when present; dtype ``auto`` takes the checkpoint's. ``TransformersEngine(model,
  tokenizer)`` wraps objects the caller already loaded (the tutorial's ``model_instruct``).
- The same accounting as every engine: streaming, stop at an end-of-turn token, prompt /
  reused / generated tokens, time to first token, tokens/s.
- KV reuse: the engine keeps its cache and the token ids it holds; a new reply crops the cache
  to the longest common prefix and evaluates only the rest (``prefill``).
- Fast decode on CUDA (default there, ``fast_decode=False`` turns it off): a static KV cache
  sized to the context, and the one-token decode step compiled (``torch.compile``, fixed
  shapes) and captured in one CUDA graph that is replayed per token, as in pytorch-labs'
  gpt-fast; decode attention reads the grouped K/V heads in place (:func:`gqa_attention`,
  installed on the model). It yields the same greedy tokens as the plain path (a dynamic
  cache, eager SDPA).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Generator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput, ModelLoadError, UnknownName
from ..params import GenerationParams
from ..template import ChatTemplate, read_template_option
from .base import Completion, Engine, Timer, emit_reply, reply_room

if TYPE_CHECKING:
    import torch
    from torch import Tensor

HUBS = ("hf", "modelscope")
DEFAULT_MAX_CONTEXT = 32768


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
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that gives context for the next piece
        self._read = 0  # ids before this have been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        now = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return str(now[len(before):])
        return ""


def hf_template_and_bos(tokenizer: Any, source: str) -> tuple[ChatTemplate, int | None]:
    """The chat template (``source``, the tokenizer's own when empty) with the tokenizer's
    BOS/EOS text, and the BOS id to put first when the tokenizer adds one itself."""
    template = ChatTemplate(source or getattr(tokenizer, "chat_template", "") or "",
                            bos_token=tokenizer.bos_token or "",
                            eos_token=tokenizer.eos_token or "")
    plain = tokenizer("a", add_special_tokens=False).input_ids
    with_special = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return template, (bos if bos is not None and with_special[:1] == [bos] != plain[:1]
                      else None)


def hf_tokenize(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids of ``text``: control-token text becomes control tokens only if ``special``."""
    return list(tokenizer(text, add_special_tokens=False,
                          split_special_tokens=not special).input_ids)


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None,
           seen: torch.Tensor | None) -> torch.Tensor:
    """One token id (a 0-d tensor, still on the device) from the last position's logits [V]."""
    import torch

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
    import torch

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


def _use_gqa_attention(model: Any) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, chat_template: str | None = None,
                 fast_decode: bool | None = None, name: str | None = None) -> None:
        super().__init__()
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
        source = read_template_option(chat_template) or getattr(tokenizer, "chat_template", "")
        if not source:
            raise ModelLoadError(self.model, "its tokenizer has no chat template",
                                 "Use an instruct/chat model, or pass --chat-template.")
        self.template, self.bos_id = hf_template_and_bos(tokenizer, source)
        self._eog = self._end_of_turn_ids()
        self.fast_decode = (self.device.type == "cuda") if fast_decode is None else fast_decode
        if self.fast_decode and self.device.type != "cuda":
            raise InvalidInput("fast_decode needs a CUDA device.", "Leave it off on the CPU.")
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either version.
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._cache: Any = None
        self._cache_ids: list[int] = []
        self._decode: Callable[[Tensor], Tensor] | None = None
        if self.fast_decode:
            _use_gqa_attention(model)

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

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        return hf_tokenize(self.tokenizer, text, special)

    # ----- the KV cache ------------------------------------------------------------------
    def _new_cache(self) -> Any:
        from transformers import DynamicCache, StaticCache

        if self.fast_decode:
            return StaticCache(config=self.hf_model.config, max_cache_len=self.context_length)
        return DynamicCache(config=self.hf_model.config)

    def prefill(self, prompt_ids: list[int]) -> tuple[int, torch.Tensor]:
        """Crop the cache to the longest common prefix with ``prompt_ids`` (leaving at least one
        token to evaluate), evaluate the rest; return (reused tokens, last logits [V])."""
        torch = self.torch
        if self._cache is None:
            self._cache = self._new_cache()
        limit = min(len(self._cache_ids), len(prompt_ids) - 1)
        keep = 0
        while keep < limit and self._cache_ids[keep] == prompt_ids[keep]:
            keep += 1
        held = len(self._cache_ids)
        if held > keep:
            try:
                self._cache.crop(keep - held)  # a negative count removes that many tokens
            except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
                self._cache.reset()
                keep = 0
        self._cache_ids = list(prompt_ids)
        rest = torch.tensor([prompt_ids[keep:]], device=self.device)  # [1, new tokens]
        out = self.hf_model(input_ids=rest, use_cache=True, logits_to_keep=1,
                            **{self._cache_arg: self._cache})
        return keep, out.logits[0, -1]  # [V]

    def decode_one(self, token: torch.Tensor) -> torch.Tensor:
        """Evaluate one token (0-d tensor on the device); return the next logits [V]."""
        self._cache_ids.append(int(token))
        step = token.view(1, 1)  # [1, 1]
        if self.fast_decode:
            if self._decode is None:
                self._decode = self._capture_decode()
            logits: torch.Tensor = self._decode(step)[0, -1]
            return logits
        return self._step(step)[0, -1]

    def _capture_decode(self) -> Callable[[Tensor], Tensor]:
        """Compile the one-token step (fused kernels, fixed shapes) and capture it in one CUDA
        graph; return a function that replays it. The static cache's keys, values and length
        live at fixed addresses, so each replay reads and advances the current position."""
        torch = self.torch
        step = torch.compile(self._step, dynamic=False, fullgraph=False)
        token = torch.zeros((1, 1), dtype=torch.long, device=self.device)  # static input
        warmups = 3
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up off the capture
            for _ in range(warmups):
                step(token)
        torch.cuda.current_stream().wait_stream(side)
        self._cache.crop(-warmups)  # forget the warm-up tokens (their slots are rewritten)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits: Tensor = step(token)  # recorded, not run: the cache is untouched

        def replay(new_token: Tensor) -> Tensor:
            token.copy_(new_token)
            graph.replay()
            return logits
        return replay

    def _step(self, step: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf_model(input_ids=step, use_cache=True, logits_to_keep=1,
                                             **{self._cache_arg: self._cache}).logits
        return logits  # [1, 1, V]

    def reset_cache(self) -> None:
        """Forget the KV cache (the next reply evaluates its whole prompt). A static cache
        is cleared in place, so a captured decode graph stays valid."""
        if self._cache is not None:
            self._cache.reset()
        self._cache_ids = []

    # ----- generation --------------------------------------------------------------------
    def _generate(self, prompt_ids: list[int],
                  params: GenerationParams) -> Generator[str, None, Completion]:
        max_new = reply_room(len(prompt_ids), self.context_length, params)
        detok = IncrementalDetokenizer(self.tokenizer)
        timer = Timer()
        with self.torch.no_grad():
            try:
                cached, logits = self.prefill(prompt_ids)
                with closing(self._tokens(prompt_ids, logits, params)) as tokens:
                    text, finish = yield from emit_reply(
                        tokens, lambda t: detok.push(t).encode("utf-8"), self._eog, params,
                        max_new, timer)
            except GeneratorExit:  # the caller stopped at a chunk: the cache is consistent
                raise
            except BaseException:  # inside the model (Ctrl-C, out of memory): layers may
                self.reset_cache()  # disagree, so the cache cannot be trusted any more
                raise
        return Completion(text, timer.usage(len(prompt_ids), cached), finish)

    def _tokens(self, prompt_ids: list[int], logits: Tensor,
                params: GenerationParams) -> Generator[int, None, None]:
        """Sample a token, hand it out, and evaluate it only when the next one is wanted."""
        torch = self.torch
        generator = torch.Generator(device=self.device).manual_seed(
            params.seed if params.seed is not None else random.getrandbits(63))
        seen = torch.tensor(prompt_ids, device=self.device)
        while True:
            token = sample(logits, params, generator, seen)
            yield int(token)  # waits for the device: the text must stream now
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, token.view(1)])
            logits = self.decode_one(token)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device),
                "dtype": str(self.hf_model.dtype).removeprefix("torch."),
                "fast_decode": self.fast_decode,
                "trained_context_length": self.trained_context_length}


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
