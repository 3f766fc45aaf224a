"""The event-loop lag monitor: a blocked loop shows up as lag, in the monitor's summary and in /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.repository import ModelRepository
from app.server.loop_monitor import EventLoopMonitor
from app.server.metrics import Metrics
from tests.conftest import ARTIFACT_DIR
from tests.generic_models import copy_rainfall
from tests.server_process import RunningServer, run_server

BLOCK_S = 0.3


def test_blocking_the_loop_is_recorded_as_lag() -> None:
    metrics = Metrics()

    async def scenario() -> EventLoopMonitor:
        monitor = EventLoopMonitor(0.01, observe=metrics.event_loop_lag.observe)
        monitor.start()
        await asyncio.sleep(0.05)  # a few undisturbed ticks
        time.sleep(BLOCK_S)  # block the loop on purpose: the pending timer wakes up about BLOCK_S late
        while monitor.count == 0 or monitor.max_s < BLOCK_S / 2:
            await asyncio.sleep(0.01)
        await monitor.stop()
        return monitor

    monitor = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert not monitor.running
    summary = monitor.summary(3600)
    assert summary["samples"] == monitor.count >= 2
    assert summary["max_s"] == monitor.max_s
    assert monitor.max_s >= BLOCK_S - 0.02  # it slept 10 ms at most of the block before it
    assert summary["p50_s"] <= summary["p99_s"] <= summary["max_s"]
    text = metrics.render().decode()
    assert f"brook_event_loop_lag_seconds_count {float(monitor.count)}" in text
    assert 'brook_event_loop_lag_seconds_bucket{le="0.1"}' in text


def test_summary_percentiles_and_window() -> None:
    now = [100.0]
    monitor = EventLoopMonitor(0.05, window_samples=1000, clock=lambda: now[0])
    for i in range(100):
        monitor.record((i + 1) / 1000, at=50.0 + i * 0.5)  # lags 1..100 ms over t = 50..99.5
    summary = monitor.summary(1000, raw=True)
    assert summary["samples"] == 100
    assert summary["p50_s"] == pytest.approx(0.050)
    assert summary["p99_s"] == pytest.approx(0.099)
    assert summary["max_s"] == pytest.approx(0.100)
    assert len(summary["lags_s"]) == 100
    recent = monitor.summary(10)  # t >= 90: the last 20 samples, lags 81..100 ms
    assert recent["samples"] == 20 and recent["p50_s"] == pytest.approx(0.090)
    assert recent["total"]["samples"] == 100 and recent["total"]["max_s"] == pytest.approx(0.100)
    empty = EventLoopMonitor(0.05).summary(10)
    assert empty["samples"] == 0 and empty["p99_s"] is None and empty["max_s"] is None


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        EventLoopMonitor(0)


@pytest.fixture(scope="module")
def small_server(
    tmp_path_factory: pytest.TempPathFactory, model_repository: ModelRepository
) -> Iterator[RunningServer]:
    """A real server with only the tiny rainfall model: the monitor runs whatever the models are."""
    repo = tmp_path_factory.mktemp("loop-repo")
    copy_rainfall(model_repository, repo)
    with run_server(ARTIFACT_DIR / "logs", model_dir=str(repo), models="rainfall", loop_monitor_interval_ms="10") as s:
        yield s


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_server_exports_event_loop_lag(small_server: RunningServer) -> None:
    deadline = time.monotonic() + 60
    while True:
        status, body = get(f"{small_server.http}/metrics/event-loop?seconds=600&raw=1")
        summary = json.loads(body)
        if status != 200 or summary["samples"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, body
    assert summary["interval_s"] == pytest.approx(0.01)
    assert summary["samples"] == len(summary["lags_s"]) > 0
    assert summary["p99_s"] >= 0 and summary["max_s"] >= summary["p50_s"]
    _, metrics = get(f"{small_server.http}/metrics")
    count = re.search(r"^brook_event_loop_lag_seconds_count ([0-9.e+]+)$", metrics.decode(), re.MULTILINE)
    assert count is not None and float(count.group(1)) > 0


def test_event_loop_endpoint_rejects_bad_window(small_server: RunningServer) -> None:
    for query in ("seconds=0", "seconds=abc", "seconds=nan"):
        status, body = get(f"{small_server.http}/metrics/event-loop?{query}")
        assert status == 400 and json.loads(body)["code"] == "invalid_request", query


def test_monitor_can_be_turned_off(tmp_path: Path, model_repository: ModelRepository) -> None:
    copy_rainfall(model_repository, tmp_path)
    with run_server(
        ARTIFACT_DIR / "logs", model_dir=str(tmp_path), models="rainfall", loop_monitor_interval_ms="0"
    ) as server:
        status, _ = get(f"{server.http}/metrics/event-loop")
        assert status == 404
        _, metrics = get(f"{server.http}/metrics")
        assert "brook_event_loop_lag_seconds_count 0.0" in metrics.decode()
