"""Convert a CTranslate2 Whisper ``model.bin`` (e.g. faster-whisper tiny.en) into two ONNX graphs.

``encoder.onnx``::

    mel [B, n_mels, frames] -> conv1 -> GELU -> conv2 (stride 2) -> GELU -> + positions[:frames/2]
      -> n_layers x (pre-norm self-attention, pre-norm MLP) -> LayerNorm
      -> cross_k, cross_v [n_layers, B, n_heads, frames/2, head_dim]   (every decoder layer's projected K/V)

``decoder.onnx``::

    tokens [B, n], n_logits [1], self_k/self_v [n_layers, B, n_heads, past, head_dim],
    cross_k/cross_v [n_layers, W, n_heads, frames/2, head_dim] (W = B, or W windows of B / W consecutive rows each)
      -> embeddings + positions[past : past+n]
      -> n_layers x (causal self-attention over past+new, cross-attention, MLP)
      -> LayerNorm(last n_logits positions) @ embeddings.T -> logits [B, n_logits, n_vocab]
      -> new_self_k/new_self_v [n_layers, B, n_heads, past+n, head_dim]

Precision "fp32" keeps every weight float32 (the CTranslate2 float16 values, widened exactly). Precision "int8"
makes some weights int8 (see ``INT8_PLAN``): the encoder MLP and cross K/V projections as per-column int8
(com.microsoft DynamicQuantizeMatMul, the op onnxruntime's dynamic quantization fuses to), and the tied
embedding/lm_head as block-wise int8 (MatMulNBits + GatherBlockQuantized, 32 weights per scale).
Only numpy and onnx are used; no torch, no onnxruntime at conversion time.

Performance choices (each checked against CTranslate2 for identical greedy tokens):
- 1/sqrt(head_dim) = 0.125 is folded into the Q weights (exact: a power of two);
- encoder self-attention uses contrib MultiHeadAttention (faster than MatMul/Softmax/MatMul at 1500 positions);
- the decoder layers run as one Scan over the layer axis, so the per-layer slices of the [n_layers, ...]
  cache inputs are views rather than copies (see ``_decoder_layers``);
- the cross-attention takes one row of audio keys and values per window even when a window has several
  consecutive rows (beam search's hypotheses): config ``shared_cross_attention``; with one row per window it is the
  same computation as before;
- only the last ``n_logits`` positions (1 when decoding; a draft's length + 1 when verifying a draft fed in one
  call) go through the final LayerNorm and the vocabulary projection.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx

from app.convert.ct2 import Ct2Model, load_ct2_model
from app.convert.onnx_graph import (
    FLOAT,
    INT8_ACCURACY_LEVEL,
    INT8_BLOCK_SIZE,
    INT64,
    MS_DOMAIN,
    Dim,
    GraphBuilder,
    StackedWeights,
    attend,
    layer_norm,
    linear,
    quantize_int8_blocks,
    split_heads,
)

logger = logging.getLogger(__name__)

REQUIRED_FILES: Final = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
PRECISIONS: Final = ("fp32", "int8")
KNOWN_OPTIONS: Final = frozenset({"precision", "output_rescore_tokens"})
MAX_RESCORE_TOKENS: Final = 1024
LAYER_NORM_EPSILON: Final = 1e-5
CT2_ACTIVATION_GELU_ERF: Final = 3  # ctranslate2 ActivationType::GELU (exact erf)
MULTILINGUAL_MIN_VOCAB: Final = 51865  # the faster-whisper / CTranslate2 rule: .en models have 51864 tokens
MASKED_SCORE: Final = float(np.finfo(np.float32).min)  # added to the scores of future positions

ENCODER_FILE: Final = "encoder.onnx"
DECODER_FILE: Final = "decoder.onnx"
TOKENIZER_FILE: Final = "tokenizer.json"


@dataclass(frozen=True)
class WhisperDims:
    """Model sizes read from the weights."""

    n_mels: int  # mel bins of the input features
    n_audio_ctx: int  # encoder positions (mel frames / 2)
    n_text_ctx: int  # decoder positions
    n_vocab: int  # vocabulary size
    d_model: int  # width of the residual stream
    n_heads: int  # attention heads per layer
    n_layers: int  # layers in the encoder and in the decoder

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class Int8Plan:
    """Which weights are stored int8 (all False = the fp32 graphs)."""

    encoder_mlp: bool = False  # encoder fc1/fc2
    encoder_attention: bool = False  # encoder Q/K/V and output projections (the most sensitive to int8)
    cross_kv: bool = False  # the projection of the encoder output to every decoder layer's cross K/V
    lm_head: bool = False  # the tied output projection (the largest weight, read once per decoded token)
    embeddings: bool = False  # decode the token embedding from the lm_head's int8 table (GatherBlockQuantized)


FP32_PLAN: Final = Int8Plan()
# Chosen by long-form transcription (faster-whisper's algorithm: conditioning on previous text, no temperature
# fallback) of the golden recordings against fp32. int8 encoder attention or decoder layers drifted (~3% of
# words); int8 encoder MLP + cross K/V made the decoder loop on meeting audio (WER 0.6-2.9 on bench_45s and
# meeting_tst00). int8 only in the tied embedding/output projection (the largest weight, read every token)
# stayed close: WER 0.00-0.16 on the short clips, 0.35 on meeting_60s (see docs/benchmarks.md).
# The decoder layers are always fp32 (30 MB; they run inside a Scan whose weights are not constants).
INT8_PLAN: Final = Int8Plan(lm_head=True, embeddings=True)
PLAN_BY_PRECISION: Final = {"fp32": FP32_PLAN, "int8": INT8_PLAN}


class _Weights:
    """float32 copies of CTranslate2 variables (float16 widens exactly)."""

    def __init__(self, model: Ct2Model) -> None:
        self._model = model

    def raw(self, name: str) -> np.ndarray:
        return np.asarray(self._model.get(name), dtype=np.float32)

    def layer_norm(self, g: GraphBuilder, x: str, prefix: str) -> str:
        return layer_norm(g, x, self.raw(f"{prefix}/gamma"), self.raw(f"{prefix}/beta"), LAYER_NORM_EPSILON)

    def linear(self, g: GraphBuilder, x: str, prefix: str, leaf: str, *, int8: bool) -> str:
        return linear(g, x, self.raw(f"{prefix}/weight"), self.raw(f"{prefix}/bias"), leaf, int8=int8)

    def qkv(self, prefix: str, d_model: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Stacked Q,K,V [3d, d] and bias with 1/sqrt(head_dim) folded into the Q rows.

        1/sqrt(64) = 0.125 is a power of two, so folding it changes no bit of the result.
        """
        weight = self.raw(f"{prefix}/weight").copy()
        bias = self.raw(f"{prefix}/bias").copy()
        scale = np.float32(1.0 / float(np.sqrt(head_dim)))
        weight[:d_model] *= scale
        bias[:d_model] *= scale
        return weight, bias


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
        raise ValueError(f"encoder has {n_heads} heads but decoder has {int(model.get('decoder/num_heads'))}")
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


