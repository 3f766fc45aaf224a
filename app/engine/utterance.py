"""Per-stream speech segmentation: Silero VAD probabilities in, utterance boundaries and decode deadlines out.

A pure state machine driven one 512-sample frame at a time (positions are absolute sample indices from the start
of the stream, so nothing depends on how the client split its audio into pushes)::

    IDLE --p >= threshold--> CANDIDATE --voiced >= min_speech--> SPEECH --silence >= silence_ms--> IDLE (final)
    CANDIDATE --silence >= silence_ms--> IDLE (dropped, nothing reported)
    SPEECH --length >= max_utterance--> SPEECH (final, then a new utterance)
    SPEECH --finalize/end--> IDLE (final)

- A frame is *voiced* when its probability is at least ``neg_threshold`` (hysteresis, as Silero's own
  ``get_speech_timestamps``). A silence run starts at the first frame below ``neg_threshold`` and is cancelled only
  by a frame at or above ``threshold``; frames in between neither start nor cancel it.
- ``UtteranceStarted`` is reported only once the candidate has ``min_speech`` of voiced audio, so a click or a
  cough shorter than that produces nothing at all. Its start is the onset minus ``speech_pad`` (never before the
  end of the previous utterance).
- ``FinalDue`` ends at the start of the silence run plus ``speech_pad``; when the utterance reaches
  ``max_utterance`` it is cut at the quietest frame of its last ``cut_search`` and the rest continues as the next
  utterance (reported with its own ``UtteranceStarted``).
- ``PartialDue`` fires whenever ``partial_interval`` of audio has passed since the previous partial (or the start)
  while speech is going on (not during a silence run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ: Final = 16_000
VAD_FRAME_SAMPLES: Final = 512  # Silero VAD's frame at 16 kHz (32 ms)

FinalReason = Literal["silence", "max_length", "finalize", "end"]


@dataclass(frozen=True)
class SegmentationConfig:
    """Thresholds and durations of the segmentation, in samples (see ``from_ms`` for milliseconds)."""

    threshold: float = 0.5  # speech starts (and a silence run is cancelled) at or above this probability
    neg_threshold: float = 0.35  # below this a frame counts as silence
    min_speech_samples: int = 4_000  # voiced audio needed before an utterance is reported (250 ms)
    silence_samples: int = 8_000  # silence that ends an utterance (500 ms)
    speech_pad_samples: int = 4_800  # audio kept before the onset and after the last speech (300 ms)
    partial_interval_samples: int | None = 8_000  # audio between partials; None: no partials
    max_utterance_samples: int = 320_000  # an utterance is cut at this length (20 s)
    cut_search_samples: int = 48_000  # a forced cut goes to the quietest frame of this last stretch (3 s)
    frame_samples: int = VAD_FRAME_SAMPLES

    def __post_init__(self) -> None:
        if not 0.0 <= self.neg_threshold <= self.threshold <= 1.0:
            raise ValueError(
                f"expected 0 <= neg_threshold <= threshold <= 1, got {self.neg_threshold}, {self.threshold}"
            )
        if self.frame_samples <= 0 or self.silence_samples <= 0 or self.min_speech_samples < 0:
            raise ValueError(f"expected positive frame and silence lengths, got {self}")
        if self.speech_pad_samples < 0 or self.speech_pad_samples > self.silence_samples:
            raise ValueError(
                f"speech_pad_samples must lie in 0..silence_samples ({self.silence_samples}), "
                f"got {self.speech_pad_samples}"
            )
        if self.partial_interval_samples is not None and self.partial_interval_samples <= 0:
            raise ValueError(f"partial_interval_samples must be positive or None, got {self.partial_interval_samples}")
        if self.max_utterance_samples < 4 * self.frame_samples:
            raise ValueError(f"max_utterance_samples is too short: {self.max_utterance_samples}")
        if not 0 < self.cut_search_samples < self.max_utterance_samples:
            raise ValueError(
                f"cut_search_samples must lie in 1..max_utterance_samples-1, got {self.cut_search_samples}"
            )

    @classmethod
    def from_ms(
        cls,
        *,
        threshold: float = 0.5,
        neg_threshold: float = 0.35,
        min_speech_ms: int = 250,
        silence_ms: int = 500,
        speech_pad_ms: int = 300,
        partial_interval_s: float | None = 0.5,
        max_utterance_s: float = 20.0,
        cut_search_s: float = 3.0,
        sample_rate_hz: int = SAMPLE_RATE_HZ,
        frame_samples: int = VAD_FRAME_SAMPLES,
    ) -> SegmentationConfig:
        """The same configuration expressed in milliseconds and seconds."""
        per_ms = sample_rate_hz / 1000.0
        return cls(
            threshold=threshold,
            neg_threshold=neg_threshold,
            min_speech_samples=round(min_speech_ms * per_ms),
            silence_samples=round(silence_ms * per_ms),
            speech_pad_samples=min(round(speech_pad_ms * per_ms), round(silence_ms * per_ms)),
            partial_interval_samples=None if partial_interval_s is None else round(partial_interval_s * sample_rate_hz),
            max_utterance_samples=round(max_utterance_s * sample_rate_hz),
            cut_search_samples=round(cut_search_s * sample_rate_hz),
            frame_samples=frame_samples,
        )


@dataclass(frozen=True)
class UtteranceStarted:
    """Speech was confirmed; the utterance's audio starts at ``start`` (pre-roll included)."""

    utterance: int
    start: int  # sample index


