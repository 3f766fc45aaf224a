"""Shared fixtures: the real model repository, real speech recordings, and loud handling of missing models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from app.convert.sources import cache_dir
from app.errors import FetchError
from app.paths import default_model_dir
from app.repository import LoadedVersion, ModelRepository, VersionState
from app.speech.whisper_runner import WhisperRunner
from tests.server_process import RunningServer, run_server


def _models_required() -> bool:
    """In CI (or with BROOK_REQUIRE_MODELS=1) a missing model fails the test instead of skipping it."""
    return bool(os.environ.get("CI") or os.environ.get("BROOK_REQUIRE_MODELS"))


def missing(reason: str) -> NoReturn:
    """Fail in CI, skip loudly elsewhere. Never let a test pass without the thing it tests."""
    message = f"MISSING: {reason}. Run `make test` (it fetches models) or `brook models fetch`."
    if _models_required():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def model_repository() -> ModelRepository:
    return ModelRepository(default_model_dir())


def load_model(repository: ModelRepository, name: str, version: int | None = None) -> LoadedVersion:
    spec = repository.spec(name)
    resolved = repository.resolve_version(spec, version)
    status = repository.status(spec, resolved)
    if status.state is not VersionState.READY:
        missing(f"model {name} v{resolved} is {status.state.value} in {repository.root}")
    return repository.load(name, resolved, check_hashes=False)


@pytest.fixture(scope="session")
def speech_clips() -> dict[str, Path]:
    """Real recordings (telephone call, meetings) plus silence and noise, as 16 kHz mono float WAV files."""
    from scripts.test_audio import build_test_clips

    try:
        return build_test_clips(cache_dir() / "test-audio")
    except FetchError as exc:
        missing(f"test recordings could not be fetched: {exc}")
        raise


ALL_MODELS = "whisper-tiny-en,silero-vad,smollm2-135m-instruct"
ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "test-artifacts"


def require_models(repository: ModelRepository, *names: str) -> None:
    for name in names:
        spec = repository.spec(name)
        status = repository.status(spec, spec.default_version)
        if status.state is not VersionState.READY:
            missing(f"model {name} v{spec.default_version} is {status.state.value}")


@pytest.fixture(scope="session")
def brook_server(model_repository: ModelRepository) -> Iterator[RunningServer]:
    """One real `brook serve` with every default model, shared by the end-to-end tests."""
    require_models(model_repository, "whisper-tiny-en", "silero-vad", "smollm2-135m-instruct")
    with run_server(ARTIFACT_DIR / "logs", models=ALL_MODELS, idle_timeout_s="30") as server:
        yield server


@pytest.fixture(scope="session")
def served_whisper(model_repository: ModelRepository) -> WhisperRunner:
    """Whisper tiny.en at its default version, as `brook serve` loads it."""
    loaded = load_model(model_repository, "whisper-tiny-en")
    return WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=2)


@pytest.fixture(scope="session")
def telephone_audio(speech_clips: dict[str, Path]) -> np.ndarray:
    """The telephone test recording (16 kHz float32), which opens with "Hello? Hello?"."""
    from tests.whisper_test_audio import read_clip  # it imports this module

    return read_clip(speech_clips["telephone"])
