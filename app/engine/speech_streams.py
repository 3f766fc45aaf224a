"""Loop-owned state of one live audio stream in the speech engine: its audio, its outgoing events, its timings.

Everything here is used from the engine's event loop only (no locks): ``AudioBuffer`` keeps the samples a future
decode may still read, ``Mailbox`` queues the events for the consumer (partials of one utterance coalesce),
``StreamState`` ties them to the stream's VAD state and push times.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from app.engine.speech_events import SpeechEvent, StreamEnded, StreamOptions, Transcript
from app.engine.speech_scheduler import DecodeItem
from app.engine.utterance import SAMPLE_RATE_HZ
from app.speech.vad import VadStreamState


class AudioBuffer:
    """The samples of one stream from ``base`` on, in one growing float32 array."""

    def __init__(self, capacity: int = SAMPLE_RATE_HZ * 4) -> None:
        self._data = np.zeros(capacity, dtype=np.float32)
        self._offset = 0  # index in _data of sample ``base``
        self.base = 0  # absolute index of the first sample kept
        self.end = 0  # absolute index after the last sample

    @property
    def kept_samples(self) -> int:
        return self.end - self.base

    def append(self, samples: np.ndarray) -> None:
        needed = self.kept_samples + samples.shape[0]
        if self._offset + needed > self._data.shape[0]:
            capacity = max(self._data.shape[0], SAMPLE_RATE_HZ)
            while needed > capacity // 2:
                capacity *= 2
            fresh = np.zeros(capacity, dtype=np.float32)
            fresh[: self.kept_samples] = self._data[self._offset : self._offset + self.kept_samples]
            self._data, self._offset = fresh, 0
        start = self._offset + self.kept_samples
        self._data[start : start + samples.shape[0]] = samples
        self.end += samples.shape[0]

    def read(self, start: int, end: int) -> np.ndarray:
        """A copy of samples ``[start, end)``."""
        if not self.base <= start <= end <= self.end:
            raise ValueError(f"expected a range inside [{self.base}, {self.end}), got [{start}, {end})")
        return self._data[self._offset + start - self.base : self._offset + end - self.base].copy()

    def discard_before(self, position: int) -> None:
        position = min(max(position, self.base), self.end)
        self._offset += position - self.base
        self.base = position


class Mailbox:
    """Events for one consumer. Partials of an utterance coalesce; everything else is kept in order."""

    def __init__(self) -> None:
        self._events: deque[SpeechEvent] = deque()
        self._ready = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False  # close(): drop everything, answer StreamEnded
        self._finished = False  # StreamEnded was queued: answer StreamEnded once the queue is empty

    def __len__(self) -> int:
        return len(self._events)

    def put(self, event: SpeechEvent) -> None:
        if self._closed:
            return
        if isinstance(event, Transcript) and event.kind == "partial":
            for index, queued in enumerate(self._events):
                if isinstance(queued, Transcript) and queued.kind == "partial" and queued.utterance == event.utterance:
                    self._events[index] = event
                    return
        self._finished = self._finished or isinstance(event, StreamEnded)
        self._events.append(event)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._events.clear()
        self._ready.set()

    async def get(self) -> SpeechEvent:
        while True:
            if self._events:
                return self._events.popleft()
            if self._closed or self._finished:
                return StreamEnded()
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()


@dataclass
class StreamState:
    """Loop-owned state of one stream."""

    stream_id: str
    options: StreamOptions
    vad: VadStreamState
    audio: AudioBuffer = field(default_factory=AudioBuffer)
    mailbox: Mailbox = field(default_factory=Mailbox)
    space: asyncio.Event = field(default_factory=asyncio.Event)  # set when a waiting push may proceed
    pushes: deque[tuple[int, float]] = field(default_factory=deque)  # (end sample, monotonic time) per push
    marker_times: dict[int, float] = field(default_factory=dict)  # finalize/end position -> monotonic time
    ended: bool = False  # end() was called
    closed: bool = False  # close() was called, or the engine released it after StreamEnded
    # The newest decoded partials of the current utterance (utterance, end sample, text tokens), oldest first: the
    # sources of the next partial's draft.
    recent_partials: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)

    def note_partial(self, utterance: int, end: int, tokens: tuple[int, ...], keep: int = 2) -> None:
        """Keep a decoded partial's tokens among the ``keep`` reaching furthest in its utterance (two workers can
        finish partials out of order); a late partial of an earlier utterance is dropped."""
        if self.recent_partials and self.recent_partials[-1][0] > utterance:
            return
        kept = [partial for partial in self.recent_partials if partial[0] == utterance]
        kept.append((utterance, end, tokens))
        kept.sort(key=lambda partial: partial[1])
        self.recent_partials = kept[-keep:]

    def partial_history(self, utterance: int) -> list[tuple[int, ...]]:
        """The kept partials' tokens of ``utterance``, oldest first (empty if none)."""
        return [tokens for kept, _, tokens in self.recent_partials if kept == utterance]

    def push_time(self, position: int) -> float | None:
        """When the sample at ``position`` was pushed."""
        for end, pushed_at in self.pushes:
            if end > position:
                return pushed_at
        return None

    def forget_before(self, position: int) -> None:
        """Drop push and marker times no decode can ask about any more."""
        while len(self.pushes) > 1 and self.pushes[0][0] <= position:
            self.pushes.popleft()
        for marker in [marker for marker in self.marker_times if marker < position]:
            del self.marker_times[marker]


@dataclass(frozen=True)
class InFlight:
    item: DecodeItem
    due_at: float | None  # monotonic time the decode became due (for the latency hooks)
