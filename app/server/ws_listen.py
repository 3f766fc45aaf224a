"""`WS /v1/listen`: live speech-to-text. Binary frames of raw audio in; speech_started/partial/final out."""

from __future__ import annotations

import logging
import uuid

from starlette.websockets import WebSocket

from app.audio import MODEL_SAMPLE_RATE_HZ
from app.engine.speech_engine import SpeechStream
from app.engine.speech_events import SpeechStarted, StreamEnded, StreamOptions, Transcript
from app.errors import ProtocolError
from app.protocol import (
    ListenParams,
    parse_listen_message,
    parse_listen_params,
    speech_started_message,
    transcript_message,
)
from app.server.audio_input import AudioInput
from app.server.pinned_versions import acquire_served
from app.server.state import ServerState
from app.server.ws_session import (
    Connection,
    close_normally,
    run_reader_writer,
    serve_websocket,
)

logger = logging.getLogger(__name__)
ENDPOINT = "listen"


async def listen_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.brook
    await serve_websocket(websocket, ENDPOINT, state.settings.max_listen_sessions, _session)


async def _session(connection: Connection) -> None:
    state = connection.state
    params = parse_listen_params(dict(connection.websocket.query_params), default_model=state.settings.speech_model)
    served = await acquire_served(state.registry, params.model, params.version, task="speech-to-text",
                                  connection=connection)
    stream = served.engine.open_stream(
        StreamOptions(
            interim_results=params.interim_results,
            vad_silence_ms=params.vad_silence_ms,
            final_beam_size=params.beam_size,
        )
    )
    labels = (ENDPOINT, served.name, str(served.version))
    state.metrics.sessions.labels(*labels).inc()
    state.metrics.sessions_total.labels(*labels).inc()
    session_id = uuid.uuid4().hex
    connection.on_shutdown = stream.end
    try:
        await connection.send({
            "type": "ready", "session_id": session_id, "model": served.name, "version": served.version,
            "sample_rate": params.sample_rate, "encoding": params.encoding,
            "interim_results": params.interim_results, "vad_silence_ms": params.vad_silence_ms,
            "beam_size": params.beam_size or served.engine.settings.decode.final_beam_size,
        })
        logger.debug("listen session %s on %s v%d", session_id, served.name, served.version)
        await run_reader_writer(_read(connection, stream, params, served.name, served.version),
                                _write(connection, stream))
    finally:
        stream.close()
        state.metrics.sessions.labels(*labels).dec()


async def _read(connection: Connection, stream: SpeechStream, params: ListenParams, model: str, version: int) -> None:
    audio_input = AudioInput(params.sample_rate, params.encoding)
    audio_seconds = connection.state.metrics.audio_seconds.labels(model, str(version))
    while True:
        frame = await connection.receive()
        if frame.data is not None:
            samples = audio_input.decode(frame.data)
            audio_seconds.inc(len(samples) / MODEL_SAMPLE_RATE_HZ)
            await stream.push_audio(samples)
            continue
        try:
            control = parse_listen_message(frame.text or "")
        except ProtocolError as exc:
            await connection.send_error(exc.code, exc.message)  # recoverable: the session goes on
            continue
        if control.type == "finalize":
            stream.finalize()
        elif control.type == "end":
            tail = audio_input.flush()
            if len(tail):
                await stream.push_audio(tail)
            stream.end()
            return


async def _write(connection: Connection, stream: SpeechStream) -> None:
    while True:
        event = await stream.next_event()
        if isinstance(event, SpeechStarted):
            await connection.send(speech_started_message(event.utterance, event.start))
        elif isinstance(event, Transcript):
            await connection.send(transcript_message(event.kind, event.utterance, event.text, event.start, event.end))
        elif isinstance(event, StreamEnded):
            await connection.send({"type": "end"})
            await close_normally(connection, "end")
            return
