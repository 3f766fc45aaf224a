"""A plain numpy fp32 forward pass of a Llama-family GGUF model over its dequantized weights.

It is the fidelity reference for the ONNX graph: every matmul, norm and softmax runs in float32 on weights
dequantized exactly from the GGUF blocks, with no activation quantization. It keeps a simple growing KV cache
so that greedy continuations cost one forward pass per token. Written for clarity, not speed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.convert.gguf_model import GGUFModel, LlamaHyperParams


@dataclass
class ReferenceCache:
    """Keys and values of every layer for the tokens seen so far, each [tokens, n_kv_heads, head_dim]."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[0])


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    normed: np.ndarray = (x / np.sqrt(variance + np.float32(eps))) * weight
    return normed


def _rotate(
    x: np.ndarray, positions: np.ndarray, params: LlamaHyperParams, freq_factors: np.ndarray | None
) -> np.ndarray:
    """Apply RoPE to x [tokens, heads, head_dim] at the given absolute positions."""
    half = params.head_dim // 2
    inv_freq = params.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / params.head_dim)
    if freq_factors is not None:  # Llama 3 "rope_freqs": llama.cpp divides each frequency by its factor
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    angles = (positions.astype(np.float64)[:, None] / params.rope_linear_scale) * inv_freq[None, :]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    if params.rope_interleaved:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = x[..., :half], x[..., half:]
    rotated_first = first * cos - second * sin
    rotated_second = first * sin + second * cos
    out = np.empty_like(x)
    if params.rope_interleaved:
        out[..., 0::2], out[..., 1::2] = rotated_first, rotated_second
    else:
        out[..., :half], out[..., half:] = rotated_first, rotated_second
    return out


class ReferenceLlama:
    """fp32 numpy Llama over dequantized GGUF weights."""

    def __init__(self, params: LlamaHyperParams, weights: dict[str, np.ndarray]) -> None:
        self.params = params
        self.weights = weights
        self.output_weight = weights.get("output.weight", weights["token_embd.weight"])

    @classmethod
    def from_gguf(cls, path: Path) -> ReferenceLlama:
        model = GGUFModel(path)
        weights = {name: model.dequantized(name) for name in model.tensors}
        return cls(model.params, weights)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y: np.ndarray = x @ self.weights[f"{name}.weight"].T
        bias = self.weights.get(f"{name}.bias")
        return y if bias is None else y + bias

    def forward(self, token_ids: list[int], cache: ReferenceCache | None = None) -> np.ndarray:
        """Logits [len(token_ids), vocab] for new tokens appended after ``cache`` (which is extended)."""
        p = self.params
        cache = cache if cache is not None else ReferenceCache()
        past = cache.length
        n_new = len(token_ids)
        positions = np.arange(past, past + n_new)
        x = self.weights["token_embd.weight"][np.asarray(token_ids)]
        group = p.n_heads // p.n_kv_heads
        for layer in range(p.n_layers):
            prefix = f"blk.{layer}"
            h = _rms_norm(x, self.weights[f"{prefix}.attn_norm.weight"], p.rms_eps)
            q = self._linear(h, f"{prefix}.attn_q").reshape(n_new, p.n_heads, p.head_dim)
            k = self._linear(h, f"{prefix}.attn_k").reshape(n_new, p.n_kv_heads, p.head_dim)
            v = self._linear(h, f"{prefix}.attn_v").reshape(n_new, p.n_kv_heads, p.head_dim)
            factors = self.weights.get("rope_freqs.weight")
            q, k = _rotate(q, positions, p, factors), _rotate(k, positions, p, factors)
            if len(cache.keys) <= layer:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[layer] = np.concatenate([cache.keys[layer], k])
                cache.values[layer] = np.concatenate([cache.values[layer], v])
            keys = np.repeat(cache.keys[layer], group, axis=1)  # [total, heads, dim]
            values = np.repeat(cache.values[layer], group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, keys) * np.float32(1.0 / float(np.sqrt(p.head_dim)))
            total = keys.shape[0]
            causal = np.arange(total)[None, :] > positions[:, None]
            scores = np.where(causal[None], np.float32(-np.inf), scores)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", probs, values).reshape(n_new, p.n_heads * p.head_dim)
            x = x + self._linear(attn, f"{prefix}.attn_output")
            h = _rms_norm(x, self.weights[f"{prefix}.ffn_norm.weight"], p.rms_eps)
            gate = self._linear(h, f"{prefix}.ffn_gate")
            up = self._linear(h, f"{prefix}.ffn_up")
            silu = gate * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * gate))  # overflow-free
            x = x + self._linear(silu * up, f"{prefix}.ffn_down")
        h = _rms_norm(x, self.weights["output_norm.weight"], p.rms_eps)
        logits: np.ndarray = (h @ self.output_weight.T).astype(np.float32)
        return logits

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        """The ``n_new`` tokens chosen greedily after ``prompt``."""
        cache = ReferenceCache()
        logits = self.forward(prompt, cache)[-1]
        out: list[int] = []
        for _ in range(n_new):
            token = int(np.argmax(logits))
            out.append(token)
            logits = self.forward([token], cache)[-1]
        return out


def use_single_blas_thread() -> None:
    """Make OpenBLAS (numpy's matmul) single-threaded in this process.

    On a loaded 2-core machine OpenBLAS's spinning threads make a 16x576x1536 product ~30x slower. The thread count
    is normally fixed by ``OPENBLAS_NUM_THREADS`` before numpy loads, so set it through the library instead.
    """
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    libraries = {line.split()[-1] for line in maps.read_text().splitlines() if "openblas" in line.lower()}
    for library in libraries:
        handle = ctypes.CDLL(library)
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(handle, symbol, None)
            if setter is not None:
                setter(1)
                break
