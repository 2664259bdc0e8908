"""warmpool's GGUF header reader against the `gguf` package (llama.cpp's own reader) on real files: the demo
model and a synthetic llama written by `gguf`'s writer; and what it does with files that are not GGUF."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.synthetic_gguf import write_synthetic_gguf
from warmpool.backends.gguf_header import FILE_TYPES, GgufError, human_number, read_facts


def reference(path: str) -> dict[str, object]:
    """The same facts, read with the `gguf` package."""
    reader = gguf.GGUFReader(path)

    def value(key: str) -> object:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = str(value("general.architecture"))
    return {"architecture": arch, "parameter_count": sum(int(t.n_elements) for t in reader.tensors),
            "file_type": value("general.file_type"), "context_length": value(f"{arch}.context_length"),
            "block_count": value(f"{arch}.block_count")}


def test_the_demo_model_reads_as_gguf_reads_it(gguf_path: str) -> None:
    facts, expected = read_facts(gguf_path), reference(gguf_path)  # (gguf's reader takes ~20 s on its vocabulary)
    assert {k: getattr(facts, k) for k in expected} == expected
    assert (facts.architecture, facts.quantization, facts.parameter_size) == ("gemma3", "Q4_K_M", "268.10M")


def test_a_file_written_by_gguf_reads_back(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "synthetic.gguf", 3_000_000)
    facts, expected = read_facts(str(path)), reference(str(path))
    assert {k: getattr(facts, k) for k in expected} == expected
    assert (facts.architecture, facts.quantization, facts.context_length) == ("llama", "F16", 4096)


def test_every_value_type_is_skipped_correctly(tmp_path: Path) -> None:
    """Metadata of every type, arrays of strings and of arrays included, before the keys that matter."""
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("a.u8", 7)
    writer.add_int16("a.i16", -3)
    writer.add_float64("a.f64", 1.5)
    writer.add_bool("a.bool", True)
    writer.add_array("a.strings", ["x", "yz", ""])
    writer.add_array("a.nested", [[1, 2], [3]])
    writer.add_uint64("a.u64", 2**40)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(8192)
    writer.add_block_count(2)
    writer.add_tensor("t0", np.zeros((3, 5), dtype=np.float32))
    writer.add_tensor("t1", np.zeros((7,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    facts = read_facts(str(path))
    assert (facts.parameter_count, facts.quantization, facts.context_length, facts.block_count) == (22, "Q8_0", 8192, 2)


@pytest.mark.parametrize("content", [b"", b"GGML" + bytes(40), b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
                                     b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + b"\x05"],
                         ids=["empty", "bad-magic", "version-1", "truncated"])
def test_what_is_not_gguf_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises((GgufError, ValueError)):
        read_facts(str(path))


@pytest.mark.parametrize(("count", "shown"), [
    (268_098_176, "268.10M"), (8_030_261_248, "8.0B"), (7_000_000_000, "7B"), (137_000_000, "137M"),
    (22_000, "22K"), (999, "999")])
def test_parameter_sizes_read_as_ollama_writes_them(count: int, shown: str) -> None:
    assert human_number(count) == shown  # Ollama's format.HumanNumber


def test_file_type_names_match_llama_cpp() -> None:
    for member in gguf.LlamaFileType:
        name = member.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        if member.value in FILE_TYPES and member.value != 4 and not name.endswith("_GUESSED"):
            assert FILE_TYPES[member.value] == name, member
    assert math.isclose(len(FILE_TYPES), 35, abs_tol=5)
