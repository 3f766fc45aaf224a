"""The streaming speech engine in-process on the real Whisper tiny.en and Silero VAD models (no server).

Real recordings are pushed as fast as the engine's backpressure allows, in random chunk sizes. Word error rates are
measured against offline long-form transcription (``app.speech.transcribe``) of the same file with the same model.
The streamed finals decode each utterance without the previous text as a prompt and cut decoder loops that the
offline transcript keeps (meeting_60s ends with one sentence four times), so the bounds are loose on purpose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import speech_engine as speech_engine_module
from app.engine.speech_decode import GroupTiming, WindowJob, WindowText
from app.engine.speech_engine import SpeechEngine, SpeechEngineSettings, SpeechStream
from app.engine.speech_events import SpeechEvent, SpeechStarted, StreamEnded, StreamOptions, Transcript
from app.engine.speech_streams import AudioBuffer, Mailbox
from app.errors import EngineDeadError, ModelError
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.transcribe import transcribe
from app.speech.vad import VadRunner
from app.speech.wer import word_error_rate
from app.speech.whisper_runner import WhisperRunner
from tests.conftest import load_model, missing
from tests.whisper_test_audio import MODEL_DIR_ENV, read_clip, read_model_config

SAMPLE_RATE_HZ = 16_000
FALLBACK_WHISPER_DIR = "/tmp/brook-whisper/1"
WER_BOUNDS = {"telephone": 0.25, "meeting_60s": 0.6}  # streamed finals vs offline transcription of the same file
# Audio pushed faster than real time is "late" by the engine's load-shedding clock; keep its partials.
FAST_PUSH = SpeechEngineSettings(max_partial_lag_s=None)
T = TypeVar("T")


def run(coroutine: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coroutine

    return asyncio.run(asyncio.wait_for(wrapper(), timeout=300))


@pytest.fixture(scope="module")
def whisper() -> WhisperRunner:
    """Whisper tiny.en v1 from the model repository, else a converted folder in ``$BROOK_WHISPER_MODEL_DIR``."""
    repository = ModelRepository(default_model_dir())
    try:
        loaded = repository.load("whisper-tiny-en", 1, check_hashes=False)
        return WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=2)
    except ModelError as error:
        reason = str(error)
    directory = Path(os.environ.get(MODEL_DIR_ENV, FALLBACK_WHISPER_DIR))
    if not (directory / "encoder.onnx").is_file():
        missing(f"whisper-tiny-en v1 is not in the model repository ({reason}) and {directory} has no converted model")
    return WhisperRunner(directory, read_model_config(directory), intra_op_threads=2)


@pytest.fixture(scope="module")
def vad() -> VadRunner:
    loaded = load_model(ModelRepository(default_model_dir()), "silero-vad", 1)
    return VadRunner(loaded.directory, loaded.manifest.config)


@pytest.fixture(scope="module")
def clips(speech_clips: dict[str, Path]) -> dict[str, np.ndarray]:
    return {name: read_clip(path) for name, path in speech_clips.items()}


@dataclass
class RecordingObserver:
    batches: list[tuple[str, int]] = field(default_factory=list)
    partial_latencies: list[float] = field(default_factory=list)
    final_latencies: list[float] = field(default_factory=list)

    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        assert seconds >= 0
        self.batches.append((stage, size))

    def on_partial_latency(self, seconds: float) -> None:
        self.partial_latencies.append(seconds)

    def on_final_latency(self, seconds: float) -> None:
        self.final_latencies.append(seconds)

    def count(self, stage: str) -> int:
        return sum(1 for name, _ in self.batches if name == stage)


def random_chunks(audio: np.ndarray, seed: int, low: int = 160, high: int = 24_000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    chunks, position = [], 0
    while position < audio.shape[0]:
        size = int(rng.integers(low, high))
        chunks.append(audio[position : position + size])
        position += size
    return chunks


async def stream_clip(stream: SpeechStream, chunks: Sequence[np.ndarray], *, consume: bool = True) -> list[SpeechEvent]:
    """Push every chunk (as fast as backpressure allows), end the stream, and collect its events."""

    async def push() -> None:
        for chunk in chunks:
            await stream.push_audio(chunk)
        stream.end()

    pusher = asyncio.create_task(push())
    if not consume:
        await pusher
    events = await collect(stream)
    await pusher
    return events


async def collect(stream: SpeechStream) -> list[SpeechEvent]:
    """Every event up to and including StreamEnded."""
    events: list[SpeechEvent] = []
    while not events or not isinstance(events[-1], StreamEnded):
        events.append(await stream.next_event())
    return events


async def with_engine(
    whisper: WhisperRunner,
    vad: VadRunner,
    body: Callable[[SpeechEngine], Awaitable[T]],
    settings: SpeechEngineSettings | None = None,
    observer: Any = None,
) -> T:
    engine = SpeechEngine(whisper, vad, settings, observer)
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.shutdown()


def finals(events: Sequence[SpeechEvent]) -> list[Transcript]:
    return [event for event in events if isinstance(event, Transcript) and event.kind == "final"]


def final_text(events: Sequence[SpeechEvent]) -> str:
    return " ".join(event.text for event in finals(events) if event.text)


def check_event_order(events: Sequence[SpeechEvent]) -> None:
    """SpeechStarted, then partials, then exactly one final per utterance; StreamEnded last."""
    assert isinstance(events[-1], StreamEnded) and not any(isinstance(e, StreamEnded) for e in events[:-1])
    started: dict[int, float] = {}
    finished: set[int] = set()
    for event in events[:-1]:
        if isinstance(event, SpeechStarted):
            assert event.utterance == len(started), "utterances are numbered 0, 1, 2, ..."
            started[event.utterance] = event.start
        else:
            assert isinstance(event, Transcript)
            assert event.utterance in started, f"{event.kind} of utterance {event.utterance} before its SpeechStarted"
            assert event.utterance not in finished, f"{event.kind} of utterance {event.utterance} after its final"
            assert event.start == started[event.utterance] and event.end > event.start
            if event.kind == "final":
                finished.add(event.utterance)
            assert event.text == event.text.strip() and "  " not in event.text
    assert finished == set(started), "every utterance gets its final"


@pytest.fixture(scope="module")
def offline_text(whisper: WhisperRunner, clips: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: transcribe(clips[name], whisper).text for name in WER_BOUNDS}


def test_streamed_finals_match_offline_transcription(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray], offline_text: dict[str, str]
) -> None:
    observer = RecordingObserver()

    async def body(engine: SpeechEngine) -> dict[str, list[SpeechEvent]]:
        streams = {name: engine.open_stream(StreamOptions()) for name in WER_BOUNDS}
        results = await asyncio.gather(
            *(
                stream_clip(stream, random_chunks(clips[name], seed))
                for seed, (name, stream) in enumerate(streams.items())
            )
        )
        assert engine.active_streams == 0
        return dict(zip(streams, results, strict=True))

    events = run(with_engine(whisper, vad, body, FAST_PUSH, observer))
    for name, bound in WER_BOUNDS.items():
        check_event_order(events[name])
        rate = word_error_rate(offline_text[name], final_text(events[name]))
        assert rate <= bound, f"{name}: WER {rate:.3f} > {bound}\nstreamed: {final_text(events[name])}"
    partials = [e for e in events["telephone"] if isinstance(e, Transcript) and e.kind == "partial"]
    assert partials, "an 18 s utterance streamed in 5 s VAD steps must show partials before its final"
    assert observer.count("encode") > 0 and len(observer.final_latencies) == len(finals(events["telephone"])) + len(
        finals(events["meeting_60s"])
    )


def test_silence_and_noise_produce_no_events_and_no_whisper_calls(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray]
) -> None:
    observer = RecordingObserver()

    async def body(engine: SpeechEngine) -> list[list[SpeechEvent]]:
        streams = [engine.open_stream(StreamOptions()) for _ in range(2)]
        return list(
            await asyncio.gather(
                stream_clip(streams[0], random_chunks(clips["silence"], 1)),
                stream_clip(streams[1], random_chunks(clips["noise"], 2)),
            )
        )

    for events in run(with_engine(whisper, vad, body, observer=observer)):
        assert events == [StreamEnded()]
    assert observer.count("vad") > 0 and observer.count("encode") == 0 and observer.count("decode") == 0


def test_four_streams_at_once_keep_their_own_transcripts(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray]
) -> None:
    names = ["telephone", "meeting_dev00", "meeting_tst00", "meeting_60s_second_half"]
    sources = {**clips, "meeting_60s_second_half": clips["meeting_60s"][30 * SAMPLE_RATE_HZ :]}
    audio = {name: sources[name][: 20 * SAMPLE_RATE_HZ] for name in names}  # 20 s each keeps the test short
    observer = RecordingObserver()

    async def alone(engine: SpeechEngine) -> dict[str, str]:
        texts = {}
        for name in names:
            texts[name] = final_text(
                await stream_clip(engine.open_stream(StreamOptions(interim_results=False)), [audio[name]])
            )
        return texts

    async def together(engine: SpeechEngine) -> dict[str, list[SpeechEvent]]:
        streams = [engine.open_stream(StreamOptions()) for _ in names]
        results = await asyncio.gather(
            *(
                stream_clip(stream, random_chunks(audio[name], 10 + i))
                for i, (name, stream) in enumerate(zip(names, streams, strict=True))
            )
        )
        return dict(zip(names, results, strict=True))

    solo = run(with_engine(whisper, vad, alone))
    mixed = run(with_engine(whisper, vad, together, FAST_PUSH, observer))
    assert max(size for stage, size in observer.batches if stage == "encode") > 1, "finals or partials were batched"
    for name in names:
        check_event_order(mixed[name])
        own = word_error_rate(solo[name], final_text(mixed[name]))
        others = [word_error_rate(solo[other], final_text(mixed[name])) for other in names if other != name]
        assert own <= 0.15, f"{name}: batched transcript drifted from the solo one (WER {own:.3f})"
        assert own < min(others) - 0.5, f"{name}: transcript closer to another stream's ({own:.2f} vs {others})"


def test_any_chunking_gives_the_same_finals(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray]
) -> None:
    audio = clips["meeting_tst00"][: 12 * SAMPLE_RATE_HZ]  # three utterances, the last one cut by end()
    splits = [[audio], random_chunks(audio, 21, 1, 2_000), random_chunks(audio, 22, 5_000, 60_000)]

    async def body(engine: SpeechEngine) -> list[list[Transcript]]:
        results = []
        for chunks in splits:  # one at a time, so the VAD and Whisper batches are the same each time
            stream = engine.open_stream(StreamOptions(interim_results=False))
            results.append(finals(await stream_clip(stream, chunks, consume=False)))
        return results

    results = run(with_engine(whisper, vad, body))
    assert len(results[0]) >= 3
    assert results[1] == results[0] and results[2] == results[0]


def test_partial_drafts_leave_the_finals_unchanged(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With drafts (the default) a partial starts from what the previous two partials of its utterance agree on;
    finals are always decoded from scratch, so they are those of the same stream without drafts."""
    audio = clips["meeting_tst00"][: 12 * SAMPLE_RATE_HZ]
    drafted: list[int] = []
    real_transcribe_group = speech_engine_module.transcribe_group

    def spy(*args: Any) -> tuple[list[WindowText], GroupTiming]:
        texts, timing = real_transcribe_group(*args)
        drafted.extend(text.drafted for text in texts)
        return texts, timing

    monkeypatch.setattr(speech_engine_module, "transcribe_group", spy)

    async def body(engine: SpeechEngine) -> list[SpeechEvent]:
        stream = engine.open_stream(StreamOptions())

        async def push_at_real_time_pace() -> None:  # a partial's draft is the partial before it, delivered by then
            for first in range(0, audio.shape[0], 1_600):
                await stream.push_audio(audio[first : first + 1_600])
                await asyncio.sleep(0.1)
            stream.end()

        pusher = asyncio.create_task(push_at_real_time_pace())
        events = await collect(stream)
        await pusher
        return events

    results = []
    for agreement in (0, 2):
        decode = dataclasses.replace(SpeechEngineSettings().decode, partial_draft_agreement=agreement)
        settings = SpeechEngineSettings(max_partial_lag_s=None, decode=decode)
        results.append(run(with_engine(whisper, vad, body, settings)))
    plain, with_drafts = results
    for events in results:
        check_event_order(events)
        assert any(isinstance(event, Transcript) and event.kind == "partial" for event in events)
    assert finals(with_drafts) == finals(plain) and len(finals(plain)) >= 3
    assert sum(drafted) > 0  # some partials of the second run started from a draft