def _mlp(g: GraphBuilder, x: str, w: _Weights, prefix: str, *, int8: bool) -> str:
    """Pre-norm MLP: ``x + fc2(gelu(fc1(LN(x))))``."""
    with g.scope("mlp"):
        h = w.layer_norm(g, x, f"{prefix}/ffn/layer_norm")
        h = w.linear(g, h, f"{prefix}/ffn/linear_0", "fc1", int8=int8)
        h = g.op1("Gelu", [h], domain=MS_DOMAIN)  # exact erf GELU; onnxruntime fuses it with the bias Add
        h = w.linear(g, h, f"{prefix}/ffn/linear_1", "fc2", int8=int8)
    return g.op1("Add", [x, h], name="residual_mlp")


# --------------------------------------------------------------------------------------------------------------
# encoder


def build_encoder(model: Ct2Model, dims: WhisperDims, plan: Int8Plan = FP32_PLAN) -> onnx.ModelProto:
    """mel [B, n_mels, frames] -> cross_k, cross_v [n_layers, B, n_heads, frames/2, head_dim]."""
    w = _Weights(model)
    g = GraphBuilder("whisper_encoder")
    mel = g.add_input("mel", FLOAT, ["batch", dims.n_mels, "frames"])
    with g.scope("encoder"):
        x = mel
        for index, stride in ((1, 1), (2, 2)):
            with g.scope(f"conv{index}"):
                conv_weight = g.weight("weight", w.raw(f"encoder/conv{index}/weight"))
                conv_bias = g.weight("bias", w.raw(f"encoder/conv{index}/bias"))
                x = g.op1("Conv", [x, conv_weight, conv_bias], pads=[1, 1], strides=[stride], kernel_shape=[3])
                x = g.op1("Gelu", [x], domain=MS_DOMAIN)
        x = g.op1("Transpose", [x], perm=[0, 2, 1])  # [B, S, d]
        with g.scope("embed_positions"):
            n_positions = g.op1("Shape", [x], start=1, end=2)
            table = g.weight("weight", w.raw("encoder/position_encodings/encodings"))
            x = g.op1("Add", [x, g.op1("Slice", [table, g.const([0]), n_positions, g.const([0])])])
        for layer in range(dims.n_layers):
            prefix = f"encoder/layer_{layer}"
            with g.scope(f"layers.{layer}"):
                with g.scope("self_attn"):
                    h = w.layer_norm(g, x, f"{prefix}/self_attention/layer_norm")
                    qkv_weight, qkv_bias = w.qkv(f"{prefix}/self_attention/linear_0", dims.d_model, dims.head_dim)
                    qkv = linear(g, h, qkv_weight, qkv_bias, "qkv_proj", int8=plan.encoder_attention)
                    # contrib MultiHeadAttention: ~12% faster than MatMul/Softmax/MatMul for 1500 positions
                    q, k, v = g.op("Split", [qkv], n_outputs=3, axis=-1)
                    h = g.op1("MultiHeadAttention", [q, k, v], domain=MS_DOMAIN, num_heads=dims.n_heads, scale=1.0)
                    h = w.linear(g, h, f"{prefix}/self_attention/linear_1", "out_proj", int8=plan.encoder_attention)
                x = g.op1("Add", [x, h], name="residual_attn")
                x = _mlp(g, x, w, prefix, int8=plan.encoder_mlp)
        with g.scope("layer_norm"):
            x = w.layer_norm(g, x, "encoder/layer_norm")
    with g.scope("cross_kv"):
        _cross_kv_outputs(g, x, w, dims, int8=plan.cross_kv)
    return g.build(doc_string="Whisper encoder: mel -> every decoder layer's cross-attention K/V")


