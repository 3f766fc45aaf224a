"""Does an engine keep memory across sessions? Run rounds of sessions in-process and print RSS after each round.

Speech: each round opens 8 streams on one speech engine, pushes 20 s of a test recording into each as fast as
backpressure allows, ends them and reads every event. Chat: each round runs 8 conversations of 3 turns (32 greedy
tokens each) on one text engine. After every round: a garbage collection, ``malloc_trim`` (as the server does),
the process RSS and the bytes Python has allocated (tracemalloc); at the end, the allocation sites that grew most
since round 3.

    .venv/bin/python -m scripts.probe_engine_memory speech --rounds 12
    .venv/bin/python -m scripts.probe_engine_memory chat --rounds 14
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tracemalloc
from collections.abc import Callable

import numpy as np
import soundfile as sf

from app.convert.sources import cache_dir
from app.engine.speech_engine import SpeechEngine, SpeechEngineSettings, SpeechStream
from app.engine.speech_events import StreamEnded, StreamOptions
from app.engine.text_engine import TextEngine, TextEngineSettings
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.server.native_heap import release_free_memory
from app.text.sampling import SamplingParams
from scripts.bench_common import rss_bytes
from scripts.bench_text_engine import one_session
from scripts.test_audio import build_test_clips

SAMPLE_RATE_HZ = 16_000
SESSIONS_PER_ROUND = 8
CLIPS = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s")
SNAPSHOT_ROUND = 2


async def speech_rounds(rounds: int, report: Callable[[int], None]) -> None:
    paths = build_test_clips(cache_dir() / "test-audio")
    clips = [sf.read(str(paths[name]), dtype="float32")[0][: 20 * SAMPLE_RATE_HZ] for name in CLIPS]
    settings = SpeechEngineSettings(max_partial_lag_s=None)
    engine = SpeechEngine.from_repository(ModelRepository(default_model_dir()), settings=settings)
    await engine.start()

    async def one(stream: SpeechStream, audio: np.ndarray) -> None:
        async def push() -> None:
            for chunk in np.array_split(audio, 100):
                await stream.push_audio(chunk)
            stream.end()

        pusher = asyncio.create_task(push())
        while not isinstance(await stream.next_event(), StreamEnded):
            pass
        await pusher

    try:
        for round_index in range(rounds):
            streams = [engine.open_stream(StreamOptions()) for _ in range(SESSIONS_PER_ROUND)]
            await asyncio.gather(*(one(stream, clips[i % len(clips)]) for i, stream in enumerate(streams)))
            report(round_index)
    finally:
        await engine.shutdown()


async def chat_rounds(rounds: int, report: Callable[[int], None], params: SamplingParams, turns: int) -> None:
    loaded = ModelRepository(default_model_dir()).load("smollm2-135m-instruct")
    engine = TextEngine.from_directory(loaded.directory, loaded.manifest.config, TextEngineSettings())
    await engine.start()
    try:
        for round_index in range(rounds):
            sessions = range(round_index * SESSIONS_PER_ROUND, (round_index + 1) * SESSIONS_PER_ROUND)
            await asyncio.gather(*(one_session(engine, index, turns, params, 0.0) for index in sessions))
            report(round_index)
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=("speech", "chat"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--turns", type=int, default=3, help="chat: turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=32, help="chat: tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="chat: 0 = greedy, else fresh seeds")
    args = parser.parse_args(argv)
    tracemalloc.start(10)
    snapshots: list[tracemalloc.Snapshot] = []

    def report(round_index: int) -> None:
        gc.collect()
        release_free_memory()
        if round_index == SNAPSHOT_ROUND:
            snapshots.append(tracemalloc.take_snapshot())
        traced_mb = tracemalloc.get_traced_memory()[0] / 1e6
        rss_mb = rss_bytes(os.getpid(), with_children=False) / 2**20
        print(f"round {round_index:2d}: RSS {rss_mb:7.1f} MB, Python allocations {traced_mb:6.2f} MB", flush=True)

    if args.engine == "speech":
        asyncio.run(speech_rounds(args.rounds, report))
    else:
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        asyncio.run(chat_rounds(args.rounds, report, params, args.turns))
    if snapshots:
        print(f"allocation sites that grew most since round {SNAPSHOT_ROUND}:")
        for stat in tracemalloc.take_snapshot().compare_to(snapshots[0], "lineno")[:8]:
            print(f"  {stat}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
