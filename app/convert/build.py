"""Build one model version: fetch its pinned source, run its converter, and write a hash-checked manifest."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from app.convert.registry import converter
from app.convert.signature import graph_signature
from app.convert.sources import extract_sources
from app.errors import FetchError, ModelError
from app.repository.manifest import (
    MANIFEST_FILENAME,
    FileEntry,
    Manifest,
    read_manifest,
    sha256_file,
    verify_files,
)
from app.repository.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    name: str
    version: int
    built: bool  # False when the version was already up to date
    seconds: float
    directory: Path


def _expected_converter(spec: ModelSpec, version: int) -> dict[str, object]:
    vspec = spec.version_spec(version)
    if vspec.converter is None:
        return {}
    return {"name": vspec.converter, "version": converter(vspec.converter).version, "options": vspec.options}


def is_up_to_date(spec: ModelSpec, version: int) -> bool:
    """True when the version folder was built by the current converter from the pinned source and is intact."""
    version_dir = spec.version_dir(version)
    if not (version_dir / MANIFEST_FILENAME).is_file():
        return False
    try:
        manifest = read_manifest(version_dir)
        verify_files(version_dir, manifest, check_hashes=True)
    except ModelError as exc:
        logger.warning("%s", exc)
        return False
    expected_source = spec.source.sha256 if spec.source else None
    return manifest.converter == _expected_converter(spec, version) and manifest.source.get("sha256") == expected_source


def write_manifest(spec: ModelSpec, version: int, directory: Path, config: dict[str, object]) -> Manifest:
    """Hash every artifact in `directory`, read each ONNX file's signature, and write `manifest.json`."""
    files: dict[str, FileEntry] = {}
    graphs = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name == MANIFEST_FILENAME:
            continue
        files[path.name] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
        if path.suffix == ".onnx":
            graphs[path.stem] = graph_signature(path)
    source = (
        {"package": spec.source.package, "version": spec.source.version, "sha256": spec.source.sha256}
        if spec.source
        else {}
    )
    manifest = Manifest(
        name=spec.name,
        version=version,
        task=spec.task,
        converter=_expected_converter(spec, version),
        source=source,
        files=files,
        graphs=graphs,
        config=dict(config),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    (directory / MANIFEST_FILENAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def build_version(spec: ModelSpec, version: int, *, force: bool = False, cache: Path | None = None) -> BuildResult:
    """Make `models/<name>/<version>/` current. Idempotent: an intact, current version is left alone."""
    started = time.perf_counter()
    final_dir = spec.version_dir(version)
    if not force and is_up_to_date(spec, version):
        return BuildResult(spec.name, version, False, time.perf_counter() - started, final_dir)
    vspec = spec.version_spec(version)
    if vspec.converter is None:
        if spec.task != "generic":
            raise FetchError(
                f"{spec.name} v{version} has no converter in model.toml and no valid manifest; "
                "place its files in the version folder (see docs/models.md)"
            )
        from app.convert.generic_onnx import import_onnx_version

        import_onnx_version(spec, version)  # a hand-dropped ONNX file: write its manifest
        return BuildResult(spec.name, version, True, time.perf_counter() - started, final_dir)
    ref = converter(vspec.converter)
    files = extract_sources(spec.source, cache) if spec.source else {}
    building = spec.directory / f".{version}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    logger.info("converting %s v%d with %s %s…", spec.name, version, vspec.converter, vspec.options or "")
    try:
        config = ref.load()(files, building, vspec.options)
        write_manifest(spec, version, building, config)
    except Exception:
        shutil.rmtree(building, ignore_errors=True)
        raise
    retired = spec.directory / f".{version}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(retired)
    building.rename(final_dir)
    shutil.rmtree(retired, ignore_errors=True)
    seconds = time.perf_counter() - started
    logger.info("built %s v%d in %.1f s", spec.name, version, seconds)
    return BuildResult(spec.name, version, True, seconds, final_dir)
