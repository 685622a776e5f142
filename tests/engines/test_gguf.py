"""The GGUF header reader on damaged copies of the embedded model's real header (issue 19,
item 5): every damage is a one-line :class:`ModelLoadError` naming it, never an
``OverflowError``, a ``MemoryError``, a ``RecursionError`` or a long loop."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rolechat import ModelLoadError
from rolechat.engines import load_engine
from rolechat.engines.gguf import MAX_NESTING, read_gguf_info
from rolechat.engines.llama_cpp import embedded_model_path

#: Where the first key's length is: magic (4), version (4), tensor count (8), key count (8).
FIRST_KEY = 24
#: The copies hold the first MiB of the real file: every field read_gguf_info reads, and more.
HEAD = 1 << 20


@pytest.fixture(scope="module")
def head() -> bytes:
    return embedded_model_path().read_bytes()[:HEAD]


def damaged(tmp_path: Path, head: bytes, at: int, data: bytes) -> Path:
    copy = bytearray(head)
    copy[at:at + len(data)] = data
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(copy))
    return path


def value_of(head: bytes, key: bytes) -> int:
    """Where the value type of ``key`` is in the header."""
    at = head.index(key)
    assert struct.unpack_from("<Q", head, at - 8)[0] == len(key)
    return at + len(key)


def test_the_real_header_reads(tmp_path: Path, head: bytes) -> None:
    info = read_gguf_info(damaged(tmp_path, head, 0, b""))
    assert (info.architecture, info.context_length) == ("llama", 8192)


@pytest.mark.parametrize("length", [2**63, 2**40, HEAD])
def test_a_key_longer_than_the_file(tmp_path: Path, head: bytes, length: int) -> None:
    # 2**63 was an OverflowError (file.read), 2**40 a MemoryError.
    path = damaged(tmp_path, head, FIRST_KEY, struct.pack("<Q", length))
    with pytest.raises(ModelLoadError) as raised:
        read_gguf_info(path)
    assert (f"the GGUF header is damaged (a string would need {length:,} bytes, but only "
            f"{HEAD - FIRST_KEY - 8:,} are left in the file)") in str(raised.value)
    assert "Download the file again." in str(raised.value)


def test_a_string_value_longer_than_the_file(tmp_path: Path, head: bytes) -> None:
    at = value_of(head, b"general.architecture")  # type (4), then the string's length
    path = damaged(tmp_path, head, at + 4, struct.pack("<Q", 2**64 - 1))
    with pytest.raises(ModelLoadError, match="a string would need 18,446,744,073,709,551,615"):
        read_gguf_info(path)


@pytest.mark.parametrize("etype, what", [(4, "values"), (8, "items")])
def test_an_array_longer_than_the_file(tmp_path: Path, head: bytes, etype: int,
                                       what: str) -> None:
    at = value_of(head, b"general.languages")  # type (4), element type (4), count (8)
    path = damaged(tmp_path, head, at + 4, struct.pack("<IQ", etype, 2**62))
    with pytest.raises(ModelLoadError, match=f"an array of {2**62:,} {what} would need"):
        read_gguf_info(path)


def test_arrays_nested_without_end(tmp_path: Path, head: bytes) -> None:
    # general.languages becomes an array of arrays of arrays ... deeper than Python's recursion
    # limit (a RecursionError before).
    at = value_of(head, b"general.languages")
    nested = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000
    path = tmp_path / "nested.gguf"
    path.write_bytes(head[:at] + nested + head[at:])
    with pytest.raises(ModelLoadError, match=f"arrays nested more than {MAX_NESTING} deep"):
        read_gguf_info(path)


def test_an_unknown_value_type(tmp_path: Path, head: bytes) -> None:
    at = value_of(head, b"general.architecture")
    with pytest.raises(ModelLoadError, match="unknown GGUF value type 99"):
        read_gguf_info(damaged(tmp_path, head, at, struct.pack("<I", 99)))


def test_a_header_cut_short(tmp_path: Path, head: bytes) -> None:
    at = value_of(head, b"general.architecture")
    path = tmp_path / "short.gguf"
    path.write_bytes(head[:at + 2])
    with pytest.raises(ModelLoadError, match="the file ends in the middle of its header"):
        read_gguf_info(path)


def test_load_engine_says_the_header_is_damaged(tmp_path: Path, head: bytes) -> None:
    path = damaged(tmp_path, head, FIRST_KEY, struct.pack("<Q", 2**63))
    with pytest.raises(ModelLoadError, match="the GGUF header is damaged"):
        load_engine(path)
