"""`WS /v1/realtime?intent=transcription`: the transcription subset of OpenAI's Realtime API on Brook's speech
engines (the same engines, streams and session machinery as `WS /v1/listen`).

Audio arrives as base64 PCM16 in `input_audio_buffer.append` events (24 kHz as OpenAI sends it, or any rate from
8 to 48 kHz declared in `session.update`) and goes, resampled to 16 kHz, into one engine stream. Engine events
become OpenAI events:

- server VAD (the default): each utterance is one conversation item. `SpeechStarted` →
  `input_audio_buffer.speech_started`; partial transcripts → `conversation.item.input_audio_transcription.delta`
  (the new words only, once two consecutive partials agree on them); the final →
  `input_audio_buffer.speech_stopped`, `input_audio_buffer.committed` and `…transcription.completed`.
- `turn_detection: null`: everything between two `input_audio_buffer.commit`s is one item.

A commit, a clear, or a `session.update` that changes the model or the turn detection ends the engine stream
(`end()` flushes its last final; `close()` drops it) and opens a fresh one; the writer drains the streams in order,
so events never interleave. Mistakes in client events are answered with `error` events and the session stays open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from starlette.websockets import WebSocket

from app.audio import MODEL_SAMPLE_RATE_HZ
from app.engine.speech_engine import SpeechEngine, SpeechStream
from app.engine.speech_events import SpeechStarted, StreamEnded, StreamOptions, Transcript
from app.errors import AudioError, ModelError, ProtocolError, UnknownModelError
from app.protocol import (
    MAX_SAMPLE_RATE_HZ,
    MAX_VAD_SILENCE_MS,
    MIN_SAMPLE_RATE_HZ,
    MIN_VAD_SILENCE_MS,
    WS_1008_POLICY_VIOLATION,
)
from app.server.audio_input import AudioInput
from app.server.pinned_versions import acquire_served
from app.server.registry import ServedVersion
from app.server.state import ServerState
from app.server.ws_session import Connection, close_normally, run_reader_writer, serve_websocket
from app.speech.wer import normalize_words

logger = logging.getLogger(__name__)

ENDPOINT = "realtime"
SPEECH_TASK = "speech-to-text"
OPENAI_SAMPLE_RATE_HZ = 24_000  # what OpenAI's `audio/pcm` format means
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms of audio
# OpenAI's transcription model names; they select the server's default speech model.
OPENAI_TRANSCRIPTION_MODELS = frozenset({
    "whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe-diarize", "gpt-transcribe", "gpt-live-transcribe", "gpt-realtime-whisper",
})
SUPPORTED_LANGUAGES = ("en",)
ANCHOR_WORDS = 3  # after a revision, deltas go on once the last 3 sent words reappear in a partial (a final: 1)
EndReason = Literal["commit", "clear", "update", "shutdown"]


class RealtimeEventError(Exception):
    """A client event that cannot be applied: answered with an `error` event; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# ---- session configuration (pure) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerVad:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    """What a client chose with `session.update` (validated; applied to the engine as far as it can be)."""

    model: str  # as the client named it: an OpenAI model (→ the default speech model) or a Brook `name[@version]`
    rate_hz: int = OPENAI_SAMPLE_RATE_HZ
    language: str | None = "en"
    turn_detection: ServerVad | None = field(default_factory=ServerVad)

    def stream_options(self) -> StreamOptions:
        if self.turn_detection is None:
            return StreamOptions(interim_results=True, vad_silence_ms=MAX_VAD_SILENCE_MS)
        vad = self.turn_detection
        return StreamOptions(interim_results=True, vad_silence_ms=vad.silence_duration_ms,
                             vad_threshold=min(max(vad.threshold, 0.01), 0.99),
                             speech_pad_ms=min(vad.prefix_padding_ms, 2_000))


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RealtimeEventError("invalid_value", f"{param} must be an object, got {value!r}", param)
    return value


