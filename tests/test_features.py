"""Log-mel features (app/speech/features.py) against faster-whisper's FeatureExtractor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.speech.features import (
    HOP_LENGTH,
    TRANSCRIBE_PADDING_SAMPLES,
    frame_count,
    log_mel_spectrogram,
    mel_filterbank,
    pad_or_trim_frames,
)
from tests.whisper_test_audio import find_speech_clips, read_clip

feature_extractor = pytest.importorskip("faster_whisper.feature_extractor", reason="faster-whisper is the reference")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference() -> object:
    return feature_extractor.FeatureExtractor()


def test_mel_filterbank_matches_the_reference(reference: object) -> None:
    np.testing.assert_allclose(mel_filterbank(80), reference.mel_filters, rtol=0, atol=1e-7)  # type: ignore[attr-defined]
    assert mel_filterbank(80).shape == (80, 201)


@pytest.mark.parametrize("padding", [0, TRANSCRIBE_PADDING_SAMPLES])
def test_real_speech_matches_the_reference(request: pytest.FixtureRequest, reference: object, padding: int) -> None:
    clips = find_speech_clips(request)
    for name in ("telephone", "meeting_60s", "silence", "noise"):
        if name not in clips:
            continue
        audio = read_clip(clips[name])
        expected = reference(audio, padding=padding)  # type: ignore[operator]
        actual = log_mel_spectrogram(audio, padding_samples=padding)
        assert actual.shape == expected.shape == (80, frame_count(audio.shape[0], padding_samples=padding))
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE, err_msg=name)


@settings(max_examples=40, deadline=None)
@given(
    n_samples=st.integers(min_value=250, max_value=50_000),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.0, 1e-4, 0.03, 1.0]),
    padding=st.sampled_from([0, 1, TRANSCRIBE_PADDING_SAMPLES, 1000]),
)
def test_random_signals_match_the_reference(n_samples: int, seed: int, scale: float, padding: int) -> None:
    audio = (np.random.default_rng(seed).standard_normal(n_samples) * scale).astype(np.float32)
    expected = feature_extractor.FeatureExtractor()(audio, padding=padding)
    actual = log_mel_spectrogram(audio, padding_samples=padding)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


def test_frame_count_is_one_per_hop() -> None:
    assert frame_count(480_000, padding_samples=TRANSCRIBE_PADDING_SAMPLES) == 3001
    assert log_mel_spectrogram(np.zeros(10 * HOP_LENGTH + 7, np.float32)).shape == (80, 10)


def test_silence_is_constant() -> None:
    features = log_mel_spectrogram(np.zeros(16_000, np.float32))
    assert np.all(features == features[0, 0])
    assert features[0, 0] == pytest.approx((-10.0 + 4.0) / 4.0, abs=1e-6)  # log10 of the 1e-10 floor


def test_rejects_stereo_and_too_short_audio() -> None:
    with pytest.raises(ValueError, match="mono"):
        log_mel_spectrogram(np.zeros((2, 16_000), np.float32))
    with pytest.raises(ValueError, match="samples"):
        log_mel_spectrogram(np.zeros(100, np.float32))


def test_pad_or_trim_frames() -> None:
    features = np.ones((80, 5), np.float32)
    assert pad_or_trim_frames(features, 8).shape == (80, 8)
    assert pad_or_trim_frames(features, 8)[:, 5:].sum() == 0.0
    assert pad_or_trim_frames(features, 3).shape == (80, 3)
    assert pad_or_trim_frames(features, 5) is features
