"""Silero VAD on onnxruntime: speech probability per 512-sample frame, with recurrent state kept per stream.

Many streams are evaluated in one batched call: each row carries its own recurrent state and context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.ort_session import create_session


@dataclass
class VadStreamState:
    """The recurrent state of one audio stream: the model state and the tail of the previous frame."""

    state: np.ndarray  # [2, 128] float32
    context: np.ndarray  # [context_samples] float32

    def reset(self) -> None:
        self.state[:] = 0.0
        self.context[:] = 0.0


@dataclass(frozen=True)
class VadConfig:
    sample_rate: int = 16000
    frame_samples: int = 512
    context_samples: int = 64
    state_shape: tuple[int, int] = field(default=(2, 128))

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any]) -> VadConfig:
        return cls(
            sample_rate=int(config["sample_rate"]),
            frame_samples=int(config["frame_samples"]),
            context_samples=int(config["context_samples"]),
            state_shape=(int(config["state_shape"][0]), int(config["state_shape"][1])),
        )


class VadRunner:
    """Runs Silero VAD for a batch of streams. numpy in, numpy out; the caller owns each stream's state."""

    def __init__(self, model_dir: Path, config: Mapping[str, Any], *, intra_op_threads: int = 1) -> None:
        self.config = VadConfig.from_manifest(config)
        self._session: ort.InferenceSession = create_session(model_dir / "vad.onnx", intra_op_threads)
        self._sample_rate = np.array(self.config.sample_rate, dtype=np.int64)

    def new_stream(self) -> VadStreamState:
        return VadStreamState(
            state=np.zeros(self.config.state_shape, dtype=np.float32),
            context=np.zeros(self.config.context_samples, dtype=np.float32),
        )

    def speech_probabilities(self, streams: Sequence[VadStreamState], frames: np.ndarray) -> np.ndarray:
        """One frame per stream: `frames` is [len(streams), frame_samples]. Returns [len(streams)] probabilities.

        Each stream's state and context are advanced in place.
        """
        if frames.ndim != 2 or frames.shape != (len(streams), self.config.frame_samples):
            raise ValueError(
                f"expected frames of shape ({len(streams)}, {self.config.frame_samples}), got {frames.shape}"
            )
        contexts = np.stack([s.context for s in streams])
        inputs = np.concatenate([contexts, frames.astype(np.float32, copy=False)], axis=1)
        state = np.ascontiguousarray(np.stack([s.state for s in streams], axis=1))  # [2, batch, 128]
        probabilities, new_state = self._session.run(None, {"input": inputs, "state": state, "sr": self._sample_rate})
        for row, stream in enumerate(streams):
            stream.state[...] = new_state[:, row, :]
            stream.context[...] = frames[row, -self.config.context_samples :]
        result: np.ndarray = probabilities[:, 0].astype(np.float32)
        return result

    def probabilities_for_audio(self, audio: np.ndarray, stream: VadStreamState | None = None) -> np.ndarray:
        """Speech probability of every whole frame of a 16 kHz clip (a trailing partial frame is ignored)."""
        stream = stream or self.new_stream()
        n_frames = len(audio) // self.config.frame_samples
        frames = audio[: n_frames * self.config.frame_samples].reshape(n_frames, self.config.frame_samples)
        return np.array([self.speech_probabilities([stream], frame[None, :])[0] for frame in frames], np.float32)