def _cross_kv_outputs(g: GraphBuilder, x: str, w: _Weights, dims: WhisperDims, *, int8: bool) -> None:
    """Project the encoder output once for every decoder layer's cross-attention.

    One linear [2*L*d, d] (rows ordered kind, layer, head, dim) -> Reshape [B,S,2,L,N,H]
    -> Transpose [2,L,B,N,S,H] -> Split -> Squeeze -> cross_k, cross_v [L,B,N,S,H]
    """
    d, n_layers = dims.d_model, dims.n_layers
    weights = [w.raw(f"decoder/layer_{layer}/attention/linear_1/weight") for layer in range(n_layers)]
    biases = [w.raw(f"decoder/layer_{layer}/attention/linear_1/bias") for layer in range(n_layers)]
    weight = np.concatenate([m[:d] for m in weights] + [m[d:] for m in weights], axis=0)
    bias = np.concatenate([b[:d] for b in biases] + [b[d:] for b in biases])
    kv = linear(g, x, weight, bias, "kv_proj", int8=int8)
    kv = g.op1("Reshape", [kv, g.const([0, 0, 2, n_layers, dims.n_heads, dims.head_dim])])
    kv = g.op1("Transpose", [kv], perm=[2, 3, 0, 4, 1, 5])
    k, v = g.op("Split", [kv], n_outputs=2, axis=0)
    g.op("Squeeze", [k, g.const([0])], outputs=["cross_k"])
    g.op("Squeeze", [v, g.const([0])], outputs=["cross_v"])
    cache_shape: list[Dim] = [n_layers, "batch", dims.n_heads, "n_audio", dims.head_dim]
    g.add_output("cross_k", FLOAT, cache_shape)
    g.add_output("cross_v", FLOAT, cache_shape)


