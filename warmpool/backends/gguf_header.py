"""The few facts of a GGUF file that Ollama's listings show (/api/ps, /api/tags, /api/show `details`):
architecture, parameter count, quantization (file type), context length and layer count.

A small reader of the GGUF header (magic, version, the key/value metadata, the tensor infos) instead of the
`gguf` package: warmpool reads five keys and the tensor shapes, and a runtime dependency for that would be
heavier than the code (tests/test_gguf_header.py checks this reader against the `gguf` package on real
files). Only the header is read, through a memory map, never the weights; results are cached per file
(path, size, mtime). Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from dataclasses import dataclass

MAGIC = b"GGUF"
# Value types (gguf.md "gguf_metadata_value_type") -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp's llama_ftype (general.file_type) by number, named as Ollama's fs/ggml FileType.String() names
# them where Ollama knows the type (4 is Ollama's MXFP4), else as llama.cpp does.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "MXFP4", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}


class GgufError(ValueError):
    """Not a GGUF file warmpool can read (wrong magic, GGUF v1, truncated)."""


@dataclass(frozen=True, slots=True)
class GgufFacts:
    architecture: str  # general.architecture: "llama", "gemma3", ...
    parameter_count: int  # elements of all tensors
    file_type: int | None  # general.file_type
    context_length: int | None  # <arch>.context_length: what the model was trained for
    block_count: int | None  # <arch>.block_count: its layers

    @property
    def quantization(self) -> str:
        return "" if self.file_type is None else FILE_TYPES.get(self.file_type, f"unknown ({self.file_type})")

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count)


def human_number(count: int) -> str:
    """Ollama's format.HumanNumber: "8.0B" is "8B", "268.10M", "512K"."""
    for scale, suffix, decimals in ((1e9, "B", 1), (1e6, "M", 2)):
        if count >= scale:
            number = count / scale
            return f"{number:.0f}{suffix}" if number == math.floor(number) else f"{number:.{decimals}f}{suffix}"
    return f"{count / 1e3:.0f}K" if count >= 1000 else str(count)


def read_facts(path: str) -> GgufFacts:
    """The facts of the GGUF at `path` (cached while its size and mtime stay); OSError or GgufError."""
    st = os.stat(path)
    return _read_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> GgufFacts:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _parse(data)
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise GgufError(f"{path}: truncated or malformed GGUF header ({exc})") from None


def _parse(data: mmap.mmap) -> GgufFacts:
    if data[:4] != MAGIC:
        raise GgufError("not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise GgufError(f"GGUF version {version} is not supported (2 and later are)")
    reader = _Reader(data, 24)
    kv: dict[str, object] = {}
    for _ in range(n_kv):
        key = reader.string()
        kv[key] = reader.value(reader.u32())
    parameters = 0
    for _ in range(n_tensors):
        reader.skip_string()
        dims = struct.unpack_from(f"<{reader.u32()}Q", data, reader.at)
        reader.at += 8 * len(dims) + 4 + 8  # the dims, then the tensor type and its data offset
        parameters += math.prod(dims)
    arch = str(kv.get("general.architecture") or "")
    return GgufFacts(architecture=arch, parameter_count=parameters, file_type=_int(kv.get("general.file_type")),
                     context_length=_int(kv.get(f"{arch}.context_length")),
                     block_count=_int(kv.get(f"{arch}.block_count")))


class _Reader:
    """A cursor over the header; arrays (a tokenizer's 262k strings) are skipped, not decoded."""

    def __init__(self, data: mmap.mmap, at: int) -> None:
        self.data, self.at = data, at

    def u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.data, self.at)
        self.at += 4
        return int(value)

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.at)
        self.at += 8
        return int(value)

    def string(self) -> str:
        length = self.u64()
        raw = self.data[self.at:self.at + length]
        if len(raw) != length:
            raise IndexError("string past the end of the file")
        self.at += length
        return raw.decode()

    def skip_string(self) -> None:
        length = self.u64()  # (`self.at += self.u64()` would add to the offset from before the read)
        self.at += length

    def value(self, kind: int) -> object:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            self._skip_array()
            return None
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GgufError(f"unknown metadata value type {kind}")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def _skip_array(self) -> None:
        kind, count = self.u32(), self.u64()
        if kind == _STRING:
            for _ in range(count):
                self.skip_string()
        elif kind == _ARRAY:
            for _ in range(count):
                self._skip_array()
        elif kind in _SCALARS:
            self.at += struct.calcsize(_SCALARS[kind]) * count
        else:
            raise GgufError(f"unknown metadata value type {kind}")
        if self.at > len(self.data):
            raise IndexError("array past the end of the file")


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
