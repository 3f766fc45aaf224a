"""Convert a Llama-family GGUF (llama, mistral, qwen2) into one ONNX graph for onnxruntime, keeping the exact weights.

Weights are never re-quantized; each GGUF type maps onto an onnxruntime operator that reproduces it exactly:

========  ======================================================================================================
F32, F16  ``MatMul`` / ``Gather`` on float32 (F16 widens exactly).
Q8_0      ``MatMulNBits`` bits=8, ``B = q + 128`` (uint8) with its default zero point 128, scales ``d``;
          ``GatherBlockQuantized`` bits=8 for the embedding. At accuracy_level 0, where the 8-bit kernel
          dequantizes the whole matrix on every call, two 4-bit products over the nibbles of ``q + 128`` instead.
Q4_0      ``MatMulNBits`` bits=4 with its default zero point 8, scales ``d``; nibbles re-packed in weight order.
Q4_1      ``w = d*q + m = d*(q - 8) + c`` with ``c = m + 8d``: ``MatMulNBits`` (default zero point 8, scales ``d``)
          plus an fp32 correction ``sum_b blocksum_b(x) * c[n, b]``. MatMulNBits' float zero points would express
          ``-m/d`` directly but disable weight prepacking (about 20x slower); the correction keeps the fast kernel.
========  ======================================================================================================

Graph (one call = one batch over a contiguous range of KV-cache slots, see ``app/text/llama_runner.py``)::

    input_ids[T] ─ embed ─► x ─┬─ RMSNorm ─ qkv ─ Gather(chunk_index)[B,S,·] ─ GroupQueryAttention ─┐
                               │                              past_key.i / past_value.i (shared buffers)│
                               │    Gather(packed_index)[T,·] ◄──────────────────────────────────────────┘
                               └─ + o_proj ─ RMSNorm ─ SwiGLU ─ + ... ─ Gather(logit_index) ─ norm ─ lm_head ─► logits

The new tokens of all rows are packed (``T`` tokens), so the projections and the MLP never see padding. Only the
attention works on the right-padded ``[B, S]`` layout that GroupQueryAttention's ``query_seqlens`` input expects.
The runner keeps ``S >= 2`` even for a call of decode rows only: onnxruntime's CPU kernel rounds a one-token row
differently at ``S = 1``, and with int8 activations that would make a row's logits depend on its batch neighbours.

Output rescoring (option ``output_rescore_tokens = k``, SmolLM2 v3): with fp32 activations the output projection
(49152 x 576, Q8_0, tied to the embedding) is a quarter of a decode step, because 8-bit MatMulNBits is only fast with
int8 activations and at level 0 it runs as two 4-bit products (5.5 ms of CPU for one row, 30 ms for sixteen). With
``k > 0`` it runs once with int8 activations (1.3 ms, 10.5 ms); ``TopK`` then takes its ``k`` best tokens, their
rows are gathered from the embedding table (``GatherBlockQuantized``, exact) and dotted with the final hidden state
in fp32, and ``ScatterElements`` writes those exact logits over the approximate ones. The int8 error there is at
most about 0.45 logits on SmolLM2, and the 64th best token lies at least 3.75 logits below the best, so every token
that greedy decoding or a nucleus at the usual temperatures can pick has its exact logit (measured: tokens within 3
logits of the best match v1 to 3e-5; v3's argmax equals v1's at all 631 teacher-forced positions of
``tests/test_llamacpp_agreement.py``). Tokens outside the ``k`` keep int8-accuracy logits. Measured on one thread,
v3 against v1: decode 20.7 against 24.9 ms of CPU per token alone, 6.2 against 7.3 in a batch of 16.

Two-level activations (option ``decode_graph_rows = r``, SmolLM2 v4): a second graph, ``model_decode.onnx``, for
calls of at most ``r`` decode rows, where fp32-activation MatMulNBits is slowest (a GEMV per row, or a full
dequantization for an SGEMM). Its 4-bit projections take ``[x; x - int8(x)]`` at accuracy level 4: int8 codes of
the activations plus int8 codes of what those codes lost, so the two products sum to ``W @ x`` within about 2^-14
of ``x`` (single-level int8, v2, is off by 2^-7 and flips answers). On the AVX2 machine a served chat stream
decodes 1.2x faster than with v3 alone and two streams 1.6x faster (30 against 38 and 21 against 38 ms of server
CPU per token, ``scripts/bench_chat_load.py``, docs/benchmarks.md); in a throwaway runner timing the fp32 graph
was faster from 8 rows on (45 against 50 ms per step) and for a 200-token prompt (347 against 710 ms), so the
runner picks the graph per call. Against v3: the same argmax at all 631 teacher-forced positions of
``tests/test_llamacpp_agreement.py`` (logits of the tokens near the top within 0.0024 at p99 in a throwaway
comparison).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx

from app.convert.gguf_model import (
    BLOCK_WEIGHTS,
    QUANTIZED_TYPES,
    GGUFModel,
    GGUFTensor,
    LlamaHyperParams,
    dequantize,
    split_blocks,
)
from app.convert.onnx_graph import FLOAT, INT64, MS_DOMAIN, GraphBuilder

logger = logging.getLogger(__name__)

MODEL_FILE_NAME: Final = "model.onnx"
# accuracy_level 4 lets MatMulNBits quantize activations to int8 per block of 32 (as llama.cpp does). On SmolLM2 it
# decodes 1.5x faster than level 0 (16.7 against 25.4 ms of CPU per token on one core; decoding is what a streaming
# server does most) and keeps first-step logits within 0.9 of the fp32 reference (correlation >= 0.999, same top-1 and
# same 20-token greedy answers on the test prompts). Level 0 (fp32 activations) matches the reference to 1e-4 and
# prefills 1.4x faster (MLAS's int8 path does not speed up products with many rows), so it suits long prompts.
DEFAULT_ACCURACY_LEVEL: Final = 4
ACCURACY_LEVELS: Final = (0, 4)
INT8_ACTIVATIONS_LEVEL: Final = 4
MAX_RESCORE_TOKENS: Final = 1024
DEFAULT_MAX_BATCH_SIZE: Final = 32
DEFAULT_MAX_SEQ_LEN: Final = 2048
INT32: Final = onnx.TensorProto.INT32
DECODE_MODEL_FILE_NAME: Final = "model_decode.onnx"
KNOWN_OPTIONS: Final = frozenset(
    {"accuracy_level", "max_batch_size", "max_seq_len", "output_rescore_tokens", "decode_graph_rows"}
)
INT8_MAX: Final = 127.0


class _LlamaGraph:
    """Builds the graph for one GGUF model; each ``_make_*`` method adds one part."""

    def __init__(
        self, model: GGUFModel, accuracy_level: int, rescore_tokens: int = 0, *, two_level_activations: bool = False
    ) -> None:
        self.model = model
        self.two_level_activations = two_level_activations
        self.params: LlamaHyperParams = model.params
        self.accuracy_level = accuracy_level
        self.g = GraphBuilder("llama")
        self.rescore_tokens = rescore_tokens
        self._embedding_names: dict[str, str] = {}  # quantized table name -> packed data initializer
        self._table_scales: dict[str, str] = {}
        self._table_offsets: dict[str, str] = {}  # Q4_1 tables: m + 8d per block
        self._dense_tables: dict[str, str] = {}

    # -- linear layers -------------------------------------------------------------------------------------------

    def _make_linear(self, x: str, tensors: Sequence[GGUFTensor], leaf: str) -> str:
        """``x [T, K] @ W.T (+ bias)`` for the weights ``tensors`` fused along N; output [T, sum N]."""
        types = {t.type_name for t in tensors}
        if len(types) > 1:
            parts = [self._make_linear(x, [t], f"{leaf}_{i}") for i, t in enumerate(tensors)]
            return self.g.op1("Concat", parts, axis=-1)
        with self.g.scope(leaf):
            (type_name,) = types
            if type_name in ("F32", "F16"):
                weight = np.concatenate([dequantize(t) for t in tensors], axis=0)
                y = self.g.op1("MatMul", [x, self.g.weight("weight", np.ascontiguousarray(weight.T))])
            else:
                y = self._make_block_matmul(x, tensors, type_name)
            biases = [self.model.optional(t.name.removesuffix(".weight") + ".bias") for t in tensors]
            if any(b is not None for b in biases):
                bias_parts = [
                    dequantize(b) if b is not None else np.zeros(t.shape[0], np.float32)
                    for t, b in zip(tensors, biases, strict=True)
                ]
                bias = np.concatenate(bias_parts)
                y = self.g.op1("Add", [y, self.g.weight("bias", bias)])
        return y

    def _make_block_matmul(self, x: str, tensors: Sequence[GGUFTensor], type_name: str) -> str:
        """MatMulNBits over Q8_0 / Q4_0 / Q4_1 blocks (Q4_1 with its fp32 offset correction)."""
        blocks = [split_blocks(t) for t in tensors]
        scales = np.concatenate([b.scales for b in blocks])
        values = np.concatenate([b.values for b in blocks])
        if type_name == "Q8_0" and self.accuracy_level == 0:
            return self._make_q8_as_two_q4(x, scales, values)
        if type_name == "Q8_0":
            packed, bits = (values.astype(np.int16) + 128).astype(np.uint8), 8
        else:
            packed, bits = _pack_nibbles(values), 4
        y = self._make_nbits(x, self._shared_weight(tensors, packed), scales, bits, "")
        if type_name != "Q4_1":
            return y
        offsets = np.concatenate([b.offsets for b in blocks if b.offsets is not None])
        return self._add_block_offsets(x, y, offsets + 8.0 * scales)  # c = m + 8d

    def _make_nbits(self, x: str, packed_name: str, scales: np.ndarray, bits: int, suffix: str) -> str:
        n_out, n_blocks = scales.shape
        two_level = self.two_level_activations and self.accuracy_level == 0 and bits == 4
        if two_level:
            x = self._with_int8_residual_rows(x, n_blocks)
        y = self.g.op1(
            "MatMulNBits",
            [x, packed_name, self.g.weight(f"scales{suffix}", scales)],
            domain=MS_DOMAIN,
            K=n_blocks * BLOCK_WEIGHTS,
            N=n_out,
            bits=bits,
            block_size=BLOCK_WEIGHTS,
            accuracy_level=INT8_ACTIVATIONS_LEVEL if two_level else self.accuracy_level,
        )
        return self._sum_of_halves(y, n_out) if two_level else y

    def _with_int8_residual_rows(self, x: str, n_blocks: int) -> str:
        """``[x; x - int8(x)]``: the rows of ``x`` followed by what int8 quantization per block of 32 loses of them,
        quantized as MLAS's CompInt8 kernels do (scale ``amax / 127``, codes ``round(x * 127 / amax)``, half to
        even). MatMulNBits at accuracy level 4 quantizes both halves to int8 again; the sum of their products
        (``_sum_of_halves``) is ``W @ x`` up to the int8 rounding of the residual, about 2^-14 of ``x``: two int8
        rows cost less than one fp32 row (module docstring, "Two-level activations")."""
        g = self.g
        blocks = g.op1("Reshape", [x, g.const([0, n_blocks, BLOCK_WEIGHTS])])
        amax = g.op1("ReduceMax", [g.op1("Abs", [blocks])], axes=[2], keepdims=1)
        int8_max = g.const(np.array(INT8_MAX, np.float32), np.float32)
        scale = g.op1("Div", [amax, int8_max])
        # a block of zeros has amax 0: any finite inverse quantizes it to 0
        nonzero_amax = g.op1("Max", [amax, g.const(np.array(1e-30, np.float32), np.float32)])
        inverse = g.op1("Div", [int8_max, nonzero_amax])
        codes = g.op1("Round", [g.op1("Mul", [blocks, inverse])])
        residual = g.op1("Sub", [blocks, g.op1("Mul", [codes, scale])])
        flat = g.op1("Reshape", [residual, g.const([0, n_blocks * BLOCK_WEIGHTS])])
        return g.op1("Concat", [x, flat], axis=0)

    def _sum_of_halves(self, y: str, n_out: int) -> str:
        """``y[:n] + y[n:]`` for ``y`` of ``2n`` rows of ``n_out`` columns."""
        halves = self.g.op1("Reshape", [y, self.g.const([2, -1, n_out])])
        return self.g.op1("ReduceSum", [halves, self.g.const([0])], keepdims=0)

    def _add_block_offsets(self, x: str, y: str, offsets: np.ndarray) -> str:
        """``y + sum_b blocksum_b(x) * offsets[n, b]``: a per-block constant added to every weight, in fp32."""
        n_blocks = offsets.shape[1]
        block_x = self.g.op1("Reshape", [x, self.g.const([0, n_blocks, BLOCK_WEIGHTS])])
        block_sums = self.g.op1("ReduceSum", [block_x, self.g.const([2])], keepdims=0)
        correction = self.g.weight("offset_correction", np.ascontiguousarray(offsets.T))  # [n_blocks, N]
        return self.g.op1("Add", [y, self.g.op1("MatMul", [block_sums, correction])])

    def _make_q8_as_two_q4(self, x: str, scales: np.ndarray, values: np.ndarray) -> str:
        """Q8_0 at accuracy level 0, where 8-bit MatMulNBits dequantizes the whole matrix on every call.

        With ``u = q + 128 = 16h + l`` (nibbles h, l): ``d*q = 16d*(h - 8) + d*(l - 8) + 8d``, i.e. two fast 4-bit
        products and a block-offset correction, still exact.
        """
        unsigned = (values.astype(np.int16) + 128).astype(np.uint8)
        high = self._make_nbits(
            x, self.g.weight("weight_high", _pack_nibbles(unsigned >> 4)), 16.0 * scales, 4, "_high"
        )
        low = self._make_nbits(x, self.g.weight("weight_low", _pack_nibbles(unsigned & 0x0F)), scales, 4, "_low")
        return self._add_block_offsets(x, self.g.op1("Add", [high, low]), 8.0 * scales)

    def _shared_weight(self, tensors: Sequence[GGUFTensor], packed: np.ndarray) -> str:
        """The packed weight initializer; a tied embedding shares it with the embedding lookup."""
        if len(tensors) == 1 and tensors[0].name in self._embedding_names:
            return self._embedding_names[tensors[0].name]
        return self.g.weight("weight_packed", packed)

    # -- embedding -------------------------------------------------------------------------------------------------

    def _make_embedding(self, input_ids: str) -> str:
        with self.g.scope("embed_tokens"):
            return self._gather_table_rows("token_embd.weight", input_ids, 1)

    def _gather_table_rows(self, name: str, indices: str, indices_rank: int) -> str:
        """Rows ``indices`` of the (embedding or output) table ``name``, dequantized exactly: [*indices, hidden].

        The packed data, scales and offsets are made once per table (in the current scope), so the embedding lookup,
        the output projection and the output rescoring share one copy of the weights.
        """
        table = self.model.tensor(name)
        if table.type_name in ("F32", "F16"):
            if name not in self._dense_tables:
                self._dense_tables[name] = self.g.weight("weight", dequantize(table))
            return self.g.op1("Gather", [self._dense_tables[name], indices], axis=0)
        blocks = split_blocks(table)
        n_blocks = blocks.values.shape[1]
        if name not in self._embedding_names:
            if blocks.type_name == "Q8_0":
                data = (blocks.values.astype(np.int16) + 128).astype(np.uint8)
            else:
                data = _pack_nibbles(blocks.values)
            self._embedding_names[name] = self.g.weight(
                "weight_packed", data
            )  # [vocab, n_blocks, bytes], MatMulNBits' B
            self._table_scales[name] = self.g.weight("scales", blocks.scales[:, :, None])
            if blocks.type_name == "Q4_1":
                assert blocks.offsets is not None
                self._table_offsets[name] = self.g.weight("offsets", (blocks.offsets + 8.0 * blocks.scales)[:, :, None])
        rows = self.g.op1(
            "GatherBlockQuantized",
            [self._embedding_names[name], indices, self._table_scales[name]],
            domain=MS_DOMAIN,
            bits=8 if blocks.type_name == "Q8_0" else 4,
            block_size=BLOCK_WEIGHTS,
            gather_axis=0,
            quantize_axis=2,  # of the data: [vocab, n_blocks, bytes per block]
        )  # [*indices, n_blocks, 32] (Q4: unpacked)
        if name in self._table_offsets:
            rows = self.g.op1("Add", [rows, self.g.op1("Gather", [self._table_offsets[name], indices])])
        return self.g.op1("Reshape", [rows, self.g.const([0] * indices_rank + [n_blocks * BLOCK_WEIGHTS])])

    def _rescore_top_tokens(self, normed: str, approx_logits: str, output: GGUFTensor) -> str:
        """Recompute the ``rescore_tokens`` highest of ``approx_logits`` exactly, in fp32, from the output weights.

        ``normed`` [R, hidden] is the final hidden state; the output projection ran with int8 activations (fast, off
        by up to about 0.5 logits on SmolLM2). The best candidates' rows are gathered and dequantized exactly and
        dotted with ``normed`` in fp32, and their logits replace the approximate ones: every token that greedy
        decoding, top-k <= ``rescore_tokens`` or a nucleus inside those candidates can pick gets its exact logit.
        """
        with self.g.scope("rescore"):
            _, top = self.g.op("TopK", [approx_logits, self.g.const([self.rescore_tokens])], n_outputs=2, axis=-1)
            rows = self._gather_table_rows(output.name, top, 2)  # [R, k, hidden]
            column = self.g.op1("Unsqueeze", [normed, self.g.const([2])])  # [R, hidden, 1]
            exact = self.g.op1("MatMul", [rows, column])  # [R, k, 1]
            exact = self.g.op1("Squeeze", [exact, self.g.const([2])])
            return self.g.op1("ScatterElements", [approx_logits, top, exact], axis=1)

    # -- blocks ----------------------------------------------------------------------------------------------------

    def _make_rms_norm(self, x: str, weight: str) -> str:
        """RMSNorm from basic ops (used once, before layer 0; later norms are fused with the residual add)."""
        eps = self.g.const(np.array([self.params.rms_eps], np.float32), np.float32)
        variance = self.g.op1("ReduceMean", [self.g.op1("Mul", [x, x])], axes=[-1], keepdims=1)
        inv_rms = self.g.op1("Reciprocal", [self.g.op1("Sqrt", [self.g.op1("Add", [variance, eps])])])
        return self.g.op1("Mul", [self.g.op1("Mul", [x, inv_rms]), weight])

    def _make_skip_norm(self, x: str, residual: str, weight: str) -> tuple[str, str]:
        """(RMSNorm(x + residual) * weight, x + residual)."""
        normed, _, _, total = self.g.op(
            "SkipSimplifiedLayerNormalization",
            [x, residual, weight],
            n_outputs=4,
            domain=MS_DOMAIN,
            epsilon=self.params.rms_eps,
        )
        return normed, total

    def _norm_weight(self, name: str) -> str:
        return self.g.weight(name.removesuffix(".weight").replace(".", "_"), self.model.dequantized(name))

    def _make_attention(self, h: str, layer: int, io: dict[str, str], cos: str, sin: str) -> str:
        p = self.params
        prefix = f"blk.{layer}"
        with self.g.scope("attn"):
            qkv = self._make_linear(
                h, [self.model.tensor(f"{prefix}.attn_{name}.weight") for name in "qkv"], "qkv_proj"
            )
            padded = self.g.op1("Gather", [qkv, io["chunk_index"]], axis=0)  # [B, S, q + 2 kv]
            attn = self.g.op(
                "GroupQueryAttention",
                [
                    padded,
                    "",
                    "",
                    f"past_key.{layer}",
                    f"past_value.{layer}",
                    io["seqlens_k"],
                    io["total_sequence_length"],
                    cos,
                    sin,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    io["query_lens"],
                ],
                domain=MS_DOMAIN,
                outputs=[
                    f"/layers.{layer}/attn/GroupQueryAttention/output_0",
                    f"present_key.{layer}",
                    f"present_value.{layer}",
                ],
                num_heads=p.n_heads,
                kv_num_heads=p.n_kv_heads,
                do_rotary=1,
                rotary_interleaved=int(p.rope_interleaved),
                scale=1.0 / float(np.sqrt(p.head_dim)),
            )[0]
            flat = self.g.op1("Reshape", [attn, self.g.const([-1, p.n_heads * p.head_dim])])
            packed = self.g.op1("Gather", [flat, io["packed_index"]], axis=0)  # [T, heads * head_dim]
            return self._make_linear(packed, [self.model.tensor(f"{prefix}.attn_output.weight")], "o_proj")

    def _make_mlp(self, h: str, layer: int) -> str:
        prefix = f"blk.{layer}"
        with self.g.scope("mlp"):
            gate_up_tensors = [self.model.tensor(f"{prefix}.ffn_{name}.weight") for name in ("gate", "up")]
            gate_up = self._make_linear(h, gate_up_tensors, "gate_up_proj")
            gate, up = self.g.op(
                "Split", [gate_up, self.g.const([self.params.ffn, self.params.ffn])], n_outputs=2, axis=-1
            )
            silu = self.g.op1("Mul", [gate, self.g.op1("Sigmoid", [gate])])
            product = self.g.op1("Mul", [silu, up])
            return self._make_linear(product, [self.model.tensor(f"{prefix}.ffn_down.weight")], "down_proj")

    def _rotary_caches(self) -> tuple[str, str]:
        """cos/sin tables [context_length, head_dim / 2] in float32, computed in float64."""
        p = self.params
        half = p.head_dim // 2
        inv_freq = p.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / p.head_dim)
        factors = self.model.optional("rope_freqs.weight")
        if factors is not None:
            inv_freq = inv_freq / dequantize(factors).astype(np.float64)
        angles = (np.arange(p.context_length, dtype=np.float64)[:, None] / p.rope_linear_scale) * inv_freq[None, :]
        return (
            self.g.weight("cos_cache", np.cos(angles).astype(np.float32)),
            self.g.weight("sin_cache", np.sin(angles).astype(np.float32)),
        )

    def build(self) -> onnx.ModelProto:
        p = self.params
        g = self.g
        io = {
            "input_ids": g.add_input("input_ids", INT64, ["tokens"]),
            "chunk_index": g.add_input("chunk_index", INT64, ["batch", "chunk"]),
            "packed_index": g.add_input("packed_index", INT64, ["tokens"]),
            "logit_index": g.add_input("logit_index", INT64, ["rows"]),
            "seqlens_k": g.add_input("seqlens_k", INT32, ["batch"]),
            "query_lens": g.add_input("query_lens", INT32, ["batch"]),
            "total_sequence_length": g.add_input("total_sequence_length", INT32, []),
        }
        kv_shape: list[int | str | None] = ["batch", p.n_kv_heads, "max_seq_len", p.head_dim]
        g.add_output("logits", FLOAT, ["rows", p.vocab_size])
        for layer in range(p.n_layers):
            g.add_input(f"past_key.{layer}", FLOAT, kv_shape)
            g.add_input(f"past_value.{layer}", FLOAT, kv_shape)
            g.add_output(f"present_key.{layer}", FLOAT, kv_shape)
            g.add_output(f"present_value.{layer}", FLOAT, kv_shape)
        cos, sin = self._rotary_caches()
        x = self._make_embedding(io["input_ids"])
        h = ""
        residual = ""
        for layer in range(p.n_layers):
            with g.scope(f"layers.{layer}"):
                norm = self._norm_weight(f"blk.{layer}.attn_norm.weight")
                if layer == 0:
                    h, residual = self._make_rms_norm(x, norm), x
                else:
                    h, residual = self._make_skip_norm(x, residual, norm)
                attn_out = self._make_attention(h, layer, io, cos, sin)
                ffn_norm = self._norm_weight(f"blk.{layer}.ffn_norm.weight")
                h, residual = self._make_skip_norm(attn_out, residual, ffn_norm)
                x = self._make_mlp(h, layer)
        with g.scope("final"):
            last_x = g.op1("Gather", [x, io["logit_index"]], axis=0)
            last_residual = g.op1("Gather", [residual, io["logit_index"]], axis=0)
            normed, _ = self._make_skip_norm(last_x, last_residual, self._norm_weight("output_norm.weight"))
        output = self.model.optional("output.weight") or self.model.tensor("token_embd.weight")
        if self.rescore_tokens and output.type_name in QUANTIZED_TYPES:
            self.accuracy_level, layers_level = INT8_ACTIVATIONS_LEVEL, self.accuracy_level
            logits = self._make_linear(normed, [output], "lm_head")
            self.accuracy_level = layers_level
            logits = self._rescore_top_tokens(normed, logits, output)
        else:
            logits = self._make_linear(normed, [output], "lm_head")
        g.op1("Identity", [logits], outputs=["logits"])
        return g.build(doc_string=f"{p.architecture} from GGUF {self.model.path.name}")


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[..., 32] nibbles in weight order to [..., 16] bytes with weight 2i in the low nibble of byte i."""
    packed: np.ndarray = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    return packed


