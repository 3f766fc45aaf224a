"""Audio input: read files, down-mix, resample to the model rate, and decode raw PCM frames. Pure numpy + soxr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from app.errors import AudioError

MODEL_SAMPLE_RATE_HZ = 16000
PCM_ENCODINGS = ("pcm_s16le", "f32le")
_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "f32le": 4}


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of a [frames, channels] array; a 1-D array is returned as it is."""
    if samples.ndim == 1:
        return samples
    mono: np.ndarray = samples.mean(axis=1, dtype=np.float32)
    return mono


def resample(audio: np.ndarray, rate_hz: int, target_hz: int = MODEL_SAMPLE_RATE_HZ) -> np.ndarray:
    """Resample mono float32 audio with soxr (high quality). A no-op when the rates already match."""
    if rate_hz == target_hz:
        return audio.astype(np.float32, copy=False)
    out: np.ndarray = soxr.resample(audio.astype(np.float32, copy=False), rate_hz, target_hz, quality="HQ")
    return out.astype(np.float32, copy=False)


def load_audio(path: Path, target_rate_hz: int = MODEL_SAMPLE_RATE_HZ) -> np.ndarray:
    """Read any format libsndfile reads (WAV, FLAC, OGG, …) as mono float32 at `target_rate_hz`.

    Raises `AudioError` with a one-line reason for a missing, corrupt, unsupported or empty file.
    """
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = str(exc).split("\n")[0]
        raise AudioError(f"{path}: not a readable audio file ({reason})") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    return resample(to_mono(samples), int(rate), target_rate_hz)


def bytes_per_sample(encoding: str) -> int:
    try:
        return _BYTES_PER_SAMPLE[encoding]
    except KeyError:
        raise AudioError(f"unknown encoding {encoding!r}; expected one of {', '.join(PCM_ENCODINGS)}") from None


def decode_pcm(frame: bytes, encoding: str) -> np.ndarray:
    """Decode one binary frame of raw mono samples to float32 in [-1, 1]. The frame must hold whole samples."""
    width = bytes_per_sample(encoding)
    if len(frame) % width:
        raise AudioError(
            f"a {encoding} frame must hold whole {width}-byte samples; got {len(frame)} bytes "
            f"({len(frame) % width} stray byte(s))"
        )
    if encoding == "pcm_s16le":
        return np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
    samples = np.frombuffer(frame, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(samples)):
        raise AudioError("f32le audio contains NaN or infinite samples")
    return samples
