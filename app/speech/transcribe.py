"""Offline long-form transcription that reproduces faster-whisper's ``WhisperModel.transcribe``.

Reproduced settings: greedy (beam 1; ``TranscriptionOptions.beam_size`` for beam search), a single temperature
0.0 (so no fallback), timestamps on, no VAD, no word
timestamps. Per recording:

- log-mel features of the whole recording (160 zero samples appended, one ``max - 8`` clamp for all of it);
- a cursor ``seek`` in 10 ms frames walks 30 s windows (``features[:, seek:seek + 3000]`` zero-padded to 3000);
- each window is decoded with the prompt ``<|startofprev|> + the last 223 emitted tokens + <|startoftranscript|>``
  (no ``<|startofprev|>`` part before anything was emitted);
- a window whose no-speech probability exceeds 0.6 while its average log-probability is at most -1.0 is skipped;
- otherwise it is cut into segments at consecutive timestamp tokens; the cursor then moves to the last complete
  timestamp, or past the whole window when the output ends with a single timestamp or has no timestamp pair;
- segments with ``start == end`` or blank text are dropped; the others feed the next prompt.

Several recordings (or short clips) can be transcribed together: ``transcribe_batch`` advances every recording by
one window per round and encodes and decodes the windows of all recordings in one batched call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from app.speech.decoding import TIME_PRECISION_S, DecodingRules, compression_ratio
from app.speech.features import (
    HOP_LENGTH,
    SAMPLE_RATE_HZ,
    TRANSCRIBE_PADDING_SAMPLES,
    log_mel_spectrogram,
    pad_or_trim_frames,
)
from app.speech.whisper_runner import DecodeResult, WhisperRunner

logger = logging.getLogger(__name__)

SECONDS_PER_FRAME: Final = HOP_LENGTH / SAMPLE_RATE_HZ  # 0.01 s, computed as faster-whisper does
FRAMES_PER_TIMESTAMP: Final = 2  # the encoder halves the frame rate: one timestamp step = 2 mel frames
DEFAULT_MAX_BATCH_SIZE: Final = 8  # windows per encoder/decoder call (each holds ~18 MB of cross-attention cache)


@dataclass(frozen=True)
class TranscriptionOptions:
    """faster-whisper's ``transcribe`` options that Brook honours (defaults = faster-whisper's defaults)."""

    language: str = "en"  # used only by multilingual models
    task: str = "transcribe"  # "transcribe" or "translate"; used only by multilingual models
    condition_on_previous_text: bool = True  # prompt each window with the text emitted so far
    no_speech_threshold: float | None = 0.6  # skip a window above this no-speech probability ...
    log_prob_threshold: float | None = -1.0  # ... unless its average log-probability is above this
    compression_ratio_threshold: float | None = 2.4  # reported only: with one temperature there is no fallback
    max_initial_timestamp_s: float | None = 1.0  # the first timestamp of a window is at most this
    suppress_blank: bool = True  # no blank or EOT as the first sampled token
    without_timestamps: bool = False  # sample text only (one segment per window)
    beam_size: int = 1  # > 1: beam search (faster-whisper's default is 5; Brook keeps greedy by default)


@dataclass(frozen=True)
class TranscriptionSegment:
    """One segment, as faster-whisper yields it."""

    start: float  # seconds from the start of the recording
    end: float  # seconds
    text: str  # decoded text tokens (usually with a leading space)
    tokens: tuple[int, ...]  # the segment's tokens, timestamps included
    seek: int  # mel frame at which its window started
    avg_logprob: float  # of the whole window's decoding
    no_speech_prob: float  # of the whole window
    compression_ratio: float  # of the whole window's text


@dataclass(frozen=True)
class TranscriptionResult:
    """All segments of one recording."""

    segments: list[TranscriptionSegment]
    duration_s: float  # length of the audio

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments)


@dataclass
class _Recording:
    """Progress of one recording through its windows."""

    features: np.ndarray  # [n_mels, frames] of the whole recording
    content_frames: int  # frames that hold audio (the last feature frame is padding)
    seek: int = 0
    all_tokens: list[int] = field(default_factory=list)
    prompt_reset_since: int = 0
    segments: list[TranscriptionSegment] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames


@dataclass(frozen=True)
class _Window:
    """The window a recording decodes in this round."""

    mel: np.ndarray  # [n_mels, max_frames]
    seek: int
    segment_size: int  # frames of real content in the window
    prompt: list[int]


def transcribe(
    audio: np.ndarray,
    runner: WhisperRunner,
    *,
    condition_on_previous_text: bool | None = None,
    options: TranscriptionOptions | None = None,
) -> TranscriptionResult:
    """Transcribe 16 kHz mono float32 audio of any length, like faster-whisper's long-form ``transcribe``.

    ``condition_on_previous_text``, when given, overrides the value in ``options`` (default True).
    """
    chosen = options or TranscriptionOptions()
    if condition_on_previous_text is not None:
        chosen = dataclasses.replace(chosen, condition_on_previous_text=condition_on_previous_text)
    return transcribe_batch([audio], runner, options=chosen)[0]


def transcribe_windows(
    windows: Sequence[np.ndarray],
    runner: WhisperRunner,
    *,
    options: TranscriptionOptions | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> list[TranscriptionResult]:
    """Transcribe independent short clips (typically up to 30 s each) together in batched model calls."""
    return transcribe_batch(windows, runner, options=options, max_batch_size=max_batch_size)


def transcribe_batch(
    audios: Sequence[np.ndarray],
    runner: WhisperRunner,
    *,
    options: TranscriptionOptions | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> list[TranscriptionResult]:
    """Transcribe independent recordings; each result equals what ``transcribe`` gives for that recording alone
    (up to the float rounding of batched matrix products). At most ``max_batch_size`` windows share a call."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    chosen = options or TranscriptionOptions()
    rules = DecodingRules.from_config(
        runner.config,
        suppress_blank=chosen.suppress_blank,
        with_timestamps=not chosen.without_timestamps,
        max_initial_timestamp_s=chosen.max_initial_timestamp_s,
    )
    sot_sequence = _sot_sequence(runner, chosen)
    n_mels = int(runner.config["n_mels"])
    recordings = [_prepare(audio, n_mels) for audio in audios]
    while True:
        active = [recording for recording in recordings if not recording.done]
        if not active:
            break
        for first in range(0, len(active), max_batch_size):
            chunk = active[first : first + max_batch_size]
            windows = [_next_window(recording, runner, sot_sequence) for recording in chunk]
            encoded = runner.encode(np.stack([window.mel for window in windows]))
            prompts = [window.prompt for window in windows]
            results = runner.decode(encoded, prompts, rules=rules, beam_size=chosen.beam_size)
            for recording, window, result in zip(chunk, windows, results, strict=True):
                _advance(recording, window, result, runner, chosen)
    return [
        TranscriptionResult(recording.segments, float(audio.shape[0]) / SAMPLE_RATE_HZ)
        for recording, audio in zip(recordings, audios, strict=True)
    ]


