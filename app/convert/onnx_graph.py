"""A small ONNX graph builder with hierarchical node names.

Nodes are named after the scope they are made in, e.g. ``/decoder/layers.0/self_attn/MatMul``, and their
outputs ``{node}/output_{i}`` (the onnxruntime-genai convention), so a profile or a Netron view reads like the
model. Only numpy and onnx are used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

MS_DOMAIN: Final = "com.microsoft"
ONNX_OPSET: Final = 17  # LayerNormalization is in 17; onnxruntime.quantization handles it well
MS_OPSET: Final = 1
FLOAT: Final = TensorProto.FLOAT
INT64: Final = TensorProto.INT64
INT8_BLOCK_SIZE: Final = 32  # weights per int8 scale along the input dimension
INT8_ZERO_POINT: Final = 128  # MatMulNBits/GatherBlockQuantized default zero point for 8 bits
INT8_ACCURACY_LEVEL: Final = 4  # MatMulNBits: quantize activations to int8 too (level 1 keeps fp32, very slow on CPU)

Dim = int | str | None


class GraphBuilder:
    """Collects nodes, initializers and graph IO, then builds a checked ``onnx.ModelProto``."""

    def __init__(self, graph_name: str, *, parent: GraphBuilder | None = None) -> None:
        self._graph_name = graph_name
        # a subgraph (Scan/Loop body) continues its parent's scope and keeps node names unique across both
        self._scopes: list[str] = list(parent._scopes) if parent else []
        self._node_names: set[str] = parent._node_names if parent else set()
        self._uses_ms_domain: list[bool] = parent._uses_ms_domain if parent else [False]
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._initializer_names: set[str] = set()
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Name nodes and weights made inside the block ``/.../name/...``."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def _scoped(self, leaf: str) -> str:
        return "/" + "/".join([*self._scopes, leaf])

    def add_input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self._inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, name: str, elem_type: int, shape: Sequence[Dim]) -> None:
        self._outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def weight_name(self, leaf: str) -> str:
        """The initializer name for ``leaf`` in the current scope, e.g. ``decoder.layers.0.fc1.weight``."""
        return ".".join([*self._scopes, leaf]).strip(".")

    def weight(self, leaf: str, array: np.ndarray) -> str:
        """Add ``array`` as an initializer named after the current scope; returns its name."""
        return self.initializer(self.weight_name(leaf), array)

    def initializer(self, name: str, array: np.ndarray) -> str:
        if name in self._initializer_names:
            raise ValueError(f"initializer {name!r} defined twice")
        self._initializer_names.add(name)
        self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: int | Sequence[int] | np.ndarray, dtype: type = np.int64) -> str:
        """A small shared constant initializer (shapes, axes, scalars); identical values share one name."""
        array: np.ndarray = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = f"/{self._graph_name}/const/{array.dtype.name}_{len(self._constants)}"
            self._constants[key] = name
            self._initializers.append(numpy_helper.from_array(array, name))
            self._initializer_names.add(name)
        return self._constants[key]

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        n_outputs: int = 1,
        domain: str = "",
        name: str | None = None,
        outputs: Sequence[str] | None = None,
        **attributes: Any,
    ) -> list[str]:
        """Add one node and return its output names. ``outputs`` pins names (graph outputs)."""
        base = self._scoped(name or op_type)
        node_name = base
        suffix = 1
        while node_name in self._node_names:
            node_name = f"{base}_{suffix}"
            suffix += 1
        self._node_names.add(node_name)
        if domain == MS_DOMAIN:
            self._uses_ms_domain[0] = True
        output_names = list(outputs) if outputs is not None else [f"{node_name}/output_{i}" for i in range(n_outputs)]
        self._nodes.append(
            helper.make_node(op_type, list(inputs), output_names, name=node_name, domain=domain, **attributes)
        )
        return output_names

    def op1(self, op_type: str, inputs: Sequence[str], **kwargs: Any) -> str:
        """Add a node with a single output and return that output's name."""
        return self.op(op_type, inputs, **kwargs)[0]

    def subgraph(self, graph_name: str) -> GraphBuilder:
        """A builder for a control-flow body (e.g. Scan) that starts in this builder's current scope."""
        return GraphBuilder(graph_name, parent=self)

    def build_graph(self) -> onnx.GraphProto:
        return helper.make_graph(
            self._nodes, self._graph_name, self._inputs, self._outputs, initializer=self._initializers
        )

    def build(self, doc_string: str = "") -> onnx.ModelProto:
        graph = self.build_graph()
        opsets = [helper.make_opsetid("", ONNX_OPSET)]
        if self._uses_ms_domain[0]:
            opsets.append(helper.make_opsetid(MS_DOMAIN, MS_OPSET))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="brook.convert", doc_string=doc_string)
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=False)
        logger.debug(
            "built graph %s: %d nodes, %d initializers", self._graph_name, len(self._nodes), len(self._initializers)
        )
        return model


def quantize_int8_blocks(weight: np.ndarray, block_size: int = INT8_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise int8 of a [N, K] weight along K, in the MatMulNBits (bits=8) layout.

    Returns ``(data, scales)``: data uint8 [N, ceil(K/block), block] holding ``q + 128`` and scales float32
    [N, ceil(K/block)], so that ``w ~= (data - 128) * scale``. K is zero-padded to whole blocks.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {weight.shape}")
    n_rows, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_rows, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n_rows, n_blocks, block_size)
    scales = np.abs(blocks).max(axis=-1) / np.float32(127.0)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    quantized = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + INT8_ZERO_POINT
    return quantized.astype(np.uint8), scales