# --------------------------------------------------------------------------------------------------------------
# decoder


def build_decoder(
    model: Ct2Model, dims: WhisperDims, plan: Int8Plan = FP32_PLAN, *, rescore_tokens: int = 0
) -> onnx.ModelProto:
    """tokens + self/cross caches + n_logits -> logits of the last n_logits positions + grown self caches.

    ``rescore_tokens`` > 0 (fp32 plan only): the vocabulary projection runs on an int8 copy of the table with int8
    activations, then the ``rescore_tokens`` best logits are recomputed exactly in fp32 (see ``_TiedEmbedding``).
    """
    w = _Weights(model)
    g = GraphBuilder("whisper_decoder")
    n_layers, n_heads, head_dim = dims.n_layers, dims.n_heads, dims.head_dim
    tokens = g.add_input("tokens", INT64, ["batch", "n_tokens"])
    n_logits = g.add_input("n_logits", INT64, [1])  # how many of the last positions get logits (at least 1)
    self_shape: list[Dim] = [n_layers, "batch", n_heads, "past_len", head_dim]
    cross_shape: list[Dim] = [n_layers, "windows", n_heads, "n_audio", head_dim]  # batch = windows x hypotheses
    self_k = g.add_input("self_k", FLOAT, self_shape)
    self_v = g.add_input("self_v", FLOAT, self_shape)
    cross_k = g.add_input("cross_k", FLOAT, cross_shape)
    cross_v = g.add_input("cross_v", FLOAT, cross_shape)

    with g.scope("decoder"):
        embed_tokens = _TiedEmbedding(g, w.raw("decoder/embeddings/weight"), plan, rescore_tokens)
        with g.scope("embed_tokens"):
            x = embed_tokens.lookup(tokens)
        with g.scope("embed_positions"):
            past_len = g.op1("Shape", [self_k], start=3, end=4)
            n_new = g.op1("Shape", [tokens], start=1, end=2)
            total_len = g.op1("Add", [past_len, n_new])
            table = g.weight("weight", w.raw("decoder/position_encodings/encodings"))
            x = g.op1("Add", [x, g.op1("Slice", [table, past_len, total_len, g.const([0])])])
        with g.scope("causal_mask"):
            # [n, past+n]: 0 where key position <= past + query row, MASKED_SCORE after it
            mask_shape = g.op1("Concat", [n_new, total_len], axis=0)
            fill = onnx.helper.make_tensor("value", FLOAT, [1], [MASKED_SCORE])
            filled = g.op1("ConstantOfShape", [mask_shape], value=fill)
            first_masked = g.op1("Squeeze", [g.op1("Add", [past_len, g.const([1])]), g.const([0])])
            mask = g.op1("Trilu", [filled, first_masked], upper=1)
        with g.scope("layers"):
            x = _decoder_layers(g, w, x, (self_k, self_v, cross_k, cross_v), mask, dims)
        with g.scope("layer_norm"):
            # only the last n_logits positions are projected: 1 to decode, more to verify a draft fed at once
            tail = g.op1("Slice", [x, g.op1("Neg", [n_logits]), g.const([2**62]), g.const([1])])
            rows = w.layer_norm(g, g.op1("Reshape", [tail, g.const([-1, dims.d_model])]), "decoder/layer_norm")
        with g.scope("lm_head"):
            embed_tokens.project(rows, output="row_logits")  # [B * n_logits, n_vocab]
            batch = g.op1("Shape", [tokens], start=0, end=1)
            shape = g.op1("Concat", [batch, n_logits, g.const([dims.n_vocab])], axis=0)
            g.op("Reshape", ["row_logits", shape], outputs=["logits"])
    g.add_output("logits", FLOAT, ["batch", "n_logits", dims.n_vocab])
    g.add_output("new_self_k", FLOAT, [n_layers, "batch", n_heads, "total_len", head_dim])
    g.add_output("new_self_v", FLOAT, [n_layers, "batch", n_heads, "total_len", head_dim])
    return g.build(doc_string="Whisper decoder step: tokens + caches -> last positions' logits + grown self caches")


