"""Tiny generic ONNX models and throw-away model repositories for the v2 API and dynamic batching tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from app.convert.generic_onnx import import_onnx_version
from app.repository import ModelRepository, VersionState, load_model_spec
from tests.conftest import missing

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="brook-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def typed_model(path: Path) -> None:
    """Three inputs of three datatypes: `x` FP32 [N,3] -> `doubled` = 2x; `flag` BOOL [N,1] -> `negated`;
    `text` BYTES [N] -> `echo` (the same strings)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["x", "two"], ["doubled"]), helper.make_node("Not", ["flag"], ["negated"]),
             helper.make_node("Identity", ["text"], ["echo"])]
    graph = helper.make_graph(
        nodes, "typed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, ["N", 1]),
         helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("negated", TensorProto.BOOL, ["N", 1]),
         helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"])],
        initializer=[two],
    )
    _save(graph, path)


def fixed_model(path: Path) -> None:
    """No batch dimension: `m` INT64 [2,2] -> `plus_one` INT64 [2,2]."""
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    graph = helper.make_graph([helper.make_node("Add", ["m", "one"], ["plus_one"])], "fixed",
                              [helper.make_tensor_value_info("m", TensorProto.INT64, [2, 2])],
                              [helper.make_tensor_value_info("plus_one", TensorProto.INT64, [2, 2])],
                              initializer=[one])
    _save(graph, path)


def write_generic_model(repo: Path, name: str, make_onnx: Callable[[Path], None], serving: str = "") -> Path:
    """Drop a model in as an operator would (model.toml + 1/model.onnx) and write its manifest with the importer."""
    directory = repo / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    (directory / "model.toml").write_text(f'name = "{name}"\ntask = "generic"\n\n[versions.1]\n\n{serving}\n',
                                          encoding="utf-8")
    make_onnx(directory / "1" / "model.onnx")
    import_onnx_version(load_model_spec(directory), 1)
    return directory


def copy_rainfall(source: ModelRepository, repo: Path, *, serving_replacements: dict[str, str] | None = None) -> Path:
    """Copy the built rainfall model (every version) into `repo`, optionally editing its [serving] lines."""
    spec = source.spec("rainfall")
    for version in spec.versions:
        if source.status(spec, version).state is not VersionState.READY:
            missing(f"model rainfall v{version} is not built in {source.root}")
    target = repo / "rainfall"
    shutil.copytree(spec.directory, target, ignore=shutil.ignore_patterns(".*"))
    toml = (target / "model.toml").read_text(encoding="utf-8")
    for old, new in (serving_replacements or {}).items():
        assert old in toml, f"{old!r} is not in rainfall's model.toml"
        toml = toml.replace(old, new)
    (target / "model.toml").write_text(toml, encoding="utf-8")
    return target
