"""Measure the streaming speech engine in-process: N live streams at real-time pace, latency and real-time factor.

For each concurrency level N, N streams each push a different real recording (rotating over the test clips, each
cut to ``--seconds`` and started at a staggered offset) in ``--chunk-ms`` chunks at real-time pace, then call
``end()``. Reported per level:

- partial latency p50/p95: from the push of the last audio a partial covers to the partial being queued;
- final latency p50/p95: from the moment the end of speech was knowable (the audio completing the silence was
  pushed, or end() was called) to the final being queued;
- RTF: seconds the inference thread was busy / seconds of audio streamed by all streams; ``busy %`` is the busy
  time over the wall time: near 100 the engine is saturated, sheds late partials and lets finals queue;
- drain: the longest wait from a stream's end() to its StreamEnded (how far behind real time the engine fell);
- partials received per stream, and the mean encoder batch size.

    .venv/bin/python -m scripts.bench_speech_engine [--streams 1,4,8,16] [--seconds 30] [--chunk-ms 100]
        [--whisper-dir DIR] [--final-windows default|full|bucketed]

Whisper tiny.en comes from the model repository unless ``--whisper-dir`` (or ``$BROOK_WHISPER_MODEL_DIR``) names a
converted folder with ``config.json`` or ``manifest.json``.
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
from app.speech.vad import VadRunner
from app.speech.whisper_runner import WhisperRunner
from scripts.test_audio import build_test_clips

logger = logging.getLogger("bench_speech_engine")

SAMPLE_RATE_HZ = 16_000
CLIP_NAMES = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s", "bench_45s")
MODEL_DIR_ENV = "BROOK_WHISPER_MODEL_DIR"
STAGGER_S = 0.37  # stream i starts i * STAGGER_S seconds (mod 2 s) after the first


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


def percentile(values: list[float], fraction: float) -> float:
    return float(np.percentile(values, fraction * 100)) if values else float("nan")


def load_whisper(directory: str | None) -> WhisperRunner:
    if directory is None:
        try:
            loaded = ModelRepository(default_model_dir()).load("whisper-tiny-en", 1, check_hashes=False)
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


async def stream_one(engine: SpeechEngine, audio: np.ndarray, delay_s: float, chunk: int) -> tuple[int, float]:
    """Push ``audio`` at real-time pace; returns (partials received, time of StreamEnded after end())."""
    stream = engine.open_stream(StreamOptions())
    partials = 0

    async def consume() -> float:
        nonlocal partials
        while True:
            event = await stream.next_event()
            if isinstance(event, Transcript) and event.kind == "partial":
                partials += 1
            if isinstance(event, StreamEnded):
                return time.monotonic()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(delay_s)
    started = time.monotonic()
    for index, position in enumerate(range(0, audio.shape[0], chunk)):
        await asyncio.sleep(max(0.0, started + index * chunk / SAMPLE_RATE_HZ - time.monotonic()))
        await stream.push_audio(audio[position : position + chunk])
    await asyncio.sleep(max(0.0, started + audio.shape[0] / SAMPLE_RATE_HZ - time.monotonic()))
    ended_at = time.monotonic()
    stream.end()
    return partials, await consumer - ended_at


async def run_level(
    whisper: WhisperRunner,
    vad: VadRunner,
    clips: list[np.ndarray],
    n_streams: int,
    chunk: int,
    settings: SpeechEngineSettings,
) -> dict[str, float]:
    observer = Observer()
    engine = SpeechEngine(whisper, vad, settings, observer)
    await engine.start()
    try:
        wall = time.monotonic()
        results = await asyncio.gather(
            *(stream_one(engine, clips[i % len(clips)], (i * STAGGER_S) % 2.0, chunk) for i in range(n_streams))
        )
        wall = time.monotonic() - wall
    finally:
        await engine.shutdown()
    audio_s = sum(clips[i % len(clips)].shape[0] for i in range(n_streams)) / SAMPLE_RATE_HZ
    encode_sizes = observer.batches.get("encode", [])
    return {
        "streams": n_streams,
        "partial_p50": percentile(observer.partial_latencies, 0.5),
        "partial_p95": percentile(observer.partial_latencies, 0.95),
        "final_p50": percentile(observer.final_latencies, 0.5),
        "final_p95": percentile(observer.final_latencies, 0.95),
        "rtf": engine.busy_seconds / audio_s,
        "busy_pct": 100.0 * engine.busy_seconds / wall,
        "drain_s": max(drain for _, drain in results),
        "partials_per_stream": statistics.mean(partials for partials, _ in results),
        "mean_encode_batch": statistics.mean(encode_sizes) if encode_sizes else 0.0,
        **{f"{stage}_s_per_audio_s": seconds / audio_s for stage, seconds in observer.stage_seconds.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per push")
    parser.add_argument("--whisper-dir", default=None, help="converted Whisper folder (default: the repository)")
    parser.add_argument(
        "--final-windows", choices=("default", "full", "bucketed"), default="default", help="window size of finals"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    whisper = load_whisper(args.whisper_dir)
    vad_model = ModelRepository(default_model_dir()).load("silero-vad", 1)
    vad = VadRunner(vad_model.directory, vad_model.manifest.config)
    paths = build_test_clips(cache_dir() / "test-audio")
    limit = int(args.seconds * SAMPLE_RATE_HZ)
    clips = [np.asarray(sf.read(paths[name], dtype="float32")[0][:limit], dtype=np.float32) for name in CLIP_NAMES]
    chunk = args.chunk_ms * SAMPLE_RATE_HZ // 1000
    settings = SpeechEngineSettings()
    if args.final_windows != "default":
        full = args.final_windows == "full"
        settings = dataclasses.replace(settings, decode=dataclasses.replace(settings.decode, final_full_window=full))

    header = (
        f"{'N':>3} {'partial p50':>11} {'p95':>6} {'final p50':>9} {'p95':>6} {'RTF':>6} {'busy%':>6} "
        f"{'drain s':>7} {'partials/stream':>15} {'enc batch':>9}"
    )
    print(
        f"{args.seconds:.0f} s per stream, {args.chunk_ms} ms chunks, real-time pace, final windows "
        f"{'full' if settings.decode.final_full_window else 'bucketed'}; latencies in seconds"
    )
    print(header)
    for level in (int(value) for value in args.streams.split(",")):
        row = asyncio.run(run_level(whisper, vad, clips, level, chunk, settings))
        print(
            f"{row['streams']:>3.0f} {row['partial_p50']:>11.2f} {row['partial_p95']:>6.2f} {row['final_p50']:>9.2f} "
            f"{row['final_p95']:>6.2f} {row['rtf']:>6.3f} {row['busy_pct']:>6.1f} {row['drain_s']:>7.2f} "
            f"{row['partials_per_stream']:>15.1f} {row['mean_encode_batch']:>9.2f}",
            flush=True,
        )
        stages = ", ".join(f"{key[:-14]} {value:.3f}" for key, value in row.items() if key.endswith("_s_per_audio_s"))
        print(f"    busy seconds per audio second by stage: {stages}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
