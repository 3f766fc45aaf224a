"""Convert a CTranslate2 Whisper ``model.bin`` (e.g. faster-whisper tiny.en) into two ONNX graphs.

``encoder.onnx``::

    mel [B, n_mels, frames] -> conv1 -> GELU -> conv2 (stride 2) -> GELU -> + positions[:frames/2]
      -> n_layers x (pre-norm self-attention, pre-norm MLP) -> LayerNorm
      -> cross_k, cross_v [n_layers, B, n_heads, frames/2, head_dim]   (every decoder layer's projected K/V)

``decoder.onnx``::

    tokens [B, n], self_k/self_v [n_layers, B, n_heads, past, head_dim], cross_k, cross_v
      -> embeddings + positions[past : past+n]
      -> n_layers x (causal self-attention over past+new, cross-attention, MLP)
      -> LayerNorm(last position) @ embeddings.T -> logits [B, n_vocab]
      -> new_self_k/new_self_v [n_layers, B, n_heads, past+n, head_dim]

Weights are stored float32 ("fp32") or the MatMul weights are then quantized to int8 ("int8").
Only numpy, onnx and onnxruntime.quantization are used; nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx

from app.convert.ct2 import Ct2Model, load_ct2_model
from app.convert.onnx_graph import FLOAT, INT64, MS_DOMAIN, GraphBuilder

logger = logging.getLogger(__name__)

REQUIRED_FILES: Final = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
PRECISIONS: Final = ("fp32", "int8")
LAYER_NORM_EPSILON: Final = 1e-5
MEL_FRAMES_PER_WINDOW: Final = 3000  # 30 s of 10 ms hops
CT2_ACTIVATION_GELU_ERF: Final = 3  # ctranslate2 ActivationType::GELU
MASKED_SCORE: Final = float(np.finfo(np.float32).min)  # added to scores of future positions

ENCODER_FILE: Final = "encoder.onnx"
DECODER_FILE: Final = "decoder.onnx"
TOKENIZER_FILE: Final = "tokenizer.json"


@dataclass(frozen=True)
class WhisperDims:
    """Model sizes read from the weights."""

    n_mels: int  # mel bins of the input features
    n_audio_ctx: int  # encoder positions (frames / 2)
    n_text_ctx: int  # decoder positions
    n_vocab: int  # vocabulary size
    d_model: int  # width of the residual stream
    n_heads: int  # attention heads per layer
    n_layers: int  # layers in the encoder and in the decoder

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class _Weights:
    """float32 views of the CTranslate2 variables, in the layouts the graphs want."""

    def __init__(self, model: Ct2Model) -> None:
        self._model = model

    def raw(self, name: str) -> np.ndarray:
        return np.asarray(self._model.get(name), dtype=np.float32)

    def linear_t(self, prefix: str) -> np.ndarray:
        """A CTranslate2 linear weight [out, in] as the MatMul right operand [in, out]."""
        return np.ascontiguousarray(self.raw(f"{prefix}/weight").T)

    def bias(self, prefix: str) -> np.ndarray:
        return self.raw(f"{prefix}/bias")


def read_dims(model: Ct2Model) -> WhisperDims:
    """Read the sizes and check the architecture flags this converter relies on."""
    if model.spec_name != "WhisperSpec":
        raise ValueError(f"expected a WhisperSpec model.bin, got spec {model.spec_name!r}")
    expected_flags = {
        "decoder/activation": CT2_ACTIVATION_GELU_ERF,
        "decoder/pre_norm": 1,
        "decoder/alibi": 0,
        "decoder/scale_embeddings": 0,
    }
    for name, expected in expected_flags.items():
        if name in model and int(model.get(name)) != expected:
            raise ValueError(f"unsupported Whisper variant: {name} = {int(model.get(name))}, expected {expected}")
    n_encoder_layers = _count_layers(model, "encoder")
    n_decoder_layers = _count_layers(model, "decoder")
    if n_encoder_layers != n_decoder_layers:
        raise ValueError(f"expected as many encoder as decoder layers, got {n_encoder_layers} and {n_decoder_layers}")
    n_heads = int(model.get("encoder/num_heads"))
    if int(model.get("decoder/num_heads")) != n_heads:
        raise ValueError("encoder and decoder head counts differ")
    n_vocab, d_model = model.get("decoder/embeddings/weight").shape
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not a multiple of num_heads {n_heads}")
    return WhisperDims(
        n_mels=int(model.get("encoder/conv1/weight").shape[1]),
        n_audio_ctx=int(model.get("encoder/position_encodings/encodings").shape[0]),
        n_text_ctx=int(model.get("decoder/position_encodings/encodings").shape[0]),
        n_vocab=int(n_vocab),
        d_model=int(d_model),
        n_heads=n_heads,
        n_layers=n_decoder_layers,
    )


def _count_layers(model: Ct2Model, stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in model:
        count += 1
    if count == 0:
        raise ValueError(f"no {stack} layers found in model.bin")
    return count


# --------------------------------------------------------------------------------------------------------------
# shared blocks


def _layer_norm(g: GraphBuilder, x: str, w: _Weights, prefix: str) -> str:
    gamma = g.weight("layer_norm.weight", w.raw(f"{prefix}/gamma"))
    beta = g.weight("layer_norm.bias", w.raw(f"{prefix}/beta"))
    return g.op1("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=LAYER_NORM_EPSILON)


def _linear(g: GraphBuilder, x: str, weight_t: np.ndarray, bias: np.ndarray | None, leaf: str) -> str:
    """``x @ weight_t + bias`` with nodes named ``.../{leaf}/MatMul`` and ``.../{leaf}/Add``."""
    with g.scope(leaf):
        y = g.op1("MatMul", [x, g.weight("weight", weight_t)])
        if bias is not None:
            y = g.op1("Add", [y, g.weight("bias", bias)])
    return y


def _mlp(g: GraphBuilder, x: str, w: _Weights, prefix: str) -> str:
    """pre-norm MLP: ``x + fc2(gelu(fc1(LN(x))))``."""
    with g.scope("mlp"):
        h = _layer_norm(g, x, w, f"{prefix}/ffn/layer_norm")
        h = _linear(g, h, w.linear_t(f"{prefix}/ffn/linear_0"), w.bias(f"{prefix}/ffn/linear_0"), "fc1")
        h = g.op1("Gelu", [h], domain=MS_DOMAIN)
        h = _linear(g, h, w.linear_t(f"{prefix}/ffn/linear_1"), w.bias(f"{prefix}/ffn/linear_1"), "fc2")
    return g.op1("Add", [x, h], name="residual_mlp")


def _split_qkv_weights(w: _Weights, prefix: str, d_model: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacked Q,K,V [3*d, d] -> MatMul weight [d, 3*d] and bias, with 1/sqrt(head_dim) folded into Q.

    The scale is a power of two for every Whisper size (head_dim 64), so folding it is exact.
    """
    scale = 1.0 / float(np.sqrt(head_dim))
    weight = w.raw(f"{prefix}/weight").copy()
    bias = w.raw(f"{prefix}/bias").copy()
    weight[:d_model] *= np.float32(scale)
    bias[:d_model] *= np.float32(scale)
    return np.ascontiguousarray(weight.T), bias


