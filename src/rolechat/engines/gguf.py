"""Read the few GGUF header fields rolechat needs, without loading the model.

Contract: :func:`read_gguf_info` checks that a path is a GGUF file and returns its
architecture, trained context length, quantization, name and size label, reading only the
metadata header up to the vocabulary (milliseconds, even
for large models; the ``gguf`` package parses every tensor and takes seconds). A missing file,
a folder, a file that is not GGUF, or a damaged header raises
:class:`~rolechat.errors.ModelLoadError` naming what is wrong: every length and count is
checked against the bytes left in the file before it is used, so damage is an error at once,
never an overflow or a huge allocation (every entry read uses up bytes, so a damaged count ends
at the end of the file).
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


#: llama.cpp's ``llama_ftype`` (``general.file_type``): how the weights are quantized.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
              16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
              22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
              28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
              37: "TQ2_0", 38: "MXFP4_MOE"}


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    context_length: int | None
    #: The quantization (``general.file_type`` by name; None: not in the header).
    quantization: str | None = None
    #: ``general.name`` and ``general.size_label`` (``"135M"``), where the file says them.
    name: str | None = None
    size_label: str | None = None


#: Arrays nested deeper than this are damage, not data (the spec's arrays hold scalars or
#: strings; llama.cpp writes no arrays of arrays at all).
MAX_NESTING = 8


class _Damaged(Exception):
    """The header contradicts itself or the file's size."""


class _Header:
    """Reads a GGUF header, checking every length against the bytes left in the file, so a
    damaged length is an error at once instead of a huge allocation or a long loop."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def left(self) -> int:
        return self.size - self.f.tell()

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Damaged(f"{what} would need {n:,} bytes, but only {self.left():,} are left "
                           "in the file")

    def read(self, fmt: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise _Damaged("the file ends in the middle of its header")
        value = struct.unpack(fmt, data)[0]
        assert isinstance(value, (int, float, bool))
        return value

    def count(self) -> int:
        value = self.read("<Q")
        assert isinstance(value, int)
        return value

    def string(self) -> str:
        n = self.count()
        self.need(n, "a string")
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> object:
        if vtype in _SCALAR:
            return self.read(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise _Damaged(f"arrays nested more than {MAX_NESTING} deep")
            etype, count = self.read("<I"), self.count()
            assert isinstance(etype, int)
            if etype in _SCALAR:  # skip fixed-size elements in one seek
                width = struct.calcsize(_SCALAR[etype]) * count
                self.need(width, f"an array of {count:,} values")
                self.f.seek(width, 1)
            else:
                self.need(count * 8, f"an array of {count:,} items")  # each at least 8 bytes
                for _ in range(count):
                    self.value(etype, depth + 1)
            return None
        raise _Damaged(f"unknown GGUF value type {vtype}")


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
            header = _Header(f, path.stat().st_size)
            version = header.read("<I")
            if version not in (2, 3):
                raise ModelLoadError(str(path), f"unsupported GGUF version {version}",
                                     "Convert the model with a current llama.cpp.")
            header.count()  # tensor count
            kv_count = header.count()
            fields: dict[str, object] = {}
            for _ in range(kv_count):
                key = header.string()
                arch = fields.get("general.architecture")
                known = isinstance(arch, str) and f"{arch}.context_length" in fields
                if known and key.startswith("tokenizer."):
                    break  # the vocabulary comes next: nothing further is read
                vtype = header.read("<I")
                assert isinstance(vtype, int)
                fields[key] = header.value(vtype)
                if known and "general.file_type" in fields:
                    break
    except _Damaged as exc:
        raise ModelLoadError(str(path), f"the GGUF header is damaged ({exc})",
                             "Download the file again.") from None
    except OSError as exc:
        raise ModelLoadError(str(path), f"cannot read it ({exc.strerror or exc})",
                             "Check the file's permissions.") from None
    arch = fields.get("general.architecture")
    ctx = fields.get(f"{arch}.context_length")
    file_type = fields.get("general.file_type")
    name, label = fields.get("general.name"), fields.get("general.size_label")
    return GGUFInfo(str(arch or "unknown"), int(ctx) if isinstance(ctx, int) else None,
                    FILE_TYPES.get(file_type) if isinstance(file_type, int) else None,
                    name if isinstance(name, str) else None,
                    label if isinstance(label, str) else None)
