"""Write small random Llama-family GGUF files (any mix of F32/F16/Q8_0/Q4_0/Q4_1) for converter and runner tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

GGML_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
}
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class SyntheticLlama:
    """Shape and tensor types of a random model; ``types`` maps tensor names to GGML types (default Q4_1)."""

    architecture: str = "llama"
    n_layers: int = 2
    hidden: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 96
    vocab: int = 300
    context: int = 256
    rope_theta: float = 10000.0
    tied: bool = False
    qkv_bias: bool = False
    types: Mapping[str, str] = field(default_factory=dict)
    default_type: str = "Q4_1"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """Every 2-D weight as (out_features, in_features)."""
        kv = self.n_kv_heads * self.head_dim
        per_layer = {
            "attn_q": (self.hidden, self.hidden),
            "attn_k": (kv, self.hidden),
            "attn_v": (kv, self.hidden),
            "attn_output": (self.hidden, self.hidden),
            "ffn_gate": (self.ffn, self.hidden),
            "ffn_up": (self.ffn, self.hidden),
            "ffn_down": (self.hidden, self.ffn),
        }
        shapes = {"token_embd.weight": (self.vocab, self.hidden)}
        if not self.tied:
            shapes["output.weight"] = (self.vocab, self.hidden)
        for layer in range(self.n_layers):
            for name, shape in per_layer.items():
                shapes[f"blk.{layer}.{name}.weight"] = shape
        return shapes


def _encode(values: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), GGML_TYPES[type_name])


def write_synthetic_gguf(path: Path, spec: SyntheticLlama, seed: int = 0) -> None:
    """Write a random model with ``spec``'s shapes and types to ``path``."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch=spec.architecture)
    writer.add_block_count(spec.n_layers)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, (rows, cols) in spec.matrix_shapes().items():
        scale = 1.0 if name == "token_embd.weight" else 1.5 / np.sqrt(cols)
        values = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(scale)
        type_name = spec.types.get(name, spec.default_type)
        encoded = _encode(values, type_name)
        writer.add_tensor(
            name, encoded, raw_dtype=GGML_TYPES[type_name] if type_name in ("Q8_0", "Q4_0", "Q4_1") else None
        )
    kv = spec.n_kv_heads * spec.head_dim
    for layer in range(spec.n_layers):
        for norm in ("attn_norm", "ffn_norm"):
            weight = 1.0 + 0.1 * rng.standard_normal(spec.hidden)
            writer.add_tensor(f"blk.{layer}.{norm}.weight", weight.astype(np.float32))
        if spec.qkv_bias:
            for name, width in (("attn_q", spec.hidden), ("attn_k", kv), ("attn_v", kv)):
                writer.add_tensor(f"blk.{layer}.{name}.bias", (0.2 * rng.standard_normal(width)).astype(np.float32))
    writer.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(spec.hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


MIXED_TYPES = SyntheticLlama(
    qkv_bias=True,
    types={
        "token_embd.weight": "Q4_1",
        "output.weight": "Q4_0",
        "blk.0.attn_q.weight": "F32",
        "blk.0.attn_k.weight": "F16",
        "blk.0.attn_v.weight": "Q8_0",
        "blk.0.attn_output.weight": "Q4_0",
        "blk.0.ffn_gate.weight": "Q4_1",
        "blk.0.ffn_up.weight": "Q4_1",
        "blk.0.ffn_down.weight": "Q8_0",
        "blk.1.attn_output.weight": "F16",
        "blk.1.ffn_gate.weight": "Q8_0",
        "blk.1.ffn_up.weight": "Q4_0",
    },
)
"""Untied Q4_0 output, Q4_1 embedding, q/k/v biases, every type, fused and unfused projections."""

TIED_Q8_QWEN2 = SyntheticLlama(
    architecture="qwen2",
    tied=True,
    qkv_bias=True,
    n_heads=8,
    n_kv_heads=2,
    hidden=128,
    default_type="Q8_0",
    types={"token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_0", "blk.1.attn_q.weight": "Q4_1"},
)
"""Tied Q8_0 embedding, mostly Q8_0 weights, half-split (NeoX) RoPE, head_dim 16 with 4 queries per KV head."""

FLOAT_TYPES = SyntheticLlama(
    default_type="F16",
    types={"token_embd.weight": "F32", "output.weight": "F32", "blk.1.attn_q.weight": "F32"},
)
"""F16/F32 only: plain MatMul and Gather."""

SYNTHETIC_MODELS = {"mixed": MIXED_TYPES, "tied_q8_qwen2": TIED_Q8_QWEN2, "float": FLOAT_TYPES}
