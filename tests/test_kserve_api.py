"""The Open Inference Protocol (KServe v2) API against a real `brook serve`, spoken by the official `tritonclient`.

One server (API keys on) serves a throw-away repository: the real rainfall model, and two tiny graphs built here
(`typed`: FP32, BOOL and BYTES tensors with a renamed input; `fixed`: no batch dimension).
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from app.repository import ModelRepository, VersionState
from tests.conftest import ARTIFACT_DIR, missing
from tests.generic_models import copy_rainfall, fixed_model, typed_model, write_generic_model
from tests.server_process import RunningServer, run_server

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra: pip install -e .[dev]")
from tritonclient.utils import InferenceServerException  # noqa: E402

API_KEY = "v2-test-key"
TYPED_SERVING = """[serving]
max_queue_delay_ms = 1.0

[serving.inputs.x]
name = "values"
description = "three numbers per row"
"""
RAIN_ROWS = np.array([[10.9, 10.6, 2.8, 4.5, 2], [0.0, 30.0, 18.0, 2.0, 200], [3.0, 12.0, 6.0, 6.1, 330]],
                     dtype=np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, model_repository: ModelRepository) -> Path:
    root = tmp_path_factory.mktemp("v2-repo")
    copy_rainfall(model_repository, root)
    write_generic_model(root, "typed", typed_model, TYPED_SERVING)
    write_generic_model(root, "fixed", fixed_model, "[serving]\nmax_batch_size = 0\n")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    # version_policy=all: rainfall v2 (A/B weight 0) is served too, as Triton serves every version of a repository.
    with run_server(ARTIFACT_DIR / "logs", model_dir=str(repo), models="rainfall,typed,fixed",
                    api_keys=API_KEY, version_policy="all") as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Any]:
    triton = http.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield triton
    triton.close()


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient adds Inference-Header-Content-Length to the dict it is given."""
    return {"Authorization": f"Bearer {API_KEY}"}


