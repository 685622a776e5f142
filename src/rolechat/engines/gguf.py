"""Read the few GGUF header fields rolechat needs, without loading the model.

Contract: :func:`read_gguf_info` checks that a path is a GGUF file and returns its
architecture and trained context length, reading only the metadata header (milliseconds, even
for large models; the ``gguf`` package parses every tensor and takes seconds). A missing file,
a folder, or a file that is not GGUF raises :class:`~rolechat.errors.ModelLoadError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ModelLoadError

# value type -> struct format, for fixed-size scalars (GGUF spec, little endian)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    context_length: int | None


def _read(f: BinaryIO, fmt: str) -> object:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    assert isinstance(n, int)
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> object:
    if vtype in _SCALAR:
        return _read(f, _SCALAR[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        assert isinstance(etype, int) and isinstance(count, int)
        if etype in _SCALAR:  # skip fixed-size elements in one seek
            f.seek(struct.calcsize(_SCALAR[etype]) * count, 1)
        else:
            for _ in range(count):
                _value(f, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_info(path: str | Path) -> GGUFInfo:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(str(path), "no such file",
                             "Check the path, or leave --model out to use the embedded model.")
    if not path.is_file():
        raise ModelLoadError(str(path), "not a file",
                             "Pass a .gguf file, or a Hugging Face model folder with --engine "
                             "transformers.")
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(str(path), "not a GGUF file (wrong magic bytes)",
                                     "Pass a .gguf model file.")
            version = _read(f, "<I")
            if version not in (2, 3):
                raise ModelLoadError(str(path), f"unsupported GGUF version {version}",
                                     "Convert the model with a current llama.cpp.")
            _read(f, "<Q")  # tensor count
            kv_count = _read(f, "<Q")
            assert isinstance(kv_count, int)
            fields: dict[str, object] = {}
            for _ in range(kv_count):
                key = _string(f)
                vtype = _read(f, "<I")
                assert isinstance(vtype, int)
                fields[key] = _value(f, vtype)
                arch = fields.get("general.architecture")
                if isinstance(arch, str) and f"{arch}.context_length" in fields:
                    break
    except (EOFError, ValueError, struct.error, OSError) as exc:
        why = str(exc) or "the file ends in the middle of its header"
        raise ModelLoadError(str(path), f"the GGUF header is damaged ({why})",
                             "Download the file again.") from None
    arch = fields.get("general.architecture")
    ctx = fields.get(f"{arch}.context_length")
    return GGUFInfo(str(arch or "unknown"), int(ctx) if isinstance(ctx, int) else None)
