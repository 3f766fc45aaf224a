"""Brook's streaming speech-to-text engine: one per Whisper model version, serving every live audio stream at once.

Shape (the vLLM/sherpa pattern, see /work/shared/STYLE.md section 6):

- The asyncio event loop owns every piece of mutable state: streams, audio buffers, VAD states, the pure
  ``SpeechScheduler`` and the mailboxes. One step-loop task drives the work; when there is none it waits on an
  ``asyncio.Event`` (no polling).
- Only runner calls leave the loop, with fresh numpy inputs (audio slices and VAD states are copies; results are
  copied back on the loop): Whisper batches on a ``ThreadPoolExecutor`` of ``decode_workers`` threads, the VAD on
  a thread of its own so that it never waits behind a Whisper batch. onnxruntime sessions accept concurrent runs:
  with one intra-op thread per session, one batch kept only one of two cores busy (the decoder's many small
  operators do not split across threads); two workers keep both busy.
- A step: Silero VAD on every pending 512-sample frame of every stream, one batched call per frame column; the
  segmenters turn probabilities into ``SpeechStarted`` events and due decodes; then each free decode worker gets a
  batch (up to ``max_batch_size`` windows: due finals first, then the newest due partial of each stream) and runs
  it as one batched encoder and decoder call per group of equal window length. Batches finish on their own: the
  loop does not wait for them, so a worker that finishes early takes the next batch at once while the other is
  still busy (continuous batching; until this release a step waited for all of its windows, and a partial due
  meanwhile waited for the slowest window of the step). The scheduler gives a stream no new decode while one of
  its decodes is in flight, so each stream's results still arrive in order; only a final may start while a
  partial of its utterance is still running (that partial's text will be dropped, so the final need not wait).
- Nothing reaches Whisper without the VAD: silence and noise cost only VAD calls and produce no events.

Windows. Measured on this shared 2-core machine (whisper-tiny-en v1 fp32, the decode guards of
``app.engine.speech_decode`` on; utterances cut by this engine's VAD segmentation from the test recordings;
word error rates against offline ``transcribe`` of the whole file):

- Every window is the audio + ``pad_s`` (2 s) of zero padding, at least ``min_window_s`` (10 s), rounded up to
  ``bucket_s`` (2 s): utterances up to 8 s long all share the 1000-frame window, so partials and finals of every
  stream land in one batched encoder call per step (finals and partials then decode in separate batched calls,
  finals with timestamps as offline, partials without).
- Finals. On 28 utterances of telephone, meeting_60s, meeting_tst00 and meeting_dev00: the full 30 s window (as
  offline) took 14.6 s in all, hit the token limit once, WER 0.14 / 0.46 / 0.71 / 0.42 (mean 0.43); these
  windows (1057 frames on average) 9.2 s, 3 times, WER 0.16 / 0.46 / 0.66 / 0.47 (mean 0.44); the audio + 3 s
  without a minimum (836 frames) 8.5 s, 3 times, WER 0.19 / 0.49 / 0.82 / 0.51. With 4 live streams the full
  windows raised the busy time per audio second from 0.55 to 0.67 (scripts/bench_speech_engine.py
  ``--final-windows``), so finals are bucketed too; ``DecodePolicy.final_full_window`` restores offline windows.
  Without the guards, windows of the audio + 1 s made the decoder loop to 224 tokens on 8 of 36 utterances.
- Partials. Over 160 partial positions (error = word edits between a partial and the
  closest prefix of its final, per partial word): 1 s padding 0.39 with 29% of decodes stopped at the token limit;
  2 s 0.33 / 14%; 3 s 0.31 / 9%; 2 s with the 10 s minimum 0.31 / 6%; full windows 0.24 / 1%, but at 1.55x the
  cost of the 10 s-minimum windows (107 s against 69 s for 80 partials, the encoder 54 s against 24 s). Partials
  are decoded without timestamps (error 0.30, fewer tokens). Continuing each partial from the previous one's text
  cut the decoded tokens 3.2x but the time only 22% and raised the error to 0.41, so every partial is decoded
  afresh.

Cost (issue 8, session 2; the machine was shared, load average 5-9 on 2 cores, so wall times are inflated and
only same-run comparisons count). ``scripts/bench_speech_windows`` replays every window the segmentation asks for
(5 clips x 30 s, 208 partials at the 0.5 s cadence and 34 finals; nothing shed, so every policy does the same work):

- Decoding. Three exact or near-exact changes: the runner compacts its caches only once half of a batch has
  finished (each finished row used to copy every cross-attention cache: a quarter of a 16-row batch's decoding
  time), decodes every row of a kind in one batch with its own token limit (instead of one sub-batch per
  token-limit class), and takes the chosen token's log-probability without a float64 log-softmax of the whole
  vocabulary (8.5 against 1.5 ms of CPU per step at batch 16). Tokens are unchanged (checked on 16 windows).
  ``DecodePolicy.stop_loops`` then stops a row as soon as it ends in 4 copies of an n-gram: 8% fewer decoded
  tokens over the replay, the same finals' WER (0.406) and partial error (0.170 against 0.174). On a batch of 16
  windows of 2-8 s (3 runs interleaved with the previous code): decoding 47-59 instead of 94-136 ms per window,
  process CPU 157-170 instead of 188-252 ms per window.
- Windows. Smaller minimums cut the encoder's frames but not the total: min 10 s (pad 2, bucket 2) 1084 frames on
  average, 0.338 CPU s per audio s, WER 0.406 against offline, 15 windows at the token limit; min 8 s (bucket 1 s)
  911 frames, 0.340, WER 0.417, 32; min 6 s 768 frames, 0.311, WER 0.439, 35. Shorter windows loop more, and the
  decoder steps they cost eat most of the encoder's saving, so the 10 s minimum stays.
- Partials are served round-robin (a newer partial keeps the waiting one's place in the queue) so that no stream
  starves when more streams speak than ``max_batch_size``.
- Batches (this release, ``scripts/bench_speech_load``, 16 paced streams on 2 cores, 1 intra-op thread): windows
  decoded by whisper-tiny-en v3 (its vocabulary projection cost 5 of 10 ms per decoded token at batch 1 in v1) in
  batches that no longer wait for each other. Partial p95 / final p95: step-synchronous batches of 8 (the
  previous engine) 9.1 / 7.6 s; batches of 8 on free workers 5.4-6.2 / 3.9-4.2 s; of 4, 4.5 / 2.7 s; of 2 (the
  default), 3.6 / 1.9 s; of 1, 3.7 / 1.4 s. With v3 a row costs about as much at batch 1 as at batch 2 (3.2
  against 3.6 ms per token, ``scripts/bench_speech_ceiling``), so small batches cost little CPU and each window
  comes back sooner.
- What bounds the targets (``scripts/bench_speech_ceiling``): every partial re-encodes its window (at least 10 s:
  10.4 GFLOP, 85 ms of CPU, already 85% of onnxruntime's fp32 MatMul speed on this core) and re-decodes the
  utterance (~25 tokens at 3.2-3.6 ms per row), 0.17 CPU s per window. A partial latency p95 <= 1 s needs a fresh
  partial every ~0.5 s per stream, so 16 streams would need 5.3 CPU s per second, 2.7x a 2-core machine (2 cores
  serve at most ~6); the engine keeps up by shedding partials, which is why partial latency grows with the number
  of streams. Going further needs encoder work that does not grow with the utterance, which Whisper's
  bidirectional encoder does not allow exactly.

Load shedding: a waiting partial whose newest audio was pushed more than ``max_partial_lag_s`` ago is dropped
unsent, so an engine that falls behind spends its time on finals and catches up instead of transcribing stale
partials (set it to None for clients that push faster than real time and still want partials).

Each stream's outgoing mailbox is bounded: a new partial replaces an unsent older partial of the same utterance;
``SpeechStarted``, finals and ``StreamEnded`` are never dropped, and ``push_audio`` waits (backpressure) while the
stream has more than ``max_backlog_s`` of unsettled audio or ``max_pending_events`` unread events, so a slow
consumer slows only its own producer. If the loop crashes, every stream's ``next_event`` raises ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from app.engine.speech_decode import (
    DecodePolicy,
    PromptRules,
    WindowJob,
    WindowText,
    partial_draft,
    transcribe_group,
)
from app.engine.speech_events import SpeechEvent, SpeechStarted, StreamEnded, StreamOptions, Transcript
from app.engine.speech_scheduler import DecodeGroup, DecodeItem, SpeechScheduler
from app.engine.speech_streams import AudioBuffer, InFlight, StreamState
from app.engine.utterance import SAMPLE_RATE_HZ, VAD_FRAME_SAMPLES, SegmentationConfig, UtteranceStarted
from app.errors import EngineDeadError
from app.speech.vad import VadRunner, VadStreamState
from app.speech.whisper_runner import WhisperRunner

if TYPE_CHECKING:
    from app.repository import ModelRepository

logger = logging.getLogger(__name__)

WHISPER_MAX_WINDOW_S: Final = 30.0


@dataclass(frozen=True)
class SpeechEngineSettings:
    """Every tunable of the engine."""

    partial_interval_s: float = 0.5  # new speech audio between two partials of an utterance
    max_batch_size: int = 2  # windows per batch (finals first, then partials); each decode worker runs one at a time
    vad_threshold: float = 0.5  # Silero probability at or above which speech starts
    vad_neg_threshold: float = 0.35  # below this a frame is silence (hysteresis)
    speech_pad_ms: int = 300  # audio kept before the onset (pre-roll) and after the last speech
    min_speech_ms: int = 250  # voiced audio needed before an utterance is reported; shorter sounds are ignored
    max_utterance_s: float = 20.0  # a final is forced at this length (<= 30 s) and a new utterance continues
    cut_search_s: float = 3.0  # a forced cut goes to the quietest frame of this last stretch
    max_backlog_s: float = 10.0  # push_audio waits while a stream has more unsettled audio than this
    max_pending_events: int = 64  # push_audio also waits while the consumer has this many unread events
    max_vad_s_per_step: float = 5.0  # VAD audio per stream per step, so a burst cannot monopolise a step
    max_vad_lead_s: float = 2.0  # the VAD stays at most this far ahead of the end of a stream's decode in flight
    max_partial_lag_s: float | None = 2.0  # a partial whose audio was pushed longer ago is skipped; None: never
    intra_op_threads: int = 2  # onnxruntime threads of the Whisper sessions (used by ``from_repository``)
    decode_workers: int = 2  # Whisper batches transcribed at once, each on its own thread
    decode: DecodePolicy = field(default_factory=DecodePolicy)  # window sizes and decode guards

    def __post_init__(self) -> None:
        if not 0 < self.max_utterance_s <= WHISPER_MAX_WINDOW_S:
            raise ValueError(f"max_utterance_s must lie in (0, {WHISPER_MAX_WINDOW_S}], got {self.max_utterance_s}")
        if min(self.partial_interval_s, self.max_backlog_s, self.max_vad_s_per_step, self.max_vad_lead_s) <= 0:
            raise ValueError(f"expected positive intervals, got {self}")
        if self.max_partial_lag_s is not None and self.max_partial_lag_s <= 0:
            raise ValueError(f"max_partial_lag_s must be positive or None, got {self.max_partial_lag_s}")
        if min(self.max_batch_size, self.max_pending_events, self.intra_op_threads, self.decode_workers) < 1:
            raise ValueError(f"expected positive sizes, got {self}")

    def segmentation(self, options: StreamOptions) -> SegmentationConfig:
        """The segmentation of one stream: engine settings plus the client's options."""
        threshold, neg_threshold = self.vad_threshold, self.vad_neg_threshold
        if options.vad_threshold is not None:  # a client's own threshold keeps the engine's hysteresis gap
            threshold = options.vad_threshold
            neg_threshold = max(0.01, threshold - (self.vad_threshold - self.vad_neg_threshold))
        return SegmentationConfig.from_ms(
            threshold=threshold,
            neg_threshold=neg_threshold,
            min_speech_ms=self.min_speech_ms,
            silence_ms=options.vad_silence_ms,
            speech_pad_ms=self.speech_pad_ms if options.speech_pad_ms is None else options.speech_pad_ms,
            partial_interval_s=self.partial_interval_s if options.interim_results else None,
            max_utterance_s=self.max_utterance_s,
            cut_search_s=min(self.cut_search_s, self.max_utterance_s / 2),
        )


