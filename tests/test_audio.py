"""Reading audio files (formats, rates, channels), decoding PCM frames, and the errors for bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st

from app.audio import decode_pcm, load_audio, resample
from app.errors import AudioError


def tone(rate: int, seconds: float, channels: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


@pytest.mark.parametrize(("fmt", "subtype", "rate", "channels"), [
    ("WAV", "PCM_16", 16000, 1),
    ("WAV", "PCM_24", 44100, 2),
    ("FLAC", "PCM_16", 48000, 2),
    ("OGG", "VORBIS", 22050, 1),
    ("WAV", "FLOAT", 8000, 3),
])
def test_load_audio_resamples_and_downmixes(tmp_path: Path, fmt: str, subtype: str, rate: int, channels: int) -> None:
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(str(path), tone(rate, 1.5, channels), rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 24000) <= 2
    # The 440 Hz tone survives resampling: its spectral peak stays at 440 Hz.
    spectrum = np.abs(np.fft.rfft(audio[2000:18000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2
    assert 0.3 < np.max(np.abs(audio[2000:-2000])) < 0.6


@pytest.mark.parametrize(("content", "fragment"), [
    (b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk", "not a readable audio file"),
    (b"this is plain text, not audio", "not a readable audio file"),
])
def test_load_audio_rejects_corrupt_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=fragment):
        load_audio(path)


def test_load_audio_rejects_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="holds no audio samples"):
        load_audio(empty)
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "absent.flac")


def test_decode_pcm_s16le_and_f32le() -> None:
    samples = np.array([0, 16384, -32768, 32767], dtype="<i2")
    assert np.allclose(decode_pcm(samples.tobytes(), "pcm_s16le"), [0.0, 0.5, -1.0, 32767 / 32768])
    floats = np.array([0.25, -0.5], dtype="<f4")
    assert np.array_equal(decode_pcm(floats.tobytes(), "f32le"), floats)


def test_decode_pcm_rejects_partial_samples_and_nan() -> None:
    with pytest.raises(AudioError, match="whole 2-byte samples; got 3 bytes"):
        decode_pcm(b"\x00\x01\x02", "pcm_s16le")
    with pytest.raises(AudioError, match="NaN"):
        decode_pcm(np.array([np.nan], dtype="<f4").tobytes(), "f32le")
    with pytest.raises(AudioError, match="unknown encoding 'mp3'"):
        decode_pcm(b"", "mp3")


@given(st.lists(st.integers(-32768, 32767), max_size=200), st.lists(st.integers(0, 400), max_size=8))
def test_decode_pcm_is_independent_of_frame_boundaries(values: list[int], cuts: list[int]) -> None:
    data = np.array(values, dtype="<i2").tobytes()
    points = sorted({min(2 * c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [decode_pcm(data[a:b], "pcm_s16le") for a, b in itertools.pairwise(points)]
    joined = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    assert np.array_equal(joined, decode_pcm(data, "pcm_s16le"))


def test_resample_is_identity_at_model_rate() -> None:
    audio = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert np.array_equal(resample(audio, 16000), audio)