def _number(data: Mapping[str, Any], name: str, param: str, low: float, high: float, default: Any) -> Any:
    value = data.get(name)
    if value is None:
        return default
    integer = isinstance(default, int)
    if (isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high
            or (integer and not float(value).is_integer())):
        raise RealtimeEventError("invalid_value", f"{param}.{name} must be {'an integer' if integer else 'a number'} "
                                 f"in [{low:g}, {high:g}], got {value!r}", f"{param}.{name}")
    return type(default)(value)


def _turn_detection(raw: Any, current: ServerVad | None) -> ServerVad | None:
    param = "session.audio.input.turn_detection"
    if raw is None:
        return None
    data = _object(raw, param)
    if data.get("type", "server_vad") != "server_vad":
        raise RealtimeEventError("unsupported_value", f"{param}.type: only 'server_vad' (or null) is supported, got "
                                 f"{data.get('type')!r}", f"{param}.type")
    base = current or ServerVad()
    return ServerVad(
        threshold=_number(data, "threshold", param, 0.0, 1.0, base.threshold),
        prefix_padding_ms=_number(data, "prefix_padding_ms", param, 0, 10_000, base.prefix_padding_ms),
        silence_duration_ms=_number(data, "silence_duration_ms", param, MIN_VAD_SILENCE_MS, MAX_VAD_SILENCE_MS,
                                    base.silence_duration_ms),
    )


def _format_rate(raw: Any, current: int) -> int:
    param = "session.audio.input.format"
    data = _object(raw, param)
    if data.get("type", "audio/pcm") != "audio/pcm":
        raise RealtimeEventError("unsupported_value", f"{param}.type: only 'audio/pcm' (PCM16 little-endian mono) is "
                                 f"supported, got {data.get('type')!r}", f"{param}.type")
    rate: int = _number(data, "rate", param, MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ, current)
    return rate


def apply_session_update(config: SessionConfig, session: Any) -> SessionConfig:
    """The configuration after a `session.update`: only the fields present change (null turns VAD off)."""
    data = _object(session, "session")
    if data.get("type", "transcription") != "transcription":
        raise RealtimeEventError("unsupported_value", "session.type: Brook serves transcription sessions only, got "
                                 f"{data.get('type')!r}", "session.type")
    audio_input = _object(_object(data.get("audio", {}), "session.audio").get("input", {}), "session.audio.input")
    updated = config
    if "format" in audio_input:
        updated = replace(updated, rate_hz=_format_rate(audio_input["format"], config.rate_hz))
    if "turn_detection" in audio_input:
        updated = replace(updated, turn_detection=_turn_detection(audio_input["turn_detection"],
                                                                  config.turn_detection))
    transcription = audio_input.get("transcription")
    if transcription is not None:
        options = _object(transcription, "session.audio.input.transcription")
        model = options.get("model", config.model)
        if not isinstance(model, str) or not model:
            raise RealtimeEventError("invalid_value", f"transcription.model must be a string, got {model!r}",
                                     "session.audio.input.transcription.model")
        language = options.get("language", config.language) or None
        if language is not None and language not in SUPPORTED_LANGUAGES:
            raise RealtimeEventError("unsupported_value", f"transcription.language: the speech models transcribe "
                                     f"{', '.join(SUPPORTED_LANGUAGES)} only, got {language!r}",
                                     "session.audio.input.transcription.language")
        updated = replace(updated, model=model, language=language)
    return updated


def session_object(config: SessionConfig, session_id: str, model: str, threshold: float,
                   prefix_padding_ms: int) -> dict[str, Any]:
    """The effective session, as OpenAI's `RealtimeTranscriptionSessionCreateResponse`."""
    vad = config.turn_detection
    return {
        "id": session_id, "object": "realtime.transcription_session", "type": "transcription",
        "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": config.rate_hz},
            "noise_reduction": None,
            "transcription": {"model": model, "language": config.language, "prompt": ""},
            "turn_detection": None if vad is None else {
                "type": "server_vad", "threshold": threshold, "prefix_padding_ms": prefix_padding_ms,
                "silence_duration_ms": vad.silence_duration_ms,
            },
        }},
        "include": [],
    }