class SpeechEngineObserver(Protocol):
    """Metrics hooks, called on the event loop."""

    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        """After each runner call: ``stage`` is "vad", "encode" or "decode"; ``size`` is its batch size."""

    def on_partial_latency(self, seconds: float) -> None:
        """When a partial is queued: seconds since the last audio it covers was pushed."""

    def on_final_latency(self, seconds: float) -> None:
        """When a final is queued: seconds since the end of speech became known (the audio completing the
        silence was pushed, or finalize()/end() was called)."""


class _NullObserver:
    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        pass

    def on_partial_latency(self, seconds: float) -> None:
        pass

    def on_final_latency(self, seconds: float) -> None:
        pass


class SpeechStream:
    """A client's handle on one live audio stream. Use it from the engine's event loop only."""

    def __init__(self, engine: SpeechEngine, state: StreamState) -> None:
        self._engine = engine
        self._state = state
        self.id = state.stream_id
        self.options = state.options

    async def push_audio(self, samples: np.ndarray) -> None:
        """Append 16 kHz mono float samples. Waits while the stream's backlog is full. Ignored after close()."""
        if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"expected 1-D float samples at 16 kHz, got dtype {samples.dtype} shape {samples.shape}")
        state = self._state
        if state.ended:
            raise ValueError(f"stream {self.id}: expected no audio after end()")
        fresh = np.array(samples, dtype=np.float32, copy=True)
        if not np.all(np.isfinite(fresh)):
            raise ValueError(f"stream {self.id}: audio contains NaN or infinite samples")
        while not state.closed and self._engine._must_wait(state):
            state.space.clear()
            await state.space.wait()
        if state.closed or fresh.shape[0] == 0:
            return
        self._engine._accept_audio(state, fresh)

    def finalize(self) -> None:
        """End the current utterance at the audio pushed so far (a final if it holds reported speech)."""
        self._engine._marker(self._state, "finalize")

    def end(self) -> None:
        """No more audio: the final of the current utterance, then ``StreamEnded``."""
        self._engine._marker(self._state, "end")

    async def next_event(self) -> SpeechEvent:
        """The next event; ``StreamEnded`` after close(); raises ``EngineDeadError`` once the engine is gone."""
        event = await self._state.mailbox.get()
        self._state.space.set()
        return event

    def close(self) -> None:
        """Abort: drop every buffer and state of this stream at once. Idempotent."""
        self._engine._release(self._state)