def _decoder_layers(
    g: GraphBuilder, w: _Weights, x: str, caches: tuple[str, str, str, str], mask: str, dims: WhisperDims
) -> str:
    """All decoder layers as one Scan over the layer axis; writes new_self_k/new_self_v and returns x.

    Scan hands each iteration views of self_k[l], self_v[l], cross_k[l], cross_v[l] and of the stacked
    weights, and writes each iteration's grown K/V straight into new_self_k[l]/new_self_v[l]. An unrolled graph
    would instead Gather (copy) every layer's cross K/V on every step: 2 x 74 MB per step at batch 8, which
    cost more than the whole rest of the decoder.

    body(x, past_k, past_v, cross_k, cross_v, weights...) -> (x, keys, values)
    """
    self_k, self_v, cross_k, cross_v = caches
    n_heads, head_dim, n_layers = dims.n_heads, dims.head_dim, dims.n_layers
    body = g.subgraph("decoder_layer")
    param = StackedWeights(g, body)
    layer_x = body.add_input("layer_x", FLOAT, ["batch", "n_tokens", dims.d_model])
    past_k = body.add_input("layer_past_k", FLOAT, ["batch", n_heads, "past_len", head_dim])
    past_v = body.add_input("layer_past_v", FLOAT, ["batch", n_heads, "past_len", head_dim])
    layer_cross_k = body.add_input("layer_cross_k", FLOAT, ["windows", n_heads, "n_audio", head_dim])
    layer_cross_v = body.add_input("layer_cross_v", FLOAT, ["windows", n_heads, "n_audio", head_dim])
    prefixes = [f"decoder/layer_{layer}" for layer in range(n_layers)]

    def layer_norm_of(x_in: str, name: str) -> str:
        gamma = param("layer_norm.weight", [w.raw(f"{p}/{name}/gamma") for p in prefixes])
        beta = param("layer_norm.bias", [w.raw(f"{p}/{name}/beta") for p in prefixes])
        return body.op1("LayerNormalization", [x_in, gamma, beta], axis=-1, epsilon=LAYER_NORM_EPSILON)

    def linear_of(x_in: str, leaf: str, weights: list[np.ndarray], biases: list[np.ndarray]) -> str:
        with body.scope(leaf):
            weight = param("weight", [np.ascontiguousarray(m.T) for m in weights])
            bias = param("bias", biases)
            return body.op1("Add", [body.op1("MatMul", [x_in, weight]), bias])

    def ct2_linear(x_in: str, leaf: str, name: str) -> str:
        return linear_of(
            x_in, leaf, [w.raw(f"{p}/{name}/weight") for p in prefixes], [w.raw(f"{p}/{name}/bias") for p in prefixes]
        )

    with body.scope("self_attn"):
        h = layer_norm_of(layer_x, "self_attention/layer_norm")
        qkv_pairs = [w.qkv(f"{p}/self_attention/linear_0", dims.d_model, head_dim) for p in prefixes]
        qkv = linear_of(h, "qkv_proj", [m for m, _ in qkv_pairs], [b for _, b in qkv_pairs])
        q, k_new, v_new = split_heads(body, qkv, n_heads, head_dim)
        keys = body.op1("Concat", [past_k, k_new], axis=2, outputs=["layer_keys"])
        values = body.op1("Concat", [past_v, v_new], axis=2, outputs=["layer_values"])
        h = attend(body, q, keys, values, mask, dims.d_model)
        h = ct2_linear(h, "out_proj", "self_attention/linear_1")
    x_mid = body.op1("Add", [layer_x, h], name="residual_self_attn")
    with body.scope("encoder_attn"):
        h = layer_norm_of(x_mid, "attention/layer_norm")
        scale = np.float32(1.0 / float(np.sqrt(head_dim)))  # exact: a power of two
        q = linear_of(
            h,
            "q_proj",
            [w.raw(f"{p}/attention/linear_0/weight") * scale for p in prefixes],
            [w.raw(f"{p}/attention/linear_0/bias") * scale for p in prefixes],
        )
        # The rows of one window may come in groups (beam search: B hypotheses per window, consecutive) against one
        # row of audio keys and values per window: [rows, n, d] -> [windows, rows / windows * n, heads, head_dim],
        # so each window's hypotheses share one product with its keys and values instead of reading copies.
        windows = body.op1("Shape", [layer_cross_k], start=0, end=1)
        grouped = body.op1("Concat", [windows, body.const([-1, n_heads, head_dim])], axis=0)
        q = body.op1("Transpose", [body.op1("Reshape", [q, grouped])], perm=[0, 2, 1, 3])
        h = attend(body, q, layer_cross_k, layer_cross_v, None, dims.d_model)  # [windows, rows / windows * n, d]
        h = body.op1("Reshape", [h, body.op1("Shape", [x_mid])])
        h = ct2_linear(h, "out_proj", "attention/linear_2")
    x_mid = body.op1("Add", [x_mid, h], name="residual_encoder_attn")
    with body.scope("mlp"):
        h = layer_norm_of(x_mid, "ffn/layer_norm")
        h = body.op1("Gelu", [ct2_linear(h, "fc1", "ffn/linear_0")], domain=MS_DOMAIN)
        h = ct2_linear(h, "fc2", "ffn/linear_1")
    body.op("Add", [x_mid, h], name="residual_mlp", outputs=["layer_x_out"])
    body.add_output("layer_x_out", FLOAT, ["batch", "n_tokens", dims.d_model])
    body.add_output("layer_keys", FLOAT, ["batch", n_heads, "total_len", head_dim])
    body.add_output("layer_values", FLOAT, ["batch", n_heads, "total_len", head_dim])

    scan_inputs = [self_k, self_v, cross_k, cross_v, *param.outer_names]
    x_out, _, _ = g.op(
        "Scan",
        [x, *scan_inputs],
        outputs=["/decoder/layers/x_out", "new_self_k", "new_self_v"],
        body=body.build_graph(),
        num_scan_inputs=len(scan_inputs),
    )
    return x_out


