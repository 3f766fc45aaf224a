"""Whisper log-mel features in pure numpy, equal to faster-whisper's ``FeatureExtractor``.

The recipe: zero-pad the end of the waveform, reflect-pad ``N_FFT // 2`` samples on both sides, cut frames of
``N_FFT`` samples every ``HOP_LENGTH`` samples, apply a periodic Hann window, take the power of the one-sided
float32 FFT, drop the last frame, project onto a Slaney-normalised mel filterbank, then
``log10(max(x, 1e-10))``, clamp to ``max - 8`` (the maximum of the whole input) and map with ``(x + 4) / 4``.

Every step runs in float32 with the same array layouts as faster-whisper, so the output is bit-identical in
practice (the tests allow 1e-5).
"""

from __future__ import annotations

import functools
import logging
from typing import Final

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ: Final = 16_000
N_FFT: Final = 400
HOP_LENGTH: Final = 160
N_MELS: Final = 80
LOG_FLOOR: Final = 1e-10  # power floor before log10
DYNAMIC_RANGE_LOG10: Final = 8.0  # values below (max - 8) are clamped
# faster-whisper pads 160 samples (one hop) at the end of the audio before the STFT when it transcribes.
TRANSCRIBE_PADDING_SAMPLES: Final = HOP_LENGTH

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_MEL_LINEAR_HZ_PER_MEL: Final = 200.0 / 3.0
_MEL_LOG_BREAK_HZ: Final = 1000.0
_MEL_LOG_STEP: Final = float(np.log(6.4) / 27.0)


def _hz_to_mel(frequency_hz: float) -> float:
    if frequency_hz < _MEL_LOG_BREAK_HZ:
        return frequency_hz / _MEL_LINEAR_HZ_PER_MEL
    return _MEL_LOG_BREAK_HZ / _MEL_LINEAR_HZ_PER_MEL + float(np.log(frequency_hz / _MEL_LOG_BREAK_HZ)) / _MEL_LOG_STEP


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    break_mel = _MEL_LOG_BREAK_HZ / _MEL_LINEAR_HZ_PER_MEL
    linear = mels * _MEL_LINEAR_HZ_PER_MEL
    logarithmic = _MEL_LOG_BREAK_HZ * np.exp(_MEL_LOG_STEP * (mels - break_mel))
    return np.where(mels >= break_mel, logarithmic, linear)


@functools.cache
def mel_filterbank(n_mels: int = N_MELS, *, sample_rate_hz: int = SAMPLE_RATE_HZ, n_fft: int = N_FFT) -> np.ndarray:
    """Triangular Slaney-normalised mel filters from 0 Hz to Nyquist, shape [n_mels, n_fft // 2 + 1], float32.

    Built in float64 and rounded once to float32. The returned array is read-only (it is cached).
    """
    fft_frequencies_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate_hz)
    mel_points = np.linspace(0.0, _hz_to_mel(sample_rate_hz / 2.0), n_mels + 2)
    edges_hz = _mel_to_hz(mel_points)
    widths_hz = np.diff(edges_hz)
    distance_hz = edges_hz[:, None] - fft_frequencies_hz[None, :]
    rising = -distance_hz[:-2] / widths_hz[:-1, None]
    falling = distance_hz[2:] / widths_hz[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    area_normalisation = 2.0 / (edges_hz[2 : n_mels + 2] - edges_hz[:n_mels])
    filters: np.ndarray = (triangles * area_normalisation[:, None]).astype(np.float32)
    filters.flags.writeable = False
    return filters


@functools.cache
def _hann_window(n_fft: int) -> np.ndarray:
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
    window.flags.writeable = False
    return window


def frame_count(n_samples: int, *, padding_samples: int = 0) -> int:
    """Number of feature frames ``log_mel_spectrogram`` returns for ``n_samples`` samples."""
    return (n_samples + padding_samples) // HOP_LENGTH


def log_mel_spectrogram(audio: np.ndarray, *, n_mels: int = N_MELS, padding_samples: int = 0) -> np.ndarray:
    """Log-mel features of 16 kHz mono audio: float32 [n_mels, (len(audio) + padding_samples) // 160].

    ``padding_samples`` zeros are appended first (faster-whisper's transcribe uses 160, see
    ``TRANSCRIBE_PADDING_SAMPLES``). The ``max - 8`` clamp uses the maximum over the whole input, so features of
    a window depend on the audio around it: compute them once for the whole recording, then slice.
    """
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio with shape [samples], got shape {audio.shape}")
    if padding_samples < 0:
        raise ValueError(f"padding_samples must be >= 0, got {padding_samples}")
    waveform = np.asarray(audio, dtype=np.float32)
    if padding_samples:
        waveform = np.pad(waveform, (0, padding_samples))
    half = N_FFT // 2
    if waveform.shape[0] <= half:
        raise ValueError(
            f"expected more than {half} samples (after padding) for reflect padding, got {waveform.shape[0]}"
        )
    padded = np.pad(waveform, (half, half), mode="reflect")
    n_frames = 1 + (padded.shape[0] - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(HOP_LENGTH * padded.strides[0], padded.strides[0]), writeable=False
    )
    spectrum = np.fft.rfft(frames * _hann_window(N_FFT), n=N_FFT, axis=-1).astype(np.complex64, copy=False)
    power = np.abs(spectrum[:-1]) ** 2  # [frames, bins]; the last frame is dropped
    mel = mel_filterbank(n_mels) @ power.T  # same operand layouts as faster-whisper -> same float32 sums
    log_mel = np.log10(np.maximum(mel, np.float32(LOG_FLOOR)))
    log_mel = np.maximum(log_mel, log_mel.max() - DYNAMIC_RANGE_LOG10)
    return np.ascontiguousarray((log_mel + 4.0) / 4.0, dtype=np.float32)


def pad_or_trim_frames(features: np.ndarray, n_frames: int) -> np.ndarray:
    """Cut or zero-pad the last axis of [.., frames] features to exactly ``n_frames`` (zeros in the log-mel domain)."""
    current = features.shape[-1]
    if current > n_frames:
        return np.ascontiguousarray(features[..., :n_frames])
    if current < n_frames:
        widths = [(0, 0)] * (features.ndim - 1) + [(0, n_frames - current)]
        return np.pad(features, widths)
    return features