def _int_option(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"option {key!r} must be a positive integer, got {value!r}")
    return value


def build_llama_onnx(model: GGUFModel, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out_dir/model.onnx`` for the GGUF model and return its config (without tokenizer entries)."""
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise ValueError(f"unknown llama-gguf options {sorted(unknown)}; expected some of {sorted(KNOWN_OPTIONS)}")
    accuracy_level = options.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"option 'accuracy_level' must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    p = model.params
    max_seq_len = _int_option(options, "max_seq_len", min(DEFAULT_MAX_SEQ_LEN, p.context_length))
    if max_seq_len > p.context_length:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context length {p.context_length}")
    max_batch_size = _int_option(options, "max_batch_size", DEFAULT_MAX_BATCH_SIZE)
    rescore_tokens = options.get("output_rescore_tokens", 0)
    if (
        isinstance(rescore_tokens, bool)
        or not isinstance(rescore_tokens, int)
        or not 0 <= rescore_tokens <= min(MAX_RESCORE_TOKENS, p.vocab_size)
    ):
        raise ValueError(
            f"option 'output_rescore_tokens' must be an integer in [0, {MAX_RESCORE_TOKENS}], got {rescore_tokens!r}"
        )
    decode_graph_rows = options.get("decode_graph_rows", 0)
    if isinstance(decode_graph_rows, bool) or not isinstance(decode_graph_rows, int) or decode_graph_rows < 0:
        raise ValueError(f"option 'decode_graph_rows' must be an integer >= 0, got {decode_graph_rows!r}")
    if decode_graph_rows and accuracy_level != 0:
        raise ValueError("option 'decode_graph_rows' needs accuracy_level 0 (its graph is for fp32-activation layers)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE_NAME: False, **({DECODE_MODEL_FILE_NAME: True} if decode_graph_rows else {})}
    for file_name, two_level in files.items():
        started = time.perf_counter()
        graph = _LlamaGraph(model, int(accuracy_level), rescore_tokens, two_level_activations=two_level).build()
        onnx.save_model(graph, out_dir / file_name)
        logger.info("Wrote %s in %.1f s", out_dir / file_name, time.perf_counter() - started)
        del graph
    decode_entries: dict[str, Any] = {}
    if decode_graph_rows:
        decode_entries = {"decode_model_file": DECODE_MODEL_FILE_NAME, "decode_graph_rows": decode_graph_rows}
    return {
        "architecture": p.architecture,
        "n_layers": p.n_layers,
        "hidden": p.hidden,
        "n_heads": p.n_heads,
        "n_kv_heads": p.n_kv_heads,
        "head_dim": p.head_dim,
        "ffn": p.ffn,
        "vocab_size": p.vocab_size,
        "context_length": p.context_length,
        "rope_theta": p.rope_theta,
        "rope_interleaved": p.rope_interleaved,
        "rms_eps": p.rms_eps,
        "tensor_types": model.type_counts(),
        "tied_embeddings": model.optional("output.weight") is None,
        "accuracy_level": int(accuracy_level),
        "output_rescore_tokens": rescore_tokens,
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "kv_dtype": "float32",
        "model_file": MODEL_FILE_NAME,
        **decode_entries,
    }


def convert_llama_gguf(files: Mapping[str, Path], out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Converter entry point: ``files["model.gguf"]`` to ``out_dir/model.onnx`` + ``tokenizer.json``; returns config."""
    from app.convert.gguf_tokenizer import write_tokenizer_files

    if "model.gguf" not in files:
        raise ValueError(f"expected a 'model.gguf' source file, got {sorted(files)}")
    model = GGUFModel(files["model.gguf"])
    config = build_llama_onnx(model, out_dir, options)
    for key, value in write_tokenizer_files(model.reader, out_dir).items():
        # The model's own entries win: e.g. "vocab_size" is the logits width, which may exceed the token count.
        config[f"tokenizer_{key}" if key in config else key] = value
    return config