class _TiedEmbedding:
    """The token embedding table, shared by the input lookup and the output projection (stored once).

    fp32: Gather(table) and Gemm(x, table, transB=1).
    int8 lm_head: MatMulNBits over the block-quantized rows; the lookup then either decodes the same int8 rows
    (GatherBlockQuantized, ``plan.embeddings``) or Gathers an fp32 copy.
    fp32 with ``rescore_tokens`` = k: the projection runs on an int8 copy of the table with int8 activations
    (MatMulNBits, accuracy level 4: the fp32 Gemm reads the 80 MB table once per decoder call and is
    memory-bound, 5 ms of a 10 ms step at batch 1), then the k best candidates are recomputed exactly from the
    fp32 rows (TopK, Gather, MatMul, ScatterElements). Greedy decoding picks the exact argmax whenever it is
    among the approximate top k; the other logits are off by the int8 rounding (up to ~0.25 on the test window).
    """

    def __init__(self, g: GraphBuilder, table: np.ndarray, plan: Int8Plan, rescore_tokens: int = 0) -> None:
        self._g = g
        self._n_vocab, self._d_model = table.shape
        self._plan = plan
        self._rescore_tokens = rescore_tokens
        if rescore_tokens and plan.lm_head:
            raise ValueError("output rescoring recomputes fp32 logits: it needs the fp32 output projection")
        self._fp32_name = ""
        self._q8_name = ""
        self._scales_name = ""
        self._block_scales_name = ""
        if plan.lm_head or rescore_tokens:
            data, scales = quantize_int8_blocks(table)
            self._q8_name = g.weight("embed_tokens.weight_q8", data)
            self._scales_name = g.weight("embed_tokens.weight_scales", scales)
            if plan.embeddings:
                if self._d_model % INT8_BLOCK_SIZE:
                    raise ValueError(
                        f"int8 embeddings need d_model divisible by {INT8_BLOCK_SIZE}, got {self._d_model}"
                    )
                self._block_scales_name = g.weight("embed_tokens.weight_block_scales", scales[..., None])
        if not (plan.lm_head and plan.embeddings):
            self._fp32_name = g.weight("embed_tokens.weight", table)

    def lookup(self, tokens: str) -> str:
        """tokens [B, n] -> [B, n, d]."""
        g = self._g
        if not self._block_scales_name:
            return g.op1("Gather", [self._fp32_name, tokens])
        # data [V, blocks, block] with scales [V, blocks, 1]: each block is one quantization group
        rows = g.op1(
            "GatherBlockQuantized",
            [self._q8_name, tokens, self._block_scales_name],
            domain=MS_DOMAIN,
            bits=8,
            block_size=INT8_BLOCK_SIZE,
            gather_axis=0,
            quantize_axis=2,
        )
        return g.op1("Reshape", [rows, g.const([0, 0, self._d_model])])

    def project(self, x: str, output: str) -> None:
        """x [B, d] -> ``output`` [B, n_vocab]."""
        g = self._g
        if not self._q8_name:
            g.op("Gemm", [x, self._fp32_name], outputs=[output], transB=1)
            return
        approximate = g.op(
            "MatMulNBits",
            [x, self._q8_name, self._scales_name],
            outputs=None if self._rescore_tokens else [output],
            domain=MS_DOMAIN,
            K=self._d_model,
            N=self._n_vocab,
            bits=8,
            block_size=INT8_BLOCK_SIZE,
            accuracy_level=INT8_ACCURACY_LEVEL,
        )[0]
        if not self._rescore_tokens:
            return
        with g.scope("rescore"):
            _, top = g.op("TopK", [approximate, g.const([self._rescore_tokens])], n_outputs=2, axis=-1)
            rows = g.op1("Gather", [self._fp32_name, top], axis=0)  # [B, k, d]
            exact = g.op1("MatMul", [rows, g.op1("Unsqueeze", [x, g.const([2])])])  # [B, k, 1]
            exact = g.op1("Squeeze", [exact, g.const([2])])
            g.op("ScatterElements", [approximate, top, exact], outputs=[output], axis=1)