class SpeechEngine:
    """Streaming speech-to-text for every stream of one Whisper model version."""

    def __init__(
        self,
        whisper: WhisperRunner,
        vad: VadRunner,
        settings: SpeechEngineSettings | None = None,
        observer: SpeechEngineObserver | None = None,
    ) -> None:
        self.settings = settings or SpeechEngineSettings()
        self._whisper = whisper
        self._vad = vad
        self._observer: SpeechEngineObserver = observer or _NullObserver()
        if vad.config.frame_samples != VAD_FRAME_SAMPLES or vad.config.sample_rate != SAMPLE_RATE_HZ:
            raise ValueError(
                f"expected a {SAMPLE_RATE_HZ} Hz VAD with {VAD_FRAME_SAMPLES}-sample frames, "
                f"got {vad.config.sample_rate} Hz and {vad.config.frame_samples}"
            )
        policy = self.settings.decode
        max_frames = whisper.max_frames
        self._scheduler = SpeechScheduler(
            lambda n_samples, kind: policy.window_frames(n_samples, kind, max_frames),
            policy.token_limit,
            max_batch_size=self.settings.max_batch_size,
            max_vad_frames_per_step=max(
                1, round(self.settings.max_vad_s_per_step * SAMPLE_RATE_HZ / VAD_FRAME_SAMPLES)
            ),
            max_vad_lead_samples=round(self.settings.max_vad_lead_s * SAMPLE_RATE_HZ),
        )
        self._rules = PromptRules.from_config(whisper.config)
        self._streams: dict[str, StreamState] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None  # Whisper batches, one thread per decode worker
        self._vad_executor: ThreadPoolExecutor | None = None  # VAD calls, never queued behind a Whisper batch
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # Whisper batches in flight
        self._crash: BaseException | None = None  # a batch's exception, re-raised by the step loop
        self._dead: EngineDeadError | None = None
        self._busy_s = 0.0  # seconds the inference thread has worked (for benchmarks)

    @classmethod
    def from_repository(
        cls,
        repository: ModelRepository,
        whisper_name: str = "whisper-tiny-en",
        whisper_version: int | None = None,
        *,
        vad_name: str = "silero-vad",
        settings: SpeechEngineSettings | None = None,
        observer: SpeechEngineObserver | None = None,
    ) -> SpeechEngine:
        """Load the runners from the model repository (Whisper with ``settings.intra_op_threads`` threads)."""
        chosen = settings or SpeechEngineSettings()
        whisper = repository.load(whisper_name, whisper_version)
        vad = repository.load(vad_name)
        return cls(
            WhisperRunner(whisper.directory, whisper.manifest.config, intra_op_threads=chosen.intra_op_threads),
            VadRunner(vad.directory, vad.manifest.config),
            chosen,
            observer,
        )

    # ----------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the speech engine was already started")
        workers = self.settings.decode_workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="speech-engine")
        self._vad_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speech-engine-vad")
        self._task = asyncio.create_task(self._run(), name="speech-engine-step-loop")

    async def shutdown(self) -> None:
        """Stop the loop; every stream's pending and later ``next_event`` raises ``EngineDeadError``."""
        self._fail(EngineDeadError("the speech engine was shut down"))
        task, self._task = self._task, None
        for batch in [*self._batches, task]:
            if batch is not None:
                batch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await batch
        for executor in (self._executor, self._vad_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def waiting_requests(self) -> int:
        """Streams with audio the engine has not settled yet (the speech engine's queue depth)."""
        return sum(1 for stream_id in self._streams if self._scheduler.backlog(stream_id) > 0)

    @property
    def busy_seconds(self) -> float:
        """Seconds the inference thread has spent in runner calls so far."""
        return self._busy_s

    def open_stream(self, options: StreamOptions | None = None) -> SpeechStream:
        if self._dead is not None:
            raise self._dead
        chosen = options or StreamOptions()
        stream_id = f"speech-{next(self._ids)}"
        state = StreamState(stream_id, chosen, self._vad.new_stream())
        self._scheduler.add_stream(stream_id, self.settings.segmentation(chosen))
        self._streams[stream_id] = state
        return SpeechStream(self, state)

    # ----------------------------------------------------------------------------------------------- stream calls

    def _must_wait(self, state: StreamState) -> bool:
        if self._dead is not None:
            raise self._dead
        if state.stream_id not in self._scheduler:
            return False
        backlog_s = self._scheduler.backlog(state.stream_id) / SAMPLE_RATE_HZ
        return backlog_s > self.settings.max_backlog_s or len(state.mailbox) >= self.settings.max_pending_events

    def _accept_audio(self, state: StreamState, samples: np.ndarray) -> None:
        state.audio.append(samples)
        total = self._scheduler.push(state.stream_id, samples.shape[0])
        state.pushes.append((total, time.monotonic()))
        self._wake.set()

    def _marker(self, state: StreamState, kind: str) -> None:
        if state.closed or state.ended:
            return
        if self._dead is not None:
            raise self._dead
        state.marker_times[self._scheduler.pushed(state.stream_id)] = time.monotonic()
        if kind == "end":
            state.ended = True
            self._scheduler.end(state.stream_id)
        else:
            self._scheduler.finalize(state.stream_id)
        self._wake.set()

    def _release(self, state: StreamState, *, keep_events: bool = False) -> None:
        """Forget a stream's engine-side state (close(), or after StreamEnded with ``keep_events``)."""
        if state.stream_id in self._streams:
            del self._streams[state.stream_id]
            self._scheduler.remove_stream(state.stream_id)
        state.closed = True
        state.audio = AudioBuffer(capacity=0)
        state.pushes.clear()
        state.marker_times.clear()
        if not keep_events:
            state.mailbox.close()
        state.space.set()

    def _fail(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
        for state in list(self._streams.values()):
            state.mailbox.fail(self._dead)
            state.space.set()

    # ----------------------------------------------------------------------------------------------- step loop

    async def _run(self) -> None:
        try:
            while True:
                if self._crash is not None:
                    raise self._crash
                if not self._can_progress():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._step()
                await asyncio.sleep(0)  # let pushes and consumers run between steps
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("speech engine step loop crashed")
            error = EngineDeadError(f"the speech engine crashed: {exc!r}")
            error.__cause__ = exc
            self._fail(error)

    def _can_progress(self) -> bool:
        """VAD work, an end to report, or a decode ready while a worker is free (a batch's end wakes the loop)."""
        scheduler = self._scheduler
        if len(self._batches) < self.settings.decode_workers and scheduler.has_ready_decodes():
            return True
        return bool(scheduler.has_ends_to_report() or scheduler.plan_vad())

    async def _step(self) -> None:
        """VAD on the new audio, then a batch for every free decode worker; batches finish on their own."""
        await self._vad_phase()
        for stream_id in self._scheduler.take_ended():
            self._end_stream(stream_id)
        is_stale = self._is_stale if self.settings.max_partial_lag_s is not None else None
        while len(self._batches) < self.settings.decode_workers:
            groups = self._scheduler.plan_decodes(is_stale)
            if not groups:
                break
            batch = asyncio.create_task(self._decode_batch(self._prepare_batch(groups)), name="speech-engine-batch")
            self._batches.add(batch)
            batch.add_done_callback(self._batch_done)
        self._discard_settled_audio()

    def _batch_done(self, batch: asyncio.Task[None]) -> None:
        self._batches.discard(batch)
        if not batch.cancelled() and batch.exception() is not None and self._crash is None:
            self._crash = batch.exception()
        self._discard_settled_audio()
        self._wake.set()

    def _discard_settled_audio(self) -> None:
        for state in list(self._streams.values()):
            retain = self._scheduler.retain_from(state.stream_id)
            state.audio.discard_before(retain)
            state.forget_before(retain)
            state.space.set()

    async def _vad_phase(self) -> None:
        plan = self._scheduler.plan_vad()
        work = [item for item in plan if item.n_frames > 0]
        probabilities: dict[str, list[float]] = {}
        if work:
            inputs: list[tuple[VadStreamState, np.ndarray]] = []
            for item in work:
                state = self._streams[item.stream_id]
                end = item.first_sample + item.n_frames * VAD_FRAME_SAMPLES
                frames = state.audio.read(item.first_sample, end).reshape(item.n_frames, VAD_FRAME_SAMPLES)
                inputs.append((VadStreamState(state.vad.state.copy(), state.vad.context.copy()), frames))
            results, columns = await self._infer(self._vad_executor, _run_vad_columns, self._vad, inputs)
            for size, seconds in columns:
                self._observer.on_batch("vad", size, seconds)
            for item, (vad_state, _), values in zip(work, inputs, results, strict=True):
                state_now = self._streams.get(item.stream_id)
                if state_now is None:
                    continue  # closed while the VAD ran
                state_now.vad.state[...] = vad_state.state
                state_now.vad.context[...] = vad_state.context
                probabilities[item.stream_id] = [float(value) for value in values]
        for item in plan:
            if item.stream_id not in self._streams:
                continue
            state = self._streams[item.stream_id]
            for event in self._scheduler.apply_vad(item.stream_id, probabilities.get(item.stream_id, [])):
                if isinstance(event, UtteranceStarted):
                    state.mailbox.put(SpeechStarted(event.utterance, event.start / SAMPLE_RATE_HZ))

    def _prepare_batch(self, groups: list[DecodeGroup]) -> list[tuple[list[InFlight], list[WindowJob]]]:
        """Copy the windows' audio now, while the buffers still hold it (handed-out decodes no longer keep their
        audio from being discarded), finals' groups first."""
        prepared: list[tuple[list[InFlight], list[WindowJob]]] = []
        ordered = sorted(groups, key=lambda group: min(0 if item.kind == "final" else 1 for item in group.items))
        for group in ordered:
            flights: list[InFlight] = []
            jobs: list[WindowJob] = []
            for item in group.items:
                state = self._streams.get(item.stream_id)
                if state is None:
                    self._scheduler.complete(item)
                    continue
                flights.append(InFlight(item, self._due_time(state, item)))
                jobs.append(self._window_job(len(jobs), state, item, self.settings.decode))
            if jobs:
                prepared.append((flights, jobs))
        return prepared

    async def _decode_batch(self, prepared: list[tuple[list[InFlight], list[WindowJob]]]) -> None:
        """One worker's batch: one executor call per group of equal window length, delivering after each call."""
        for flights, jobs in prepared:
            policy, rules = self.settings.decode, self._rules
            texts, timing = await self._infer(self._executor, transcribe_group, self._whisper, jobs, policy, rules)
            self._observer.on_batch("encode", timing.size, timing.features_s + timing.encode_s)
            self._observer.on_batch("decode", timing.size, timing.decode_s)
            if timing.beamed_finals:  # the finals decoded with a beam, and that part of the decoding time
                self._observer.on_batch("beam", timing.beamed_finals, timing.beam_s)
            now = time.monotonic()
            for flight, text in sorted(zip(flights, texts, strict=True), key=lambda pair: pair[0].item.order):
                self._deliver(flight, text, now)

    @staticmethod
    def _window_job(index: int, state: StreamState, item: DecodeItem, policy: DecodePolicy) -> WindowJob:
        audio = state.audio.read(item.start, item.end)
        agreed = partial_draft(state.partial_history(item.utterance), policy)
        if item.kind == "partial":
            return WindowJob(index, item.kind, audio, item.frames, item.max_new_tokens, draft=agreed)
        beam = state.options.final_beam_size
        return WindowJob(index, item.kind, audio, item.frames, item.max_new_tokens, agreed=agreed, beam_size=beam)

    def _deliver(self, flight: InFlight, text: WindowText, now: float) -> None:
        item = flight.item
        completion = self._scheduler.complete(item)
        state = self._streams.get(item.stream_id)
        if state is None:
            return
        if text.text_tokens and self.settings.decode.partial_draft_agreement > 0:
            state.note_partial(item.utterance, item.end, text.text_tokens, self.settings.decode.partial_draft_agreement)
        if not completion.deliver or (item.kind == "partial" and not text.text):
            return
        start_s, end_s = item.start / SAMPLE_RATE_HZ, item.end / SAMPLE_RATE_HZ
        state.mailbox.put(Transcript(item.kind, item.utterance, text.text, start_s, end_s))
        if flight.due_at is not None:
            if item.kind == "partial":
                self._observer.on_partial_latency(now - flight.due_at)
            else:
                self._observer.on_final_latency(now - flight.due_at)
        if completion.stream_ended:
            self._end_stream(item.stream_id)

    def _end_stream(self, stream_id: str) -> None:
        state = self._streams.get(stream_id)
        if state is not None:
            state.mailbox.put(StreamEnded())
            self._release(state, keep_events=True)

    def _is_stale(self, item: DecodeItem) -> bool:
        """A partial whose newest audio was pushed more than ``max_partial_lag_s`` ago (the engine is behind)."""
        state = self._streams.get(item.stream_id)
        pushed_at = None if state is None else state.push_time(item.end - 1)
        limit = self.settings.max_partial_lag_s
        return pushed_at is not None and limit is not None and time.monotonic() - pushed_at > limit

    def _due_time(self, state: StreamState, item: DecodeItem) -> float | None:
        if item.kind == "final" and item.due_position in state.marker_times:
            return state.marker_times[item.due_position]
        return state.push_time(item.due_position - 1)

    async def _infer(self, executor: ThreadPoolExecutor | None, function: Any, *args: Any) -> Any:
        if executor is None:
            raise RuntimeError("the speech engine is not started")
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
        finally:
            self._busy_s += time.perf_counter() - started


# --------------------------------------------------------------------------------------------------- inference


def _run_vad_columns(
    vad: VadRunner, inputs: Sequence[tuple[VadStreamState, np.ndarray]]
) -> tuple[list[np.ndarray], list[tuple[int, float]]]:
    """VAD every stream's frames: one batched call per frame column. States (copies) advance in place."""
    results = [np.empty(frames.shape[0], dtype=np.float32) for _, frames in inputs]
    columns: list[tuple[int, float]] = []
    for column in range(max(frames.shape[0] for _, frames in inputs)):
        rows = [row for row, (_, frames) in enumerate(inputs) if frames.shape[0] > column]
        batch = np.stack([inputs[row][1][column] for row in rows])
        started = time.perf_counter()
        values = vad.speech_probabilities([inputs[row][0] for row in rows], batch)
        columns.append((len(rows), time.perf_counter() - started))
        for position, row in enumerate(rows):
            results[row][column] = values[position]
    return results, columns
