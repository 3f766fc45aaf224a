"""`WS /v1/realtime?intent=transcription` driven by the official `openai` SDK's realtime client against a real
`brook serve`, plus the pure session-configuration and delta logic."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from hypothesis import given
from hypothesis import strategies as st

from app.audio import load_audio
from app.repository import ModelRepository
from app.server.openai_realtime import (
    RealtimeEventError,
    ServerVad,
    SessionConfig,
    TranscriptItem,
    agreed_prefix,
    apply_session_update,
    new_words,
)
from app.speech.wer import word_error_rate
from tests.server_process import RunningServer
from tests.whisper_test_audio import offline_transcript

openai = pytest.importorskip("openai", reason="the `openai` SDK is in the dev extra: pip install -e '.[dev]'")

OPENAI_RATE_HZ = 24_000
CHUNK_S = 0.1
EVENT_TIMEOUT_S = 60.0
# Live transcription cuts the audio where the VAD hears pauses and decodes each turn alone; a few words at the
# edges can differ from offline 30 s windows (the same bound as /v1/listen's end-to-end test).
MAX_LIVE_WER = 0.15
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def pcm16_base64(audio: np.ndarray) -> str:
    return base64.b64encode((np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()).decode()


@dataclass
class Session:
    events: list[Any] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # monotonic time each event arrived
    audio_sent_at: float = 0.0  # monotonic time the last audio chunk went out

    def of(self, kind: str) -> list[Any]:
        return [event for event in self.events if event.type == kind]

    def index(self, kind: str, item_id: str) -> int:
        return next(i for i, e in enumerate(self.events) if e.type == kind and getattr(e, "item_id", None) == item_id)

    @property
    def transcript(self) -> str:
        return " ".join(event.transcript for event in self.of(COMPLETED) if event.transcript).strip()


async def live_session(server: RunningServer, audio: np.ndarray, rate: int, *, speed: float,
                       session: dict[str, Any] | None) -> Session:
    """Stream `audio` (at `rate`) through the SDK's realtime client, commit, then clear. Brook delivers every event
    of the audio before a clear ahead of `input_audio_buffer.cleared`, so that event ends the recording."""
    result = Session()
    async with (
        openai.AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0) as client,
        client.realtime.connect(extra_query={"intent": "transcription"}) as connection,
    ):
        created = await asyncio.wait_for(connection.recv(), EVENT_TIMEOUT_S)
        assert created.type == "session.created", created
        if session is not None:
            await connection.session.update(session=session)  # type: ignore[arg-type]

        async def send() -> None:
            step = int(CHUNK_S * rate)
            started = time.monotonic()
            for index, offset in enumerate(range(0, len(audio), step)):
                if speed > 0:
                    await asyncio.sleep(max(0.0, started + index * CHUNK_S / speed - time.monotonic()))
                await connection.input_audio_buffer.append(audio=pcm16_base64(audio[offset : offset + step]))
            result.audio_sent_at = time.monotonic()
            await connection.input_audio_buffer.commit()
            await connection.input_audio_buffer.clear()

        sender = asyncio.create_task(send())
        try:
            while True:
                event = await asyncio.wait_for(connection.recv(), EVENT_TIMEOUT_S)
                result.events.append(event)
                result.received_at.append(time.monotonic())
                if event.type == "input_audio_buffer.cleared":
                    break
                assert event.type != "error", event
        finally:
            await sender
    return result


def test_sdk_realtime_client_transcribes_a_recording_like_brook_transcribe(
    brook_server: RunningServer, model_repository: ModelRepository, speech_clips: dict[str, Path]
) -> None:
    audio = soxr.resample(load_audio(speech_clips["telephone"]), 16000, OPENAI_RATE_HZ).astype(np.float32)
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": OPENAI_RATE_HZ},
        "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                           "silence_duration_ms": 500},
    }}}
    result = asyncio.run(live_session(brook_server, audio, OPENAI_RATE_HZ, speed=4.0, session=session))
    updated = result.of("session.updated")
    assert len(updated) == 1 and updated[0].session.audio.input.turn_detection.silence_duration_ms == 500
    started, completed, deltas = result.of("input_audio_buffer.speech_started"), result.of(COMPLETED), result.of(DELTA)
    assert started and completed and deltas
    wer = word_error_rate(offline_transcript(model_repository, speech_clips["telephone"]), result.transcript)
    assert wer <= MAX_LIVE_WER, (wer, result.transcript)
    first_started = result.index("input_audio_buffer.speech_started", started[0].item_id)
    assert result.received_at[first_started] < result.audio_sent_at, "speech is reported while audio still streams"
    # Every item goes speech_started → deltas → speech_stopped → committed → completed, chained by previous_item_id.
    previous = None
    for done in completed:
        item = done.item_id
        committed = result.events[result.index("input_audio_buffer.committed", item)]
        assert committed.previous_item_id == previous
        previous = item
        start, stop = result.index("input_audio_buffer.speech_started", item), result.index(
            "input_audio_buffer.speech_stopped", item)
        assert start < stop < result.index("input_audio_buffer.committed", item) < result.index(COMPLETED, item)
        item_deltas = [i for i, e in enumerate(result.events) if e.type == DELTA and e.item_id == item]
        assert all(start < i < stop for i in item_deltas)
        assert 0 <= result.events[start].audio_start_ms < result.events[stop].audio_end_ms <= 31_000
        assert done.usage.type == "duration" and done.usage.seconds > 0
    assert {delta.item_id for delta in deltas} <= {done.item_id for done in completed}


def test_manual_turns_at_16_khz_make_one_item_per_commit(
    brook_server: RunningServer, model_repository: ModelRepository, speech_clips: dict[str, Path]
) -> None:
    seconds = 8.0
    audio = load_audio(speech_clips["meeting_dev00"])[: int(seconds * 16000)]
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
        "transcription": {"model": "whisper-tiny-en@1"},
    }}}
    result = asyncio.run(live_session(brook_server, audio, 16000, speed=0, session=session))
    assert result.of("session.updated")[0].session.audio.input.turn_detection is None
    assert not result.of("input_audio_buffer.speech_started"), "no VAD events without turn detection"
    committed, completed = result.of("input_audio_buffer.committed"), result.of(COMPLETED)
    assert len(committed) == 1 and len(completed) == 1 and committed[0].item_id == completed[0].item_id
    assert completed[0].usage.seconds == pytest.approx(seconds, abs=0.05)
    reference = offline_transcript(model_repository, speech_clips["meeting_dev00"], seconds)
    wer = word_error_rate(reference, result.transcript)
    assert wer <= MAX_LIVE_WER, (wer, result.transcript)


def test_bad_events_get_error_events_and_the_session_stays_open(brook_server: RunningServer) -> None:
    async def scenario() -> list[Any]:
        async with (
            openai.AsyncOpenAI(base_url=f"{brook_server.http}/v1", api_key="unused", max_retries=0) as client,
            client.realtime.connect(extra_query={"intent": "transcription"}) as connection,
        ):
            events = [await connection.recv()]
            await connection.send({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "evt_1"})
            await connection.send({"type": "response.create", "event_id": "evt_2"})
            await connection.input_audio_buffer.commit(event_id="evt_3")
            await connection.session.update(session={"type": "transcription", "audio": {"input": {
                "turn_detection": {"type": "semantic_vad"}}}}, event_id="evt_4")
            await connection.session.update(session={"type": "transcription", "audio": {"input": {
                "transcription": {"model": "no-such-model"}}}}, event_id="evt_5")
            await connection.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcmu"}}}}, event_id="evt_6")
            await connection.session.update(session={"type": "transcription", "audio": {"input": {
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 800}}}})
            silence = np.zeros(OPENAI_RATE_HZ // 2, dtype=np.float32)
            await connection.input_audio_buffer.append(audio=pcm16_base64(silence))
            await connection.input_audio_buffer.commit()
            await connection.input_audio_buffer.clear()
            while events[-1].type != "input_audio_buffer.cleared":
                events.append(await asyncio.wait_for(connection.recv(), EVENT_TIMEOUT_S))
            return events

    events = asyncio.run(scenario())
    errors = [event.error for event in events if event.type == "error"]
    assert [(e.event_id, e.code) for e in errors] == [
        ("evt_1", "invalid_value"), ("evt_2", "unknown_event"), ("evt_3", "input_audio_buffer_commit_empty"),
        ("evt_4", "unsupported_value"), ("evt_5", "model_not_found"), ("evt_6", "unsupported_value")]
    assert all(e.type == "invalid_request_error" and e.message for e in errors)
    updated = [event for event in events if event.type == "session.updated"]
    assert len(updated) == 1 and updated[0].session.audio.input.turn_detection.silence_duration_ms == 800
    # Committing audio in which the VAD heard no speech still makes an (empty) item, as OpenAI does.
    kinds = [event.type for event in events]
    assert kinds[-3:] == ["input_audio_buffer.committed", COMPLETED, "input_audio_buffer.cleared"]
    assert events[-2].transcript == ""


# ---- pure logic -------------------------------------------------------------------------------------------------

def test_session_update_changes_only_the_fields_present() -> None:
    config = SessionConfig(model="gpt-4o-transcribe")
    same = apply_session_update(config, {"type": "transcription"})
    assert same == config and config.turn_detection == ServerVad() and config.rate_hz == OPENAI_RATE_HZ
    manual = apply_session_update(config, {"audio": {"input": {"turn_detection": None,
                                                               "format": {"type": "audio/pcm", "rate": 16000}}}})
    assert manual.turn_detection is None and manual.rate_hz == 16000 and manual.model == config.model
    assert manual.stream_options().vad_silence_ms == 10_000, "manual turns: only a commit ends the turn"
    vad = apply_session_update(manual, {"audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                               "silence_duration_ms": 700}}}})
    assert vad.turn_detection == ServerVad(silence_duration_ms=700) and vad.stream_options().vad_silence_ms == 700
    model = apply_session_update(config, {"audio": {"input": {"transcription": {"model": "whisper-tiny-en@1"}}}})
    assert model.model == "whisper-tiny-en@1"


@pytest.mark.parametrize("session", [
    {"type": "realtime"}, {"audio": {"input": {"format": {"type": "audio/pcma"}}}},
    {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 96000}}}},
    {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}},
    {"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 50}}}},
    {"audio": {"input": {"turn_detection": {"type": "server_vad", "prefix_padding_ms": 1.5}}}},
    {"audio": {"input": {"transcription": {"language": "fr"}}}}, {"audio": "x"}, "x",
])
def test_bad_session_updates_are_refused(session: Any) -> None:
    with pytest.raises(RealtimeEventError):
        apply_session_update(SessionConfig(model="m"), session)


def test_partials_become_deltas_only_once_two_partials_agree() -> None:
    item = TranscriptItem("item_1", 0.0)
    assert item.delta("Hello this", final=False) == ""
    assert item.delta("Hello, this is Di", final=False) == "Hello, this"  # case and punctuation may differ
    assert item.delta("hello this is Diane in", final=False) == " is"
    assert item.delta("Hello, this is Diane in New Jersey.", final=True) == " Diane in New Jersey."
    assert agreed_prefix(["a", "b", "c"], ["a", "B.", "d"]) == ["a", "B."]
    assert new_words(["a", "b"], ["a", "x", "c"]) == [], "a revision of few sent words: wait for the final"


def test_deltas_go_on_after_a_revision_once_the_last_sent_words_reappear() -> None:
    item = TranscriptItem("item_1", 0.0)
    item.delta("Hello hello. I didn't know you were", final=False)
    assert item.delta("Hello hello. I didn't know you were there", final=False) == (
        "Hello hello. I didn't know you were")
    # Whisper rewrites the start; the sent "know you were" reappears, so the text goes on after it.
    assert item.delta("Hello? Oh, hello. I didn't know you were there. I need", final=False) == ""
    assert item.delta("Hello? Oh, hello. I didn't know you were there. I need the", final=False) == (
        " there. I need")
    assert item.delta("So you need a design.", final=True) == " a design.", "a final re-anchors on one word"
    assert new_words(["a", "b", "c", "d"], ["a", "x", "y"]) == [], "nothing sent reappears: nothing is new yet"


words = st.lists(st.sampled_from(["one", "two", "Three.", "four,", "five?"]), min_size=1, max_size=12)


@given(final=words, cuts=st.lists(st.integers(0, 12), max_size=8))
def test_deltas_add_up_to_the_final_when_partials_are_its_prefixes(final: list[str], cuts: list[int]) -> None:
    item = TranscriptItem("item_1", 0.0)
    deltas = [item.delta(" ".join(final[:cut]), final=False) for cut in sorted(cuts)]
    deltas.append(item.delta(" ".join(final), final=True))
    assert "".join(deltas) == " ".join(final)


@given(partials=st.lists(words, max_size=8), final=words)
def test_deltas_always_add_up_to_the_words_sent(partials: list[list[str]], final: list[str]) -> None:
    item = TranscriptItem("item_1", 0.0)
    sent = ""
    for partial in partials:
        sent += item.delta(" ".join(partial), final=False)
        assert sent == " ".join(item.sent)
    sent += item.delta(" ".join(final), final=True)
    assert sent == " ".join(item.sent)
