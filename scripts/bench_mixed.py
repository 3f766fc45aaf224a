"""Mixed load and memory: live speech streams and multi-turn chat sessions at once against one ``brook serve``.

    .venv/bin/python -m scripts.bench_mixed [--speech 8] [--chat 8] [--minutes 10] [--sample-s 5] [--idle-s 10]
        [--max-tokens 64] [--think-s 0.5] [--turns 6] [--label default] [--json docs/bench/mixed.json]
        [--server-env KEY=VALUE ...] [--probe-memory DIR [--probe-option=--no-arena ...]]

    quick mixed run:  .venv/bin/python -m scripts.bench_mixed --speech 4 --chat 4 --minutes 1
    memory run:       .venv/bin/python -m scripts.bench_mixed --speech 8 --chat 8 --minutes 10
    idle memory only: .venv/bin/python -m scripts.bench_mixed --minutes 0 --label idle-weighted
                      .venv/bin/python -m scripts.bench_mixed --minutes 0 --label idle-all \\
                          --server-env VERSION_POLICY=all

It starts ``brook serve --no-fetch`` with the default models (``--server-env`` adds ``BROOK_*`` settings, e.g.
``VERSION_POLICY=all``), waits ``--idle-s`` and records the idle RSS, then runs for ``--minutes``:

- ``--speech`` M clients each stream real recordings (the benchmark clips of ``scripts/test_audio.py``, rotating,
  staggered) to ``/v1/listen`` as PCM16 in 100 ms chunks paced by the wall clock, like a microphone; after each
  clip they send ``end``, wait for the server's ``end`` and reconnect with the next clip;
- ``--chat`` K clients each hold a ``/v1/chat`` conversation: a user turn, the streamed reply (``--max-tokens``),
  ``--think-s`` pause, the next turn with the history kept in the server's cache; after ``--turns`` turns they
  ``reset`` and start over.

Every ``--sample-s`` it samples the server's RSS (with children), its CPU use (cores busy) and the event-loop lag
(``GET /metrics/event-loop``, raw samples of the timer that runs every 50 ms in the server). Reported:

- event-loop lag p50/p99/max over the whole load phase (raw samples pooled);
- speech: partial latency (audio sent -> partial whose ``end`` covers it) and final latency (the moment the end of
  speech was knowable: the audio completing ``vad_silence_ms`` of silence after it was sent, or ``end`` was sent,
  -> final) p50/p95, messages and errors;
- chat: TTFT p50/p95 (``chat`` sent -> first token), per-reply decode tokens/s (after the first token) p50, and
  aggregate tokens/s, cached-token share;
- RSS idle (before load), at the end of the load and after the load settles, growth % from idle and over the load
  phase itself (from the first sample after the warm-up minute, or 10 % of the run, to the end); the median RSS of
  every 2 minutes after the warm-up and the growth from the first such median to the last (the server trims its
  heap every 30 s, so single samples swing by about ±60 MB); the trend, the least-squares slope of RSS over the
  load phase after the warm-up, in MB per minute and as % of the mean RSS per 10 minutes.

``--probe-memory DIR`` runs the server under ``scripts/probe_server_memory.py`` (tracemalloc and a report every
minute in DIR: where the memory is and which allocation sites grow); its latencies are then not comparable.

The summary and a time series (for ``scripts/plot_benchmarks.py``) are merged into the JSON under ``runs[label]``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import os
import resource
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from app.convert.sources import cache_dir
from scripts.bench_common import (
    DOCS_BENCH_DIR,
    ServerProcess,
    brook_server_with,
    cpu_seconds,
    machine_facts,
    percentile,
    write_json,
)
from scripts.test_audio import build_test_clips

logger = logging.getLogger("bench_mixed")

SAMPLE_RATE_HZ = 16_000
CHUNK_S = 0.1
RSS_WINDOW_S = 120.0  # RSS medians per this many seconds of load
CLIP_NAMES = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s", "bench_45s")
STAGGER_S = 0.37  # speech stream i starts i * STAGGER_S s after the first; chat sessions likewise
VAD_SILENCE_S = 0.5  # the /v1/listen default
DEFAULT_JSON = DOCS_BENCH_DIR / "mixed.json"
QUESTIONS = (
    "What is the capital of France?",
    "Tell me one fact about its history.",
    "Which river flows through it?",
    "Name a famous museum there.",
    "What food is the city known for?",
    "Summarise our conversation in one sentence.",
    "Explain what a neural network is in two sentences.",
    "Give an example of where they are used.",
    "What is a good way to learn more about them?",
)


# ---- measurements ---------------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything the clients and the sampler observe during the load phase."""

    partial_latency_s: list[float] = field(default_factory=list)
    final_latency_s: list[float] = field(default_factory=list)
    speech_errors: list[str] = field(default_factory=list)
    speech_sessions: int = 0
    audio_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replies: int = 0
    chat_errors: list[str] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