def test_a_slow_consumer_gets_the_newest_partial_and_every_final(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray]
) -> None:
    async def body(engine: SpeechEngine) -> list[SpeechEvent]:
        stream = engine.open_stream(StreamOptions())
        for chunk in random_chunks(clips["meeting_tst00"], 5):
            await stream.push_audio(chunk)
        stream.end()
        while engine.active_streams:  # the engine releases the stream once StreamEnded is queued
            await asyncio.sleep(0.05)
        return await collect(stream)

    events = run(with_engine(whisper, vad, body, FAST_PUSH))
    check_event_order(events)
    partials = Counter(e.utterance for e in events if isinstance(e, Transcript) and e.kind == "partial")
    assert partials, "meeting_tst00 has utterances long enough for partials"
    assert all(count == 1 for count in partials.values()), "unread partials of one utterance coalesce into the newest"


def test_close_mid_stream_frees_it_at_once(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray]
) -> None:
    observer = RecordingObserver()
    speech = clips["telephone"][: 20 * SAMPLE_RATE_HZ]

    async def body(engine: SpeechEngine) -> tuple[int, int]:
        stream = engine.open_stream(StreamOptions())
        await stream.push_audio(speech)
        assert engine.active_streams == 1
        assert isinstance(await stream.next_event(), SpeechStarted)
        stream.close()
        stream.close()  # idempotent
        assert engine.active_streams == 0
        assert await stream.next_event() == StreamEnded()
        await stream.push_audio(speech[:16000])  # ignored
        encodes_at_close = observer.count("encode")
        sentinel = engine.open_stream(StreamOptions())  # silence: the engine steps on, with no Whisper work of its own
        assert await stream_clip(sentinel, [clips["silence"][: 2 * SAMPLE_RATE_HZ]]) == [StreamEnded()]
        assert engine.active_streams == 0
        vad_frames = sum(size for stage, size in observer.batches if stage == "vad")
        return observer.count("encode") - encodes_at_close, vad_frames

    extra_encodes, vad_frames = run(with_engine(whisper, vad, body, observer=observer))
    assert extra_encodes <= 2, "only the decode already in flight at close() may finish"
    assert vad_frames < (speech.shape[0] + 2 * SAMPLE_RATE_HZ) // 512, "the closed stream's audio was not all VAD'd"


