"""Read the input/output signature of an ONNX file for the manifest (names, element types, shapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from app.repository.manifest import GraphSignature, TensorSignature


def _tensor_signature(value_info: Any) -> TensorSignature:
    tensor_type = value_info.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    shape: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or "?")
    return TensorSignature(name=value_info.name, dtype=dtype, shape=shape)


def graph_signature(path: Path) -> GraphSignature:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return GraphSignature(
        file=path.name,
        inputs=[_tensor_signature(v) for v in model.graph.input if v.name not in initializers],
        outputs=[_tensor_signature(v) for v in model.graph.output],
    )
