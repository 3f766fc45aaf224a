"""Streaming clients of the speech load benchmark (Brook's ``/v1/listen`` and WhisperLive) and what they measure.

Both clients behave like a microphone: chunk ``k`` (``chunk_s`` seconds of audio, stream time
``[k * chunk_s, (k + 1) * chunk_s)``) is sent at wall-clock time ``start + (k + 1) * chunk_s``, when its last sample
would have been captured; its send time is recorded. Every result the server sends is recorded as a
``Result(received_at, kind, start, end, text)`` with ``start``/``end`` in stream seconds:

- Brook: each ``partial`` and ``final`` message;
- WhisperLive: each segment of each ``{"segments": [...]}`` message; a ``completed`` segment is a final (counted
  once, when it first arrives), the trailing not-completed segment is a partial.

Measures derived from the records (``StreamRecord``):

- partial latency (``coverage_latencies``): for every chunk that some result covers (a result covers the chunks
  from ``floor(start / chunk_s)`` to ``floor(end / chunk_s)``), the receive time of the FIRST result, partial or
  final, covering it minus the chunk's send time. Chunks no result covers (silence between utterances) have no
  value. Weighting by chunk, not by message, keeps skipped or sparse partials from hiding lag.
- final latency (``final_latencies``): for every final, its receive time minus the send time of the chunk holding
  its ``end`` (the end of the speech it transcribes). For a final ended by the voice-activity detector this includes
  the silence the detector waits for (Brook: ``vad_silence_ms`` 500 minus its 300 ms end padding).
- WhisperLive's end of stream: like WhisperLive's own client (``Client.wait_before_disconnect``, 15 s), the client
  waits after the last chunk until the transcript has not changed (no new completed segment, no new partial text)
  for ``settle_s`` seconds, then sends ``END_OF_AUDIO``: WhisperLive completes a segment only when Whisper starts
  another one or after the same text came out ``same_output_threshold`` times, so this wait lets the last segment
  complete. It does not count in the drain below.
- drain (``StreamRecord.drain_s``): how far behind the stream still is when its audio ends.
  Brook: from sending ``{"type":"end"}`` (right after the last chunk) to receiving ``{"type":"end"}``, which follows
  the last final. WhisperLive has no flush (it drops unprocessed audio at ``END_OF_AUDIO``); its drain is the time
  from the last chunk to the first result covering the last covered chunk (it need not be a completed segment: a
  lenient reading for the anchor).
- the hypothesis text for the word error rate: Brook's finals; WhisperLive's completed segments plus its last
  partial (what WhisperLive's own client writes out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

SAMPLE_RATE_HZ: Final = 16_000
CONNECT_TIMEOUT_S: Final = 60.0
WHISPERLIVE_END: Final = b"END_OF_AUDIO"
WHISPERLIVE_SAME_OUTPUT_THRESHOLD: Final = 10  # WhisperLive's server default for clients that do not send it


@dataclass(frozen=True)
class Result:
    received_at: float  # time.monotonic()
    kind: Literal["partial", "final"]
    start: float  # stream seconds
    end: float
    text: str


@dataclass
class StreamRecord:
    """Everything one stream saw; times are ``time.monotonic()`` values."""

    name: str
    chunk_s: float
    sent_at: list[float] = field(default_factory=list)  # per chunk
    results: list[Result] = field(default_factory=list)
    end_sent_at: float | None = None  # when the last chunk (and Brook's `end`) went out
    ended_at: float | None = None  # Brook: `end` received; WhisperLive: last result after the audio ended
    error: str | None = None  # refused, error message, abnormal close, timeout
    late: bool = False  # the stream did not finish within the drain timeout
    kind_has_flush: bool = True  # Brook: drain is end -> `end`; WhisperLive: coverage catch-up

    @property
    def finals(self) -> list[Result]:
        return [result for result in self.results if result.kind == "final"]

    def hypothesis(self) -> str:
        texts = [result.text.strip() for result in self.finals]
        partials = [result for result in self.results if result.kind == "partial"]
        if partials and (not self.finals or partials[-1].received_at > self.finals[-1].received_at):
            texts.append(partials[-1].text.strip())  # WhisperLive: the segment still open at the end
        return " ".join(text for text in texts if text)

    def first_cover_times(self) -> dict[int, float]:
        """Chunk index -> receive time of the first result covering it."""
        covered: dict[int, float] = {}
        last_chunk = len(self.sent_at) - 1
        for result in self.results:
            first = max(0, _chunk_index(result.start, self.chunk_s, at_end=False))
            last = min(last_chunk, _chunk_index(max(result.start, result.end), self.chunk_s, at_end=True))
            for chunk in range(first, last + 1):
                covered.setdefault(chunk, result.received_at)
        return covered

    def coverage_latencies(self) -> list[float]:
        return [received - self.sent_at[chunk] for chunk, received in sorted(self.first_cover_times().items())]

    def final_latencies(self) -> list[float]:
        last_chunk = len(self.sent_at) - 1
        values = []
        for final in self.finals:
            chunk = min(last_chunk, max(0, _chunk_index(max(final.start, final.end), self.chunk_s, at_end=True)))
            values.append(final.received_at - self.sent_at[chunk])
        return values

    def drain_s(self) -> float:
        """See the module docstring; NaN when the stream never finished sending."""
        if self.end_sent_at is None:
            return float("nan")
        if self.ended_at is not None and self.kind_has_flush:
            return self.ended_at - self.end_sent_at
        covered = self.first_cover_times()
        if not covered:
            return float("nan")  # nothing was ever transcribed
        return max(0.0, max(covered.values()) - self.end_sent_at)


def _chunk_index(seconds: float, chunk_s: float, *, at_end: bool) -> int:
    """The chunk holding the sample at ``seconds``; an end time on a chunk boundary belongs to the chunk before."""
    position = seconds / chunk_s
    return math.ceil(position - 1e-6) - 1 if at_end else math.floor(position + 1e-6)


@dataclass(frozen=True)
class StreamPlan:
    """One stream's audio and when it starts after the level's go signal."""

    name: str
    audio: np.ndarray  # float32 mono 16 kHz
    delay_s: float


def _chunks(audio: np.ndarray, chunk: int) -> list[np.ndarray]:
    return [audio[position : position + chunk] for position in range(0, audio.shape[0], chunk)]


async def _pace(
    record: StreamRecord, plan: StreamPlan, chunk: int, send: Callable[[np.ndarray], Any], go: asyncio.Event
) -> None:
    """Send ``plan.audio`` chunk by chunk at real-time pace, each chunk when its last sample would be captured."""
    await go.wait()
    await asyncio.sleep(plan.delay_s)
    started = time.monotonic()
    for index, piece in enumerate(_chunks(plan.audio, chunk)):
        due = started + (index * chunk + piece.shape[0]) / SAMPLE_RATE_HZ
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await send(piece)
        record.sent_at.append(time.monotonic())


async def brook_stream(
    url: str, plan: StreamPlan, chunk: int, go: asyncio.Event, connected: Callable[[], None], drain_timeout_s: float
) -> StreamRecord:
    """Stream ``plan`` to Brook's ``/v1/listen`` (PCM16) and record every result."""
    record = StreamRecord(plan.name, chunk / SAMPLE_RATE_HZ)
    try:
        async with connect(url, max_size=None, open_timeout=CONNECT_TIMEOUT_S) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                record.error = f"no ready: {ready}"
                return record
            connected()
            receiver = asyncio.create_task(_brook_receive(ws, record))

            async def send(piece: np.ndarray) -> None:
                await ws.send((np.clip(piece, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

            sender = asyncio.create_task(_pace(record, plan, chunk, send, go))
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:  # the server ended the session early (error or close)
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                if record.error is None:
                    record.error = "closed before the audio ended"
                return record
            await sender
            await ws.send(json.dumps({"type": "end"}))
            record.end_sent_at = time.monotonic()
            try:
                await asyncio.wait_for(receiver, timeout=drain_timeout_s)
            except TimeoutError:
                record.late = True
                record.error = f"no end within {drain_timeout_s:.0f} s of the audio's end"
    except InvalidStatus as exc:
        record.error = f"refused: HTTP {exc.response.status_code}"
    except (OSError, ConnectionClosed, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def _brook_receive(ws: ClientConnection, record: StreamRecord) -> None:
    try:
        async for raw in ws:
            event = json.loads(raw)
            kind = event.get("type")
            if kind in ("partial", "final"):
                record.results.append(
                    Result(time.monotonic(), kind, float(event["start"]), float(event["end"]), event["text"])
                )
            elif kind == "end":
                record.ended_at = time.monotonic()
                return
            elif kind == "error":
                record.error = f"error {event.get('code')}: {event.get('message')}"
    except ConnectionClosed as exc:
        record.error = record.error or f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}"
        return
    if record.ended_at is None:
        code = ws.close_code
        record.error = record.error or f"closed {code} before end"


async def whisperlive_stream(
    url: str,
    plan: StreamPlan,
    chunk: int,
    go: asyncio.Event,
    connected: Callable[[], None],
    drain_timeout_s: float,
    settle_s: float,
) -> StreamRecord:
    """Stream ``plan`` to a WhisperLive server (float32 frames), wait until it settles, then send END_OF_AUDIO."""
    record = StreamRecord(plan.name, chunk / SAMPLE_RATE_HZ, kind_has_flush=False)
    uid = uuid.uuid4().hex
    last_message_at = [0.0]
    try:
        async with connect(url, max_size=None, open_timeout=CONNECT_TIMEOUT_S) as ws:
            await ws.send(json.dumps(_whisperlive_handshake(uid)))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), timeout=CONNECT_TIMEOUT_S))
                if reply.get("message") == "SERVER_READY":
                    break
                if reply.get("status") in ("WAIT", "ERROR"):
                    record.error = f"refused: {reply.get('status')} {reply.get('message')}"
                    return record
            connected()
            receiver = asyncio.create_task(_whisperlive_receive(ws, record, last_message_at))

            async def send(piece: np.ndarray) -> None:
                await ws.send(np.ascontiguousarray(piece, dtype=np.float32).tobytes())

            sender = asyncio.create_task(_pace(record, plan, chunk, send, go))
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                record.error = record.error or "closed before the audio ended"
                return record
            await sender
            record.end_sent_at = time.monotonic()
            deadline = record.end_sent_at + drain_timeout_s
            while time.monotonic() - max(last_message_at[0], record.end_sent_at) < settle_s:
                if time.monotonic() > deadline:
                    record.late = True
                    break
                if receiver.done():
                    break
                await asyncio.sleep(0.05)
            record.ended_at = max(last_message_at[0], record.end_sent_at)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(WHISPERLIVE_END)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    except InvalidStatus as exc:
        record.error = f"refused: HTTP {exc.response.status_code}"
    except (OSError, ConnectionClosed, TimeoutError) as exc:
        record.error = record.error or f"{type(exc).__name__}: {exc}"
    return record


