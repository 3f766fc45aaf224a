"""Pure scheduling for the streaming speech engine: audio positions, VAD work, and which decodes run each step.

No asyncio, no models, no audio: the scheduler counts samples. Per stream it keeps the samples pushed so far, the
``finalize``/``end`` markers (each at the sample position where it was requested), an ``UtteranceSegmenter``, the
finals waiting to be decoded (first in, first out; never dropped) and at most one waiting partial (a newer one
replaces it). One engine step is:

1. ``plan_vad()``: for every stream with whole 512-sample frames not yet seen by the VAD (at most
   ``max_vad_frames_per_step`` each, and no further than ``max_vad_lead_samples`` past the end of the stream's
   decode in flight, so that audio pushed faster than real time still gets partials instead of the VAD reaching
   the end of every utterance before its partial is back) or with a marker that is now due, a ``VadWork`` item;
2. ``apply_vad(stream_id, probabilities)``: feed the frames' probabilities to the segmenter, applying each marker
   just before the first frame that reaches past its position (so the result does not depend on how the audio was
   split into pushes); returns the segmentation events (``UtteranceStarted`` is for the client, the others become
   waiting decodes);
3. ``plan_decodes(is_stale)``: up to ``max_batch_size`` windows, finals first (oldest first), then partials
   (a partial the engine calls stale is dropped), grouped by encoder frame count so that every group is one
   batched encoder call. Partials go round-robin: a newer partial replacing a waiting one keeps the waiting one's
   place, so the stream that has waited longest for a partial is served first and no stream starves when there
   are more speaking streams than ``max_batch_size``. A stream with a decode in flight gets no other until that
   one completes (except a final passing a partial of its own utterance, whose text will be dropped), so the
   engine can plan the next batch while earlier ones still run (one batch per decode worker) and every stream's
   results still arrive in order;
4. ``complete(item)`` once its text is known: says whether the text is still wanted (a partial is dropped once the
   final of its utterance is queued) and whether the stream has now ended.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from app.engine.utterance import (
    FinalDue,
    PartialDue,
    SegmentationConfig,
    SegmentEvent,
    UtteranceSegmenter,
    UtteranceStarted,
)

logger = logging.getLogger(__name__)

DecodeKind = Literal["partial", "final"]
MarkerKind = Literal["finalize", "end"]
WindowSizer = Callable[[int, DecodeKind], int]  # (samples of audio, kind) -> encoder frames of its window
TokenLimiter = Callable[[int], int]  # samples of audio -> max new tokens
DEFAULT_MAX_VAD_FRAMES_PER_STEP: Final = 157  # about 5 s of audio per stream per step
DEFAULT_MAX_VAD_LEAD_SAMPLES: Final = 32_000  # 2 s: a live stream's decodes rarely take longer than that


@dataclass(frozen=True)
class VadWork:
    """Frames ``[first_sample, first_sample + n_frames * frame_samples)`` of a stream need VAD probabilities."""

    stream_id: str
    first_sample: int
    n_frames: int  # 0: no frames, only a marker to apply


@dataclass(frozen=True)
class DecodeItem:
    """One window to transcribe: ``[start, end)`` of a stream's audio."""

    stream_id: str
    kind: DecodeKind
    utterance: int
    start: int
    end: int
    frames: int  # encoder frames of the window
    max_new_tokens: int
    due_position: int  # the sample whose arrival made this decode due (for latency metrics)
    order: int  # global order in which decodes became due


@dataclass(frozen=True)
class DecodeGroup:
    """Windows of equal frame count: one batched encoder call."""

    frames: int
    items: tuple[DecodeItem, ...]


@dataclass(frozen=True)
class Completion:
    """What to do with a finished decode."""

    deliver: bool  # False: the stream is gone or a final superseded this partial
    stream_ended: bool  # True once: the last final of an ended stream has been delivered


@dataclass
class _Marker:
    position: int
    kind: MarkerKind