# ---- speech clients -------------------------------------------------------------------------------------------


def load_clips() -> list[np.ndarray]:
    paths = build_test_clips(cache_dir() / "test-audio")
    return [np.asarray(sf.read(paths[name], dtype="float32")[0], dtype=np.float32) for name in CLIP_NAMES]


def pcm16(audio: np.ndarray) -> bytes:
    return bytes((np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


class SentClock:
    """When each stream second was sent: wall time of the chunk that carried a given stream time."""

    def __init__(self) -> None:
        self.ends: list[float] = []  # stream time at the end of chunk i
        self.sent: list[float] = []  # perf_counter() when chunk i was sent
        self.end_sent: float | None = None  # when {"type":"end"} was sent

    def add(self, stream_end_s: float, at: float) -> None:
        self.ends.append(stream_end_s)
        self.sent.append(at)

    def sent_at(self, stream_s: float) -> float | None:
        """When the audio up to ``stream_s`` had been sent (None if not yet)."""
        index = bisect.bisect_left(self.ends, stream_s - 1e-6)
        return self.sent[index] if index < len(self.sent) else None


async def speech_client(url: str, clips: Sequence[np.ndarray], index: int, results: Results) -> None:
    await asyncio.sleep(index * STAGGER_S)
    clip_index = index
    while not results.stop.is_set():
        clip = clips[clip_index % len(clips)]
        clip_index += 1
        try:
            await stream_one(url, clip, results)
        except (OSError, WebSocketException, TimeoutError) as exc:
            results.speech_errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)


async def stream_one(url: str, clip: np.ndarray, results: Results) -> None:
    clock = SentClock()
    async with connect(url, max_size=None) as ws:
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            results.speech_errors.append(str(ready))
            return
        results.speech_sessions += 1
        sender = asyncio.create_task(send_paced(ws, clip, clock, results))
        try:
            async for raw in ws:
                received = time.perf_counter()
                event = json.loads(raw)
                record_speech_event(event, received, clock, results)
                if event.get("type") == "end":
                    break
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


async def send_paced(ws: ClientConnection, clip: np.ndarray, clock: SentClock, results: Results) -> None:
    step = int(CHUNK_S * SAMPLE_RATE_HZ)
    started = time.perf_counter()
    for chunk_index, offset in enumerate(range(0, len(clip), step)):
        if results.stop.is_set():
            break
        await asyncio.sleep(max(0.0, started + chunk_index * CHUNK_S - time.perf_counter()))
        chunk = clip[offset : offset + step]
        await ws.send(pcm16(chunk))
        clock.add((offset + len(chunk)) / SAMPLE_RATE_HZ, time.perf_counter())
        results.audio_s += len(chunk) / SAMPLE_RATE_HZ
    clock.end_sent = time.perf_counter()
    await ws.send(json.dumps({"type": "end"}))


def record_speech_event(event: dict[str, Any], received: float, clock: SentClock, results: Results) -> None:
    kind = event.get("type")
    if kind == "partial":
        sent = clock.sent_at(float(event["end"]))
        if sent is not None:
            results.partial_latency_s.append(received - sent)
    elif kind == "final":
        knowable = clock.sent_at(float(event["end"]) + VAD_SILENCE_S)
        if knowable is None or (clock.end_sent is not None and clock.end_sent < knowable):
            knowable = clock.end_sent
        if knowable is not None:
            results.final_latency_s.append(max(0.0, received - knowable))
    elif kind == "error":
        results.speech_errors.append(f"{event.get('code')}: {event.get('message')}")


# ---- chat clients ---------------------------------------------------------------------------------------------


async def chat_client(url: str, index: int, args: argparse.Namespace, results: Results) -> None:
    await asyncio.sleep(index * STAGGER_S)
    while not results.stop.is_set():
        try:
            async with connect(url) as ws:
                ready = json.loads(await ws.recv())
                if ready.get("type") != "ready":
                    results.chat_errors.append(str(ready))
                    await asyncio.sleep(1.0)
                    continue
                await chat_conversations(ws, index, args, results)
        except (OSError, WebSocketException, TimeoutError) as exc:
            results.chat_errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)


