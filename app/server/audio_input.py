"""Client audio to the speech engine's input: decode raw PCM frames and resample them, as a stream, to 16 kHz.

Shared by `WS /v1/listen` (binary frames) and `WS /v1/realtime` (base64 PCM16 in JSON events).
"""

from __future__ import annotations

import numpy as np
import soxr

from app.audio import MODEL_SAMPLE_RATE_HZ, decode_pcm


class AudioInput:
    """Decodes a session's frames and resamples them, as a stream, to the model rate."""

    def __init__(self, sample_rate: int, encoding: str) -> None:
        self.sample_rate = sample_rate
        self.encoding = encoding
        self._resampler = (
            None if sample_rate == MODEL_SAMPLE_RATE_HZ
            else soxr.ResampleStream(sample_rate, MODEL_SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ")
        )

    def decode(self, frame: bytes) -> np.ndarray:
        """Samples at the model rate; raises `AudioError` when the frame does not hold whole samples."""
        samples = decode_pcm(frame, self.encoding)
        if self._resampler is None:
            return samples
        out: np.ndarray = self._resampler.resample_chunk(samples)
        return out

    def flush(self) -> np.ndarray:
        """The samples the resampler still holds back (call once, at the end of the audio)."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        out: np.ndarray = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return out
