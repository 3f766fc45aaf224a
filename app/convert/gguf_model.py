"""Read a Llama-family GGUF file: hyper-parameters, tensors, and numpy dequantization.

Supported tensor types are F32, F16, Q8_0, Q4_0 and Q4_1. The quantized types store blocks of
``BLOCK_WEIGHTS`` (32) consecutive weights along a row (the input-feature axis):

- Q8_0 (34 bytes): fp16 scale ``d``, then 32 int8 values; ``w = d * q``.
- Q4_0 (18 bytes): fp16 scale ``d``, then 16 bytes; ``w = d * (q - 8)``.
- Q4_1 (20 bytes): fp16 scale ``d``, fp16 offset ``m``, then 16 bytes; ``w = d * q + m``.

In both 4-bit layouts weight ``j`` (0 <= j < 16) is the low nibble of byte ``j`` and weight ``j + 16`` the
high nibble of the same byte. Shapes here are in numpy order, ``(rows, cols)`` = ``(out_features, in_features)``,
the reverse of GGUF's ``ne`` order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

logger = logging.getLogger(__name__)

BLOCK_WEIGHTS = 32
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
# Architectures whose attention/FFN blocks follow the Llama layout, mapped to whether llama.cpp rotates
# adjacent pairs (True: "normal" RoPE; the converter permuted q/k) or the two halves (False: NeoX RoPE).
ROPE_INTERLEAVED_BY_ARCH = {"llama": True, "mistral": True, "qwen2": False}


class GGUFFormatError(ValueError):
    """The GGUF file lacks a field or tensor the Llama converter needs, or has an unexpected shape."""


class UnsupportedTensorTypeError(ValueError):
    """A tensor uses a GGML type other than ``SUPPORTED_TYPES``."""


@dataclass(frozen=True)
class LlamaHyperParams:
    """Model hyper-parameters read from the GGUF metadata."""

    architecture: str  # "llama", "mistral" or "qwen2"
    n_layers: int  # transformer blocks
    hidden: int  # embedding width
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # width of one head
    ffn: int  # feed-forward inner width
    vocab_size: int  # rows of token_embd
    context_length: int  # trained context, tokens
    rope_theta: float  # RoPE frequency base
    rope_interleaved: bool  # rotate adjacent pairs (True) or halves (False)
    rope_linear_scale: float  # positions are divided by this factor (1.0 = no scaling)
    rms_eps: float  # RMS norm epsilon


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored in the file; ``raw`` is a read-only view of the bytes (or typed values for F32/F16)."""

    name: str
    type_name: str  # one of SUPPORTED_TYPES
    shape: tuple[int, ...]  # numpy order: (out_features, in_features) for matrices
    raw: np.ndarray


