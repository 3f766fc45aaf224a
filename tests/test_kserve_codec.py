"""The v2 tensor wire format: JSON and binary requests decode to the right arrays; responses encode as tritonclient
expects (checked with tritonclient's own decoder)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.engine.generic_runner import DATATYPES
from app.server.kserve_codec import (
    InferRequestError,
    encode_infer_response,
    parse_infer_request,
    serialize_bytes,
)

NUMERIC = [name for name in DATATYPES if name != "BYTES"]


def binary_request(tensors: list[tuple[str, str, np.ndarray]], **extra: Any) -> tuple[bytes, int]:
    header: dict[str, Any] = {"inputs": [], **extra}
    chunks = []
    for name, datatype, array in tensors:
        raw = serialize_bytes(array) if datatype == "BYTES" else array.astype(array.dtype.newbyteorder("<")).tobytes()
        header["inputs"].append({"name": name, "shape": list(array.shape), "datatype": datatype,
                                 "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    text = json.dumps(header).encode()
    return text + b"".join(chunks), len(text)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(NUMERIC))
def test_binary_and_json_requests_decode_to_the_same_array(data: st.DataObject, datatype: str) -> None:
    dtype = DATATYPES[datatype]
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False) if dtype.kind == "f" else None
    array = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), elements=elements))
    body, length = binary_request([("t", datatype, array)])
    decoded = parse_infer_request(body, length).inputs["t"]
    assert decoded.dtype == dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    as_json = json.dumps({"inputs": [{"name": "t", "shape": list(array.shape), "datatype": datatype,
                                      "data": array.tolist()}]}).encode()
    np.testing.assert_array_equal(parse_infer_request(as_json, None).inputs["t"], array)


def test_bytes_tensors_decode_from_binary_and_json() -> None:
    texts = np.array([["a", ""], ["héllo", "日本"]], dtype=object)
    body, length = binary_request([("s", "BYTES", texts)])
    np.testing.assert_array_equal(parse_infer_request(body, length).inputs["s"], texts)
    as_json = json.dumps({"inputs": [{"name": "s", "shape": [2, 2], "datatype": "BYTES",
                                      "data": ["a", "", "héllo", "日本"]}]}).encode()
    np.testing.assert_array_equal(parse_infer_request(as_json, None).inputs["s"], texts)


def test_several_binary_inputs_take_their_bytes_in_order() -> None:
    a, b = np.arange(4, dtype=np.int32).reshape(2, 2), np.array([True, False, True])
    body, length = binary_request([("a", "INT32", a), ("b", "BOOL", b)], id="r1",
                                  outputs=[{"name": "y", "parameters": {"binary_data": False}}],
                                  parameters={"binary_data_output": True})
    request = parse_infer_request(body, length)
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert request.id == "r1" and request.binary_output
    assert request.outputs is not None and [(o.name, o.binary) for o in request.outputs] == [("y", False)]


@pytest.mark.parametrize(("tensor", "message"), [
    ({"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}, "needs 2 values"),
    ({"name": "x", "shape": [1], "datatype": "BF16", "data": [1.0]}, "unsupported datatype"),
    ({"name": "x", "shape": [1], "datatype": "INT64", "data": [1.5]}, "must be integers"),
    ({"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}, "does not fit"),
    ({"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}, "true/false"),
    ({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}, "non-negative integers"),
    ({"name": "x", "shape": [1], "datatype": "FP32"}, "neither 'data'"),
    ({"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"shared_memory_region": "r"}},
     "shared-memory"),
    ({"shape": [1], "datatype": "FP32", "data": [1]}, "string 'name'"),
])
def test_bad_json_tensors_are_refused_with_the_reason(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(InferRequestError, match=message):
        parse_infer_request(json.dumps({"inputs": [tensor]}).encode(), None)


_ONE_BINARY = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'
_TWO_BINARY = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'
_JSON_ONLY = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'


@pytest.mark.parametrize(("header", "tail", "message"), [
    (b"{oops", None, "not valid JSON"),
    (b"[1]", None, "JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, None, "too deeply"),
    (b'{"inputs": []}', None, "non-empty list"),
    (_ONE_BINARY, b"\x00\x00", "binary part has only 2"),
    (_TWO_BINARY, b"\x00" * 4, "needs 8 bytes"),
    (_JSON_ONLY, b"XYZ", "add up to 0"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], '
     b'"outputs": [{"name": "y", "parameters": {"classification": 3}}]}', None, "classification"),
])
def test_bad_bodies_are_refused_with_the_reason(header: bytes, tail: bytes | None, message: str) -> None:
    with pytest.raises(InferRequestError, match=message):
        parse_infer_request(header + (tail or b""), None if tail is None else len(header))


def test_a_header_length_past_the_body_is_refused() -> None:
    with pytest.raises(InferRequestError, match="body has"):
        parse_infer_request(_JSON_ONLY, len(_JSON_ONLY) + 1)


def test_responses_decode_with_tritonclient() -> None:
    result_class = pytest.importorskip("tritonclient.http", reason="tritonclient is in the dev extra").InferResult
    outputs = [("p", np.array([[0.25, 0.75]], dtype=np.float32), True),
               ("label", np.array([1], dtype=np.int64), False),
               ("words", np.array(["rain", "dry"], dtype=object), True)]
    body, length = encode_infer_response("rainfall", 2, "abc", outputs)
    assert length is not None
    result = result_class.from_response_body(body, header_length=length)
    response = result.get_response()
    assert response["model_name"] == "rainfall" and response["model_version"] == "2" and response["id"] == "abc"
    np.testing.assert_array_equal(result.as_numpy("p"), outputs[0][1])
    np.testing.assert_array_equal(result.as_numpy("label"), [1])
    assert list(result.as_numpy("words")) == [b"rain", b"dry"]


def test_an_all_json_response_has_no_binary_part() -> None:
    body, length = encode_infer_response("m", 1, None, [("y", np.array([[True, False]]), False)])
    assert length is None
    assert json.loads(body)["outputs"] == [{"name": "y", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]}]