@dataclass
class _StreamSchedule:
    segmenter: UtteranceSegmenter
    pushed: int = 0
    markers: deque[_Marker] = field(default_factory=deque)
    end_requested: bool = False
    finals: deque[DecodeItem] = field(default_factory=deque)  # waiting, not yet handed out
    partial: DecodeItem | None = None  # the newest waiting partial
    finals_in_flight: dict[int, int] = field(default_factory=dict)  # utterance -> end sample
    in_flight: int = 0  # decodes handed out and not yet completed
    in_flight_end: int = 0  # the end sample of the newest decode in flight
    finalized_utterances: int = 0  # utterances below this index have a final queued (their partials are stale)
    ended_reported: bool = False


class SpeechScheduler:
    """Per-stream positions and decode queues for one engine."""

    def __init__(
        self,
        window_frames: WindowSizer,
        token_limit: TokenLimiter,
        *,
        max_batch_size: int = 16,
        max_vad_frames_per_step: int = DEFAULT_MAX_VAD_FRAMES_PER_STEP,
        max_vad_lead_samples: int = DEFAULT_MAX_VAD_LEAD_SAMPLES,
    ) -> None:
        if max_batch_size < 1 or max_vad_frames_per_step < 1 or max_vad_lead_samples < 0:
            raise ValueError(
                f"expected max_batch_size >= 1, max_vad_frames_per_step >= 1 and max_vad_lead_samples >= 0, "
                f"got {max_batch_size}, {max_vad_frames_per_step} and {max_vad_lead_samples}"
            )
        self._window_frames = window_frames
        self._token_limit = token_limit
        self.max_batch_size = max_batch_size
        self.max_vad_frames_per_step = max_vad_frames_per_step
        self.max_vad_lead_samples = max_vad_lead_samples
        self._streams: dict[str, _StreamSchedule] = {}
        self._order = itertools.count()

    # ----------------------------------------------------------------------------------------------- streams

    def add_stream(self, stream_id: str, config: SegmentationConfig) -> None:
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} is already scheduled")
        self._streams[stream_id] = _StreamSchedule(UtteranceSegmenter(config))

    def remove_stream(self, stream_id: str) -> None:
        """Forget a stream at once (idempotent); its decodes in flight will be dropped by ``complete``."""
        self._streams.pop(stream_id, None)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def push(self, stream_id: str, n_samples: int) -> int:
        """Count ``n_samples`` more samples of audio; returns the stream's new total."""
        stream = self._stream(stream_id)
        if stream.end_requested:
            raise ValueError(f"stream {stream_id!r} has ended; expected no more audio")
        if n_samples < 0:
            raise ValueError(f"expected n_samples >= 0, got {n_samples}")
        stream.pushed += n_samples
        return stream.pushed

    def finalize(self, stream_id: str) -> None:
        stream = self._stream(stream_id)
        if not stream.end_requested:
            stream.markers.append(_Marker(stream.pushed, "finalize"))

    def end(self, stream_id: str) -> None:
        stream = self._stream(stream_id)
        if not stream.end_requested:
            stream.end_requested = True
            stream.markers.append(_Marker(stream.pushed, "end"))

    def pushed(self, stream_id: str) -> int:
        return self._stream(stream_id).pushed

    def segmenter(self, stream_id: str) -> UtteranceSegmenter:
        return self._stream(stream_id).segmenter

    def backlog(self, stream_id: str) -> int:
        """Samples pushed but not yet settled: not seen by the VAD, or after the oldest final still to deliver."""
        stream = self._stream(stream_id)
        settled = stream.segmenter.position
        pending_ends = [item.end for item in stream.finals] + list(stream.finals_in_flight.values())
        if pending_ends:
            settled = min(settled, *pending_ends)
        return max(0, stream.pushed - settled)

    def retain_from(self, stream_id: str) -> int:
        """The earliest sample the stream's future decodes can still read."""
        stream = self._stream(stream_id)
        earliest = stream.segmenter.retain_from
        if stream.finals:
            earliest = min(earliest, stream.finals[0].start)
        if stream.partial is not None:
            earliest = min(earliest, stream.partial.start)
        return earliest

    # ----------------------------------------------------------------------------------------------- VAD

    def plan_vad(self) -> list[VadWork]:
        """Frames each stream needs probabilities for in this step (and streams with a marker now due)."""
        plan: list[VadWork] = []
        for stream_id, stream in self._streams.items():
            segmenter = stream.segmenter
            if segmenter.ended:
                continue
            frame = segmenter.config.frame_samples
            available = (stream.pushed - segmenter.position) // frame
            n_frames = min(available, self.max_vad_frames_per_step)
            if stream.in_flight:  # audio pushed faster than real time: keep the VAD close to the decodes
                lead = stream.in_flight_end + self.max_vad_lead_samples - segmenter.position
                n_frames = min(n_frames, max(0, lead // frame))
            marker_due = bool(stream.markers) and stream.markers[0].position < segmenter.position + frame
            if n_frames > 0 or marker_due:
                plan.append(VadWork(stream_id, segmenter.position, n_frames))
        return plan

    def apply_vad(self, stream_id: str, probabilities: list[float]) -> list[SegmentEvent]:
        """Feed the planned frames' probabilities in order; returns the segmentation events they caused.

        A stream removed since ``plan_vad`` is ignored (no events).
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return []
        segmenter = stream.segmenter
        frame = segmenter.config.frame_samples
        if segmenter.position + len(probabilities) * frame > stream.pushed:
            raise ValueError(
                f"stream {stream_id!r}: {len(probabilities)} frames from sample {segmenter.position} "
                f"go past the {stream.pushed} samples pushed"
            )
        events: list[SegmentEvent] = []
        for probability in probabilities:
            events += self._apply_due_markers(stream_id, stream)
            if segmenter.ended:
                break
            events += self._route(stream_id, stream, segmenter.push(probability), segmenter.position)
        events += self._apply_due_markers(stream_id, stream)
        return events

    def _apply_due_markers(self, stream_id: str, stream: _StreamSchedule) -> list[SegmentEvent]:
        segmenter = stream.segmenter
        events: list[SegmentEvent] = []
        frame = segmenter.config.frame_samples
        while stream.markers and stream.markers[0].position < segmenter.position + frame:
            marker = stream.markers.popleft()
            new = segmenter.end(stream.pushed) if marker.kind == "end" else segmenter.finalize()
            events += self._route(stream_id, stream, new, marker.position)
        return events

    def _route(
        self, stream_id: str, stream: _StreamSchedule, events: list[SegmentEvent], due_position: int
    ) -> list[SegmentEvent]:
        for event in events:
            if isinstance(event, PartialDue):
                waiting = stream.partial
                partial = self._item(stream_id, "partial", event.utterance, event.start, event.end, due_position)
                if waiting is not None:  # the newer window keeps the waiting one's place in the queue
                    partial = dataclasses.replace(partial, order=waiting.order)
                stream.partial = partial
            elif isinstance(event, FinalDue):
                stream.finals.append(
                    self._item(stream_id, "final", event.utterance, event.start, event.end, due_position)
                )
                stream.finalized_utterances = max(stream.finalized_utterances, event.utterance + 1)
                if stream.partial is not None and stream.partial.utterance <= event.utterance:
                    stream.partial = None
            else:
                assert isinstance(event, UtteranceStarted)
        return events

    def _item(
        self, stream_id: str, kind: DecodeKind, utterance: int, start: int, end: int, due_position: int
    ) -> DecodeItem:
        n_samples = end - start
        return DecodeItem(
            stream_id=stream_id,
            kind=kind,
            utterance=utterance,
            start=start,
            end=end,
            frames=self._window_frames(n_samples, kind),
            max_new_tokens=self._token_limit(n_samples),
            due_position=due_position,
            order=next(self._order),
        )

    # ----------------------------------------------------------------------------------------------- decodes

    def plan_decodes(self, is_stale: Callable[[DecodeItem], bool] | None = None) -> list[DecodeGroup]:
        """Hand out up to ``max_batch_size`` waiting decodes, finals first, grouped by window frame count.

        At most one decode per stream, and none for a stream whose previous decode is still in flight, except a
        final while only partials are in flight (their utterance is then final, so their results will be dropped:
        the final need not wait for them). A waiting partial for which ``is_stale`` says True is dropped instead
        (load shedding: a late partial is worth less than the compute it takes from finals and fresher partials).
        """
        for stream in self._streams.values():
            if stream.partial is not None and is_stale is not None and is_stale(stream.partial):
                stream.partial = None
        candidates = [self._ready_item(stream) for stream in self._streams.values()]
        chosen = sorted(
            (item for item in candidates if item is not None), key=lambda item: (item.kind != "final", item.order)
        )[: self.max_batch_size]
        for item in chosen:
            stream = self._streams[item.stream_id]
            stream.in_flight += 1
            stream.in_flight_end = max(stream.in_flight_end, item.end)
            if item.kind == "final":
                stream.finals.popleft()
                stream.finals_in_flight[item.utterance] = item.end
            else:
                stream.partial = None
        groups: dict[int, list[DecodeItem]] = {}
        for item in chosen:
            groups.setdefault(item.frames, []).append(item)
        return [DecodeGroup(frames, tuple(items)) for frames, items in groups.items()]

    def complete(self, item: DecodeItem) -> Completion:
        """A decode handed out by ``plan_decodes`` has finished."""
        stream = self._streams.get(item.stream_id)
        if stream is None:
            return Completion(deliver=False, stream_ended=False)
        stream.in_flight = max(0, stream.in_flight - 1)
        if item.kind == "partial":
            return Completion(deliver=item.utterance >= stream.finalized_utterances, stream_ended=False)
        stream.finals_in_flight.pop(item.utterance, None)
        return Completion(deliver=True, stream_ended=self._take_stream_ended(stream))

    def take_ended(self) -> list[str]:
        """Streams that ended with nothing left to deliver (reported once each)."""
        return [stream_id for stream_id, stream in self._streams.items() if self._take_stream_ended(stream)]

    def has_work(self) -> bool:
        """Whether a step would do anything: VAD frames, a due marker, a decode ready to hand out or an end to
        report (a waiting decode of a stream with one in flight does not count: it is not ready yet)."""
        return self.has_ready_decodes() or self.has_ends_to_report() or bool(self.plan_vad())

    def has_ends_to_report(self) -> bool:
        """Whether ``take_ended`` would report a stream now."""
        return any(self._is_finished(stream) and not stream.ended_reported for stream in self._streams.values())

    def has_ready_decodes(self) -> bool:
        """Whether ``plan_decodes`` would hand out a decode now (staleness aside)."""
        return any(self._ready_item(stream) is not None for stream in self._streams.values())

    @staticmethod
    def _ready_item(stream: _StreamSchedule) -> DecodeItem | None:
        """The stream's decode to hand out next, if it may start now (see ``plan_decodes``)."""
        if stream.finals:
            return stream.finals[0] if not stream.finals_in_flight else None
        return stream.partial if stream.in_flight == 0 else None

    @staticmethod
    def _is_finished(stream: _StreamSchedule) -> bool:
        return stream.segmenter.ended and not stream.finals and not stream.finals_in_flight

    def _take_stream_ended(self, stream: _StreamSchedule) -> bool:
        if stream.ended_reported or not self._is_finished(stream):
            return False
        stream.ended_reported = True
        return True

    def _stream(self, stream_id: str) -> _StreamSchedule:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"no stream {stream_id!r} in the scheduler") from None