# --------------------------------------------------------------------------------------------------------------
# special tokens

SPECIAL_TOKENS: Final = {
    "sot": ("<|startoftranscript|>",),
    "eot": ("<|endoftext|>",),
    "sot_prev": ("<|startofprev|>",),
    "sot_lm": ("<|startoflm|>",),
    "no_timestamps": ("<|notimestamps|>",),
    "no_speech": ("<|nospeech|>", "<|nocaptions|>"),
    "timestamp_begin": ("<|0.00|>",),
    "transcribe": ("<|transcribe|>",),
    "translate": ("<|translate|>",),
    "english": ("<|en|>",),
}


def special_token_ids(vocabulary_path: Path, tokenizer_path: Path, n_vocab: int) -> dict[str, int]:
    """Find the Whisper special tokens; vocabulary.txt (line N = id N-1) and tokenizer.json must agree."""
    vocabulary = vocabulary_path.read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    if len(vocabulary) != n_vocab:
        raise ValueError(f"{vocabulary_path} has {len(vocabulary)} tokens but the model has {n_vocab} embeddings")
    vocab_ids: dict[str, int] = {}
    for index, token in enumerate(vocabulary):
        if token.startswith("<|") and token.endswith("|>"):
            vocab_ids.setdefault(token, index)
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tokenizer_ids = {str(entry["content"]): int(entry["id"]) for entry in tokenizer.get("added_tokens", [])}

    found: dict[str, int] = {}
    for key, candidates in SPECIAL_TOKENS.items():
        present = [candidate for candidate in candidates if candidate in vocab_ids]
        if not present:
            raise ValueError(f"none of {candidates} ({key}) is in {vocabulary_path}")
        token_id = vocab_ids[present[0]]
        if present[0] in tokenizer_ids and tokenizer_ids[present[0]] != token_id:
            raise ValueError(
                f"{present[0]} is id {token_id} in vocabulary.txt but {tokenizer_ids[present[0]]} in tokenizer.json"
            )
        found[key] = token_id
    if found["timestamp_begin"] != found["no_timestamps"] + 1:
        raise ValueError(
            f"expected <|0.00|> right after <|notimestamps|>, got ids {found['timestamp_begin']} "
            f"and {found['no_timestamps']}"
        )
    return found