def _sot_sequence(runner: WhisperRunner, options: TranscriptionOptions) -> list[int]:
    sequence = [int(runner.config["sot"])]
    if runner.config.get("is_multilingual"):
        sequence.append(runner.tokenizer.token_id(f"<|{options.language}|>"))
        sequence.append(int(runner.config[options.task]))
    if options.without_timestamps:
        sequence.append(int(runner.config["no_timestamps"]))
    return sequence


def _prepare(audio: np.ndarray, n_mels: int) -> _Recording:
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio with shape [samples], got shape {audio.shape}")
    if audio.shape[0] < HOP_LENGTH:  # not one full frame of content: nothing to transcribe
        return _Recording(np.zeros((n_mels, 1), dtype=np.float32), content_frames=0)
    features = log_mel_spectrogram(audio, n_mels=n_mels, padding_samples=TRANSCRIBE_PADDING_SAMPLES)
    return _Recording(features, content_frames=features.shape[-1] - 1)


def _next_window(recording: _Recording, runner: WhisperRunner, sot_sequence: list[int]) -> _Window:
    segment_size = min(runner.max_frames, recording.content_frames - recording.seek)
    mel = pad_or_trim_frames(recording.features[:, recording.seek : recording.seek + segment_size], runner.max_frames)
    previous = recording.all_tokens[recording.prompt_reset_since :]
    prompt: list[int] = []
    if previous:
        max_previous = runner.n_text_ctx // 2 - 1  # 223
        prompt = [int(runner.config["sot_prev"]), *previous[-max_previous:]]
    return _Window(mel, recording.seek, segment_size, prompt + sot_sequence)