def test_shutdown_fails_pending_and_later_calls(whisper: WhisperRunner, vad: VadRunner) -> None:
    async def body() -> None:
        engine = SpeechEngine(whisper, vad)
        await engine.start()
        stream = engine.open_stream(StreamOptions())
        waiting = asyncio.create_task(stream.next_event())
        await asyncio.sleep(0)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await waiting
        with pytest.raises(EngineDeadError):
            await stream.next_event()
        with pytest.raises(EngineDeadError):
            await stream.push_audio(np.zeros(512, dtype=np.float32))
        with pytest.raises(EngineDeadError):
            engine.open_stream(StreamOptions())

    run(body())


def test_a_crash_in_the_runner_kills_the_engine_loudly(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_encode(mel: np.ndarray) -> Any:
        raise RuntimeError("simulated onnxruntime failure")

    monkeypatch.setattr(whisper, "encode", broken_encode)

    async def body(engine: SpeechEngine) -> None:
        stream = engine.open_stream(StreamOptions())
        await stream.push_audio(clips["telephone"][: 10 * SAMPLE_RATE_HZ])
        stream.end()
        with pytest.raises(EngineDeadError, match="crashed"):
            while True:
                await stream.next_event()
        with pytest.raises(EngineDeadError):
            engine.open_stream(StreamOptions())

    run(with_engine(whisper, vad, body))


def test_bad_audio_is_rejected(whisper: WhisperRunner, vad: VadRunner) -> None:
    async def body(engine: SpeechEngine) -> None:
        stream = engine.open_stream(StreamOptions())
        with pytest.raises(ValueError, match="1-D float"):
            await stream.push_audio(np.zeros((2, 10), dtype=np.float32))
        with pytest.raises(ValueError, match="1-D float"):
            await stream.push_audio(np.zeros(10, dtype=np.int16))
        with pytest.raises(ValueError, match="NaN"):
            await stream.push_audio(np.full(10, np.nan, dtype=np.float32))
        stream.end()
        with pytest.raises(ValueError, match="after end"):
            await stream.push_audio(np.zeros(10, dtype=np.float32))
        assert await stream.next_event() == StreamEnded()

    run(with_engine(whisper, vad, body))


def test_a_free_worker_takes_the_next_batch_while_another_is_still_running(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching: the first batch hangs in one worker; the other worker keeps serving the other stream,
    and once released the stuck stream's results still arrive, in order. (The transcription is faked: this test
    is about the engine's workers, not Whisper.)"""
    release = threading.Event()
    calls = itertools.count()

    def transcribe_slowly_once(runner: Any, jobs: Sequence[WindowJob], policy: Any, rules: Any) -> Any:
        if next(calls) == 0:
            release.wait(timeout=120)
        texts = [WindowText(job.key, f"{job.kind} {job.audio.shape[0]}", False, False, False, 1) for job in jobs]
        return texts, GroupTiming(len(jobs), 0.0, 0.0, 0.0)

    monkeypatch.setattr(speech_engine_module, "transcribe_group", transcribe_slowly_once)
    settings = SpeechEngineSettings(max_batch_size=1, decode_workers=2, max_partial_lag_s=None)
    audio = clips["telephone"][: 20 * SAMPLE_RATE_HZ]  # speech from 6.5 s on

    async def body(engine: SpeechEngine) -> None:
        streams = [engine.open_stream(StreamOptions()), engine.open_stream(StreamOptions())]
        received: list[list[Transcript]] = [[], []]

        async def consume(index: int) -> None:
            while not isinstance(event := await streams[index].next_event(), StreamEnded):
                if isinstance(event, Transcript):
                    received[index].append(event)

        async def push(stream: SpeechStream) -> None:  # the stuck stream's pushes wait once its backlog is full
            for chunk in np.array_split(audio, 40):
                await stream.push_audio(chunk)
            stream.end()

        consumers = [asyncio.create_task(consume(index)) for index in range(2)]
        pushers = [asyncio.create_task(push(stream)) for stream in streams]
        try:
            for _ in range(600):
                if max(len(texts) for texts in received) >= 3:
                    break
                await asyncio.sleep(0.1)
            stuck = 0 if not received[0] else 1
            assert not received[stuck] and len(received[1 - stuck]) >= 3, received  # served while the other hangs
        finally:
            release.set()  # never leave the worker thread hanging
        await asyncio.gather(*pushers, *consumers)
        for texts in received:
            assert texts and texts[-1].kind == "final", texts
            ends = [(event.utterance, event.end) for event in texts if event.kind == "partial"]
            assert ends == sorted(ends), "a stream's partials must arrive in order"

    run(with_engine(whisper, vad, body, settings))


def test_settings_reject_utterances_longer_than_whisper_windows() -> None:
    with pytest.raises(ValueError, match="max_utterance_s"):
        SpeechEngineSettings(max_utterance_s=31)
    with pytest.raises(ValueError, match="positive"):
        SpeechEngineSettings(decode_workers=0)


# ------------------------------------------------------------------------------------------------ without models


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=40_000), st.integers(min_value=0, max_value=40_000))))
def test_audio_buffer_keeps_exactly_the_samples_not_discarded(operations: list[tuple[int, int]]) -> None:
    buffer = AudioBuffer(capacity=100)
    everything = np.zeros(0, dtype=np.float32)
    for push, discard in operations:
        chunk = np.arange(everything.shape[0], everything.shape[0] + push, dtype=np.float32)
        buffer.append(chunk)
        everything = np.concatenate([everything, chunk])
        buffer.discard_before(buffer.base + discard)
        assert buffer.end == everything.shape[0]
        assert np.array_equal(buffer.read(buffer.base, buffer.end), everything[buffer.base :])
    with pytest.raises(ValueError, match="inside"):
        buffer.read(buffer.base - 1, buffer.end)