def rain_input(rows: np.ndarray, *, binary: bool = True, datatype: str = "FP32") -> Any:
    tensor = http.InferInput("weather_today", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def reference(repo: Path, version: int, rows: np.ndarray) -> list[np.ndarray]:
    """onnxruntime on the same file, outside the server."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(repo / "rainfall" / str(version) / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    return list(session.run(["label", "probabilities"], {"weather_today": rows}))


def error_of(call: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return int(caught.value.status()), caught.value.message()


def raw_post(server: RunningServer, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(server.http + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --- health and metadata ------------------------------------------------------------------------------------------


def test_health_and_server_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(headers=auth())
    assert metadata["name"] == "brook"
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])
    assert client.is_model_ready("rainfall", headers=auth())
    assert client.is_model_ready("rainfall", "2", headers=auth())
    assert not client.is_model_ready("no-such-model", headers=auth())


def test_model_metadata_comes_from_the_graph_with_the_toml_overrides(client: Any) -> None:
    rain = client.get_model_metadata("rainfall", headers=auth())
    assert rain["platform"] == "onnxruntime_onnx" and rain["versions"] == ["1", "2"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in rain["inputs"]] == [("weather_today", "FP32", [-1, 5])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in rain["outputs"]] == [
        ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 2])]
    assert client.get_model_metadata("rainfall", "2", headers=auth())["versions"] == ["2"]
    typed = client.get_model_metadata("typed", headers=auth())
    assert [(t["name"], t["datatype"]) for t in typed["inputs"]] == [
        ("values", "FP32"), ("flag", "BOOL"), ("text", "BYTES")]
    assert typed["inputs"][0]["description"] == "three numbers per row"
    config = client.get_model_config("rainfall", headers=auth())
    assert config["max_batch_size"] == 64 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert client.get_model_config("fixed", headers=auth())["max_batch_size"] == 0


# --- inference ----------------------------------------------------------------------------------------------------


def test_single_inference_in_json_equals_onnxruntime(client: Any, repo: Path) -> None:
    rows = RAIN_ROWS[:1]
    outputs = [http.InferRequestedOutput("label", binary_data=False),
               http.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("rainfall", [rain_input(rows, binary=False)], outputs=outputs, request_id="one",
                          headers=auth())
    response = result.get_response()
    assert response["id"] == "one" and response["model_version"] == "1"
    assert all("data" in o for o in response["outputs"]), "binary_data=False answers in JSON"
    labels, probabilities = reference(repo, 1, rows)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)


def test_batched_inference_in_binary_on_a_pinned_version(client: Any, repo: Path) -> None:
    rows = np.tile(RAIN_ROWS, (6, 1))  # 18 rows in one request
    result = client.infer("rainfall", [rain_input(rows)], model_version="2", headers=auth())
    response = result.get_response()
    assert response["model_version"] == "2"
    assert all(o["parameters"]["binary_data_size"] > 0 for o in response["outputs"])
    labels, probabilities = reference(repo, 2, rows)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.as_numpy("probabilities").shape == (18, 2)


def test_it_rains_after_a_wet_january_day_more_likely_than_after_a_hot_july_day(client: Any) -> None:
    result = client.infer("rainfall", [rain_input(RAIN_ROWS[:2])], headers=auth())
    wet, dry = result.as_numpy("probabilities")[:, 1]
    assert wet > 0.5 > dry


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bool_and_bytes_tensors_round_trip(client: Any, binary: bool) -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    flags = np.array([[True], [False]])
    texts = np.array(["héllo", "wörld"], dtype=object)
    inputs = []
    for name, array, datatype in (("values", values, "FP32"), ("flag", flags, "BOOL"), ("text", texts, "BYTES")):
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [http.InferRequestedOutput(name, binary_data=binary) for name in ("doubled", "negated", "echo")]
    result = client.infer("typed", inputs, outputs=outputs, headers=auth())
    np.testing.assert_array_equal(result.as_numpy("doubled"), values * 2)
    np.testing.assert_array_equal(result.as_numpy("negated"), ~flags)
    echoed = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("echo")]
    assert echoed == ["héllo", "wörld"]


def test_a_model_without_a_batch_dimension(client: Any) -> None:
    matrix = np.array([[1, 2], [3, 4]], dtype=np.int64)
    tensor = http.InferInput("m", [2, 2], "INT64")
    tensor.set_data_from_numpy(matrix)
    result = client.infer("fixed", [tensor], headers=auth())
    np.testing.assert_array_equal(result.as_numpy("plus_one"), matrix + 1)
    tensor = http.InferInput("m", [1, 2], "INT64")
    tensor.set_data_from_numpy(matrix[:1])
    status, message = error_of(client.infer, "fixed", [tensor], headers=auth())
    assert status == 400 and "expects [2, 2]" in message


def test_curl_style_json_request(server: RunningServer) -> None:
    body = json.dumps({"inputs": [{"name": "weather_today", "shape": [1, 5], "datatype": "FP32",
                                   "data": [[10.9, 10.6, 2.8, 4.5, 2]]}]}).encode()
    status, answer = raw_post(server, "/v2/models/rainfall/infer", body, {"Content-Type": "application/json", **auth()})
    assert status == 200
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["data"] == [1] and len(outputs["probabilities"]["data"]) == 2


# --- errors -------------------------------------------------------------------------------------------------------


def test_wrong_shape_is_400(client: Any) -> None:
    status, message = error_of(client.infer, "rainfall", [rain_input(RAIN_ROWS[:, :4])], headers=auth())
    assert status == 400 and "shape [3, 4]" in message and "[-1, 5]" in message


def test_wrong_datatype_is_400(client: Any) -> None:
    status, message = error_of(client.infer, "rainfall", [rain_input(RAIN_ROWS.astype(np.float64), datatype="FP64")],
                               headers=auth())
    assert status == 400 and "FP64" in message and "FP32" in message


def test_missing_input_is_400(client: Any) -> None:
    tensor = http.InferInput("values", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    status, message = error_of(client.infer, "typed", [tensor], headers=auth())
    assert status == 400 and "missing input" in message and "flag" in message


def test_unknown_model_and_version_are_404(client: Any) -> None:
    status, message = error_of(client.infer, "no-such-model", [rain_input(RAIN_ROWS)], headers=auth())
    assert status == 404 and "unknown model" in message
    status, message = error_of(client.infer, "rainfall", [rain_input(RAIN_ROWS)], model_version="9", headers=auth())
    assert status == 404 and "no version 9" in message
    status, _ = error_of(client.get_model_metadata, "rainfall", "9", headers=auth())
    assert status == 404


def test_oversized_batch_is_400(client: Any) -> None:
    rows = np.zeros((65, 5), np.float32)
    status, message = error_of(client.infer, "rainfall", [rain_input(rows)], headers=auth())
    assert status == 400 and "batch size 65 exceeds the max batch size 64" in message


def test_unknown_output_is_400(client: Any) -> None:
    status, message = error_of(client.infer, "rainfall", [rain_input(RAIN_ROWS)],
                               outputs=[http.InferRequestedOutput("nope")], headers=auth())
    assert status == 400 and "unknown output" in message


def test_malformed_bodies_are_400(server: RunningServer) -> None:
    path = "/v2/models/rainfall/infer"
    status, answer = raw_post(server, path, b"{oops", auth())
    assert status == 400 and "not valid JSON" in answer["error"]
    header = json.dumps({"inputs": [{"name": "weather_today", "shape": [1, 5], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 20}}]}).encode()
    status, answer = raw_post(server, path, header + b"\x00" * 12, {"Inference-Header-Content-Length":
                                                                   str(len(header)), **auth()})
    assert status == 400 and "binary part has only 12" in answer["error"]
    body = json.dumps({"inputs": [{"name": "weather_today", "shape": [1, 5], "datatype": "FP32",
                                   "data": [1, 2, 3]}]}).encode()
    status, answer = raw_post(server, path, body, auth())
    assert status == 400 and "needs 5 values" in answer["error"]


def test_without_the_api_key_everything_but_health_is_401(client: Any, server: RunningServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    status, message = error_of(client.infer, "rainfall", [rain_input(RAIN_ROWS)])
    assert status == 401 and "API key" in message
    for call in (client.get_server_metadata, client.get_model_repository_index):
        assert error_of(call)[0] == 401
    assert error_of(client.unload_model, "rainfall")[0] == 401
    assert error_of(client.load_model, "rainfall")[0] == 401
    assert client.is_model_ready("rainfall", headers=auth())


# --- the model repository: drop a model in, load it, unload it ------------------------------------------------------


def test_load_and_unload_a_model_copied_in_while_serving(client: Any, repo: Path) -> None:
    index = {(m["name"], m.get("version")): m["state"] for m in client.get_model_repository_index(headers=auth())}
    assert index[("rainfall", "1")] == "READY" and ("copied", "1") not in index

    status, _ = error_of(client.load_model, "copied", headers=auth())
    assert status == 404, "not in the repository yet"
    write_generic_model(repo, "copied", typed_model)  # an operator drops a folder in, no restart
    client.load_model("copied", headers=auth())
    assert client.is_model_ready("copied", headers=auth())
    index = {(m["name"], m.get("version")): m["state"] for m in client.get_model_repository_index(headers=auth())}
    assert index[("copied", "1")] == "READY"

    tensors = []
    for name, array, datatype in (("x", np.ones((1, 3), np.float32), "FP32"), ("flag", np.array([[True]]), "BOOL"),
                                  ("text", np.array(["a"], dtype=object), "BYTES")):
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    np.testing.assert_array_equal(client.infer("copied", tensors, headers=auth()).as_numpy("doubled"), [[2, 2, 2]])

    client.unload_model("copied", headers=auth())
    assert not client.is_model_ready("copied", headers=auth())
    status, message = error_of(client.infer, "copied", tensors, headers=auth())
    assert status == 404 and "not loaded" in message
    rows = client.get_model_repository_index(headers=auth())
    assert {"name": "copied", "version": "1", "state": "UNAVAILABLE", "reason": "not_loaded"} in rows
    client.unload_model("copied", headers=auth())  # unloading twice is fine


def test_loading_a_broken_model_is_400_and_the_rest_keeps_serving(client: Any, repo: Path) -> None:
    broken = repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "model.toml").write_text('name = "broken"\ntask = "generic"\n\n[versions.1]\n', encoding="utf-8")
    status, message = error_of(client.load_model, "broken", headers=auth())
    assert status == 400 and "no version is ready" in message and "not fetched" in message
    assert client.is_model_ready("rainfall", headers=auth())
    assert client.is_server_ready(), "a failed load leaves nothing half-loaded behind"


def test_a_speech_or_language_model_is_refused_with_400(client: Any, repo: Path,
                                                        model_repository: ModelRepository) -> None:
    spec = model_repository.spec("silero-vad")
    if model_repository.status(spec, 1).state is not VersionState.READY:
        missing("model silero-vad v1 is not fetched")
    shutil.copytree(spec.directory, repo / "silero-vad", ignore=shutil.ignore_patterns(".*"))
    status, message = error_of(client.get_model_metadata, "silero-vad", headers=auth())
    assert status == 400 and "vad model" in message, "refused even before it is loaded"
    client.load_model("silero-vad", headers=auth())
    try:
        status, message = error_of(client.infer, "silero-vad", [rain_input(RAIN_ROWS)], headers=auth())
        assert status == 400 and 'task = "generic"' in message
    finally:
        client.unload_model("silero-vad", headers=auth())
