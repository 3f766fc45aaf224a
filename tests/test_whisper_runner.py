"""WhisperRunner on a converted model: batching, row dropout, limits and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.speech.features import TRANSCRIBE_PADDING_SAMPLES, log_mel_spectrogram, pad_or_trim_frames
from app.speech.whisper_runner import EncoderOutput, LoopStop, WhisperRunner
from tests.conftest import missing
from tests.whisper_test_audio import MODEL_DIR_ENV, find_speech_clips, load_converted_model, read_clip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner() -> WhisperRunner:
    model_dir, config = load_converted_model(MODEL_DIR_ENV, "/tmp/brook-whisper/1")
    return WhisperRunner(model_dir, config, intra_op_threads=2)


@pytest.fixture(scope="module")
def windows(request: pytest.FixtureRequest, runner: WhisperRunner) -> np.ndarray:
    """Two 30 s windows of real speech and one of silence, [3, 80, 3000]."""
    clips: dict[str, Path] = find_speech_clips(request)
    mels = []
    for name in ("telephone", "meeting_dev00", "silence"):
        if name not in clips:
            missing(f"clip {name!r} missing from {sorted(clips)}")
        audio = read_clip(clips[name])
        features = log_mel_spectrogram(audio, padding_samples=TRANSCRIBE_PADDING_SAMPLES)[:, :-1]
        mels.append(pad_or_trim_frames(features, runner.max_frames))
    return np.stack(mels)


def test_batched_decode_equals_one_window_at_a_time(runner: WhisperRunner, windows: np.ndarray) -> None:
    sot, sot_prev = int(runner.config["sot"]), int(runner.config["sot_prev"])
    previous = runner.tokenizer.encode(" Hello there.")
    prompts = [[sot], [sot_prev, *previous, sot], [sot]]  # two prompt lengths: decoded as two groups
    encoded = runner.encode(windows)
    batched = runner.decode(encoded, prompts, max_new_tokens=40)
    for row, prompt in enumerate(prompts):
        single = runner.decode(encoded.select([row]), [prompt], max_new_tokens=40)[0]
        assert batched[row].tokens == single.tokens
        assert batched[row].text == single.text
        assert batched[row].no_speech_prob == pytest.approx(single.no_speech_prob, abs=1e-5)
        assert batched[row].avg_logprob == pytest.approx(single.avg_logprob, abs=1e-4)
    assert batched[0].text.strip() and batched[1].text.strip()
    assert batched[2].no_speech_prob > 0.6 > batched[0].no_speech_prob


def test_token_limit_stops_a_row_without_eot(runner: WhisperRunner, windows: np.ndarray) -> None:
    result = runner.decode(runner.encode(windows[:1]), [[int(runner.config["sot"])]], max_new_tokens=3)[0]
    assert len(result.tokens) == 3
    assert not result.reached_eot
    assert result.tokens[0] >= int(runner.config["timestamp_begin"])  # timestamps on: the first token is one
    assert result.avg_logprob == pytest.approx(result.sum_logprob / 4)


def test_per_row_token_limits_in_one_batch_equal_each_row_alone(runner: WhisperRunner, windows: np.ndarray) -> None:
    sot = int(runner.config["sot"])
    encoded = runner.encode(windows)
    limits = [5, 40, 2]  # rows finish at different steps: the caches are compacted once half of them are done
    batched = runner.decode(encoded, [[sot]] * 3, max_new_tokens=limits)
    for row, limit in enumerate(limits):
        single = runner.decode(encoded.select([row]), [[sot]], max_new_tokens=limit)[0]
        assert batched[row].tokens == single.tokens
        assert len(batched[row].tokens) <= limit
    assert len(batched[0].tokens) == 5 and not batched[0].reached_eot
    with pytest.raises(ValueError, match="one per prompt"):
        runner.decode(encoded, [[sot]] * 3, max_new_tokens=[5, 5])


def test_loop_stop_detects_back_to_back_copies_at_the_end() -> None:
    stop = LoopStop(copies=4, max_ngram=3)
    assert stop.ends_in_loop([9, 7, 7, 7, 7])
    assert stop.ends_in_loop([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert not stop.ends_in_loop([7, 7, 7])  # three copies are not a loop yet
    assert not stop.ends_in_loop([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert not stop.ends_in_loop([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4])  # longer than max_ngram
    assert not stop.ends_in_loop([])


def test_encode_and_decode_check_their_inputs(runner: WhisperRunner, windows: np.ndarray) -> None:
    with pytest.raises(ValueError, match="even frame count"):
        runner.encode(windows[:, :, :2999])
    with pytest.raises(ValueError, match="mel"):
        runner.encode(windows[0])
    encoded = runner.encode(windows[:1, :, :1000])
    assert isinstance(encoded, EncoderOutput)
    assert encoded.cross_k.shape == (runner.n_layers, 1, runner.n_heads, 500, runner.head_dim)
    with pytest.raises(ValueError, match="one per window"):
        runner.decode(encoded, [[int(runner.config["sot"])]] * 2)
    with pytest.raises(ValueError, match="startoftranscript"):
        runner.decode(encoded, [[1, 2, 3]])