def test_mailbox_coalesces_partials_of_one_utterance_only() -> None:
    async def body() -> list[SpeechEvent]:
        mailbox = Mailbox()
        mailbox.put(SpeechStarted(0, 0.0))
        mailbox.put(Transcript("partial", 0, "a", 0.0, 1.0))
        mailbox.put(SpeechStarted(1, 2.0))
        mailbox.put(Transcript("partial", 0, "a b", 0.0, 1.5))  # replaces the unsent partial in place
        mailbox.put(Transcript("partial", 1, "c", 2.0, 3.0))
        mailbox.put(Transcript("final", 0, "a b c", 0.0, 1.8))
        mailbox.put(StreamEnded())
        events = [await mailbox.get() for _ in range(6)]
        events.append(await mailbox.get())  # after StreamEnded: StreamEnded again, never a hang
        return events

    assert run(body()) == [
        SpeechStarted(0, 0.0),
        Transcript("partial", 0, "a b", 0.0, 1.5),
        SpeechStarted(1, 2.0),
        Transcript("partial", 1, "c", 2.0, 3.0),
        Transcript("final", 0, "a b c", 0.0, 1.8),
        StreamEnded(),
        StreamEnded(),
    ]


def test_mailbox_failure_after_queued_events_and_close_wins() -> None:
    async def body() -> None:
        mailbox = Mailbox()
        mailbox.put(SpeechStarted(0, 0.0))
        mailbox.fail(EngineDeadError("gone"))
        assert await mailbox.get() == SpeechStarted(0, 0.0)
        with pytest.raises(EngineDeadError, match="gone"):
            await mailbox.get()
        closed = Mailbox()
        closed.put(SpeechStarted(0, 0.0))
        closed.close()
        assert await closed.get() == StreamEnded()

    run(body())


