"""Where the Whisper tests find their speech clips and the converted model (helpers, not tests).

Clips come from the ``speech_clips`` fixture when tests/conftest.py provides it, else from the directory in
``BROOK_TEST_AUDIO_DIR``. The converted models come from the model repository (v1 fp32, v2 int8) unless
``BROOK_WHISPER_MODEL_DIR`` / ``BROOK_WHISPER_INT8_MODEL_DIR`` name other folders.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest
import soundfile as sf

from app.paths import default_model_dir
from app.repository import ModelRepository
from tests.conftest import load_model, missing

CLIP_NAMES: Final = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s", "silence", "noise", "bench_45s")
GOLDEN_DIR: Final = Path(__file__).resolve().parent / "goldens" / "whisper"
MODEL_DIR_ENV: Final = "BROOK_WHISPER_MODEL_DIR"
INT8_MODEL_DIR_ENV: Final = "BROOK_WHISPER_INT8_MODEL_DIR"
AUDIO_DIR_ENV: Final = "BROOK_TEST_AUDIO_DIR"


def find_speech_clips(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Clip name -> WAV path, or skip loudly when neither the fixture nor the environment provides them."""
    try:
        clips = request.getfixturevalue("speech_clips")
    except pytest.FixtureLookupError:
        clips = None
    if clips:
        return {str(name): Path(path) for name, path in dict(clips).items()}
    audio_dir = os.environ.get(AUDIO_DIR_ENV)
    if not audio_dir:
        missing(f"no speech clips: no `speech_clips` fixture and {AUDIO_DIR_ENV} is not set")
    found = {path.stem: path for path in Path(audio_dir).glob("*.wav")}
    if not found:
        missing(f"no speech clips: {AUDIO_DIR_ENV}={audio_dir} holds no .wav files")
    return found


def read_clip(path: Path) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32", always_2d=False)
    assert rate == 16_000 and samples.ndim == 1, f"{path}: expected 16 kHz mono, got {rate} Hz {samples.shape}"
    return np.ascontiguousarray(samples, dtype=np.float32)


def load_converted_model(env_name: str, default: str) -> tuple[Path, dict[str, Any]]:
    """(model_dir, config) of a converted Whisper: `$env_name` when set, else the model repository's version
    (v1 for the fp32 variable, v2 for the int8 one). Fails in CI and skips loudly elsewhere when absent."""
    configured = os.environ.get(env_name)
    if not configured:
        version = 2 if env_name == INT8_MODEL_DIR_ENV else 1
        loaded = load_model(ModelRepository(default_model_dir()), "whisper-tiny-en", version)
        return loaded.directory, dict(loaded.manifest.config)
    model_dir = Path(configured)
    absent = [name for name in ("encoder.onnx", "decoder.onnx", "tokenizer.json") if not (model_dir / name).is_file()]
    if absent:
        missing(f"converted Whisper model absent: {model_dir} lacks {absent} (set {env_name})")
    return model_dir, read_model_config(model_dir)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The converter's config dict: config.json next to the graphs, or the ``config`` of a manifest.json."""
    for name in ("config.json", "whisper_config.json", "manifest.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            config = data.get("config", data) if name == "manifest.json" else data
            if "timestamp_begin" in config:
                return dict(config)
    missing(f"no Whisper config dict (with timestamp_begin) next to the graphs in {model_dir}")


@functools.cache
def _offline_text(path: Path, seconds: float | None, model_root: Path) -> str:
    from app.audio import load_audio
    from app.speech.transcribe import transcribe
    from app.speech.whisper_runner import WhisperRunner

    loaded = ModelRepository(model_root).load("whisper-tiny-en", 1)
    audio = load_audio(path)
    if seconds is not None:
        audio = audio[: int(seconds * 16000)]
    return transcribe(audio, WhisperRunner(loaded.directory, loaded.manifest.config)).text


def offline_transcript(model_repository: ModelRepository, path: Path, seconds: float | None = None) -> str:
    """What `brook transcribe` prints for the file (whisper-tiny-en v1), computed once per file per session."""
    load_model(model_repository, "whisper-tiny-en", 1)
    return _offline_text(path, seconds, model_repository.root)
