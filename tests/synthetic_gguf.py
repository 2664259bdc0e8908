"""Synthetic GGUF files of a chosen size that llama.cpp really loads and runs: for benchmarks where the
size of the weights matters and their values do not.

`write_synthetic_gguf(path, target_bytes)` writes a llama-architecture model whose weights are random
F16 numbers, sized by its width, depth and feed-forward length to land within a few percent of
`target_bytes`. What llama.cpp's llama loader insists on (llama-model.cpp / llama-vocab.cpp):

- the hyperparameters `llama.{context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.layer_norm_rms_epsilon}` (head_count_kv and rope dimensions default);
- a vocabulary: `tokenizer.ggml.model` plus the token list. A SentencePiece ("llama") vocabulary of the
  three specials and the 256 byte tokens is the smallest that tokenizes any text (by byte fallback) and
  has a newline token;
- the tensors `token_embd`, `output_norm` and, per block, `attn_norm`, `attn_{q,k,v,output}`,
  `ffn_norm`, `ffn_{gate,up,down}` (`output` may be left out: the embedding is reused, tied).

The weights are random rather than zero because a virtual disk may store zeros as holes (a zero write
becomes an unmap), and reading a hole costs nothing: a cold read would look faster than the disk. Their
exponent is fixed small so every value is finite and activations stay tame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

ARCH = "llama"
HEAD_DIM = 128
MIN_LAYERS = 4
MAX_EMBD = 4096
FF_MULTIPLE = 64
SPECIALS = ("<unk>", "<s>", "</s>")
VOCAB = [*SPECIALS, *(f"<0x{byte:02X}>" for byte in range(256))]
F16_MASK, F16_EXPONENT = 0x83FF, 0x2000  # keep sign and mantissa; exponent 8, i.e. |w| in [2^-7, 2^-6)


@dataclass(frozen=True, slots=True)
class Shape:
    """The hyperparameters that decide a synthetic model's size."""

    n_embd: int
    n_ff: int
    n_layer: int
    n_vocab: int = len(VOCAB)

    @property
    def n_head(self) -> int:
        return max(1, self.n_embd // HEAD_DIM)

    def tensors(self) -> list[tuple[str, tuple[int, ...], type]]:
        """(name, numpy shape, dtype) in file order; numpy shapes are ggml's reversed."""
        e, ff = self.n_embd, self.n_ff
        specs: list[tuple[str, tuple[int, ...], type]] = [
            ("token_embd.weight", (self.n_vocab, e), np.float16),
            ("output_norm.weight", (e,), np.float32),
        ]
        for i in range(self.n_layer):
            specs += [
                (f"blk.{i}.attn_norm.weight", (e,), np.float32),
                *((f"blk.{i}.attn_{part}.weight", (e, e), np.float16) for part in ("q", "k", "v", "output")),
                (f"blk.{i}.ffn_norm.weight", (e,), np.float32),
                (f"blk.{i}.ffn_gate.weight", (ff, e), np.float16),
                (f"blk.{i}.ffn_up.weight", (ff, e), np.float16),
                (f"blk.{i}.ffn_down.weight", (e, ff), np.float16),
            ]
        return specs


def _layer_bytes(n_embd: int, n_ff: int) -> int:
    return 2 * (4 * n_embd * n_embd + 3 * n_embd * n_ff)


def shape_for(target_bytes: int) -> Shape:
    """The widest model (power-of-two width, feed-forward 4x) with at least MIN_LAYERS blocks in the
    budget, its feed-forward length then stretched so the blocks fill `target_bytes`."""
    n_embd = HEAD_DIM
    while n_embd * 2 <= MAX_EMBD and MIN_LAYERS * _layer_bytes(n_embd * 2, n_embd * 8) <= target_bytes:
        n_embd *= 2
    budget = max(target_bytes - 2 * len(VOCAB) * n_embd, 0)
    n_layer = max(1, budget // _layer_bytes(n_embd, 4 * n_embd))
    per_layer_ff = (budget // n_layer // 2 - 4 * n_embd * n_embd) // (3 * n_embd)
    n_ff = max(FF_MULTIPLE, per_layer_ff // FF_MULTIPLE * FF_MULTIPLE)
    return Shape(n_embd=n_embd, n_ff=n_ff, n_layer=int(n_layer))


def write_synthetic_gguf(path: str | os.PathLike[str], target_bytes: int, *, seed: int = 0) -> Path:
    """Write a loadable llama-architecture GGUF of about `target_bytes` to `path`, fsynced (so its pages
    are clean and `posix_fadvise(DONTNEED)` can drop them), and return the path."""
    path = Path(path)
    shape = shape_for(target_bytes)
    writer = GGUFWriter(path, ARCH)
    _add_metadata(writer, shape)
    specs = shape.tensors()
    for name, dims, dtype in specs:
        writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    # One tensor in memory at a time: a 4 GB model never needs 4 GB of RAM to be written.
    for _, dims, dtype in specs:
        writer.write_tensor_data(_weights(rng, dims) if dtype is np.float16 else np.ones(dims, np.float32))
    assert writer.fout is not None
    writer.flush()
    os.fsync(writer.fout[0].fileno())
    writer.close()
    return path


def _add_metadata(writer: GGUFWriter, shape: Shape) -> None:
    writer.add_name(f"synthetic llama {shape.n_layer}x{shape.n_embd}")
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_context_length(4096)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_scores([0.0] * len(VOCAB))
    writer.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
                           + [TokenType.BYTE] * 256)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _weights(rng: np.random.Generator, dims: tuple[int, ...]) -> np.ndarray:
    """Random finite F16 values of magnitude about 0.01, from random bits (much faster than a normal
    distribution at gigabyte scale)."""
    count = int(np.prod(dims))
    bits = np.frombuffer(rng.bytes(2 * count), dtype=np.uint16).reshape(dims)
    return ((bits & F16_MASK) | F16_EXPONENT).view(np.float16)
