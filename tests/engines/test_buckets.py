"""The transformers fast path's bucketed static cache (rolechat.engines.buckets) against the plain
path (dynamic cache, eager), on the tiny float32 Llama folder.

On the CPU the fast path runs with ``capture="off"``: the same steps, buckets, padded prompt
chunks and masks as on a GPU, run eagerly. With CUDA the same checks run with the steps
compiled and captured in CUDA graphs (``compile``) and captured without compiling (``graph``).
The smallest bucket is 16 here, so a short conversation crosses several buckets.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rolechat import Chat, InvalidInput, UnknownName
from rolechat.engines.transformers import TransformersEngine

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rolechat.engines.buckets import bucket_for, bucket_sizes, chunk_for  # noqa: E402

CUDA = torch.cuda.is_available()
CAPTURES = [pytest.param("off", id="off"),
            *(pytest.param(mode, id=mode, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))
              for mode in ("compile", "graph"))]
#: Logits may differ in the last bits (a bucket-sized, masked attention against the exact
#: length); a mask or position off by one moves them by ~0.1 on this model.
ATOL = 1e-4


def engines(folder: Path, capture: str, context: int = 256) -> tuple[TransformersEngine,
                                                                       TransformersEngine]:
    """The plain engine and the bucketed one (smallest bucket 16), each on its own model."""
    device = "cpu" if capture == "off" else "cuda"
    plain = TransformersEngine.load(folder, device=device, dtype="float32",
                                    context_length=context, fast_decode=False)
    fast = TransformersEngine.load(folder, device=device, dtype="float32",
                                   context_length=context, fast_decode=True, capture=capture,
                                   min_bucket=16)
    assert fast.fast is not None and fast.fast.buckets == bucket_sizes(context, 16)
    return plain, fast


def decode_runs(fast: TransformersEngine) -> Counter[int]:
    assert fast.fast is not None
    return Counter({bucket: n for (size, bucket), n in fast.fast.runs.items() if size == 1})


def test_bucket_sizes() -> None:
    assert bucket_sizes(128, 16) == (16, 32, 64, 128)
    assert bucket_sizes(32768) == (512, 1024, 2048, 4096, 8192, 16384, 32768)
    assert bucket_sizes(18432)[-2:] == (16384, 18432)
    assert bucket_sizes(300, 512) == (300,)
    sizes = bucket_sizes(128, 16)
    assert [bucket_for(sizes, n) for n in (1, 16, 17, 32, 33, 128)] == [16, 16, 32, 32, 64, 128]
    with pytest.raises(ValueError):
        bucket_for(sizes, 129)
    assert [chunk_for((8, 32, 128), n) for n in (1, 8, 9, 128, 129)] == [8, 8, 32, 128, None]


@pytest.mark.parametrize("capture", CAPTURES)
def test_logits_match_the_plain_path_in_every_bucket(tiny_folder: Path, capture: str) -> None:
    plain, fast = engines(tiny_folder, capture)
    assert fast.fast is not None
    steps: list[tuple[Any, Any]] = []

    def both(call: str, *args: Any) -> Any:
        a, b = getattr(plain.adapter, call)(*args), getattr(fast.adapter, call)(*args)
        steps.append((a, b))
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        return a.argmax()

    def decode(token: Any, n: int) -> None:
        for _ in range(n):
            token = both("decode_one", token)

    # A 10-token prompt (a padded 32-token chunk), then 60 greedy tokens: positions 10..69
    # decode in buckets 16, 32, 64 and 128.
    ids = fast.tokenize("The quick brown fox jumps over the lazy dog again", special=False)
    assert len(ids) == 10
    decode(both("prompt", ids, 0), 60)
    assert decode_runs(fast) == {16: 6, 32: 16, 64: 32, 128: 6}
    assert fast.fast.made[:2] == [(32, 32), (1, 16)]

    # The next turn keeps 40 tokens (keep(n) on the static cache) and adds 20: a 32-token chunk
    # in bucket 128 (positions 40..71); then 10 tokens decode in buckets 64 and 128.
    held = [int(t) for t in fast.adapter.kv.ids]
    assert held == [int(t) for t in plain.adapter.kv.ids]
    for engine in (plain, fast):
        engine.adapter.kv.keep(40)
    more = fast.tokenize(" and then it ran all the way home to sleep in the warm barn, tired "
                         "and happy, until the morning sun came up over the hills", special=False)
    more = more[:20]
    assert len(more) == 20
    decode(both("prompt", [*held[:40], *more], 40), 10)
    assert fast.fast.runs[(32, 128)] == 1

    # A prompt longer than the largest chunk runs eagerly over its bucket (256).
    for engine in (plain, fast):
        engine.adapter.kv.keep(20)
    long = (more * 8)[:150]
    decode(both("prompt", [*held[:20], *long], 20), 5)
    assert decode_runs(fast) == {16: 6, 32: 16, 64: 32 + 4, 128: 6 + 6, 256: 5}
    assert [int(t) for t in fast.adapter.kv.ids] == [int(t) for t in plain.adapter.kv.ids]
    # And from an empty cache (keep(0)): SDPA's own causal mask over bucket 256.
    for engine in (plain, fast):
        engine.adapter.kv.keep(0)
    decode(both("prompt", long, 0), 3)
    assert int(fast.adapter.kv.cache.position()) == len(fast.adapter.kv.held)
    # Greedy tokens, step by step, are the plain path's.
    assert [int(b.argmax()) for _, b in steps] == [int(a.argmax()) for a, _ in steps]


def expected_decode(replies: list[Any], sizes: tuple[int, ...]) -> Counter[int]:
    """Decode steps per bucket: a reply of G tokens after a P-token prompt evaluates its
    first G - 1 tokens one at a time, at positions P .. P + G - 2."""
    runs: Counter[int] = Counter()
    for reply in replies:
        start = reply.usage.prompt_tokens
        for position in range(start, start + reply.usage.generated_tokens - 1):
            runs[bucket_for(sizes, position + 1)] += 1
    return runs


@pytest.mark.parametrize("capture", CAPTURES)
def test_chat_replies_match_the_plain_path(tiny_folder: Path, capture: str) -> None:
    """Greedy replies over several turns, with the cache reused (cropped with keep(n)), another
    conversation in between and the first one restored from its snapshot in memory."""
    params = {"temperature": 0.0, "max_new_tokens": 40}
    results = []
    plain, fast = engines(tiny_folder, capture)

    def send(chat: Chat, text: str) -> Any:
        """A reply, and the engine's idle work after it (its re-evaluation as a prompt): both
        engines then reuse the same tokens."""
        reply = chat.send(text)
        chat.engine.flush()  # type: ignore[attr-defined]
        return reply

    for engine in (plain, fast):
        first = Chat(engine, system="Be brief.", params=params)
        replies = [send(first, "hi"), send(first, "and again")]
        replies.append(send(Chat(engine, system="Another one.", params=params), "other"))
        replies.append(send(first, "back to the first"))
        results.append(([r.text for r in replies],
                         [(r.usage.prompt_tokens, r.usage.cached_tokens,
                           r.usage.generated_tokens, r.usage.kv_source) for r in replies],
                         [int(t) for t in engine.adapter.kv.ids]))
        if engine is fast:
            assert fast.fast is not None
            assert decode_runs(fast) == expected_decode(replies, fast.fast.buckets)
            assert set(decode_runs(fast)) >= {32, 64, 128}  # crossed 16→32→64→128(→256)
            assert any(size > 1 for size, _ in fast.fast.made)  # prompts ran as chunk steps
    assert results[0] == results[1]
    usages = results[1][1]
    assert usages[1][1] > usages[0][0]  # the second turn reused the first
    assert usages[3][3] == "ram" and usages[3][1] > usages[1][0]  # restored from a snapshot


def test_snapshot_restore_on_the_bucketed_cache(tiny_folder: Path) -> None:
    plain, fast = engines(tiny_folder, "off")
    ids = fast.tokenize("The quick brown fox jumps over the lazy dog again and again and "
                        "again", special=False)
    for engine in (plain, fast):
        engine.adapter.prompt(ids, 0)
    snapshot = fast.adapter.kv.snapshot()
    assert snapshot is not None and len(snapshot) == len(ids)
    fast.adapter.kv.reset()
    assert int(fast.adapter.kv.cache.position()) == 0
    fast.adapter.kv.restore(snapshot, len(ids) - 3)
    plain.adapter.kv.keep(len(ids) - 3)
    assert int(fast.adapter.kv.cache.position()) == len(ids) - 3
    a, b = plain.adapter.prompt(ids, len(ids) - 3), fast.adapter.prompt(ids, len(ids) - 3)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    token = a.argmax()
    for _ in range(20):  # across bucket 16 -> 32
        a, b = plain.adapter.decode_one(token), fast.adapter.decode_one(token)
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        token = a.argmax()


def test_progress_lines_and_the_capture_option(tiny_folder: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, fast = engines(tiny_folder, "off", context=64)
    assert fast.fast is not None
    assert fast.describe()["capture"] == "off"
    lines: list[str] = []
    fast.fast.progress = lines.append
    Chat(fast, system="Be brief.", params={"temperature": 0.0, "max_new_tokens": 4}).send("hi")
    assert any("decode step for KV bucket" in line for line in lines)
    assert any("ready in" in line for line in lines)

    with pytest.raises(UnknownName, match="Valid capture modes: compile, graph, off"):
        TransformersEngine(fast.hf_model, fast.tokenizer, fast_decode=True, capture="fast")
    if not CUDA:
        with pytest.raises(InvalidInput, match="CUDA"):
            TransformersEngine(fast.hf_model, fast.tokenizer, fast_decode=True, capture="graph")
        monkeypatch.setenv("ROLECHAT_CAPTURE", "off")
        engine = TransformersEngine(fast.hf_model, fast.tokenizer, fast_decode=True)
        assert engine.fast is not None and engine.fast.capture == "off"


def test_sliding_window_models_stay_on_the_plain_path(tiny_folder: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    _, fast = engines(tiny_folder, "off", context=64)
    config = MistralConfig(vocab_size=len(fast.tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, sliding_window=32)
    model = MistralForCausalLM(config)
    assert TransformersEngine(model, fast.tokenizer).fast_decode is False
    with pytest.raises(InvalidInput, match="full attention"):
        TransformersEngine(model, fast.tokenizer, fast_decode=True, capture="off")


def test_steps_read_nothing_back_to_the_host(tiny_folder: Path) -> None:
    """A step must not wait for the device (``.item()``, ``if tensor:``): that is what lets a
    CUDA graph capture it. Checked on the eager steps, op by op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncs = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
             torch.ops.aten.nonzero.default)

    class Watch(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            self.ops.append(str(func))
            assert func not in syncs, f"{func} reads a tensor back to the host"
            return func(*args, **(kwargs or {}))

    _, fast = engines(tiny_folder, "off", context=64)
    assert fast.fast is not None
    ids = fast.tokenize("The quick brown fox jumps over the lazy dog again", special=False)
    token = fast.adapter.prompt(ids, 0).argmax()
    fast.adapter.decode_one(token)
    decode, chunk = fast.fast._steps[(1, 16)], fast.fast._steps[(32, 32)]
    with torch.no_grad(), Watch() as watch:
        decode(token.view(1, 1), None)
        chunk(torch.zeros((1, 32), dtype=torch.long), torch.tensor(3))
    assert len(watch.ops) > 100  # it saw the model's ops
