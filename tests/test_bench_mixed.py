"""The pure parts of scripts/bench_mixed.py: how latencies are derived from client events, and the summary."""

from __future__ import annotations

import argparse

import pytest

from scripts.bench_mixed import (
    Results,
    SentClock,
    histogram_means,
    record_speech_event,
    rss_trend_mb_per_min,
    summarise,
    window_medians,
)


def clock_of(chunks: int, started: float = 100.0) -> SentClock:
    """Chunk i (0.1 s of audio) sent at ``started + i * 0.1``."""
    clock = SentClock()
    for index in range(chunks):
        clock.add((index + 1) * 0.1, started + index * 0.1)
    return clock


def test_sent_clock_finds_the_chunk_that_carried_a_stream_time() -> None:
    clock = clock_of(10)
    assert clock.sent_at(0.05) == 100.0
    assert clock.sent_at(0.1) == 100.0
    assert clock.sent_at(0.15) == pytest.approx(100.1)
    assert clock.sent_at(1.0) == pytest.approx(100.9)
    assert clock.sent_at(1.01) is None  # not sent yet


def test_partial_and_final_latency() -> None:
    results = Results()
    clock = clock_of(30)
    record_speech_event({"type": "partial", "end": 1.0}, 101.2, clock, results)  # audio to 1.0 s sent at 100.9
    assert results.partial_latency_s == [pytest.approx(0.3)]
    # The end of speech at 1.2 s is knowable once the 0.5 s of silence after it is sent (1.7 s, at 101.6).
    record_speech_event({"type": "final", "end": 1.2}, 101.8, clock, results)
    assert results.final_latency_s == [pytest.approx(0.2)]
    # A final flushed by `end` before that silence was sent counts from `end`.
    short = clock_of(13)
    short.end_sent = 101.25
    record_speech_event({"type": "final", "end": 1.2}, 101.45, short, results)
    assert results.final_latency_s[-1] == pytest.approx(0.2)
    record_speech_event({"type": "error", "code": "x", "message": "y"}, 0.0, clock, results)
    assert results.speech_errors == ["x: y"]


def test_histogram_means_sum_every_label_set() -> None:
    text = "\n".join(
        [
            'brook_ttft_seconds_sum{model="m",version="1"} 1.5',
            'brook_ttft_seconds_count{model="m",version="1"} 3.0',
            'brook_ttft_seconds_sum{model="m",version="2"} 0.5',
            'brook_ttft_seconds_count{model="m",version="2"} 1.0',
            'brook_ttft_seconds_bucket{model="m",version="1",le="0.5"} 2.0',
        ]
    )
    means = histogram_means(text)
    assert means["ttft_mean_ms"] == 500.0 and means["partial_latency_mean_ms"] is None


def test_summary_growth_and_idle_only_runs() -> None:
    args = argparse.Namespace(speech=1, chat=1, minutes=1.0)
    results = Results()
    results.series = [
        {"t_s": 5.0, "phase": "idle", "rss_mb": 500.0},
        *({"t_s": 5.0 + t, "phase": "load", "rss_mb": 600.0 + t} for t in range(0, 61, 5)),
        {"t_s": 70.0, "phase": "after", "rss_mb": 650.0},
    ]
    results.lag_s = [0.001] * 98 + [0.02, 0.5]
    summary = summarise(results, args, [500.0], 60.0, 30.0, 6.0)["summary"]
    assert summary["rss_mb"]["idle"] == 500.0 and summary["rss_mb"]["end_of_load"] == 660.0
    assert summary["rss_mb"]["growth_from_idle_pct"] == 32.0
    assert summary["rss_mb"]["warm"] == 610.0  # the first sample at least 10 % of the run (6 s) into the load
    assert summary["event_loop_lag_ms"]["max"] == 500.0 and summary["cpu"]["server_cores_mean"] == 0.5
    idle = summarise(Results(), argparse.Namespace(speech=0, chat=0, minutes=0.0), [520.0], 0.0, 0.0, 0.0)
    assert idle["summary"]["rss_mb"]["idle"] == 520.0 and idle["summary"]["rss_mb"]["growth_from_idle_pct"] is None


def test_rss_window_medians_ignore_the_sawtooth_and_the_cut_short_window() -> None:
    def rss(t: int) -> float:  # 800 MB, then 820 MB after 2 minutes, 900 in the last 10 s; a heap trim every 30 s
        level = 800.0 if t < 120 else 820.0 if t < 240 else 900.0
        return level - (60.0 if t % 30 == 0 else 0.0)

    points = [{"t_s": 100.0 + t, "rss_mb": rss(t)} for t in range(0, 250, 5)]
    assert window_medians(points, 120.0) == [800.0, 820.0]  # the last window, [240, 250), is cut short: left out
    assert window_medians([], 120.0) == []
    assert window_medians(points[:3], 120.0) == [800.0]  # a run shorter than one window keeps its one median


def test_rss_trend_is_the_slope_under_the_sawtooth() -> None:
    points = [{"t_s": float(t), "rss_mb": 800.0 + 2.0 * t / 60 - (60.0 if t % 30 == 0 else 0.0)} for t in range(600)]
    trend = rss_trend_mb_per_min(points)
    assert trend is not None and abs(trend - 2.0) < 0.1  # a dip at t = 0 tilts the fit a little
    assert rss_trend_mb_per_min(points[:1]) is None
