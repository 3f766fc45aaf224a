"""Import a ready-made ONNX file as a generic model version (``task = "generic"``): check that onnxruntime can serve
it, copy it, and let the manifest record its signature.

Two ways in:

- ``converter = "onnx-file"`` in ``model.toml``: the file comes from the pinned ``[source]`` (``options.file`` names
  its logical name in ``[source.files]``; default: the only one), or from ``options.path``, relative to the model's
  folder, for a file dropped in by hand (``build_version`` builds in a sibling of the version folder, so the
  converter resolves the path against ``out_dir.parent``).
- ``import_onnx_version(spec, version)`` (or ``python -m app.convert.generic_onnx models/NAME [VERSION]``): a
  version folder filled by hand (exactly one ``.onnx`` file and no manifest) gets its ``manifest.json`` in place.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from app.convert.build import write_manifest
from app.errors import FetchError
from app.repository.manifest import Manifest
from app.repository.spec import ModelSpec, load_model_spec

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
PLATFORM = "onnxruntime_onnx"
SERVABLE_ELEMENT_TYPES = {
    onnx.TensorProto.BOOL, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64, onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
    onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.STRING,
}


def _type_problem(value: Any) -> str | None:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        hint = " (for a scikit-learn classifier, convert with options={'zipmap': False})" if kind in (
            "sequence_type", "map_type") else ""
        return f"{value.name!r} is a {kind}, not a tensor{hint}"
    elem = value.type.tensor_type.elem_type
    if elem not in SERVABLE_ELEMENT_TYPES:
        return f"{value.name!r} has element type {onnx.TensorProto.DataType.Name(elem)}, which the v2 API can't carry"
    return None


def check_servable(path: Path) -> dict[str, Any]:
    """Check an ONNX file (onnx checker, tensor-only inputs/outputs, onnxruntime loads it); return manifest config.

    Raises ``FetchError`` naming the problem.
    """
    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, OSError) as exc:
        raise FetchError(f"{path.name} is not a valid ONNX model: {exc}") from None
    initializers = {init.name for init in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers] + list(model.graph.output)
    problems = [problem for value in values if (problem := _type_problem(value)) is not None]
    if problems:
        raise FetchError(f"{path.name} can not be served as a generic model: " + "; ".join(problems))
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise FetchError(f"onnxruntime can not load {path.name}: {exc}") from None
    return {
        "platform": PLATFORM,
        "ir_version": int(model.ir_version),
        "opset": {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }


def convert_onnx_file(files: Mapping[str, Path], out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Converter ``onnx-file``: check one ONNX file and copy it to ``out_dir/model.onnx``."""
    source = _source_file(files, out_dir, options)
    config = check_servable(source)
    shutil.copyfile(source, out_dir / MODEL_FILENAME)
    logger.info("imported %s (%d bytes)", source.name, source.stat().st_size)
    return {**config, "source_file": source.name}


def _source_file(files: Mapping[str, Path], out_dir: Path, options: Mapping[str, Any]) -> Path:
    if "path" in options:
        path = Path(str(options["path"]))
        resolved = path if path.is_absolute() else out_dir.parent / path
        if not resolved.is_file():
            raise FetchError(f"onnx-file: options.path {str(path)!r} is not a file (looked at {resolved})")
        return resolved
    if "file" in options:
        name = str(options["file"])
        if name not in files:
            raise FetchError(f"onnx-file: options.file {name!r} is not in [source.files] ({sorted(files)})")
        return files[name]
    if len(files) != 1:
        raise FetchError(f"onnx-file: [source.files] has {len(files)} files ({sorted(files)}); name one with "
                         "options.file, or give options.path")
    return next(iter(files.values()))


def import_onnx_version(spec: ModelSpec, version: int) -> Manifest:
    """Write ``manifest.json`` for a version folder filled by hand with exactly one ``.onnx`` file."""
    version_dir = spec.version_dir(version)
    onnx_files = sorted(version_dir.glob("*.onnx")) if version_dir.is_dir() else []
    if len(onnx_files) != 1:
        raise FetchError(f"{version_dir} must hold exactly one .onnx file to import, found "
                         f"{[p.name for p in onnx_files] or 'none'}")
    config = check_servable(onnx_files[0])
    manifest = write_manifest(spec, version, version_dir, config)
    logger.info("imported %s v%d from %s", spec.name, version, onnx_files[0].name)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`python -m app.convert.generic_onnx MODEL_DIR [VERSION]`: import a hand-filled version folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app.convert.generic_onnx",
                                     description="Write manifest.json for a generic model version filled by hand.")
    parser.add_argument("model_dir", type=Path, help="the model's folder (holds model.toml)")
    parser.add_argument("version", type=int, nargs="?", default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = import_onnx_version(load_model_spec(args.model_dir), args.version)
    graph = next(iter(manifest.graphs.values()))
    logger.info("%s v%d: inputs %s, outputs %s", manifest.name, manifest.version,
                [(t.name, t.dtype, t.shape) for t in graph.inputs], [(t.name, t.dtype, t.shape) for t in graph.outputs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
