"""`ModelRepository`: the folder of models (`models/<name>/model.toml` + `models/<name>/<version>/…`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from app.errors import ModelError, ModelNotReadyError, UnknownModelError
from app.repository.manifest import MANIFEST_FILENAME, Manifest, read_manifest, verify_files
from app.repository.spec import MODEL_SPEC_FILENAME, ModelSpec, load_model_spec

logger = logging.getLogger(__name__)


class VersionState(StrEnum):
    """Whether a version's artifacts are on disk. `READY` means the manifest and its files are present."""

    MISSING = "missing"  # never fetched/converted
    READY = "ready"
    BROKEN = "broken"  # a manifest exists but files are missing or of the wrong size


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: VersionState
    detail: str = ""


@dataclass(frozen=True)
class LoadedVersion:
    """A verified model version on disk: what runners are built from."""

    spec: ModelSpec
    manifest: Manifest
    directory: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.manifest.version


class ModelRepository:
    """Reads the model repository. It never converts anything (that is `app.convert`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MODEL_SPEC_FILENAME).is_file())

    def spec(self, name: str) -> ModelSpec:
        directory = self.root / name
        if not (directory / MODEL_SPEC_FILENAME).is_file():
            known = ", ".join(self.names()) or "none"
            raise UnknownModelError(f"unknown model {name!r}; the repository at {self.root} has: {known}")
        return load_model_spec(directory)

    def specs(self) -> list[ModelSpec]:
        return [self.spec(name) for name in self.names()]

    def status(self, spec: ModelSpec, version: int) -> VersionStatus:
        version_dir = spec.version_dir(version)
        if not (version_dir / MANIFEST_FILENAME).is_file():
            return VersionStatus(version, VersionState.MISSING, "not fetched")
        try:
            manifest = read_manifest(version_dir)
            verify_files(version_dir, manifest, check_hashes=False)
        except ModelError as exc:
            return VersionStatus(version, VersionState.BROKEN, str(exc))
        return VersionStatus(version, VersionState.READY)

    def resolve_version(self, spec: ModelSpec, version: int | None) -> int:
        if version is None:
            return spec.default_version
        spec.version_spec(version)  # raises ModelError for an unknown version
        return version

    def load(self, name: str, version: int | None = None, *, check_hashes: bool = True) -> LoadedVersion:
        """Read and verify one version. A missing or mismatching file is an error, never a partial load."""
        spec = self.spec(name)
        resolved = self.resolve_version(spec, version)
        version_dir = spec.version_dir(resolved)
        if not (version_dir / MANIFEST_FILENAME).is_file():
            raise ModelNotReadyError(
                f"model {name!r} v{resolved} is not fetched yet; run `brook models fetch {name}`"
            )
        manifest = read_manifest(version_dir)
        if manifest.name != name or manifest.version != resolved:
            raise ModelError(
                f"{version_dir}/{MANIFEST_FILENAME} describes {manifest.name!r} v{manifest.version}, "
                f"expected {name!r} v{resolved}"
            )
        verify_files(version_dir, manifest, check_hashes=check_hashes)
        logger.debug("verified %s v%d (%d files)", name, resolved, len(manifest.files))
        return LoadedVersion(spec=spec, manifest=manifest, directory=version_dir)