def _heads_to_sequence(g: GraphBuilder, x: str, d_model: int) -> str:
    """[B, N, S, H] -> [B, S, N*H]."""
    x = g.op1("Transpose", [x], perm=[0, 2, 1, 3])
    return g.op1("Reshape", [x, g.const([0, 0, d_model])])


# --------------------------------------------------------------------------------------------------------------
# encoder


def build_encoder(model: Ct2Model, dims: WhisperDims) -> onnx.ModelProto:
    w = _Weights(model)
    g = GraphBuilder("whisper_encoder")
    d, n_heads, head_dim = dims.d_model, dims.n_heads, dims.head_dim
    mel = g.add_input("mel", FLOAT, ["batch", dims.n_mels, "frames"])
    with g.scope("encoder"):
        with g.scope("conv1"):
            x = g.op1("Conv", [mel, g.weight("weight", w.raw("encoder/conv1/weight")),
                               g.weight("bias", w.raw("encoder/conv1/bias"))], pads=[1, 1], kernel_shape=[3])
            x = g.op1("Gelu", [x], domain=MS_DOMAIN)
        with g.scope("conv2"):
            x = g.op1("Conv", [x, g.weight("weight", w.raw("encoder/conv2/weight")),
                               g.weight("bias", w.raw("encoder/conv2/bias"))],
                      pads=[1, 1], strides=[2], kernel_shape=[3])
            x = g.op1("Gelu", [x], domain=MS_DOMAIN)
        x = g.op1("Transpose", [x], perm=[0, 2, 1])  # [B, S, d]
        with g.scope("embed_positions"):
            n_positions = g.op1("Shape", [x], start=1, end=2)
            table = g.weight("weight", w.raw("encoder/position_encodings/encodings"))
            positions = g.op1("Slice", [table, g.const([0]), n_positions, g.const([0])])
            x = g.op1("Add", [x, positions])
        for layer in range(dims.n_layers):
            prefix = f"encoder/layer_{layer}"
            with g.scope(f"layers.{layer}"):
                with g.scope("self_attn"):
                    h = _layer_norm(g, x, w, f"{prefix}/self_attention/layer_norm")
                    qkv_w, qkv_b = _split_qkv_weights(w, f"{prefix}/self_attention/linear_0", d, head_dim)
                    h = _encoder_attention(g, h, qkv_w, qkv_b, n_heads, head_dim, d)
                    h = _linear(g, h, w.linear_t(f"{prefix}/self_attention/linear_1"),
                                w.bias(f"{prefix}/self_attention/linear_1"), "out_proj")
                x = g.op1("Add", [x, h], name="residual_attn")
                x = _mlp(g, x, w, prefix)
        with g.scope("layer_norm"):
            x = _layer_norm(g, x, w, "encoder/layer_norm")
    with g.scope("cross_kv"):
        _cross_kv_outputs(g, x, w, dims)
    return g.build(doc_string="Whisper encoder: mel -> per-layer cross-attention K/V")


