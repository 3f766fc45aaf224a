"""What a speech stream tells its consumer, and the per-stream options and engine settings that shape it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_FINAL_BEAM_SIZE = 8  # the widest beam a stream may ask for (each hypothesis is one more decoder row)


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began: ``utterance`` counts from 0 per stream; ``start`` is in seconds from the stream's start and
    includes a short pre-roll before the detected onset."""

    utterance: int
    start: float


@dataclass(frozen=True)
class Transcript:
    """Text of an utterance: a ``partial`` (may still change, may be skipped) or its one ``final``."""

    kind: Literal["partial", "final"]
    utterance: int
    text: str  # may be "" for a final whose audio held no words
    start: float  # seconds from the stream's start
    end: float  # seconds; the audio the text covers


@dataclass(frozen=True)
class StreamEnded:
    """The answer to ``end()``: every final has been delivered; no further events."""


SpeechEvent = SpeechStarted | Transcript | StreamEnded


@dataclass(frozen=True)
class StreamOptions:
    """Per-stream choices of the client."""

    interim_results: bool = True  # send partial transcripts
    vad_silence_ms: int = 500  # silence that ends an utterance
    vad_threshold: float | None = None  # speech probability that starts speech (None: the engine's setting)
    speech_pad_ms: int | None = None  # audio kept before detected speech (None: the engine's setting)
    final_beam_size: int | None = None  # beam of this stream's finals (None: the engine's DecodePolicy.final_beam_size)

    def __post_init__(self) -> None:
        if not 100 <= self.vad_silence_ms <= 10_000:
            raise ValueError(f"vad_silence_ms must lie in 100..10000, got {self.vad_silence_ms}")
        if self.vad_threshold is not None and not 0.0 < self.vad_threshold < 1.0:
            raise ValueError(f"vad_threshold must lie in (0, 1), got {self.vad_threshold}")
        if self.speech_pad_ms is not None and not 0 <= self.speech_pad_ms <= 2_000:
            raise ValueError(f"speech_pad_ms must lie in 0..2000, got {self.speech_pad_ms}")
        if self.final_beam_size is not None and not 1 <= self.final_beam_size <= MAX_FINAL_BEAM_SIZE:
            raise ValueError(f"final_beam_size must lie in 1..{MAX_FINAL_BEAM_SIZE}, got {self.final_beam_size}")