def layer_norm(g: GraphBuilder, x: str, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> str:
    """LayerNormalization over the last axis with weights ``{scope}.layer_norm.{weight,bias}``."""
    gamma_name = g.weight("layer_norm.weight", gamma)
    beta_name = g.weight("layer_norm.bias", beta)
    return g.op1("LayerNormalization", [x, gamma_name, beta_name], axis=-1, epsilon=epsilon)


INT8_COLUMN_RANGE: Final = 63  # 7-bit weights, like onnxruntime's quantize_dynamic(reduce_range=True)


def quantize_int8_columns(weight_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8 of a [K, N] MatMul weight: ``(q int8 [K, N], scale float32 [N])``.

    The values use 7 bits (-63..63): on x86 processors without VNNI, onnxruntime multiplies uint8 activations by
    int8 weights with ``vpmaddubsw``, which adds pairs of products into saturating int16, and 255 * 127 * 2
    overflows it (measured on an AMD EPYC with AVX2 only: outputs off by up to 3.0 on a 64-input layer whose largest
    output is 21). With 7-bit weights a pair is at most 255 * 63 * 2 = 32130 and cannot saturate."""
    scales = np.abs(weight_t).max(axis=0) / np.float32(INT8_COLUMN_RANGE)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    quantized = np.clip(np.rint(weight_t / scales), -INT8_COLUMN_RANGE, INT8_COLUMN_RANGE).astype(np.int8)
    return quantized, scales


def linear(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None, leaf: str, *, int8: bool) -> str:
    """``x @ weight.T + bias`` for a [out, in] weight, in scope ``leaf``.

    fp32: MatMul (weight stored transposed, [in, out]) then Add.
    int8: one com.microsoft DynamicQuantizeMatMul (what onnxruntime's dynamic quantization produces after fusion):
    per-column symmetric int8 weights, activations quantized to uint8 per call, bias fused.
    """
    weight_t = np.ascontiguousarray(weight.T)
    with g.scope(leaf):
        if int8:
            quantized, scales = quantize_int8_columns(weight_t)
            inputs = [x, g.weight("weight_q8", quantized), g.weight("weight_scales", scales)]
            if bias is not None:
                inputs += ["", g.weight("bias", bias)]
            return g.op1("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN)
        y = g.op1("MatMul", [x, g.weight("weight", weight_t)])
        if bias is not None:
            y = g.op1("Add", [y, g.weight("bias", bias)])
    return y


class StackedWeights:
    """Per-layer weights for a Scan body: one [n_layers, ...] initializer outside, one slice per iteration inside.

    Call it inside the body's scopes; the outer initializer takes the scoped name (``decoder.layers.mlp.fc1.weight``)
    and the body sees ``{name}[layer]``. ``outer_names`` lists the Scan inputs in the order of the body inputs, so
    the body's own inputs (state and other scanned tensors) must be added before the first weight.
    """

    def __init__(self, outer: GraphBuilder, body: GraphBuilder) -> None:
        self._outer = outer
        self._body = body
        self.outer_names: list[str] = []

    def __call__(self, leaf: str, per_layer: Sequence[np.ndarray]) -> str:
        stacked = np.stack([np.asarray(layer, dtype=np.float32) for layer in per_layer])
        name = self._outer.initializer(self._body.weight_name(leaf), stacked)
        self.outer_names.append(name)
        return self._body.add_input(f"{name}[layer]", FLOAT, list(stacked.shape[1:]))


def heads_to_sequence(g: GraphBuilder, x: str, d_model: int) -> str:
    """[B, N, S, H] -> [B, S, N*H]."""
    x = g.op1("Transpose", [x], perm=[0, 2, 1, 3])
    return g.op1("Reshape", [x, g.const([0, 0, d_model])])


def split_heads(g: GraphBuilder, qkv: str, n_heads: int, head_dim: int) -> list[str]:
    """[B, S, 3*N*H] (Q, K, V stacked) -> q, k, v each [B, N, S, H], with one Transpose.

    Reshape [B,S,3,N,H] -> Transpose [3,B,N,S,H] -> Split -> Squeeze x3
    """
    qkv = g.op1("Reshape", [qkv, g.const([0, 0, 3, n_heads, head_dim])])
    qkv = g.op1("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    return [g.op1("Squeeze", [part, g.const([0])]) for part in g.op("Split", [qkv], n_outputs=3, axis=0)]


def attend(g: GraphBuilder, q: str, keys: str, values: str, mask: str | None, d_model: int) -> str:
    """softmax(q @ keys^T + mask) @ values for pre-scaled q [B,N,n,H] and keys/values [B,N,S,H]; returns [B,n,d].

    FusedMatMul(transB) -> [Add mask] -> Softmax -> MatMul -> Transpose -> Reshape
    """
    scores = g.op1("FusedMatMul", [q, keys], domain=MS_DOMAIN, transB=1, alpha=1.0)
    if mask is not None:
        scores = g.op1("Add", [scores, mask])
    probs = g.op1("Softmax", [scores], axis=-1)
    return heads_to_sequence(g, g.op1("MatMul", [probs, values]), d_model)