def _whisperlive_handshake(uid: str) -> dict[str, Any]:
    """The options WhisperLive's own client sends (``Client.on_open``), with its defaults."""
    return {
        "uid": uid, "language": "en", "task": "transcribe", "model": "tiny.en", "use_vad": True,
        "send_last_n_segments": 10, "no_speech_thresh": 0.45, "clip_audio": False,
        "same_output_threshold": WHISPERLIVE_SAME_OUTPUT_THRESHOLD, "enable_translation": False,
        "word_timestamps": False,
    }  # fmt: skip


async def _whisperlive_receive(ws: ClientConnection, record: StreamRecord, last_message_at: list[float]) -> None:
    finals_seen: set[tuple[str, str]] = set()
    try:
        async for raw in ws:
            message = json.loads(raw)
            now = time.monotonic()
            if message.get("status") == "ERROR" or message.get("message") == "DISCONNECT":
                record.error = f"server: {message}"
                continue
            segments = message.get("segments")
            if not segments:
                continue
            changed = False
            for index, segment in enumerate(segments):
                start, end, text = float(segment["start"]), float(segment["end"]), str(segment["text"])
                if segment.get("completed"):
                    key = (str(segment["start"]), str(segment["end"]))
                    if key not in finals_seen:
                        finals_seen.add(key)
                        record.results.append(Result(now, "final", start, end, text))
                        changed = True
                elif index == len(segments) - 1:
                    previous = record.results[-1] if record.results else None
                    changed = changed or previous is None or (previous.text, previous.end) != (text, end)
                    record.results.append(Result(now, "partial", start, end, text))
            if changed:
                last_message_at[0] = now
    except ConnectionClosed:
        return