# --------------------------------------------------------------------------------------------------------------
# entry point


def convert_whisper(files: Mapping[str, Path], out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``tokenizer.json`` into ``out_dir``; return the manifest config.

    ``files`` maps "model.bin", "config.json", "tokenizer.json" and "vocabulary.txt" to extracted paths.
    ``options["precision"]`` is "fp32" (default) or "int8".
    """
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"convert_whisper needs files {list(REQUIRED_FILES)}, missing {missing}")
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown whisper conversion options {unknown}, expected only {sorted(KNOWN_OPTIONS)}")
    precision = str(options.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    plan = PLAN_BY_PRECISION[precision]
    rescore_tokens = options.get("output_rescore_tokens", 0)
    valid = isinstance(rescore_tokens, int) and not isinstance(rescore_tokens, bool)
    if not valid or not 0 <= rescore_tokens <= MAX_RESCORE_TOKENS:
        raise ValueError(
            f"option 'output_rescore_tokens' must be an integer in [0, {MAX_RESCORE_TOKENS}], got {rescore_tokens!r}"
        )
    if rescore_tokens and plan.lm_head:
        raise ValueError("option 'output_rescore_tokens' needs precision 'fp32' (it recomputes fp32 logits)")

    started = time.perf_counter()
    model = load_ct2_model(Path(files["model.bin"]))
    dims = read_dims(model)
    ct2_config = json.loads(Path(files["config.json"]).read_text(encoding="utf-8"))
    specials = special_token_ids(Path(files["vocabulary.txt"]), Path(files["tokenizer.json"]), dims.n_vocab)

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_encoder(model, dims, plan), out_dir / ENCODER_FILE)
    onnx.save(build_decoder(model, dims, plan, rescore_tokens=rescore_tokens), out_dir / DECODER_FILE)
    shutil.copyfile(files["tokenizer.json"], out_dir / TOKENIZER_FILE)
    logger.info("converted Whisper %s to %s in %.1f s", precision, out_dir, time.perf_counter() - started)

    is_multilingual = dims.n_vocab >= MULTILINGUAL_MIN_VOCAB
    english = specials.pop("english")
    # English-only models take no language/task tokens; multilingual ones default to English transcription
    sot_sequence = [specials["sot"], english, specials["transcribe"]] if is_multilingual else [specials["sot"]]
    return {
        "n_mels": dims.n_mels,
        "n_audio_ctx": dims.n_audio_ctx,
        "max_frames": 2 * dims.n_audio_ctx,
        "n_text_ctx": dims.n_text_ctx,
        "n_vocab": dims.n_vocab,
        "n_layers": dims.n_layers,
        "n_heads": dims.n_heads,
        "head_dim": dims.head_dim,
        "d_model": dims.d_model,
        "precision": precision,
        "int8_plan": asdict(plan),
        "output_rescore_tokens": rescore_tokens,
        "shared_cross_attention": True,  # cross_k/cross_v may hold one row per window of consecutive rows
        "encoder": ENCODER_FILE,
        "decoder": DECODER_FILE,
        "tokenizer": TOKENIZER_FILE,
        "suppress_ids": [int(i) for i in ct2_config.get("suppress_ids", [])],
        "suppress_ids_begin": [int(i) for i in ct2_config.get("suppress_ids_begin", [])],
        "alignment_heads": [[int(a), int(b)] for a, b in ct2_config.get("alignment_heads", [])],
        "is_multilingual": is_multilingual,
        "sot_sequence": sot_sequence,
        **specials,
    }