def _encoder_attention(
    g: GraphBuilder, h: str, qkv_w: np.ndarray, qkv_b: np.ndarray, n_heads: int, head_dim: int, d: int
) -> str:
    """Bidirectional attention, Q pre-scaled; returns [B, S, d].

    MatMul(qkv) -> Add -> Reshape [B,S,3,N,H] -> Transpose [3,B,N,S,H] -> Split -> q,k,v
    q @ k^T (FusedMatMul transB) -> Softmax -> @ v -> Transpose -> Reshape
    """
    qkv = _linear(g, h, qkv_w, qkv_b, "qkv_proj")
    qkv = g.op1("Reshape", [qkv, g.const([0, 0, 3, n_heads, head_dim])])
    qkv = g.op1("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op1("Squeeze", [part, g.const([0])]) for part in g.op("Split", [qkv], n_outputs=3, axis=0))
    scores = g.op1("FusedMatMul", [q, k], domain=MS_DOMAIN, transB=1, alpha=1.0)
    probs = g.op1("Softmax", [scores], axis=-1)
    context = g.op1("MatMul", [probs, v])
    return _heads_to_sequence(g, context, d)


def _cross_kv_outputs(g: GraphBuilder, x: str, w: _Weights, dims: WhisperDims) -> None:
    """Project the encoder output once for every decoder layer's cross-attention.

    One MatMul [d, 2*L*d] (columns ordered kind, layer, head, dim) -> Reshape [B,S,2,L,N,H]
    -> Transpose [2,L,B,N,S,H] -> Split -> cross_k, cross_v [L,B,N,S,H].
    """
    d, n_layers = dims.d_model, dims.n_layers
    keys, values, key_biases, value_biases = [], [], [], []
    for layer in range(n_layers):
        prefix = f"decoder/layer_{layer}/attention/linear_1"
        weight, bias = w.raw(f"{prefix}/weight"), w.raw(f"{prefix}/bias")
        keys.append(weight[:d])
        values.append(weight[d:])
        key_biases.append(bias[:d])
        value_biases.append(bias[d:])
    weight_t = np.ascontiguousarray(np.concatenate(keys + values, axis=0).T)
    bias = np.concatenate(key_biases + value_biases)
    kv = _linear(g, x, weight_t, bias, "kv_proj")
    kv = g.op1("Reshape", [kv, g.const([0, 0, 2, n_layers, dims.n_heads, dims.head_dim])])
    kv = g.op1("Transpose", [kv], perm=[2, 3, 0, 4, 1, 5])
    k, v = g.op("Split", [kv], n_outputs=2, axis=0)
    g.op("Squeeze", [k, g.const([0])], outputs=["cross_k"])
    g.op("Squeeze", [v, g.const([0])], outputs=["cross_v"])
    cache_shape = [n_layers, "batch", dims.n_heads, "n_audio", dims.head_dim]
    g.add_output("cross_k", FLOAT, cache_shape)
    g.add_output("cross_v", FLOAT, cache_shape)


# --------------------------------------------------------------------------------------------------------------
# decoder


def build_decoder(model: Ct2Model, dims: WhisperDims) -> onnx.ModelProto:
    w = _Weights(model)
    g = GraphBuilder("whisper_decoder")
    d, n_layers, n_heads, head_dim = dims.d_model, dims.n_layers, dims.n_heads, dims.head_dim
    tokens = g.add_input("tokens", INT64, ["batch", "n_tokens"])
    self_shape = [n_layers, "batch", n_heads, "past_len", head_dim]
    cross_shape = [n_layers, "batch", n_heads, "n_audio", head_dim]
    self_k = g.add_input("self_k", FLOAT, self_shape)
    self_v = g.add_input("self_v", FLOAT, self_shape)
    cross_k = g.add_input("cross_k", FLOAT, cross_shape)
    cross_v = g.add_input("cross_v", FLOAT, cross_shape)

    embeddings = w.raw("decoder/embeddings/weight")
    with g.scope("decoder"):
        with g.scope("embed_tokens"):
            table = g.weight("weight", embeddings)
            x = g.op1("Gather", [table, tokens])
        with g.scope("embed_positions"):
            past_len = g.op1("Shape", [self_k], start=3, end=4)
            n_new = g.op1("Shape", [tokens], start=1, end=2)
            total_len = g.op1("Add", [past_len, n_new])
            positions = g.op1("Slice", [g.weight("weight", w.raw("decoder/position_encodings/encodings")),
                                        past_len, total_len, g.const([0])])
            x = g.op1("Add", [x, positions])
        with g.scope("causal_mask"):
            # [n, past+n]: 0 where key position <= past + query row, MASKED_SCORE after it
            mask_shape = g.op1("Concat", [n_new, total_len], axis=0)
            filled = g.op1("ConstantOfShape", [mask_shape],
                           value=onnx.helper.make_tensor("value", FLOAT, [1], [MASKED_SCORE]))
            diagonal = g.op1("Squeeze", [g.op1("Add", [past_len, g.const([1])]), g.const([0])])
            mask = g.op1("Trilu", [filled, diagonal], upper=1)
        new_keys, new_values = [], []
        for layer in range(n_layers):
            prefix = f"decoder/layer_{layer}"
            with g.scope(f"layers.{layer}"):
                layer_index = g.const(layer)
                with g.scope("self_attn"):
                    past_k = g.op1("Gather", [self_k, layer_index], axis=0)
                    past_v = g.op1("Gather", [self_v, layer_index], axis=0)
                    h = _layer_norm(g, x, w, f"{prefix}/self_attention/layer_norm")
                    qkv_w, qkv_b = _split_qkv_weights(w, f"{prefix}/self_attention/linear_0", d, head_dim)
                    h, key, value = _decoder_self_attention(g, h, qkv_w, qkv_b, past_k, past_v, mask, dims)
                    new_keys.append(g.op1("Unsqueeze", [key, g.const([0])]))
                    new_values.append(g.op1("Unsqueeze", [value, g.const([0])]))
                    h = _linear(g, h, w.linear_t(f"{prefix}/self_attention/linear_1"),
                                w.bias(f"{prefix}/self_attention/linear_1"), "out_proj")
                x = g.op1("Add", [x, h], name="residual_self_attn")
                with g.scope("encoder_attn"):
                    h = _layer_norm(g, x, w, f"{prefix}/attention/layer_norm")
                    scale = np.float32(1.0 / float(np.sqrt(head_dim)))
                    q = _linear(g, h, w.linear_t(f"{prefix}/attention/linear_0") * scale,
                                w.bias(f"{prefix}/attention/linear_0") * scale, "q_proj")
                    layer_k = g.op1("Gather", [cross_k, layer_index], axis=0)
                    layer_v = g.op1("Gather", [cross_v, layer_index], axis=0)
                    h = _cross_attention(g, q, layer_k, layer_v, dims)
                    h = _linear(g, h, w.linear_t(f"{prefix}/attention/linear_2"),
                                w.bias(f"{prefix}/attention/linear_2"), "out_proj")
                x = g.op1("Add", [x, h], name="residual_encoder_attn")
                x = _mlp(g, x, w, prefix)
        g.op("Concat", new_keys, axis=0, outputs=["new_self_k"])
        g.op("Concat", new_values, axis=0, outputs=["new_self_v"])
        with g.scope("layer_norm"):
            last = g.op1("Gather", [x, g.const(-1)], axis=1)  # [B, d]
            last = _layer_norm(g, last, w, "decoder/layer_norm")
        with g.scope("lm_head"):
            projection = g.weight("weight", np.ascontiguousarray(w.raw("decoder/projection/weight").T))
            g.op("MatMul", [last, projection], outputs=["logits"])
    g.add_output("logits", FLOAT, ["batch", dims.n_vocab])
    g.add_output("new_self_k", FLOAT, [n_layers, "batch", n_heads, "total_len", head_dim])
    g.add_output("new_self_v", FLOAT, [n_layers, "batch", n_heads, "total_len", head_dim])
    return g.build(doc_string="Whisper decoder step: tokens + caches -> last-position logits + grown self caches")


def _decoder_self_attention(
    g: GraphBuilder,
    h: str,
    qkv_w: np.ndarray,
    qkv_b: np.ndarray,
    past_k: str,
    past_v: str,
    mask: str,
    dims: WhisperDims,
) -> tuple[str, str, str]:
    """Causal attention over past + new positions. Returns (context [B,n,d], keys, values [B,N,past+n,H]).

    MatMul(qkv) -> Add -> Reshape [B,n,3,N,H] -> Transpose [3,B,N,n,H] -> Split -> q, k_new, v_new
    k = Concat(past_k, k_new); v = Concat(past_v, v_new)
    q @ k^T + mask -> Softmax -> @ v -> Transpose -> Reshape
    """
    qkv = _linear(g, h, qkv_w, qkv_b, "qkv_proj")
    qkv = g.op1("Reshape", [qkv, g.const([0, 0, 3, dims.n_heads, dims.head_dim])])
    qkv = g.op1("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    q, k_new, v_new = (g.op1("Squeeze", [part, g.const([0])]) for part in g.op("Split", [qkv], n_outputs=3, axis=0))
    keys = g.op1("Concat", [past_k, k_new], axis=2)
    values = g.op1("Concat", [past_v, v_new], axis=2)
    scores = g.op1("FusedMatMul", [q, keys], domain=MS_DOMAIN, transB=1, alpha=1.0)
    scores = g.op1("Add", [scores, mask])
    probs = g.op1("Softmax", [scores], axis=-1)
    context = g.op1("MatMul", [probs, values])
    return _heads_to_sequence(g, context, dims.d_model), keys, values


def _cross_attention(g: GraphBuilder, q: str, keys: str, values: str, dims: WhisperDims) -> str:
    """q [B,n,d] (pre-scaled) against precomputed keys/values [B,N,S,H]; returns [B,n,d]."""
    q = g.op1("Reshape", [q, g.const([0, 0, dims.n_heads, dims.head_dim])])
    q = g.op1("Transpose", [q], perm=[0, 2, 1, 3])
    scores = g.op1("FusedMatMul", [q, keys], domain=MS_DOMAIN, transB=1, alpha=1.0)
    probs = g.op1("Softmax", [scores], axis=-1)
    context = g.op1("MatMul", [probs, values])
    return _heads_to_sequence(g, context, dims.d_model)