def _same_word(a: str, b: str) -> bool:
    """Equal but for case and punctuation (Whisper's partials often flip "Hello?" and "hello")."""
    return normalize_words(a) == normalize_words(b)


def agreed_prefix(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """The words of `current` that the previous partial agrees on (local agreement: both start with them)."""
    agreed: list[str] = []
    for before, now in zip(previous, current, strict=False):
        if not _same_word(before, now):
            break
        agreed.append(now)
    return agreed


def _starts_with(words: Sequence[str], prefix: Sequence[str]) -> bool:
    return len(prefix) <= len(words) and all(_same_word(a, b) for a, b in zip(prefix, words, strict=False))


def new_words(sent: Sequence[str], stable: Sequence[str], *, min_anchor: int = ANCHOR_WORDS) -> list[str]:
    """The words of `stable` that follow the words already `sent`.

    Usually `stable` starts with `sent` and the rest is new. Sent text cannot be taken back, so when Whisper has
    revised a sent word, the text goes on after the place where the last `ANCHOR_WORDS` sent words reappear in
    `stable` (the occurrence nearest to where they were), or, down to `min_anchor`, fewer of them; if none
    reappear, nothing is new yet. The completed transcript is always the model's final text."""
    if _starts_with(stable, sent):
        return list(stable[len(sent):])
    for size in range(min(ANCHOR_WORDS, len(sent)), max(min_anchor, 1) - 1, -1):
        anchor = sent[-size:]
        ends = [start + size for start in range(len(stable) - size + 1) if _starts_with(stable[start:], anchor)]
        if ends:
            return list(stable[min(ends, key=lambda end: abs(end - len(sent))):])
    return []


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


# ---- one session ----------------------------------------------------------------------------------------------

@dataclass
class _Segment:
    """One engine stream: the session's audio from `offset_s` on, until a commit, clear or update ends it."""

    stream: SpeechStream
    served: ServedVersion
    manual_turns: bool  # turn_detection null: the whole segment is one item
    offset_s: float  # session time of the stream's first sample
    announce_cleared: bool = False  # send input_audio_buffer.cleared before this segment's events
    ended_by: EndReason | None = None
    pushed_samples: int = 0  # at 16 kHz


@dataclass
class TranscriptItem:
    """One conversation item: an utterance (server VAD) or everything up to a commit (manual turns)."""

    id: str
    start_s: float
    finals: list[str] = field(default_factory=list)  # final texts of the engine's utterances in this item
    sent: list[str] = field(default_factory=list)  # words already sent as deltas
    last_view: list[str] = field(default_factory=list)  # words of the previous partial view

    def text(self, pending: str = "") -> str:
        return " ".join(part for part in (*self.finals, pending) if part)

    def delta(self, pending: str, *, final: bool) -> str:
        """The delta to send after a transcript: a final's words all count; of a partial's, only those the
        previous partial agreed on (so words Whisper is still changing are not sent). A final re-anchors on as
        little as one sent word: it is the item's last chance to send its remaining text."""
        view = self.text(pending).split()
        stable = view if final else agreed_prefix(self.last_view, view)
        self.last_view = view
        fresh = new_words(self.sent, stable, min_anchor=1 if final else ANCHOR_WORDS)
        if not fresh:
            return ""
        delta = (" " if self.sent else "") + " ".join(fresh)
        self.sent.extend(fresh)
        return delta


class RealtimeSession:
    """Reader and writer of one `/v1/realtime` socket, and what they share."""

    def __init__(self, connection: Connection, config: SessionConfig, served: ServedVersion) -> None:
        self.connection = connection
        self.state: ServerState = connection.state
        self.config = config
        self.session_id = "sess_" + uuid.uuid4().hex[:24]
        self._event_ids = itertools.count(1)
        self._item_ids = itertools.count(1)
        self.previous_item_id: str | None = None
        self.segments: asyncio.Queue[_Segment | None] = asyncio.Queue()
        self.open_segments: list[_Segment] = []
        self.audio_input = AudioInput(config.rate_hz, "pcm_s16le")
        self.uncommitted_samples = 0  # at 16 kHz, since the last commit or clear
        self.stopping = False
        self.segment = self._open_segment(served, 0.0)

    # -- sending ------------------------------------------------------------------------------------------------

    async def send(self, event_type: str, **fields: Any) -> None:
        await self.connection.send({"type": event_type, "event_id": f"event_{self.session_id[5:13]}_"
                                    f"{next(self._event_ids)}", **fields})

    async def send_error(self, error: RealtimeEventError, client_event_id: Any = None) -> None:
        self.state.metrics.errors.labels(ENDPOINT, error.code).inc()
        await self.send("error", error={
            "type": "invalid_request_error", "code": error.code, "message": error.message, "param": error.param,
            "event_id": client_event_id if isinstance(client_event_id, str) else None,
        })

    def session(self) -> dict[str, Any]:
        engine: SpeechEngine = self.segment.served.engine
        options = self.config.stream_options()
        threshold = engine.settings.vad_threshold if options.vad_threshold is None else options.vad_threshold
        padding = engine.settings.speech_pad_ms if options.speech_pad_ms is None else options.speech_pad_ms
        return session_object(self.config, self.session_id, self.segment.served.name, threshold, padding)

    # -- segments (reader side) -------------------------------------------------------------------------------

    def _open_segment(self, served: ServedVersion, offset_s: float, *, announce_cleared: bool = False) -> _Segment:
        stream = served.engine.open_stream(self.config.stream_options())
        segment = _Segment(stream, served, self.config.turn_detection is None, offset_s, announce_cleared)
        self.open_segments.append(segment)
        self.segments.put_nowait(segment)
        self.audio_input = AudioInput(self.config.rate_hz, "pcm_s16le")
        return segment

    async def _end_segment(self, reason: EndReason, served: ServedVersion | None = None) -> None:
        """End the current stream (flushing it, or dropping it for a clear) and continue in a fresh one."""
        old = self.segment
        old.ended_by = reason
        if reason == "clear":
            old.stream.close()
        else:
            await self._push(self.audio_input.flush())
            old.stream.end()
        self.uncommitted_samples = 0
        offset = old.offset_s + old.pushed_samples / MODEL_SAMPLE_RATE_HZ
        self.segment = self._open_segment(served or old.served, offset, announce_cleared=reason == "clear")

    async def _push(self, samples: Any) -> None:
        if len(samples) == 0 or self.stopping:
            return
        segment = self.segment
        segment.pushed_samples += len(samples)
        self.uncommitted_samples += len(samples)
        self.state.metrics.audio_seconds.labels(segment.served.name, str(segment.served.version)).inc(
            len(samples) / MODEL_SAMPLE_RATE_HZ)
        await segment.stream.push_audio(samples)

    def shutdown(self) -> None:
        """Graceful shutdown: flush the current stream, then the writer closes the socket."""
        if self.stopping:
            return
        self.segment.ended_by = "shutdown"
        self.segment.stream.end()
        self.stopping = True
        self.segments.put_nowait(None)

    def close(self) -> None:
        for segment in self.open_segments:
            segment.stream.close()
        self.open_segments.clear()

    # -- client events ----------------------------------------------------------------------------------------

    async def read(self) -> None:
        while True:
            frame = await self.connection.receive()
            event: Any = None
            try:
                if frame.data is not None:
                    raise RealtimeEventError("invalid_event", "binary frames are not part of the Realtime API; "
                                             "send audio as base64 in input_audio_buffer.append events")
                event = _parse_event(frame.text or "")
                await self.handle(event)
            except RealtimeEventError as exc:
                await self.send_error(exc, event.get("event_id") if isinstance(event, dict) else None)

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            if self.uncommitted_samples < MIN_COMMIT_S * MODEL_SAMPLE_RATE_HZ:
                raise RealtimeEventError(
                    "input_audio_buffer_commit_empty", f"buffer too small: expected at least {MIN_COMMIT_S * 1000:g} "
                    f"ms of audio, the buffer holds {self.uncommitted_samples / 16:.2f} ms")
            await self._end_segment("commit")
        elif kind == "input_audio_buffer.clear":
            await self._end_segment("clear")
        elif kind == "session.update":
            await self._update(event.get("session"))
        else:
            raise RealtimeEventError("unknown_event", f"event type {kind!r} is not supported in a Brook transcription "
                                     "session; expected session.update or input_audio_buffer.append/commit/clear")

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise RealtimeEventError("invalid_value", f"audio must be a base64 string, got {type(audio).__name__}",
                                     "audio")
        try:
            raw = base64.b64decode(audio, validate=True)
            samples = self.audio_input.decode(raw)
        except binascii.Error as exc:
            raise RealtimeEventError("invalid_value", f"audio is not valid base64: {exc}", "audio") from None
        except AudioError as exc:
            raise RealtimeEventError("invalid_value", f"audio must be PCM16 little-endian mono: {exc}",
                                     "audio") from None
        await self._push(samples)

    async def _update(self, raw: Any) -> None:
        updated = apply_session_update(self.config, raw)
        served = self.segment.served
        if updated.model != self.config.model:
            served = await resolve_model(self.state, updated.model)
        restart = (served is not self.segment.served or updated.stream_options() != self.config.stream_options()
                   or (updated.turn_detection is None) != (self.config.turn_detection is None))
        rate_changed = updated.rate_hz != self.config.rate_hz
        if rate_changed and not restart:
            await self._push(self.audio_input.flush())
        self.config = updated
        if restart:
            await self._end_segment("update", served)
        elif rate_changed:
            self.audio_input = AudioInput(updated.rate_hz, "pcm_s16le")
        await self.send("session.updated", session=self.session())

    # -- engine events (writer side) --------------------------------------------------------------------------

    async def write(self) -> None:
        while (segment := await self.segments.get()) is not None:
            if segment.announce_cleared:
                await self.send("input_audio_buffer.cleared")
            await self._drain(segment)
            if segment in self.open_segments:
                self.open_segments.remove(segment)
        await close_normally(self.connection, "shutdown")

    def _new_item(self, start_s: float) -> TranscriptItem:
        return TranscriptItem(f"item_{self.session_id[5:13]}_{next(self._item_ids):04d}", start_s)

    async def _drain(self, segment: _Segment) -> None:
        """Translate one stream's events until it ends; then complete what the end committed."""
        items: dict[int, TranscriptItem] = {}
        manual = TranscriptItem("", segment.offset_s) if segment.manual_turns else None
        finals = 0
        while True:
            event = await segment.stream.next_event()
            if isinstance(event, StreamEnded):
                break
            if isinstance(event, SpeechStarted) and manual is None:
                item = items[event.utterance] = self._new_item(segment.offset_s + event.start)
                await self.send("input_audio_buffer.speech_started", audio_start_ms=_ms(item.start_s),
                                item_id=item.id)
            elif isinstance(event, Transcript):
                finals += event.kind == "final"
                await self._transcript(segment, event, manual, items)
        seconds = segment.pushed_samples / MODEL_SAMPLE_RATE_HZ
        if segment.ended_by == "clear":
            return
        if manual is None:
            if segment.ended_by == "commit" and finals == 0:  # a commit of audio in which the VAD heard no speech
                await self._complete(self._new_item(segment.offset_s), seconds)
            return
        if segment.ended_by == "commit" or manual.finals:
            manual.id = manual.id or self._new_item(segment.offset_s).id
            await self._complete(manual, seconds)

    async def _transcript(self, segment: _Segment, event: Transcript, manual: TranscriptItem | None,
                          items: dict[int, TranscriptItem]) -> None:
        if manual is not None:
            manual.id = manual.id or self._new_item(segment.offset_s).id
            item, pending = manual, event.text if event.kind == "partial" else ""
            if event.kind == "final" and event.text:
                manual.finals.append(event.text)
        else:
            item = items.get(event.utterance) or self._new_item(segment.offset_s + event.start)
            items[event.utterance] = item
            pending = event.text if event.kind == "partial" else ""
            if event.kind == "final":
                item.finals.append(event.text)
        delta = item.delta(pending, final=event.kind == "final")
        if delta:
            await self.send("conversation.item.input_audio_transcription.delta", item_id=item.id, content_index=0,
                            delta=delta)
        if manual is None and event.kind == "final":
            del items[event.utterance]
            await self.send("input_audio_buffer.speech_stopped", audio_end_ms=_ms(segment.offset_s + event.end),
                            item_id=item.id)
            await self._complete(item, event.end - event.start)

    async def _complete(self, item: TranscriptItem, seconds: float) -> None:
        await self.send("input_audio_buffer.committed", item_id=item.id, previous_item_id=self.previous_item_id)
        self.previous_item_id = item.id
        await self.send("conversation.item.input_audio_transcription.completed", item_id=item.id, content_index=0,
                        transcript=item.text(), usage={"type": "duration", "seconds": round(seconds, 3)})


def _parse_event(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RealtimeEventError("invalid_json", f"expected a JSON object, got malformed JSON ({exc.msg} at "
                                 f"position {exc.pos})") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise RealtimeEventError("invalid_event", 'expected a JSON object with a "type" string')
    return data


async def resolve_model(state: ServerState, requested: str, connection: Connection | None = None) -> ServedVersion:
    """An OpenAI transcription model name → the server's default speech model; otherwise a Brook `name[@version]`.
    A pinned version that is not loaded yet is loaded first (a bounded wait; `connection`: see `acquire_served`).
    Raises `RealtimeEventError` for an unknown model or a version that can not load."""
    name, version = state.settings.speech_model, None
    if requested not in OPENAI_TRANSCRIPTION_MODELS:
        name, separator, pinned = requested.partition("@")
        if separator and not pinned.isdigit():
            raise RealtimeEventError("model_not_found", f"model {requested!r}: the version after '@' must be a "
                                     "positive integer", "session.audio.input.transcription.model")
        version = int(pinned) if separator else None
    try:
        return await acquire_served(state.registry, name, version, task=SPEECH_TASK, connection=connection)
    except UnknownModelError as exc:
        raise RealtimeEventError("model_not_found", str(exc), "session.audio.input.transcription.model") from None
    except ModelError as exc:  # failed to load, or still loading after the wait
        raise RealtimeEventError("model_not_ready", str(exc), "session.audio.input.transcription.model") from None


# ---- the endpoint ---------------------------------------------------------------------------------------------

async def realtime_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.brook
    await serve_websocket(websocket, ENDPOINT, state.settings.max_listen_sessions, _session)


async def _session(connection: Connection) -> None:
    state = connection.state
    query = dict(connection.websocket.query_params)
    if query.get("intent") != "transcription":
        raise ProtocolError("bad_message", "Brook serves the transcription subset of the Realtime API only: connect "
                            f"to /v1/realtime?intent=transcription (got intent={query.get('intent')!r})",
                            close_code=WS_1008_POLICY_VIOLATION)
    model = query.get("model") or state.settings.speech_model
    try:
        served = await resolve_model(state, model, connection)
    except RealtimeEventError as exc:
        raise UnknownModelError(exc.message) from None
    session = RealtimeSession(connection, SessionConfig(model=model), served)
    labels = (ENDPOINT, served.name, str(served.version))
    state.metrics.sessions.labels(*labels).inc()
    state.metrics.sessions_total.labels(*labels).inc()
    connection.on_shutdown = session.shutdown
    try:
        await session.send("session.created", session=session.session())
        await run_reader_writer(session.read(), session.write())
    finally:
        session.close()
        state.metrics.sessions.labels(*labels).dec()