def test_a_streams_own_beam_decodes_its_finals_and_only_its_finals(
    whisper: WhisperRunner, vad: VadRunner, clips: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``StreamOptions.final_beam_size`` (``/v1/listen?beam_size=``) reaches the decoder for that stream's finals;
    another stream on the same engine keeps the engine's greedy finals."""
    calls: list[tuple[bool, int]] = []  # (final rules, beam) of every decoder call
    decode = whisper.decode

    def recording_decode(*args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs["rules"].with_timestamps, kwargs.get("beam_size", 1)))
        return decode(*args, **kwargs)

    monkeypatch.setattr(whisper, "decode", recording_decode)
    audio = clips["telephone"][: 12 * SAMPLE_RATE_HZ]

    async def body(engine: SpeechEngine) -> tuple[list[SpeechEvent], list[tuple[bool, int]]]:
        beamed = await stream_clip(engine.open_stream(StreamOptions(final_beam_size=3)), [audio])
        beamed_calls = list(calls)
        calls.clear()
        await stream_clip(engine.open_stream(StreamOptions()), [audio])
        return beamed, beamed_calls

    observer = RecordingObserver()
    events, beamed_calls = run(with_engine(whisper, vad, body, FAST_PUSH, observer))
    assert final_text(events)
    assert any(stage == "beam" for stage, _ in observer.batches)  # the beamed finals reach the metrics
    assert (True, 3) in beamed_calls and all(beam == 1 for final, beam in beamed_calls if not final)
    assert calls and all(beam == 1 for _, beam in calls)
    with pytest.raises(ValueError, match="final_beam_size must lie in 1..8"):
        StreamOptions(final_beam_size=9)
