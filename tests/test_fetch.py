"""Fetching pinned sources: sha256 checks, caching (works offline), clear errors, and idempotent builds."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.convert.build import build_version
from app.convert.sources import extract_sources, fetch_distribution
from app.errors import FetchError, ModelError
from app.repository import ModelRepository, load_model_spec
from app.repository.spec import SourceSpec
from tests.conftest import missing

WHEEL_NAME = "brooktoy-1.0-py3-none-any.whl"


def make_wheel(directory: Path) -> Path:
    """A minimal valid wheel that pip can 'download' from a local --find-links folder."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WHEEL_NAME
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("brooktoy/data/weights.bin", b"\x00\x01\x02real bytes")
        zf.writestr("brooktoy-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: brooktoy\nVersion: 1.0\n")
        zf.writestr("brooktoy-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr("brooktoy-1.0.dist-info/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wheel = make_wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    return wheel


def toy_source(sha256: str) -> SourceSpec:
    return SourceSpec("brooktoy", "1.0", WHEEL_NAME, sha256, {"weights.bin": "brooktoy/data/weights.bin"})


def test_fetch_verifies_then_serves_from_cache_without_pip(
    local_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = toy_source(hashlib.sha256(local_index.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    files = extract_sources(source, cache)
    assert files["weights.bin"].read_bytes() == b"\x00\x01\x02real bytes"

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run when the distribution is cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert extract_sources(source, cache) == files  # offline once fetched


def test_fetch_refuses_a_file_with_the_wrong_hash(local_index: Path, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="sha256 mismatch for brooktoy-1.0-py3-none-any.whl"):
        fetch_distribution(toy_source("0" * 64), tmp_path / "cache")
    assert not (tmp_path / "cache" / "distributions" / WHEEL_NAME).exists()


def test_fetch_reports_an_unreachable_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: connection refused
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(FetchError, match="could not download brooktoy==1.0 from the package index"):
        fetch_distribution(toy_source("0" * 64), tmp_path / "cache")


def test_missing_member_is_a_clear_error(local_index: Path, tmp_path: Path) -> None:
    sha = hashlib.sha256(local_index.read_bytes()).hexdigest()
    source = SourceSpec("brooktoy", "1.0", WHEEL_NAME, sha, {"x": "brooktoy/nope.bin"})
    with pytest.raises(FetchError, match="has no member 'brooktoy/nope.bin'"):
        extract_sources(source, tmp_path / "cache")


def test_build_is_idempotent_and_rebuilds_a_tampered_version(
    model_repository: ModelRepository, tmp_path: Path
) -> None:
    """Uses the real silero-vad source (pinned wheel from PyPI, cached after the first run)."""
    shutil.copytree(model_repository.root / "silero-vad", tmp_path / "silero-vad",
                    ignore=shutil.ignore_patterns("[0-9]*", ".*"))
    spec = load_model_spec(tmp_path / "silero-vad")
    try:
        first = build_version(spec, 1)
    except FetchError as exc:
        missing(f"the silero-vad wheel could not be fetched: {exc}")
    assert first.built
    second = build_version(spec, 1)
    assert not second.built, "a second fetch must do nothing"

    vad_file = tmp_path / "silero-vad" / "1" / "vad.onnx"
    data = bytearray(vad_file.read_bytes())
    data[100] ^= 0xFF
    vad_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        ModelRepository(tmp_path).load("silero-vad")
    assert build_version(spec, 1).built, "a tampered version is rebuilt"
    loaded = ModelRepository(tmp_path).load("silero-vad")
    assert loaded.manifest.graph("vad").input_names() == ["input", "state", "sr"]
    assert loaded.manifest.config["frame_samples"] == 512
    assert np.isclose(loaded.manifest.files["vad.onnx"].bytes, vad_file.stat().st_size)


def test_an_sdist_is_fetched_by_name_with_its_build_constraints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the sdist itself comes as source (its build dependencies as wheels), and its build constraints reach
    the build environment that pip prepares its metadata in."""
    seen: dict[str, Any] = {}

    def fake_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen["command"], seen["env"] = command, kwargs["env"]
        if "--build-constraint" in command:
            seen["constraints"] = Path(command[command.index("--build-constraint") + 1]).read_text()
        return subprocess.CompletedProcess(command, 1, stdout="no index here")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    source = SourceSpec("toysdist", "2.0", "toysdist-2.0.tar.gz", "0" * 64, {}, ("scikit-build-core<0.10",))
    with pytest.raises(FetchError, match="could not download toysdist==2.0"):
        fetch_distribution(source, tmp_path / "cache")
    command = seen["command"]
    assert command[command.index("--no-binary") + 1] == "toysdist" and ":all:" not in command
    if "--build-constraint" in command:  # pip >= 25.3
        assert seen["constraints"] == "scikit-build-core<0.10\n"
    else:
        assert seen["env"]["PIP_CONSTRAINT"].endswith("build-constraints.txt")
