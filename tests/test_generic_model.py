"""Generic models: `[serving]` parsing, tensor overrides, request validation, and the ONNX importer / converter."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.convert import build
from app.convert.generic_onnx import check_servable, import_onnx_version
from app.engine.generic_runner import (
    GenericModel,
    GenericRunner,
    InvalidInputError,
    OversizedBatchError,
    ServingConfig,
    SessionSettings,
)
from app.errors import FetchError, ModelError
from app.repository import ModelRepository, load_model_spec
from tests.generic_models import fixed_model, typed_model, write_generic_model


def model_of(path: Path, **serving: Any) -> GenericModel:
    return GenericModel("m", 1, GenericRunner(path, SessionSettings()), ServingConfig.from_settings(serving, "test"))


@pytest.fixture(scope="module")
def typed_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("typed") / "model.onnx"
    typed_model(path)
    return path


@pytest.fixture(scope="module")
def fixed_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fixed") / "model.onnx"
    fixed_model(path)
    return path


def typed_inputs(rows: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, 3), np.float32), "flag": np.zeros((rows, 1), bool),
            "text": np.array(["t"] * rows, dtype=object)}


# --- [serving] --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("serving", "message"), [
    ({"max_batch_sise": 4}, "unknown keys"),
    ({"max_batch_size": -1}, "max_batch_size must be an integer >= 0"),
    ({"max_queue_delay_ms": "fast"}, "max_queue_delay_ms"),
    ({"preferred_batch_sizes": [0]}, "preferred_batch_sizes"),
    ({"dynamic_batching": "yes"}, "dynamic_batching"),
    ({"session": {"intra_op_threads": 0}}, "intra_op_threads"),
    ({"session": {"graph_optimization_level": "max"}}, "graph_optimization_level"),
    ({"session": {"execution_mode": "async"}}, "execution_mode"),
    ({"inputs": {"x": {"shape": "N,3"}}}, "shape must be a list"),
    ({"inputs": {"x": {"colour": "red"}}}, "unknown keys"),
])
def test_bad_serving_tables_are_refused_with_the_key(serving: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ServingConfig.from_settings(serving, "model.toml [serving]")


def test_the_graph_sets_the_tensors_and_the_toml_renames_and_narrows_them(typed_path: Path) -> None:
    model = model_of(typed_path, inputs={"x": {"name": "values", "shape": [-1, 3], "description": "d"}},
                     preferred_batch_sizes=[8], max_batch_size=16, max_queue_delay_ms=1.5)
    assert [(t.name, t.graph_name, t.datatype, t.shape) for t in model.inputs] == [
        ("values", "x", "FP32", (-1, 3)), ("flag", "flag", "BOOL", (-1, 1)), ("text", "text", "BYTES", (-1,))]
    assert [t.name for t in model.outputs] == ["doubled", "negated", "echo"]
    assert model.max_batch_size == 16
    assert model.batcher.policy.preferred_batch_sizes == (8,) and model.batcher.policy.max_queue_delay_s == 0.0015


def test_a_free_batch_dimension_defaults_to_batching_and_a_fixed_one_to_none(typed_path: Path,
                                                                             fixed_path: Path) -> None:
    assert model_of(typed_path).max_batch_size == 32
    fixed = model_of(fixed_path)
    assert fixed.max_batch_size == 0 and not fixed.batcher.policy.enabled
    with pytest.raises(ModelError, match="set max_batch_size = 0"):
        model_of(fixed_path, max_batch_size=4)


@pytest.mark.parametrize(("serving", "message"), [
    ({"inputs": {"nope": {"name": "a"}}}, "the graph has no"),
    ({"inputs": {"x": {"shape": [-1, 4]}}}, "does not fit the graph"),
    ({"inputs": {"x": {"name": "flag"}}}, "share a name"),
    ({"max_batch_size": 4, "preferred_batch_sizes": [8]}, "exceed max_batch_size"),
])
def test_overrides_that_contradict_the_graph_are_refused(typed_path: Path, serving: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(ModelError, match=message):
        model_of(typed_path, **serving)


# --- validation -------------------------------------------------------------------------------------------------


def test_requests_are_checked_against_the_model(typed_path: Path) -> None:
    model = model_of(typed_path, max_batch_size=4, inputs={"x": {"shape": [-1, 3]}})
    assert model.validate(typed_inputs(3)) == 3
    cases: list[tuple[dict[str, np.ndarray], str]] = [
        ({k: v for k, v in typed_inputs().items() if k != "flag"}, "missing input"),
        ({**typed_inputs(), "extra": np.zeros(1)}, "unknown input"),
        ({**typed_inputs(), "x": np.ones((2, 3), np.float64)}, "datatype FP64; the model expects FP32"),
        ({**typed_inputs(), "x": np.ones((2, 4), np.float32)}, r"shape \[2, 4\]"),
        ({**typed_inputs(), "x": np.ones((3, 3), np.float32)}, "disagree on the batch size"),
        (typed_inputs(0), "at least 1"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            model.validate(inputs)
    with pytest.raises(OversizedBatchError, match="batch size 5 exceeds the max batch size 4"):
        model.validate(typed_inputs(5))


def test_infer_maps_public_names_both_ways(typed_path: Path) -> None:
    model = model_of(typed_path, inputs={"x": {"name": "values"}}, outputs={"doubled": {"name": "twice"}})
    inputs = typed_inputs()
    inputs["values"] = inputs.pop("x") * 3

    async def run() -> dict[str, np.ndarray]:
        await model.start()
        try:
            return await model.infer(inputs)
        finally:
            await model.shutdown()

    outputs = asyncio.run(run())
    assert sorted(outputs) == ["echo", "negated", "twice"]
    np.testing.assert_array_equal(outputs["twice"], np.full((2, 3), 6, np.float32))


# --- importing ONNX files -----------------------------------------------------------------------------------------


def zipmap_like_model(path: Path) -> None:
    """An output that is a sequence, as scikit-learn classifiers converted with zipmap produce."""
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_the_importer_refuses_non_tensor_outputs_and_garbage(tmp_path: Path) -> None:
    zipmap_like_model(tmp_path / "seq.onnx")
    with pytest.raises(FetchError, match="not a tensor.*zipmap"):
        check_servable(tmp_path / "seq.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FetchError, match="not a valid ONNX model"):
        check_servable(tmp_path / "junk.onnx")


def test_a_dropped_in_version_gets_a_manifest_that_the_repository_accepts(tmp_path: Path) -> None:
    write_generic_model(tmp_path, "dropped", typed_model)
    loaded = ModelRepository(tmp_path).load("dropped", 1)
    graph = loaded.manifest.graphs["model"]
    assert [t.name for t in graph.inputs] == ["x", "flag", "text"]
    assert loaded.manifest.config["platform"] == "onnxruntime_onnx"
    assert GenericModel.from_loaded(loaded).max_batch_size == 32
    (tmp_path / "dropped" / "1" / "second.onnx").write_bytes(b"")
    with pytest.raises(FetchError, match="exactly one .onnx"):
        import_onnx_version(load_model_spec(tmp_path / "dropped"), 1)


def test_fetch_builds_an_onnx_file_from_a_pinned_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`brook models fetch` with converter "onnx-file" (the download is replaced by a local file)."""
    source = tmp_path / "cache" / "model.onnx"
    typed_model(source)
    directory = tmp_path / "repo" / "shipped"
    directory.mkdir(parents=True)
    (directory / "model.toml").write_text(
        'name = "shipped"\ntask = "generic"\n\n[source]\npackage = "p"\nversion = "1"\nfilename = "p-1.whl"\n'
        f'sha256 = "{"0" * 64}"\n\n[source.files]\n"model.onnx" = "p/model.onnx"\n\n'
        '[versions.1]\nconverter = "onnx-file"\n', encoding="utf-8")
    monkeypatch.setattr(build, "extract_sources", lambda spec, cache=None: {"model.onnx": source})
    spec = load_model_spec(directory)
    assert build.build_version(spec, 1).built
    assert not build.build_version(spec, 1).built, "the second fetch finds it up to date"
    loaded = ModelRepository(directory.parent).load("shipped", 1)
    assert loaded.manifest.converter["name"] == "onnx-file"
    assert GenericModel.from_loaded(loaded).inputs[0].name == "x"