@dataclass(frozen=True)
class PartialDue:
    """A partial transcript of ``[start, end)`` should be computed."""

    utterance: int
    start: int
    end: int


@dataclass(frozen=True)
class FinalDue:
    """The utterance is over: its final transcript covers ``[start, end)``."""

    utterance: int
    start: int
    end: int
    reason: FinalReason


SegmentEvent = UtteranceStarted | PartialDue | FinalDue


class SegmenterState(Enum):
    IDLE = "idle"  # no speech
    CANDIDATE = "candidate"  # speech began but is not yet long enough to be reported
    SPEECH = "speech"  # inside a reported utterance


class UtteranceSegmenter:
    """Segments one stream. Feed every frame's probability in order with ``push``; ``finalize``/``end`` between."""

    def __init__(self, config: SegmentationConfig) -> None:
        self.config = config
        self.state = SegmenterState.IDLE
        self.position = 0  # samples consumed so far (a multiple of frame_samples until ``end``)
        self.next_utterance = 0  # index of the next utterance to report
        self.ended = False
        self._floor = 0  # an utterance never starts before this (the end of the previous one)
        self._onset = 0  # first frame at or above threshold of the current candidate/utterance
        self._start = 0  # start of the current utterance (onset - pad, or a cut point)
        self._voiced = 0  # voiced samples of the current candidate
        self._silence_start: int | None = None  # start of the current silence run
        self._last_partial = 0  # end of the last partial (or the start of the utterance)
        self._probabilities: list[float] = []  # per frame since _start's frame, for a forced cut

    @property
    def current_utterance(self) -> int | None:
        """The index of the utterance in progress, or None outside speech."""
        return self.next_utterance - 1 if self.state is SegmenterState.SPEECH else None

    @property
    def retain_from(self) -> int:
        """The earliest sample a future transcript can still need."""
        if self.state is SegmenterState.SPEECH:
            return self._start
        anchor = self._onset if self.state is SegmenterState.CANDIDATE else self.position
        return max(self._floor, anchor - self.config.speech_pad_samples)

    def push(self, probability: float) -> list[SegmentEvent]:
        """Consume the next frame, whose speech probability is ``probability``."""
        if self.ended:
            raise RuntimeError("expected no audio after end(), got another frame")
        config = self.config
        frame_start = self.position
        frame_end = frame_start + config.frame_samples
        self.position = frame_end
        events: list[SegmentEvent] = []
        if self.state is SegmenterState.IDLE:
            if probability < config.threshold:
                return events
            self.state = SegmenterState.CANDIDATE
            self._onset = frame_start
            self._voiced = 0
            self._silence_start = None
            self._probabilities = []

        self._probabilities.append(probability)
        if probability >= config.threshold:
            self._silence_start = None
        elif probability < config.neg_threshold and self._silence_start is None:
            self._silence_start = frame_start
        silent_for = 0 if self._silence_start is None else frame_end - self._silence_start

        if self.state is SegmenterState.CANDIDATE:
            if probability >= config.neg_threshold:
                self._voiced += config.frame_samples
            if silent_for >= config.silence_samples:
                self.state = SegmenterState.IDLE  # too short to be speech: dropped without a word
                return events
            if self._voiced < config.min_speech_samples:
                return events
            self._begin_utterance(max(self._floor, self._onset - config.speech_pad_samples), events)

        if silent_for >= config.silence_samples:
            assert self._silence_start is not None
            self._end_utterance(min(self._silence_start + config.speech_pad_samples, frame_end), "silence", events)
            return events
        if frame_end - self._start >= config.max_utterance_samples:
            self._cut(events)
        self._maybe_partial(events)
        return events

    def finalize(self) -> list[SegmentEvent]:
        """End the current utterance at the current position (a final if speech was reported, else nothing)."""
        return self._finish("finalize")

    def end(self, total_samples: int) -> list[SegmentEvent]:
        """The stream is over after ``total_samples`` samples (a trailing part-frame included): final and stop."""
        if total_samples < self.position:
            raise ValueError(f"expected total_samples >= {self.position} (already consumed), got {total_samples}")
        if self.ended:
            return []
        self.position = total_samples
        events = self._finish("end")
        self.ended = True
        return events

    def _finish(self, reason: FinalReason) -> list[SegmentEvent]:
        events: list[SegmentEvent] = []
        if self.state is SegmenterState.SPEECH:
            end = self.position
            if self._silence_start is not None:
                end = min(end, self._silence_start + self.config.speech_pad_samples)
            self._end_utterance(end, reason, events)
        else:
            self.state = SegmenterState.IDLE  # an unconfirmed candidate is dropped
            self._floor = max(self._floor, self.position)
        return events

    def _begin_utterance(self, start: int, events: list[SegmentEvent]) -> None:
        self.state = SegmenterState.SPEECH
        self._start = start
        self._last_partial = start
        events.append(UtteranceStarted(self.next_utterance, start))
        self.next_utterance += 1

    def _end_utterance(self, end: int, reason: FinalReason, events: list[SegmentEvent]) -> None:
        events.append(FinalDue(self.next_utterance - 1, self._start, max(end, self._start), reason))
        self._floor = max(end, self._start)
        self.state = SegmenterState.IDLE
        self._silence_start = None
        self._probabilities = []

    def _cut(self, events: list[SegmentEvent]) -> None:
        """Force a final at the quietest recent frame and continue the speech as a new utterance."""
        config = self.config
        frame_count = len(self._probabilities)
        first_frame_start = self.position - frame_count * config.frame_samples
        search_frames = min(frame_count, max(1, config.cut_search_samples // config.frame_samples))
        window = self._probabilities[frame_count - search_frames :]
        quietest = min(range(len(window)), key=lambda index: (window[index], -index))
        cut_frame = frame_count - search_frames + quietest
        cut = max(first_frame_start + (cut_frame + 1) * config.frame_samples, self._start + config.frame_samples)
        events.append(FinalDue(self.next_utterance - 1, self._start, cut, "max_length"))
        kept = (self.position - cut) // config.frame_samples
        self._probabilities = self._probabilities[frame_count - kept :] if kept else []
        self._floor = cut
        if self._silence_start is not None:
            self._silence_start = max(self._silence_start, cut)
        self._begin_utterance(cut, events)

    def _maybe_partial(self, events: list[SegmentEvent]) -> None:
        interval = self.config.partial_interval_samples
        if interval is None or self.state is not SegmenterState.SPEECH or self._silence_start is not None:
            return
        if self.position - self._last_partial >= interval:
            events.append(PartialDue(self.next_utterance - 1, self._start, self.position))
            self._last_partial = self.position
