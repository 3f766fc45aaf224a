"""GGUF reading and numpy dequantization: hand-built blocks, gguf's own dequantizer, metadata, errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.convert.gguf_model import (
    GGUFFormatError,
    GGUFModel,
    GGUFTensor,
    UnsupportedTensorTypeError,
    dequantize,
    split_blocks,
)
from tests.model_paths import smollm2_gguf
from tests.synthetic_llama_gguf import GGML_TYPES, MIXED_TYPES, TIED_Q8_QWEN2, write_synthetic_gguf


def _fp16_bytes(value: float) -> bytes:
    return np.array([value], np.float16).tobytes()


def _tensor(type_name: str, raw: bytes, shape: tuple[int, ...]) -> GGUFTensor:
    return GGUFTensor("w", type_name, shape, np.frombuffer(raw, np.uint8).reshape(shape[0], -1))


def test_q4_1_block_by_hand() -> None:
    # Weight j is the low nibble of byte j, weight j + 16 the high nibble; w = d * q + m.
    low = np.arange(16, dtype=np.uint8)  # weights 0..15 -> q = 0..15
    high = (15 - np.arange(16)).astype(np.uint8)  # weights 16..31 -> q = 15..0
    raw = _fp16_bytes(0.5) + _fp16_bytes(-2.0) + (low | (high << 4)).tobytes()
    weights = dequantize(_tensor("Q4_1", raw, (1, 32)))
    expected = np.concatenate([0.5 * np.arange(16) - 2.0, 0.5 * (15 - np.arange(16)) - 2.0])
    np.testing.assert_array_equal(weights[0], expected.astype(np.float32))


def test_q4_0_block_by_hand() -> None:
    packed = np.full(16, 0x3C, np.uint8)  # low nibble 12, high nibble 3
    raw = _fp16_bytes(0.25) + packed.tobytes()
    weights = dequantize(_tensor("Q4_0", raw, (1, 32)))
    np.testing.assert_array_equal(weights[0, :16], np.full(16, 0.25 * (12 - 8), np.float32))
    np.testing.assert_array_equal(weights[0, 16:], np.full(16, 0.25 * (3 - 8), np.float32))


def test_q8_0_blocks_by_hand() -> None:
    values = np.arange(-16, 16, dtype=np.int8)
    raw = _fp16_bytes(0.125) + values.tobytes() + _fp16_bytes(-1.0) + values[::-1].tobytes()
    weights = dequantize(_tensor("Q8_0", raw, (1, 64)))
    np.testing.assert_array_equal(weights[0, :32], 0.125 * values.astype(np.float32))
    np.testing.assert_array_equal(weights[0, 32:], -1.0 * values[::-1].astype(np.float32))


def test_split_blocks_exposes_q4_1_fields() -> None:
    raw = _fp16_bytes(1.5) + _fp16_bytes(0.75) + bytes([0x21] * 16)
    blocks = split_blocks(_tensor("Q4_1", raw, (1, 32)))
    assert blocks.scales.tolist() == [[1.5]]
    assert blocks.offsets is not None and blocks.offsets.tolist() == [[0.75]]
    assert blocks.values[0, 0, :16].tolist() == [1] * 16
    assert blocks.values[0, 0, 16:].tolist() == [2] * 16


@settings(max_examples=30, deadline=None)
@given(
    type_name=st.sampled_from(["Q8_0", "Q4_0", "Q4_1"]),
    rows=st.integers(1, 5),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_dequantize_matches_gguf(type_name: str, rows: int, n_blocks: int, seed: int) -> None:
    values = np.random.default_rng(seed).standard_normal((rows, 32 * n_blocks)).astype(np.float32) * 3
    qtype = GGML_TYPES[type_name]
    raw = gguf.quants.quantize(values, qtype)
    ours = dequantize(GGUFTensor("w", type_name, values.shape, raw))
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))


def test_synthetic_file_hyper_params_and_types(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_synthetic_gguf(path, TIED_Q8_QWEN2)
    model = GGUFModel(path)
    p = model.params
    assert (p.architecture, p.n_layers, p.hidden, p.n_heads, p.n_kv_heads, p.head_dim, p.ffn, p.vocab_size) == (
        "qwen2",
        2,
        128,
        8,
        2,
        16,
        96,
        300,
    )
    assert p.rope_interleaved is False  # llama.cpp rotates Qwen2 q/k in NeoX (half-split) order
    assert model.optional("output.weight") is None
    assert model.tensor("blk.0.ffn_down.weight").type_name == "Q4_0"
    assert model.tensor("blk.0.attn_q.weight").shape == (128, 128)
    assert model.tensor("blk.0.attn_k.bias").shape == (32,)
    with pytest.raises(GGUFFormatError, match="missing"):
        model.tensor("blk.9.attn_q.weight")


def test_every_tensor_dequantizes_like_gguf(tmp_path: Path) -> None:
    path = tmp_path / "mixed.gguf"
    write_synthetic_gguf(path, MIXED_TYPES)
    model = GGUFModel(path)
    assert set(model.type_counts()) == {"F32", "F16", "Q8_0", "Q4_0", "Q4_1"}
    for stored in model.reader.tensors:
        expected = gguf.quants.dequantize(stored.data, stored.tensor_type).astype(np.float32)
        np.testing.assert_array_equal(model.dequantized(stored.name), expected.reshape(model.tensor(stored.name).shape))


def test_unsupported_type_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "q5.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    values = np.zeros((2, 32), np.float32)
    writer.add_tensor(
        "token_embd.weight",
        gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q5_0),
        raw_dtype=gguf.GGMLQuantizationType.Q5_0,
    )
    for key, value in (
        ("block_count", 1),
        ("embedding_length", 32),
        ("feed_forward_length", 32),
        ("context_length", 8),
        ("attention.head_count", 1),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedTensorTypeError, match="Q5_0"):
        GGUFModel(path)


def test_missing_metadata_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFFormatError, match="llama.embedding_length"):
        GGUFModel(path)


def test_smollm2_file() -> None:
    model = GGUFModel(smollm2_gguf())
    p = model.params
    assert (p.n_layers, p.hidden, p.ffn, p.n_heads, p.n_kv_heads, p.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert (p.vocab_size, p.context_length, p.rope_theta) == (49152, 8192, 100000.0)
    assert p.rope_interleaved and p.rms_eps == pytest.approx(1e-5)
    assert model.type_counts() == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert model.optional("output.weight") is None  # tied to token_embd
    stored = next(t for t in model.reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = gguf.quants.dequantize(stored.data, stored.tensor_type)
    np.testing.assert_array_equal(model.dequantized("blk.0.ffn_down.weight"), expected)
