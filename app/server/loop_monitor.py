"""Event-loop lag: a timer task that sleeps a fixed interval and records how late it wakes up.

Every coroutine of the server (sockets, engines' result hand-off, HTTP) shares one event loop; anything that
blocks it (a slow callback, CPU work done on the loop, a GIL-holding thread) delays all of them. The lag of a
periodic timer is the standard way to see it: ``lag = wake-up time - planned wake-up time``. Each sample goes into
the ``brook_event_loop_lag_seconds`` histogram (``GET /metrics``) and into a bounded window of recent samples,
which ``GET /metrics/event-loop`` summarises as JSON for benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

DEFAULT_INTERVAL_S: Final = 0.05
DEFAULT_WINDOW_SAMPLES: Final = 12_000  # ten minutes at 50 ms
DEFAULT_SUMMARY_SECONDS: Final = 60.0


@dataclass(frozen=True)
class LagSample:
    at: float  # time.monotonic() of the wake-up
    lag_s: float  # how late the wake-up was


class EventLoopMonitor:
    """Samples the lag of the running event loop every ``interval_s`` (start inside the loop, stop on shutdown)."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        window_samples: int = DEFAULT_WINDOW_SAMPLES,
        observe: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._observe = observe
        self._clock = clock
        self._samples: deque[LagSample] = deque(maxlen=window_samples)
        self._task: asyncio.Task[None] | None = None
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="brook-event-loop-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            planned = self._clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = self._clock()
            self.record(max(0.0, now - planned), now)

    def record(self, lag_s: float, at: float | None = None) -> None:
        """Add one sample (the timer task calls this; tests may too)."""
        self._samples.append(LagSample(self._clock() if at is None else at, lag_s))
        self.count += 1
        self.total_s += lag_s
        self.max_s = max(self.max_s, lag_s)
        if self._observe is not None:
            self._observe(lag_s)

    def recent(self, seconds: float) -> list[LagSample]:
        """The samples of the last ``seconds`` (as many as the window still holds)."""
        since = self._clock() - seconds
        return [sample for sample in self._samples if sample.at >= since]

    def summary(self, seconds: float = DEFAULT_SUMMARY_SECONDS, *, raw: bool = False) -> dict[str, Any]:
        """Lag percentiles over the last ``seconds``, plus totals since start; ``raw`` adds every sample's lag."""
        lags = sorted(sample.lag_s for sample in self.recent(seconds))
        body: dict[str, Any] = {
            "interval_s": self.interval_s,
            "window_s": seconds,
            "samples": len(lags),
            "p50_s": _quantile(lags, 0.50),
            "p90_s": _quantile(lags, 0.90),
            "p99_s": _quantile(lags, 0.99),
            "max_s": lags[-1] if lags else None,
            "total": {
                "samples": self.count,
                "mean_s": self.total_s / self.count if self.count else None,
                "max_s": self.max_s if self.count else None,
            },
        }
        if raw:
            body["lags_s"] = [sample.lag_s for sample in self.recent(seconds)]
        return body


def _quantile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank quantile (None without values): the smallest value with at least ``fraction`` at or below it."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


async def event_loop_endpoint(request: Request) -> Response:
    """``GET /metrics/event-loop?seconds=60&raw=0``: the monitor's summary as JSON (404 when it is turned off)."""
    monitor: EventLoopMonitor | None = request.app.state.brook.loop_monitor
    if monitor is None:
        return JSONResponse(
            {
                "type": "error",
                "code": "not_found",
                "message": "the event-loop monitor is off (BROOK_LOOP_MONITOR_INTERVAL_MS=0)",
            },
            status_code=404,
        )
    try:
        seconds = float(request.query_params.get("seconds", DEFAULT_SUMMARY_SECONDS))
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        return JSONResponse(
            {"type": "error", "code": "invalid_request", "message": "seconds must be a positive number"},
            status_code=400,
        )
    raw = request.query_params.get("raw", "0").lower() in {"1", "true", "yes"}
    return JSONResponse(monitor.summary(seconds, raw=raw))