def _advance(
    recording: _Recording,
    window: _Window,
    result: DecodeResult,
    runner: WhisperRunner,
    options: TranscriptionOptions,
) -> None:
    """Apply one window's decoding to the recording: skip it, or cut it into segments and move the cursor."""
    ratio = compression_ratio(result.text.strip())
    if options.compression_ratio_threshold is not None and ratio > options.compression_ratio_threshold:
        logger.debug("window at frame %d: compression ratio %.2f above threshold (no fallback)", window.seek, ratio)
    if options.no_speech_threshold is not None:
        should_skip = result.no_speech_prob > options.no_speech_threshold
        if options.log_prob_threshold is not None and result.avg_logprob > options.log_prob_threshold:
            should_skip = False
        if should_skip:
            logger.debug("window at frame %d: no speech (p=%.3f)", window.seek, result.no_speech_prob)
            recording.seek += window.segment_size
            return

    timestamp_begin = int(runner.config["timestamp_begin"])
    pieces, recording.seek = split_by_timestamps(result.tokens, window.seek, window.segment_size, timestamp_begin)
    for start, end, tokens in pieces:
        text = runner.tokenizer.decode(tokens)
        if start == end or not text.strip():
            continue
        recording.all_tokens.extend(tokens)
        recording.segments.append(
            TranscriptionSegment(
                start=start,
                end=end,
                text=text,
                tokens=tuple(tokens),
                seek=window.seek,
                avg_logprob=result.avg_logprob,
                no_speech_prob=result.no_speech_prob,
                compression_ratio=ratio,
            )
        )
    if not options.condition_on_previous_text:
        recording.prompt_reset_since = len(recording.all_tokens)


def split_by_timestamps(
    tokens: Sequence[int], seek: int, segment_size: int, timestamp_begin: int
) -> tuple[list[tuple[float, float, list[int]]], int]:
    """Cut a window's tokens into (start_s, end_s, tokens) pieces and return them with the next ``seek``.

    A piece ends at each pair of consecutive timestamps. If the output ends with a single timestamp, the whole
    window is consumed; otherwise the cursor stops at the last complete pair and the unfinished tail is decoded
    again in the next window. Without any timestamp pair, the window is one piece and is consumed whole.
    """
    time_offset = seek * SECONDS_PER_FRAME
    single_timestamp_ending = len(tokens) >= 2 and tokens[-2] < timestamp_begin <= tokens[-1]
    boundaries = [
        index
        for index in range(1, len(tokens))
        if tokens[index] >= timestamp_begin and tokens[index - 1] >= timestamp_begin
    ]
    if not boundaries:
        duration = segment_size * SECONDS_PER_FRAME
        timestamps = [token for token in tokens if token >= timestamp_begin]
        if timestamps and timestamps[-1] != timestamp_begin:
            duration = (timestamps[-1] - timestamp_begin) * TIME_PRECISION_S
        return [(time_offset, time_offset + duration, list(tokens))], seek + segment_size

    if single_timestamp_ending:
        boundaries.append(len(tokens))
    pieces: list[tuple[float, float, list[int]]] = []
    last_boundary = 0
    for boundary in boundaries:
        piece = list(tokens[last_boundary:boundary])
        start = time_offset + (piece[0] - timestamp_begin) * TIME_PRECISION_S
        end = time_offset + (piece[-1] - timestamp_begin) * TIME_PRECISION_S
        pieces.append((start, end, piece))
        last_boundary = boundary
    if single_timestamp_ending:
        return pieces, seek + segment_size
    last_timestamp_position = tokens[last_boundary - 1] - timestamp_begin
    return pieces, seek + last_timestamp_position * FRAMES_PER_TIMESTAMP
