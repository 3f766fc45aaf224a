"""The Open Inference Protocol (KServe v2) wire format for tensors: JSON and the binary tensor data extension.

Pure code: bytes in, numpy arrays out, and back. No I/O.

A request body is a JSON object, optionally followed by raw tensor bytes. With the binary extension the
``Inference-Header-Content-Length`` header gives the JSON's length; an input whose ``parameters.binary_data_size``
is set takes that many bytes of the binary part, in the order of the inputs. Numbers are little-endian, row-major.
A ``BYTES`` element is a 4-byte little-endian length followed by that many bytes. Responses use the same layout when
an output is asked for in binary (``parameters.binary_data`` on the output, or ``binary_data_output`` on the
request, which tritonclient sets by default).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.engine.generic_runner import DATATYPES, datatype_of
from app.errors import BrookError

BYTES_LENGTH = struct.Struct("<I")  # the length prefix of one BYTES element


class InferRequestError(BrookError, ValueError):
    """The body is not a valid inference request (bad JSON, a bad tensor, data that does not fit its shape)."""


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool  # send this output in the binary part of the response


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool  # the default for outputs that do not say (request parameter `binary_data_output`)
    parameters: dict[str, Any] = field(default_factory=dict)


def _load_json(text: bytes) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferRequestError(f"the request header is not valid JSON: {exc}") from None
    except RecursionError:
        raise InferRequestError("the request header nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise InferRequestError(f"the request must be a JSON object, got {type(data).__name__}")
    return data


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InferRequestError(f"{where}: 'parameters' must be an object, got {params!r}")
    return params


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a request body. `header_length` is the `Inference-Header-Content-Length` header (None if absent)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise InferRequestError(f"Inference-Header-Content-Length is {header_length}, but the body has "
                                    f"{len(body)} bytes")
        header, binary = body[:header_length], body[header_length:]
    data = _load_json(header)
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InferRequestError(f"'id' must be a string, got {request_id!r}")
    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InferRequestError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _decode_input(raw, binary, offset)
        if name in inputs:
            raise InferRequestError(f"input {name!r} appears twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InferRequestError(f"the binary part has {len(binary)} bytes, but the inputs' binary_data_size add up "
                                f"to {offset}")
    params = _parameters(data, "request")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InferRequestError(f"parameter binary_data_output must be true or false, got {binary_output!r}")
    outputs = None
    if "outputs" in data:
        if not isinstance(data["outputs"], list):
            raise InferRequestError("'outputs' must be a list")
        outputs = [_requested_output(raw, binary_output) for raw in data["outputs"]]
    return InferRequest(request_id, inputs, outputs, binary_output, params)


def _requested_output(raw: Any, default_binary: bool) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InferRequestError(f"each requested output needs a string 'name', got {raw!r}")
    params = _parameters(raw, f"output {raw['name']!r}")
    if params.get("classification"):
        raise InferRequestError(f"output {raw['name']!r}: the classification extension is not supported")
    binary = params.get("binary_data", default_binary)
    if not isinstance(binary, bool):
        raise InferRequestError(f"output {raw['name']!r}: binary_data must be true or false, got {binary!r}")
    return RequestedOutput(raw["name"], binary)


def _decode_input(raw: Any, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """(name, array, binary bytes used) of one input tensor."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InferRequestError(f"each input needs a string 'name', got {str(raw)[:200]}")
    name = raw["name"]
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InferRequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise InferRequestError(f"input {name!r}: unsupported datatype {datatype!r}; supported: "
                                f"{', '.join(DATATYPES)}")
    count = math.prod(shape)
    params = _parameters(raw, f"input {name!r}")
    if "shared_memory_region" in params:
        raise InferRequestError(f"input {name!r}: the shared-memory extension is not supported")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InferRequestError(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in raw:
            raise InferRequestError(f"input {name!r} has both 'data' and binary_data_size")
        if offset + size > len(binary):
            raise InferRequestError(f"input {name!r} needs {size} binary bytes at offset {offset}, but the binary "
                                    f"part has only {len(binary)}")
        chunk = binary[offset:offset + size]
        return name, _from_binary(name, datatype, shape, count, chunk), size
    if "data" not in raw:
        raise InferRequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return name, _from_json(name, datatype, shape, count, raw["data"]), 0


def _from_binary(name: str, datatype: str, shape: list[int], count: int, chunk: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(_split_bytes(name, chunk, count), dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InferRequestError(f"input {name!r}: shape {shape} of {datatype} needs {expected} bytes, "
                                f"binary_data_size is {len(chunk)}")
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _split_bytes(name: str, chunk: bytes, count: int) -> list[str]:
    items: list[str] = []
    offset = 0
    while offset < len(chunk):
        if offset + BYTES_LENGTH.size > len(chunk):
            raise InferRequestError(f"input {name!r}: a BYTES element's 4-byte length is cut off")
        (length,) = BYTES_LENGTH.unpack_from(chunk, offset)
        offset += BYTES_LENGTH.size
        if offset + length > len(chunk):
            raise InferRequestError(f"input {name!r}: a BYTES element of {length} bytes runs past the data")
        items.append(_utf8(name, chunk[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise InferRequestError(f"input {name!r}: its shape needs {count} BYTES elements, got {len(items)}")
    return items


def _utf8(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InferRequestError(f"input {name!r}: BYTES elements must be UTF-8 text for an ONNX string tensor") \
            from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(name: str, datatype: str, shape: list[int], count: int, data: Any) -> np.ndarray:
    flat = _flatten(data)  # the protocol allows flat (row-major) or nested lists
    if len(flat) != count:
        raise InferRequestError(f"input {name!r}: shape {shape} needs {count} values, 'data' holds {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InferRequestError(f"input {name!r}: BYTES data must be strings")
        return np.array(flat, dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        valid = all(isinstance(v, bool) for v in flat)
    elif dtype.kind in "iu":
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
    else:
        valid = all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    if not valid:
        wanted = {"b": "true/false", "i": "integers", "u": "integers"}.get(dtype.kind, "numbers")
        raise InferRequestError(f"input {name!r}: {datatype} data must be {wanted}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InferRequestError(f"input {name!r}: a value does not fit in {datatype}") from None


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES elements (str or bytes) as length-prefixed bytes, row-major."""
    parts = []
    for item in array.reshape(-1):
        raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(BYTES_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _json_data(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == np.object_:
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    values: list[Any] = flat.tolist()
    return values


def encode_infer_response(model_name: str, model_version: int, request_id: str | None,
                          outputs: Sequence[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON part's length (the header to send)."""
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, binary in outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary:
            raw = (serialize_bytes(array) if array.dtype == np.object_
                   else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _json_data(array)
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version), "outputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
