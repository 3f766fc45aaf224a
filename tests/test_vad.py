"""Silero VAD on onnxruntime: speech vs silence on real recordings, and batched = per-stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.audio import load_audio
from app.repository import ModelRepository
from app.speech.vad import VadRunner
from tests.conftest import load_model


def make_runner(model_repository: ModelRepository) -> VadRunner:
    loaded = load_model(model_repository, "silero-vad")
    return VadRunner(loaded.directory, loaded.manifest.config)


def test_vad_hears_speech_and_not_silence_or_noise(
    model_repository: ModelRepository, speech_clips: dict[str, Path]
) -> None:
    runner = make_runner(model_repository)
    speech = runner.probabilities_for_audio(load_audio(speech_clips["telephone"]))
    silence = runner.probabilities_for_audio(load_audio(speech_clips["silence"]))
    noise = runner.probabilities_for_audio(load_audio(speech_clips["noise"]))
    assert np.mean(speech > 0.5) > 0.4, "a telephone conversation is mostly speech"
    assert np.max(silence) < 0.1
    assert np.mean(noise > 0.5) < 0.05


def test_vad_batch_equals_separate_streams(model_repository: ModelRepository, speech_clips: dict[str, Path]) -> None:
    runner = make_runner(model_repository)
    clips = [load_audio(speech_clips[name])[: 512 * 60] for name in ("telephone", "meeting_dev00", "noise")]
    alone = [runner.probabilities_for_audio(clip) for clip in clips]
    streams = [runner.new_stream() for _ in clips]
    batched = np.stack([
        runner.speech_probabilities(streams, np.stack([clip[i * 512:(i + 1) * 512] for clip in clips]))
        for i in range(60)
    ], axis=1)
    for row, expected in enumerate(alone):
        assert np.allclose(batched[row], expected, atol=1e-5)


def test_vad_state_is_per_stream(model_repository: ModelRepository, speech_clips: dict[str, Path]) -> None:
    runner = make_runner(model_repository)
    speech = load_audio(speech_clips["telephone"])[: 512 * 40]
    stream = runner.new_stream()
    first = runner.probabilities_for_audio(speech, stream)
    stream.reset()
    again = runner.probabilities_for_audio(speech, stream)
    assert np.allclose(first, again, atol=1e-6)