async def chat_conversations(ws: ClientConnection, index: int, args: argparse.Namespace, results: Results) -> None:
    turn = 0
    while not results.stop.is_set():
        if turn and turn % args.turns == 0:
            await ws.send(json.dumps({"type": "reset"}))
        question = QUESTIONS[(index + turn) % len(QUESTIONS)]
        turn += 1
        message = {
            "type": "chat",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens,
            "temperature": 0.2,
            "seed": index * 1000 + turn,
        }
        sent = time.perf_counter()
        await ws.send(json.dumps(message))
        first: float | None = None
        while True:
            event = json.loads(await ws.recv())
            now = time.perf_counter()
            if event["type"] == "token":
                if first is None:
                    first = now
                    results.ttft_s.append(now - sent)
            elif event["type"] == "done":
                record_reply(event, first, now, results)
                break
            elif event["type"] == "error":
                results.chat_errors.append(f"{event.get('code')}: {event.get('message')}")
                if event.get("code") == "context_exceeded":
                    await ws.send(json.dumps({"type": "reset"}))
                    turn = 0
                break
        await asyncio.sleep(args.think_s)


def record_reply(done: dict[str, Any], first: float | None, now: float, results: Results) -> None:
    usage = done.get("usage", {})
    tokens = int(usage.get("completion_tokens", 0))
    results.replies += 1
    results.completion_tokens += tokens
    results.prompt_tokens += int(usage.get("prompt_tokens", 0))
    results.cached_tokens += int(usage.get("cached_tokens", 0))
    if first is not None and tokens > 1 and now > first:
        results.decode_tok_s.append((tokens - 1) / (now - first))


# ---- sampling the server --------------------------------------------------------------------------------------


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@dataclass
class Sampler:
    server: ServerProcess
    started: float
    last_cpu: float = 0.0
    last_at: float = 0.0

    def __post_init__(self) -> None:
        self.last_cpu, self.last_at = cpu_seconds(self.server.pid), time.perf_counter()

    def sample(self, phase: str, window_s: float) -> tuple[dict[str, Any], list[float]]:
        """One time-series point and the raw lag samples of the last ``window_s``."""
        if self.server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {self.server.process.returncode}:\n{self.server.log_tail()}")
        now, cpu = time.perf_counter(), cpu_seconds(self.server.pid)
        cores = (cpu - self.last_cpu) / max(1e-9, now - self.last_at)
        self.last_cpu, self.last_at = cpu, now
        lags: list[float] = []
        try:
            lag = get_json(f"{self.server.http}/metrics/event-loop?seconds={window_s:g}&raw=1")
            lags = [float(x) for x in lag.get("lags_s", [])]
        except (urllib.error.URLError, OSError, ValueError) as exc:
            logger.warning("no event-loop lag: %s", exc)
        point = {
            "t_s": round(now - self.started, 2),
            "phase": phase,
            "rss_mb": round(self.server.rss_bytes() / 2**20, 1),
            "cpu_cores": round(cores, 3),
            "lag_p50_ms": _ms(percentile(lags, 0.5)),
            "lag_p99_ms": _ms(percentile(lags, 0.99)),
            "lag_max_ms": _ms(max(lags)) if lags else None,
            "load_average_1m": round(_load_average(), 2),
        }
        return point, lags


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 2)


def _load_average() -> float:
    return os.getloadavg()[0]


async def sample_phase(
    sampler: Sampler, phase: str, seconds: float, interval_s: float, results: Results, *, keep_lags: bool
) -> None:
    deadline = time.perf_counter() + seconds
    while True:
        remaining = deadline - time.perf_counter()
        await asyncio.sleep(max(0.0, min(interval_s, remaining)))
        point, lags = await asyncio.to_thread(sampler.sample, phase, interval_s)
        point.update(speech_sessions=results.speech_sessions, replies=results.replies)
        results.series.append(point)
        if keep_lags:
            results.lag_s.extend(lags)
        logger.info(
            "%s t=%5.0fs rss %6.1f MB  cpu %.2f cores  lag p99 %s ms  load %.1f",
            phase,
            point["t_s"],
            point["rss_mb"],
            point["cpu_cores"],
            point["lag_p99_ms"],
            point["load_average_1m"],
        )
        if time.perf_counter() >= deadline - 1e-3:
            return


