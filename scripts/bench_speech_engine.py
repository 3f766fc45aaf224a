"""Measure the streaming speech engine in-process: N live streams at real-time pace, latency, cost and accuracy.

For each concurrency level N, N streams each push a different real recording (rotating over the test clips, each
cut to ``--seconds`` and started at a staggered offset) in ``--chunk-ms`` chunks at real-time pace, then call
``end()``. Reported per level:

- partial latency p50/p95 (engine view): from the push of the last audio a partial covers to the partial being
  queued;
- word latency p95 (the issue's client view): for every audio chunk inside an utterance, from its push to the
  first transcript (partial or final) of that utterance covering it; it adds the wait for the next partial;
- final latency p50/p95: from the moment the end of speech was knowable (the audio completing the silence was
  pushed, or end() was called) to the final being queued;
- WER of the streamed finals (joined per stream) against offline ``transcribe`` (model version 1, as ``brook
  transcribe``) of the same clip cut, pooled over the streams (edits / reference words);
- RTF: seconds the inference thread was busy / seconds of audio streamed by all streams (busy seconds per audio
  second, split by stage); ``busy %`` is the busy time over the wall time: near 100 the engine is saturated,
  sheds late partials and lets finals queue; CPU seconds of the whole process per audio second;
- drain: the longest wait from a stream's end() to its StreamEnded (how far behind real time the engine fell);
- partials received per stream, and the mean encoder batch size; the 1-minute load average before the level.

    .venv/bin/python -m scripts.bench_speech_engine [--streams 1,4,8,16,24] [--seconds 30] [--chunk-ms 100]
        [--whisper-dir DIR] [--whisper-version 1] [--final-windows default|full|bucketed]
        [--min-window-s S] [--pad-s S] [--bucket-s S] [--partial-draft-holdback K] [--partial-draft-agreement N]
        [--partial-draft-multiple M] [--partial-draft-verify] [--partial-interval-s S] [--max-utterance-s S]
        [--json docs/bench/speech_engine.json] [--label NAME]

Results are merged into the JSON file per (label, level) as each level finishes, so an interrupted sweep can be
resumed with the remaining levels. Whisper tiny.en comes from the model repository unless ``--whisper-dir`` (or
``$BROOK_WHISPER_MODEL_DIR``) names a converted folder with ``config.json`` or ``manifest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from app.convert.sources import cache_dir
from app.engine.speech_engine import SpeechEngine, SpeechEngineSettings
from app.engine.speech_events import StreamEnded, StreamOptions, Transcript
from app.errors import ModelError
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.transcribe import transcribe_batch
from app.speech.vad import VadRunner
from app.speech.wer import edit_distance, normalize_words
from app.speech.whisper_runner import WhisperRunner
from scripts.bench_common import DOCS_BENCH_DIR, load_average, machine_facts, write_json
from scripts.test_audio import build_test_clips

logger = logging.getLogger("bench_speech_engine")

SAMPLE_RATE_HZ = 16_000
CLIP_NAMES = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s", "bench_45s")
MODEL_DIR_ENV = "BROOK_WHISPER_MODEL_DIR"
STAGGER_S = 0.37  # stream i starts i * STAGGER_S seconds (mod 2 s) after the first
DEFAULT_JSON = DOCS_BENCH_DIR / "speech_engine.json"


@dataclass
class Observer:
    partial_latencies: list[float] = field(default_factory=list)
    final_latencies: list[float] = field(default_factory=list)
    batches: dict[str, list[int]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        self.batches.setdefault(stage, []).append(size)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def on_partial_latency(self, seconds: float) -> None:
        self.partial_latencies.append(seconds)

    def on_final_latency(self, seconds: float) -> None:
        self.final_latencies.append(seconds)


@dataclass
class StreamResult:
    partials: int
    drain_s: float
    finals_text: str
    word_latencies: list[float]


def percentile(values: list[float], fraction: float) -> float:
    return float(np.percentile(values, fraction * 100)) if values else float("nan")


def load_whisper(directory: str | None, version: int) -> WhisperRunner:
    if directory is None:
        try:
            loaded = ModelRepository(default_model_dir()).load("whisper-tiny-en", version, check_hashes=False)
            return WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=2)
        except ModelError as error:
            directory = os.environ.get(MODEL_DIR_ENV)
            if directory is None:
                raise SystemExit(f"whisper-tiny-en is not ready ({error}); pass --whisper-dir") from None
    path = Path(directory)
    for name in ("config.json", "manifest.json"):
        if (path / name).is_file():
            data = json.loads((path / name).read_text(encoding="utf-8"))
            config: dict[str, Any] = data.get("config", data) if name == "manifest.json" else data
            return WhisperRunner(path, config, intra_op_threads=2)
    raise SystemExit(f"{path} has neither config.json nor manifest.json")


def word_latencies(pushes: list[tuple[float, float]], events: list[tuple[float, Transcript]]) -> list[float]:
    """Per pushed chunk inside an utterance (its end in (start, end] of the utterance's final): seconds from its
    push to the first transcript of that utterance whose end reaches the chunk's end."""
    finals = {event.utterance: event for _, event in events if event.kind == "final"}
    latencies: list[float] = []
    for chunk_end_s, pushed_at in pushes:
        for utterance, final in finals.items():
            if not final.start < chunk_end_s <= final.end:
                continue
            arrivals = [
                arrived for arrived, event in events if event.utterance == utterance and event.end + 1e-6 >= chunk_end_s
            ]
            if arrivals:
                latencies.append(min(arrivals) - pushed_at)
            break
    return latencies


async def stream_one(engine: SpeechEngine, audio: np.ndarray, delay_s: float, chunk: int) -> StreamResult:
    """Push ``audio`` at real-time pace and collect what comes back."""
    stream = engine.open_stream(StreamOptions())
    events: list[tuple[float, Transcript]] = []
    pushes: list[tuple[float, float]] = []

    async def consume() -> float:
        while True:
            event = await stream.next_event()
            if isinstance(event, Transcript):
                events.append((time.monotonic(), event))
            if isinstance(event, StreamEnded):
                return time.monotonic()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(delay_s)
    started = time.monotonic()
    for index, position in enumerate(range(0, audio.shape[0], chunk)):
        await asyncio.sleep(max(0.0, started + index * chunk / SAMPLE_RATE_HZ - time.monotonic()))
        piece = audio[position : position + chunk]
        await stream.push_audio(piece)
        pushes.append(((position + piece.shape[0]) / SAMPLE_RATE_HZ, time.monotonic()))
    await asyncio.sleep(max(0.0, started + audio.shape[0] / SAMPLE_RATE_HZ - time.monotonic()))
    ended_at = time.monotonic()
    stream.end()
    drain = await consumer - ended_at
    finals = " ".join(event.text for _, event in events if event.kind == "final")
    partials = sum(1 for _, event in events if event.kind == "partial")
    return StreamResult(partials, drain, finals, word_latencies(pushes, events))


async def run_level(
    whisper: WhisperRunner,
    vad: VadRunner,
    clips: list[np.ndarray],
    references: list[str],
    n_streams: int,
    chunk: int,
    settings: SpeechEngineSettings,
) -> dict[str, float]:
    observer = Observer()
    engine = SpeechEngine(whisper, vad, settings, observer)
    load_before = load_average()
    await engine.start()
    try:
        wall = time.monotonic()
        cpu = time.process_time()
        results = await asyncio.gather(
            *(stream_one(engine, clips[i % len(clips)], (i * STAGGER_S) % 2.0, chunk) for i in range(n_streams))
        )
        cpu = time.process_time() - cpu
        wall = time.monotonic() - wall
    finally:
        await engine.shutdown()
    audio_s = sum(clips[i % len(clips)].shape[0] for i in range(n_streams)) / SAMPLE_RATE_HZ
    encode_sizes = observer.batches.get("encode", [])
    edits = words = 0
    for index, result in enumerate(results):
        reference = normalize_words(references[index % len(references)])
        edits += edit_distance(reference, normalize_words(result.finals_text))
        words += len(reference)
    all_word_latencies = [value for result in results for value in result.word_latencies]
    return {
        "streams": n_streams,
        "partial_p50": percentile(observer.partial_latencies, 0.5),
        "partial_p95": percentile(observer.partial_latencies, 0.95),
        "word_p50": percentile(all_word_latencies, 0.5),
        "word_p95": percentile(all_word_latencies, 0.95),
        "final_p50": percentile(observer.final_latencies, 0.5),
        "final_p95": percentile(observer.final_latencies, 0.95),
        "wer": edits / max(1, words),
        "rtf": engine.busy_seconds / audio_s,
        "cpu_per_audio_s": cpu / audio_s,
        "busy_pct": 100.0 * engine.busy_seconds / wall,
        "drain_s": max(result.drain_s for result in results),
        "partials_per_stream": statistics.mean(result.partials for result in results),
        "mean_encode_batch": statistics.mean(encode_sizes) if encode_sizes else 0.0,
        "load_1m_before": load_before,
        **{f"{stage}_s_per_audio_s": seconds / audio_s for stage, seconds in observer.stage_seconds.items()},
    }


def build_settings(args: argparse.Namespace) -> SpeechEngineSettings:
    settings = SpeechEngineSettings()
    decode = settings.decode
    if args.final_windows != "default":
        decode = dataclasses.replace(decode, final_full_window=args.final_windows == "full")
    policy_fields = ("min_window_s", "pad_s", "bucket_s")
    draft_fields = (
        "partial_draft_holdback",
        "partial_draft_agreement",
        "partial_draft_multiple",
        "partial_draft_verify",
        "final_beam_size",
        "final_beam_below_logprob",
    )
    for name in (*policy_fields, *draft_fields):
        if getattr(args, name) is not None:
            decode = dataclasses.replace(decode, **{name: getattr(args, name)})
    settings = dataclasses.replace(settings, decode=decode)
    for name in ("partial_interval_s", "max_utterance_s"):
        if getattr(args, name) is not None:
            settings = dataclasses.replace(settings, **{name: getattr(args, name)})
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", "--levels", default="1,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per push")
    parser.add_argument("--whisper-dir", default=None, help="converted Whisper folder (default: the repository)")
    parser.add_argument("--whisper-version", type=int, default=1, help="repository version of whisper-tiny-en")
    parser.add_argument(
        "--final-windows", choices=("default", "full", "bucketed"), default="default", help="window size of finals"
    )
    parser.add_argument("--min-window-s", type=float, default=None, help="DecodePolicy.min_window_s")
    parser.add_argument("--pad-s", type=float, default=None, help="DecodePolicy.pad_s")
    parser.add_argument("--bucket-s", type=float, default=None, help="DecodePolicy.bucket_s")
    parser.add_argument("--partial-draft-holdback", type=int, default=None, help="DecodePolicy value (default 0)")
    parser.add_argument(
        "--partial-draft-agreement", type=int, default=None, help="DecodePolicy value (default 2; 0: no partial drafts)"
    )
    parser.add_argument(
        "--partial-draft-multiple", type=int, default=None, help="DecodePolicy value (default 1: drafts never cut)"
    )
    parser.add_argument(
        "--partial-draft-verify", action="store_true", default=None, help="DecodePolicy.partial_draft_verify = True"
    )
    parser.add_argument(
        "--final-beam-size", type=int, default=None, help="DecodePolicy.final_beam_size (default 1: greedy finals)"
    )
    parser.add_argument(
        "--final-beam-below-logprob", type=float, default=None, help="DecodePolicy value (default: beam every final)"
    )
    parser.add_argument("--partial-interval-s", type=float, default=None, help="SpeechEngineSettings value")
    parser.add_argument("--max-utterance-s", type=float, default=None, help="SpeechEngineSettings value")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (merged per label and level)")
    parser.add_argument("--label", default="default", help="name of this configuration in the JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    whisper = load_whisper(args.whisper_dir, args.whisper_version)
    vad_model = ModelRepository(default_model_dir()).load("silero-vad", 1)
    vad = VadRunner(vad_model.directory, vad_model.manifest.config)
    paths = build_test_clips(cache_dir() / "test-audio")
    limit = int(args.seconds * SAMPLE_RATE_HZ)
    clips = [np.asarray(sf.read(paths[name], dtype="float32")[0][:limit], dtype=np.float32) for name in CLIP_NAMES]
    offline = whisper if args.whisper_version == 1 else load_whisper(None, 1)  # offline ``brook transcribe``: v1
    references = [result.text for result in transcribe_batch(clips, offline)]
    chunk = args.chunk_ms * SAMPLE_RATE_HZ // 1000
    settings = build_settings(args)

    header = (
        f"{'N':>3} {'partial p50':>11} {'p95':>5} {'word p95':>8} {'final p50':>9} {'p95':>5} {'WER':>5} "
        f"{'RTF':>6} {'CPU/s':>6} {'busy%':>6} {'drain s':>7} {'partials':>8} {'enc batch':>9} {'load':>5}"
    )
    print(
        f"{args.seconds:.0f} s per stream, {args.chunk_ms} ms chunks, real-time pace, label {args.label!r}; "
        f"latencies in seconds; {settings}"
    )
    print(header)
    payload: dict[str, Any] = {"runs": {}}
    if args.json.is_file():
        payload = json.loads(args.json.read_text(encoding="utf-8"))
    for level in (int(value) for value in args.streams.split(",")):
        row = asyncio.run(run_level(whisper, vad, clips, references, level, chunk, settings))
        print(
            f"{row['streams']:>3.0f} {row['partial_p50']:>11.2f} {row['partial_p95']:>5.2f} {row['word_p95']:>8.2f} "
            f"{row['final_p50']:>9.2f} {row['final_p95']:>5.2f} {row['wer']:>5.3f} {row['rtf']:>6.3f} "
            f"{row['cpu_per_audio_s']:>6.3f} {row['busy_pct']:>6.1f} {row['drain_s']:>7.2f} "
            f"{row['partials_per_stream']:>8.1f} {row['mean_encode_batch']:>9.2f} {row['load_1m_before']:>5.2f}",
            flush=True,
        )
        stages = ", ".join(f"{key[:-14]} {value:.3f}" for key, value in row.items() if key.endswith("_s_per_audio_s"))
        included = " (decode includes beam)" if "beam_s_per_audio_s" in row else ""
        print(f"    busy seconds per audio second by stage: {stages}{included}", flush=True)
        run = payload.setdefault("runs", {}).setdefault(args.label, {"levels": {}})
        run["settings"] = {"seconds": args.seconds, "chunk_ms": args.chunk_ms, "engine": repr(settings)}
        run["levels"][str(level)] = {**row, "machine": machine_facts()}
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