@dataclass(frozen=True)
class QuantizedBlocks:
    """The fields of a block-quantized matrix, each indexed [row, block(, weight in block)]."""

    type_name: str  # "Q8_0", "Q4_0" or "Q4_1"
    scales: np.ndarray  # float32 [rows, n_blocks]: d
    offsets: np.ndarray | None  # float32 [rows, n_blocks]: m (Q4_1 only)
    values: np.ndarray  # [rows, n_blocks, 32]: uint8 nibbles 0..15 (Q4_*) or int8 (Q8_0), in weight order


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFFormatError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def read_hyper_params(reader: gguf.GGUFReader) -> LlamaHyperParams:
    """Read the Llama hyper-parameters; raise ``GGUFFormatError`` for missing keys or unknown architectures."""
    arch = str(_field(reader, "general.architecture"))
    if arch not in ROPE_INTERLEAVED_BY_ARCH:
        raise GGUFFormatError(f"expected architecture in {sorted(ROPE_INTERLEAVED_BY_ARCH)}, got {arch!r}")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFFormatError(f"partial rotary is not supported: rope dims {rope_dim}, head dim {head_dim}")
    scaling = str(_field(reader, f"{arch}.rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise GGUFFormatError(f"expected RoPE scaling 'none' or 'linear', got {scaling!r}")
    linear_scale = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    embd = reader.get_tensor(_tensor_index(reader, "token_embd.weight"))
    vocab = int(embd.shape[1])
    return LlamaHyperParams(
        architecture=arch,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=vocab,
        context_length=int(_field(reader, f"{arch}.context_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_interleaved=ROPE_INTERLEAVED_BY_ARCH[arch],
        rope_linear_scale=linear_scale,
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
    )


def _tensor_index(reader: gguf.GGUFReader, name: str) -> int:
    for index, tensor in enumerate(reader.tensors):
        if tensor.name == name:
            return index
    raise GGUFFormatError(f"GGUF tensor {name!r} is missing")


def read_tensors(reader: gguf.GGUFReader) -> dict[str, GGUFTensor]:
    """All tensors by name, without copying or converting their data."""
    tensors: dict[str, GGUFTensor] = {}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if type_name not in SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                f"tensor {tensor.name!r} has type {type_name}; expected one of {SUPPORTED_TYPES}"
            )
        if type_name in QUANTIZED_TYPES and shape[-1] % BLOCK_WEIGHTS:
            raise GGUFFormatError(f"tensor {tensor.name!r} row length {shape[-1]} is not a multiple of 32")
        tensors[tensor.name] = GGUFTensor(tensor.name, type_name, shape, tensor.data)
    return tensors


def split_blocks(tensor: GGUFTensor) -> QuantizedBlocks:
    """Split a Q8_0/Q4_0/Q4_1 matrix into scales, offsets and per-weight values (weight order)."""
    if tensor.type_name not in QUANTIZED_TYPES:
        raise UnsupportedTensorTypeError(f"tensor {tensor.name!r} ({tensor.type_name}) is not block-quantized")
    rows = int(np.prod(tensor.shape[:-1])) if len(tensor.shape) > 1 else 1
    n_blocks = tensor.shape[-1] // BLOCK_WEIGHTS
    blocks = np.ascontiguousarray(tensor.raw).reshape(rows, n_blocks, _BLOCK_BYTES[tensor.type_name])
    scales = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    if tensor.type_name == "Q8_0":
        values = blocks[:, :, 2:].copy().view(np.int8)
        return QuantizedBlocks("Q8_0", scales, None, values)
    offsets = None
    packed = blocks[:, :, 2:]
    if tensor.type_name == "Q4_1":
        offsets = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
        packed = blocks[:, :, 4:]
    values = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return QuantizedBlocks(tensor.type_name, scales, offsets, values)


def dequantize_blocks(blocks: QuantizedBlocks) -> np.ndarray:
    """Float32 weights [rows, n_blocks * 32] from split blocks."""
    values = blocks.values.astype(np.float32)
    scales = blocks.scales[:, :, None]
    if blocks.type_name == "Q8_0":
        weights = scales * values
    elif blocks.type_name == "Q4_0":
        weights = scales * (values - 8.0)
    else:
        assert blocks.offsets is not None
        weights = scales * values + blocks.offsets[:, :, None]
    return weights.reshape(weights.shape[0], -1)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """The tensor as float32 in numpy order; exact (every supported type is representable in fp32)."""
    if tensor.type_name in ("F32", "F16"):
        return np.asarray(tensor.raw, dtype=np.float32).reshape(tensor.shape)
    return dequantize_blocks(split_blocks(tensor)).reshape(tensor.shape)


class GGUFModel:
    """A GGUF file opened for conversion: reader, hyper-parameters and tensors by name."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"expected a GGUF file at {path}")
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.params = read_hyper_params(self.reader)
        self.tensors = read_tensors(self.reader)
        logger.info("Read %s: %s, %d tensors", path.name, self.params.architecture, len(self.tensors))

    def tensor(self, name: str) -> GGUFTensor:
        """The named tensor; raise ``GGUFFormatError`` when absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFFormatError(f"GGUF tensor {name!r} is missing from {self.path.name}") from None

    def optional(self, name: str) -> GGUFTensor | None:
        """The named tensor, or None when the file does not have it."""
        return self.tensors.get(name)

    def dequantized(self, name: str) -> np.ndarray:
        """The named tensor as float32."""
        return dequantize(self.tensor(name))

    def type_counts(self) -> dict[str, int]:
        """How many tensors the file holds of each type."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return counts