# ---- the run --------------------------------------------------------------------------------------------------


async def run(server: ServerProcess, args: argparse.Namespace, clips: list[np.ndarray]) -> dict[str, Any]:
    results = Results()
    sampler = Sampler(server, time.perf_counter())
    await sample_phase(sampler, "idle", args.idle_s, min(args.sample_s, args.idle_s), results, keep_lags=False)
    idle_rss = [p["rss_mb"] for p in results.series if p["phase"] == "idle"]
    if args.minutes <= 0:  # idle memory only
        return summarise(results, args, idle_rss, 0.0, 0.0, 0.0)
    listen_url, chat_url = f"{server.ws}/v1/listen", f"{server.ws}/v1/chat"
    client_cpu_start = _client_cpu()
    server_cpu_start, load_started = cpu_seconds(server.pid), time.perf_counter()
    clients = [asyncio.create_task(speech_client(listen_url, clips, i, results)) for i in range(args.speech)]
    clients += [asyncio.create_task(chat_client(chat_url, i, args, results)) for i in range(args.chat)]
    try:
        await sample_phase(sampler, "load", args.minutes * 60, args.sample_s, results, keep_lags=True)
    finally:
        results.stop.set()
        load_s = time.perf_counter() - load_started
        server_cpu = cpu_seconds(server.pid) - server_cpu_start
        await asyncio.sleep(0)
        _, pending = await asyncio.wait(clients, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    client_cpu = _client_cpu() - client_cpu_start
    await sample_phase(sampler, "after", args.settle_s, min(args.sample_s, args.settle_s), results, keep_lags=False)
    outcome = summarise(results, args, idle_rss, load_s, server_cpu, client_cpu)
    outcome["summary"]["server_view"] = await asyncio.to_thread(server_means, server)
    return outcome


SERVER_HISTOGRAMS = ("brook_partial_latency_seconds", "brook_final_latency_seconds", "brook_ttft_seconds")


def server_means(server: ServerProcess) -> dict[str, float | None]:
    """Mean of each latency histogram in ``/metrics`` since start (the server's own view, a cross-check)."""
    try:
        with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as response:
            return histogram_means(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        logger.warning("no /metrics: %s", exc)
        return {}


def histogram_means(text: str) -> dict[str, float | None]:
    """``{partial_latency_mean_ms, final_latency_mean_ms, ttft_mean_ms}`` from Prometheus text (all label sets)."""
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name in SERVER_HISTOGRAMS}
    for line in text.splitlines():
        for name in SERVER_HISTOGRAMS:
            for index, suffix in enumerate(("_sum", "_count")):
                if line.startswith(name + suffix):
                    totals[name][index] += float(line.rsplit(" ", 1)[1])
    return {
        f"{name.removeprefix('brook_').removesuffix('_seconds')}_mean_ms": round(1000 * total / count, 1)
        if count
        else None
        for name, (total, count) in totals.items()
    }


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarise(
    results: Results,
    args: argparse.Namespace,
    idle_rss: list[float],
    load_s: float,
    server_cpu: float,
    client_cpu: float,
) -> dict[str, Any]:
    load_points = [p for p in results.series if p["phase"] == "load"]
    after_points = [p for p in results.series if p["phase"] == "after"]
    warm_after_s = min(60.0, 0.1 * args.minutes * 60)
    warm_points = [p for p in load_points if p["t_s"] - load_points[0]["t_s"] >= warm_after_s] or load_points
    rss_idle = idle_rss[-1] if idle_rss else None
    rss_warm = warm_points[0]["rss_mb"] if warm_points else None
    rss_end = load_points[-1]["rss_mb"] if load_points else None
    rss_after = after_points[-1]["rss_mb"] if after_points else None
    rss_peak = max((p["rss_mb"] for p in load_points), default=None)
    rss_windows = window_medians(warm_points, RSS_WINDOW_S)
    trend = rss_trend_mb_per_min(warm_points)
    warm_mean = float(np.mean([p["rss_mb"] for p in warm_points])) if warm_points else None

    def pct(values: list[float], q: float, scale: float = 1000.0) -> float | None:
        value = percentile(values, q)
        return None if math.isnan(value) else round(value * scale, 1)

    summary = {
        "event_loop_lag_ms": {
            "p50": pct(results.lag_s, 0.5),
            "p99": pct(results.lag_s, 0.99),
            "max": round(max(results.lag_s) * 1000, 1) if results.lag_s else None,
            "samples": len(results.lag_s),
        },
        "speech": {
            "streams": args.speech,
            "sessions": results.speech_sessions,
            "audio_s": round(results.audio_s, 1),
            "partial_latency_ms": {
                "p50": pct(results.partial_latency_s, 0.5),
                "p95": pct(results.partial_latency_s, 0.95),
                "count": len(results.partial_latency_s),
            },
            "final_latency_ms": {
                "p50": pct(results.final_latency_s, 0.5),
                "p95": pct(results.final_latency_s, 0.95),
                "count": len(results.final_latency_s),
            },
            "errors": len(results.speech_errors),
            "first_errors": results.speech_errors[:5],
        },
        "chat": {
            "sessions": args.chat,
            "replies": results.replies,
            "completion_tokens": results.completion_tokens,
            "ttft_ms": {"p50": pct(results.ttft_s, 0.5), "p95": pct(results.ttft_s, 0.95)},
            "decode_tok_s_per_stream_p50": pct(results.decode_tok_s, 0.5, 1.0),
            "aggregate_tok_s": round(results.completion_tokens / load_s, 1) if load_s > 0 else None,
            "cached_token_share": round(results.cached_tokens / results.prompt_tokens, 3)
            if results.prompt_tokens
            else None,
            "errors": len(results.chat_errors),
            "first_errors": results.chat_errors[:5],
        },
        "rss_mb": {
            "idle": rss_idle,
            "warm": rss_warm,
            "end_of_load": rss_end,
            "peak": rss_peak,
            "after": rss_after,
            "growth_from_idle_pct": _growth(rss_idle, rss_end),
            "growth_during_load_pct": _growth(rss_warm, rss_end),
            "warm_after_s": warm_after_s,
            "window_s": RSS_WINDOW_S,
            "window_medians": rss_windows,
            "growth_of_medians_pct": _growth(rss_windows[0], rss_windows[-1]) if len(rss_windows) > 1 else None,
            "trend_mb_per_min": None if trend is None else round(trend, 2),
            "trend_pct_per_10min": None if trend is None or not warm_mean else round(1000.0 * trend / warm_mean, 2),
        },
        "cpu": {
            "server_cores_mean": round(server_cpu / load_s, 3) if load_s > 0 else None,
            "client_cores_mean": round(client_cpu / load_s, 3) if load_s > 0 else None,
            "load_seconds": round(load_s, 1),
        },
    }
    raw = {
        "partial_latency_s": _rounded(results.partial_latency_s),
        "final_latency_s": _rounded(results.final_latency_s),
        "ttft_s": _rounded(results.ttft_s),
        "decode_tok_s": _rounded(results.decode_tok_s),
        "event_loop_lag_s": _rounded(results.lag_s, 5),
    }
    return {"summary": summary, "series": results.series, "raw": raw}


def window_medians(points: list[dict[str, Any]], window_s: float) -> list[float]:
    """Median RSS of each whole ``window_s`` of ``points`` (from the first point on): the heap trim every 30 s makes
    single samples swing by ±60 MB, medians show the trend."""
    if not points:
        return []
    start = points[0]["t_s"]
    windows: dict[int, list[float]] = {}
    for point in points:
        windows.setdefault(int((point["t_s"] - start) // window_s), []).append(point["rss_mb"])
    last_whole = int((points[-1]["t_s"] - start) // window_s) - 1  # the last window is cut short
    medians = [round(float(np.median(windows[i])), 1) for i in sorted(windows) if i <= max(0, last_whole)]
    return medians


def rss_trend_mb_per_min(points: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of RSS over time: the creep under the sawtooth of the heap trims (None: < 2 points)."""
    if len(points) < 2:
        return None
    minutes = np.array([p["t_s"] for p in points]) / 60.0
    return float(np.polyfit(minutes, np.array([p["rss_mb"] for p in points]), 1)[0])


def _growth(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= 0:
        return None
    return round(100.0 * (after - before) / before, 2)


def _rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]


def print_table(label: str, summary: dict[str, Any]) -> None:
    lag, speech, chat, rss = summary["event_loop_lag_ms"], summary["speech"], summary["chat"], summary["rss_mb"]
    rows = [
        (
            "event-loop lag p50 / p99 / max (ms)",
            f"{lag['p50']} / {lag['p99']} / {lag['max']}  ({lag['samples']} samples)",
        ),
        (
            "speech partial latency p50 / p95 (ms)",
            f"{speech['partial_latency_ms']['p50']} / {speech['partial_latency_ms']['p95']}",
        ),
        (
            "speech final latency p50 / p95 (ms)",
            f"{speech['final_latency_ms']['p50']} / {speech['final_latency_ms']['p95']}",
        ),
        ("speech streams / sessions / errors", f"{speech['streams']} / {speech['sessions']} / {speech['errors']}"),
        ("chat TTFT p50 / p95 (ms)", f"{chat['ttft_ms']['p50']} / {chat['ttft_ms']['p95']}"),
        ("chat tok/s per stream p50 / aggregate", f"{chat['decode_tok_s_per_stream_p50']} / {chat['aggregate_tok_s']}"),
        ("chat sessions / replies / errors", f"{chat['sessions']} / {chat['replies']} / {chat['errors']}"),
        (
            "RSS idle / warm / end / after (MB)",
            f"{rss['idle']} / {rss['warm']} / {rss['end_of_load']} / {rss['after']}",
        ),
        ("RSS growth from idle / during load (%)", f"{rss['growth_from_idle_pct']} / {rss['growth_during_load_pct']}"),
        (f"RSS medians per {RSS_WINDOW_S:.0f} s (MB)", " ".join(f"{m:.0f}" for m in rss["window_medians"])),
        ("RSS growth of those medians (%)", f"{rss['growth_of_medians_pct']}"),
        ("RSS trend (MB/min; % per 10 min)", f"{rss['trend_mb_per_min']}; {rss['trend_pct_per_10min']}"),
        ("server CPU cores (mean)", f"{summary['cpu']['server_cores_mean']}"),
    ]
    if summary["cpu"]["load_seconds"] == 0:  # --minutes 0: idle memory only
        rows = [row for row in rows if row[0].startswith("RSS idle")]
    print(f"\nmixed load [{label}]")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def merge_json(path: Path, label: str, run_result: dict[str, Any], config: dict[str, Any]) -> None:
    payload: dict[str, Any] = {"benchmark": "mixed", "runs": {}}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(existing, dict) and isinstance(existing.get("runs"), dict):
                payload = existing
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; starting it over", path)
    payload["runs"][label] = {"machine": machine_facts(), "config": config, **run_result}
    write_json(path, payload)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--speech", type=int, default=8, help="concurrent speech streams (real-time pace)")
    parser.add_argument("--chat", type=int, default=8, help="concurrent multi-turn chat sessions")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load phase")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples of RSS, CPU and lag")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle seconds before the load (idle RSS)")
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle seconds after the load")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per chat reply")
    parser.add_argument("--think-s", type=float, default=0.5, help="pause between a reply and the next turn")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation before a reset")
    parser.add_argument("--label", default="default", help="name of this run in the JSON")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra BROOK_ setting for the server, without the prefix (repeatable)",
    )
    parser.add_argument(
        "--probe-memory", type=Path, metavar="DIR", help="run the server under scripts.probe_server_memory"
    )
    parser.add_argument(
        "--probe-option", action="append", default=[], help="option for scripts.probe_server_memory (repeatable)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.server_env)
    settings = {key.lower().removeprefix("brook_"): value for key, value in settings.items()}
    clips = load_clips()
    skipped = {"json", "server_env", "probe_memory", "probe_option"}
    config = {**{k: v for k, v in vars(args).items() if k not in skipped}, "server_env": settings}
    launcher: tuple[str, ...] = ("app.cli",)
    if args.probe_memory is not None:
        launcher = ("scripts.probe_server_memory", "--report-dir", str(args.probe_memory), *args.probe_option, "--")
        config["probe_memory"] = args.probe_option or True
    with brook_server_with("brook-mixed", settings, launcher=launcher) as server:
        result = asyncio.run(run(server, args, clips))
    print_table(args.label, result["summary"])
    merge_json(args.json, args.label, result, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
