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

Dim = int | str | None


class GraphBuilder:
    """Collects nodes, initializers and graph IO, then builds a checked ``onnx.ModelProto``."""

    def __init__(self, graph_name: str) -> None:
        self._graph_name = graph_name
        self._scopes: list[str] = []
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._initializer_names: set[str] = set()
        self._node_names: set[str] = set()
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

    def weight(self, leaf: str, array: np.ndarray) -> str:
        """Add ``array`` as an initializer named after the current scope (``decoder.layers.0.fc1.weight``)."""
        name = ".".join([*self._scopes, leaf]).strip(".")
        if name in self._initializer_names:
            raise ValueError(f"initializer {name!r} defined twice")
        self._initializer_names.add(name)
        self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: Sequence[int] | Sequence[float] | np.ndarray, dtype: type = np.int64) -> str:
        """A small shared constant initializer (shapes, axes, scalars); identical values share one name."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = f"/const/{array.dtype.name}_{len(self._constants)}"
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
        output_names = list(outputs) if outputs is not None else [f"{node_name}/output_{i}" for i in range(n_outputs)]
        self._nodes.append(
            helper.make_node(op_type, list(inputs), output_names, name=node_name, domain=domain, **attributes)
        )
        return output_names

    def op1(self, op_type: str, inputs: Sequence[str], **kwargs: Any) -> str:
        """Add a node with a single output and return that output's name."""
        return self.op(op_type, inputs, **kwargs)[0]

    def build(self, doc_string: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(
            self._nodes, self._graph_name, self._inputs, self._outputs, initializer=self._initializers
        )
        opsets = [helper.make_opsetid("", ONNX_OPSET)]
        if any(node.domain == MS_DOMAIN for node in self._nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, MS_OPSET))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="brook.convert", doc_string=doc_string)
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=False)
        logger.debug(
            "built graph %s: %d nodes, %d initializers", self._graph_name, len(self._nodes), len(self._initializers)
        )
        return model


FLOAT: Final = TensorProto.FLOAT
INT64: Final = TensorProto.INT64
