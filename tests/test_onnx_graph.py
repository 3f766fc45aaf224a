"""The small ONNX graph builder used by the converters: naming, Scan bodies with stacked weights, int8 linears."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.convert.onnx_graph import (
    FLOAT,
    INT8_ZERO_POINT,
    GraphBuilder,
    StackedWeights,
    attend,
    linear,
    quantize_int8_blocks,
    quantize_int8_columns,
)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs: list[np.ndarray] = session.run(None, feed)
    return outputs


def test_nodes_and_weights_are_named_after_their_scope() -> None:
    g = GraphBuilder("demo")
    x = g.add_input("x", FLOAT, ["batch", 4])
    with g.scope("decoder"), g.scope("layers.0"), g.scope("mlp"):
        h = g.op1("Relu", [x])
        h = g.op1("Relu", [h])
        weight = g.weight("fc1.weight", np.ones((4, 2), dtype=np.float32))
    g.op("MatMul", [h, weight], outputs=["y"])
    g.add_output("y", FLOAT, ["batch", 2])
    model = g.build()

    assert [node.name for node in model.graph.node] == [
        "/decoder/layers.0/mlp/Relu",
        "/decoder/layers.0/mlp/Relu_1",
        "/MatMul",
    ]
    assert model.graph.node[0].output == ["/decoder/layers.0/mlp/Relu/output_0"]
    assert weight == "decoder.layers.0.mlp.fc1.weight"
    with pytest.raises(ValueError, match="defined twice"):
        g.initializer(weight, np.zeros(1, dtype=np.float32))
    assert g.const([1, 2]) == g.const([1, 2]) != g.const([2, 1])
    (y,) = _run(model, {"x": np.full((3, 4), -1.0, dtype=np.float32)})
    np.testing.assert_array_equal(y, np.zeros((3, 2), dtype=np.float32))


def test_scan_over_stacked_weights_equals_an_unrolled_loop() -> None:
    """x -> for each layer l: x = x @ W[l] + b[l] + cache[l]; the scan also emits every layer's x."""
    rng = np.random.default_rng(0)
    n_layers, width = 3, 5
    weights = [rng.standard_normal((width, width)).astype(np.float32) for _ in range(n_layers)]
    biases = [rng.standard_normal(width).astype(np.float32) for _ in range(n_layers)]

    g = GraphBuilder("scan_demo")
    x = g.add_input("x", FLOAT, ["batch", width])
    cache = g.add_input("cache", FLOAT, [n_layers, "batch", width])
    with g.scope("layers"):
        body = g.subgraph("layer")
        state = body.add_input("state", FLOAT, ["batch", width])
        cache_slice = body.add_input("cache_slice", FLOAT, ["batch", width])
        stacked = StackedWeights(g, body)
        with body.scope("proj"):
            h = body.op1("MatMul", [state, stacked("weight", weights)])
            h = body.op1("Add", [h, stacked("bias", biases)])
        body.op("Add", [h, cache_slice], outputs=["state_out"])
        body.op("Identity", ["state_out"], outputs=["per_layer"])
        body.add_output("state_out", FLOAT, ["batch", width])
        body.add_output("per_layer", FLOAT, ["batch", width])
        scan_inputs = [cache, *stacked.outer_names]
        g.op(
            "Scan",
            [x, *scan_inputs],
            outputs=["y", "all_layers"],
            body=body.build_graph(),
            num_scan_inputs=len(scan_inputs),
        )
    g.add_output("y", FLOAT, ["batch", width])
    g.add_output("all_layers", FLOAT, [n_layers, "batch", width])
    model = g.build()
    assert stacked.outer_names == ["layers.proj.weight", "layers.proj.bias"]

    x_value = rng.standard_normal((2, width)).astype(np.float32)
    cache_value = rng.standard_normal((n_layers, 2, width)).astype(np.float32)
    y, all_layers = _run(model, {"x": x_value, "cache": cache_value})
    expected = x_value
    for layer in range(n_layers):
        expected = expected @ weights[layer] + biases[layer] + cache_value[layer]
        np.testing.assert_allclose(all_layers[layer], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_linear_matches_numpy(int8: bool) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((48, 64)).astype(np.float32)  # [out, in] like CTranslate2 and PyTorch
    bias = rng.standard_normal(48).astype(np.float32)
    g = GraphBuilder("linear")
    x = g.add_input("x", FLOAT, ["batch", "time", 64])
    y = linear(g, x, weight, bias, "proj", int8=int8)
    g.op("Identity", [y], outputs=["y"])
    g.add_output("y", FLOAT, ["batch", "time", 48])
    x_value = rng.standard_normal((2, 3, 64)).astype(np.float32)
    (got,) = _run(g.build(), {"x": x_value})
    expected = x_value @ weight.T + bias
    tolerance = 0.05 * np.abs(expected).max() if int8 else 1e-4
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)


def test_attend_is_softmax_attention() -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    v = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    mask = np.triu(np.full((3, 5), -1e9, dtype=np.float32), k=3)
    g = GraphBuilder("attend")
    names = [g.add_input(n, FLOAT, list(a.shape)) for n, a in (("q", q), ("k", k), ("v", v), ("mask", mask))]
    out = attend(g, names[0], names[1], names[2], names[3], d_model=8)
    g.op("Identity", [out], outputs=["out"])
    g.add_output("out", FLOAT, [1, 3, 8])
    (got,) = _run(g.build(), {"q": q, "k": k, "v": v, "mask": mask})
    scores = q @ k.transpose(0, 1, 3, 2) + mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v).transpose(0, 2, 1, 3).reshape(1, 3, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


weights_2d = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
    elements=st.floats(-1e3, 1e3, width=32),
)


@settings(max_examples=60, deadline=None)
@given(weight=weights_2d)
def test_block_quantization_error_is_at_most_half_a_step(weight: np.ndarray) -> None:
    data, scales = quantize_int8_blocks(weight, block_size=16)
    n_rows, k = weight.shape
    assert data.dtype == np.uint8 and data.shape == (n_rows, -(-k // 16), 16)
    assert scales.shape == (n_rows, -(-k // 16)) and np.all(scales > 0)
    restored = ((data.astype(np.float32) - INT8_ZERO_POINT) * scales[..., None]).reshape(n_rows, -1)[:, :k]
    step = np.repeat(scales, 16, axis=1)[:, :k]
    assert np.all(np.abs(restored - weight) <= 0.5 * step * (1 + 1e-5) + 1e-30)
    assert data.min() >= 1  # symmetric: q in [-127, 127], so code 0 (-128) is never used


@settings(max_examples=60, deadline=None)
@given(weight=weights_2d)
def test_column_quantization_error_is_at_most_half_a_step(weight: np.ndarray) -> None:
    quantized, scales = quantize_int8_columns(weight)
    assert quantized.dtype == np.int8 and scales.shape == (weight.shape[1],)
    restored = quantized.astype(np.float32) * scales
    assert np.all(np.abs(restored - weight) <= 0.5 * scales * (1 + 1e-5) + 1e-30)
