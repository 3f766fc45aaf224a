"""The model repository: committed `model.toml` specs plus generated, hash-checked version folders."""

from __future__ import annotations

from app.repository.manifest import Manifest, read_manifest, sha256_file, verify_files
from app.repository.repository import LoadedVersion, ModelRepository, VersionState, VersionStatus
from app.repository.spec import ModelSpec, SourceSpec, VersionSpec, load_model_spec

__all__ = [
    "LoadedVersion",
    "Manifest",
    "ModelRepository",
    "ModelSpec",
    "SourceSpec",
    "VersionSpec",
    "VersionState",
    "VersionStatus",
    "load_model_spec",
    "read_manifest",
    "sha256_file",
    "verify_files",
]
