"""`manifest.json`: what a converted model version holds, written by the converter and checked at load time."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ModelError

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSignature:
    """One graph input or output: its name, element type and shape (symbolic dims are strings)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphSignature:
    """The inputs and outputs of one ONNX file."""

    file: str
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of one model version."""

    name: str
    version: int
    task: str
    converter: dict[str, Any]  # {"name", "version", "options"}
    source: dict[str, Any]  # {"package", "version", "sha256"} or {} for hand-made versions
    files: dict[str, FileEntry]
    graphs: dict[str, GraphSignature]
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_FORMAT_VERSION
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def graph(self, name: str) -> GraphSignature:
        try:
            return self.graphs[name]
        except KeyError:
            raise ModelError(
                f"model {self.name!r} v{self.version}: manifest has no graph {name!r}; has {sorted(self.graphs)}"
            ) from None


def _parse_signature(data: dict[str, Any]) -> GraphSignature:
    return GraphSignature(
        file=data["file"],
        inputs=[TensorSignature(**t) for t in data["inputs"]],
        outputs=[TensorSignature(**t) for t in data["outputs"]],
    )


def read_manifest(version_dir: Path) -> Manifest:
    """Parse `version_dir/manifest.json`. Raises `ModelError` if it is missing, malformed or of an unknown format."""
    path = version_dir / MANIFEST_FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found (run `brook models fetch`)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON: {exc}") from None
    fmt = data.get("format_version")
    if fmt != MANIFEST_FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {fmt!r} is not supported (expected {MANIFEST_FORMAT_VERSION})")
    try:
        return Manifest(
            name=data["name"],
            version=int(data["version"]),
            task=data["task"],
            converter=dict(data.get("converter", {})),
            source=dict(data.get("source", {})),
            files={name: FileEntry(**entry) for name, entry in data["files"].items()},
            graphs={name: _parse_signature(sig) for name, sig in data.get("graphs", {}).items()},
            config=dict(data.get("config", {})),
            format_version=fmt,
            created_at=str(data.get("created_at", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None


def verify_files(version_dir: Path, manifest: Manifest, *, check_hashes: bool = True) -> None:
    """Check that every file in the manifest exists with the recorded size (and sha256). Raises `ModelError`."""
    problems: list[str] = []
    for name, entry in sorted(manifest.files.items()):
        path = version_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems.append(f"{name}: expected {entry.bytes} bytes, found {size}")
            continue
        if check_hashes:
            actual = sha256_file(path)
            if actual != entry.sha256:
                problems.append(f"{name}: sha256 mismatch (expected {entry.sha256[:12]}…, found {actual[:12]}…)")
    for graph_name, signature in manifest.graphs.items():
        if signature.file not in manifest.files:
            problems.append(f"graph {graph_name!r} refers to {signature.file}, which the manifest does not list")
    if problems:
        raise ModelError(
            f"model {manifest.name!r} v{manifest.version} at {version_dir} does not match its manifest: "
            + "; ".join(problems)
            + " (run `brook models fetch --force " + manifest.name + "` to rebuild it)"
        )
