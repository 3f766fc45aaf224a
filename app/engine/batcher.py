"""Dynamic batching, as Triton's dynamic batcher does it: concurrent requests to one model version share one call.

``BatchQueue`` is the pure policy. Requests go in with their row count (the size of their batch dimension), their
arrival time and a compatibility key (requests can share a call only when every input has the same dtype and the
same shape after the batch dimension). ``next_batch(now)`` says which queued requests to run together now, or
returns None; ``deadline()`` then says when to ask again. A batch is formed from the oldest request and the later
compatible ones, in arrival order, and it is sent when

- it is full: ``max_batch_size`` rows, or the next compatible request would not fit;
- its row count reaches a preferred batch size exactly (the largest one reached is sent, the rest waits);
- the oldest request has waited ``max_queue_delay_s`` (everything that fits is sent).

Requests are never split across calls, and a request is never reordered behind a younger compatible one.

``DynamicBatcher`` is the asyncio façade. ``submit(inputs)`` queues a request and awaits its outputs. One task per
batcher forms batches only while the model is idle (so requests that arrive during a call join the next one), and
runs each in the batcher's own single-thread executor: concatenate the inputs along axis 0, run the model, split
every output back by rows. If a merged call fails, each of its requests is retried alone so that one bad request
cannot fail its neighbours. On shutdown every waiting request fails with ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from app.errors import EngineDeadError, OverloadedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Tensors = dict[str, np.ndarray]
RunBatch = Callable[[Tensors], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version batches. With ``enabled`` False every request runs alone, in arrival order."""

    max_batch_size: int  # most rows in one call; larger requests must be refused before they are queued
    max_queue_delay_s: float = 0.0  # how long the oldest request may wait for others to join its batch
    preferred_batch_sizes: tuple[int, ...] = ()  # row counts that are sent at once, without waiting for the delay
    enabled: bool = True  # False: no merging (batching "off")
    max_queue_size: int = 0  # requests that may wait; more are refused with OverloadedError (0: unbounded)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")
        bad = [size for size in self.preferred_batch_sizes if not 1 <= size <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes must be within 1..{self.max_batch_size}, got {bad}")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")


@dataclass(eq=False)
class _Queued(Generic[T]):
    item: T
    rows: int
    key: Hashable
    arrived_at: float


class BatchQueue(Generic[T]):
    """The pure batching policy over a FIFO of requests. No clocks, threads or asyncio: time is passed in."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._queue: list[_Queued[T]] = []

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def pending_rows(self) -> int:
        return sum(q.rows for q in self._queue)

    def add(self, item: T, rows: int, key: Hashable, now: float) -> None:
        """Queue a request of `rows` rows. Raises ValueError for a row count the policy can never run."""
        if not 1 <= rows <= self.policy.max_batch_size:
            raise ValueError(f"a request must have 1..{self.policy.max_batch_size} rows, got {rows}")
        if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
            raise OverloadedError(f"the queue already holds {len(self._queue)} requests (max_queue_size)")
        self._queue.append(_Queued(item, rows, key, now))

    def discard(self, item: T) -> bool:
        """Remove a request that is still waiting (its caller gave up). True if it was queued."""
        for index, queued in enumerate(self._queue):
            if queued.item is item:
                del self._queue[index]
                return True
        return False

    def deadline(self) -> float | None:
        """When the oldest request's queue delay runs out (None when the queue is empty)."""
        if not self._queue:
            return None
        return self._queue[0].arrived_at + self.policy.max_queue_delay_s

    def next_batch(self, now: float) -> list[T] | None:
        """The requests to run together now (removed from the queue), or None to keep waiting."""
        if not self._queue:
            return None
        if not self.policy.enabled:
            return [self._queue.pop(0).item]
        chosen = self._candidates()
        rows = sum(q.rows for q in chosen)
        full = rows == self.policy.max_batch_size or len(chosen) < self._compatible_count()
        expired = now >= self._queue[0].arrived_at + self.policy.max_queue_delay_s
        if not (full or expired):
            preferred = self._preferred_prefix(chosen)
            if preferred == 0:
                return None
            chosen = chosen[:preferred]
        return self._take(chosen)

    def drain(self) -> list[T]:
        """Remove and return every waiting request (at shutdown)."""
        items = [q.item for q in self._queue]
        self._queue.clear()
        return items

    def _candidates(self) -> list[_Queued[T]]:
        """The oldest request plus later compatible ones, in order, until the next would not fit."""
        head = self._queue[0]
        chosen: list[_Queued[T]] = []
        rows = 0
        for queued in self._queue:
            if queued.key != head.key:
                continue
            if rows + queued.rows > self.policy.max_batch_size:
                break
            chosen.append(queued)
            rows += queued.rows
        return chosen

    def _compatible_count(self) -> int:
        head_key = self._queue[0].key
        return sum(1 for q in self._queue if q.key == head_key)

    def _preferred_prefix(self, chosen: Sequence[_Queued[T]]) -> int:
        """How many of `chosen` make up the largest preferred batch size reached exactly (0: none)."""
        best_count, best_rows, rows = 0, 0, 0
        for count, queued in enumerate(chosen, start=1):
            rows += queued.rows
            if rows in self.policy.preferred_batch_sizes and rows > best_rows:
                best_count, best_rows = count, rows
        return best_count

    def _take(self, chosen: Sequence[_Queued[T]]) -> list[T]:
        taken = {id(q) for q in chosen}
        self._queue = [q for q in self._queue if id(q) not in taken]
        return [q.item for q in chosen]


class BatchObserver(Protocol):
    """Metrics hooks, called on the event loop after each model call."""

    def on_batch(self, rows: int, requests: int, seconds: float) -> None:
        """After every model call: rows and requests it held, and its wall time."""

    def on_queue_time(self, seconds: float) -> None:
        """For every request that starts running: seconds it waited in the queue."""


def batch_key(inputs: Mapping[str, np.ndarray]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """Requests with equal keys can be concatenated along axis 0: same names, dtypes, and shapes after axis 0."""
    return tuple(sorted((name, array.dtype.str, tuple(array.shape[1:])) for name, array in inputs.items()))


class BatchSplitError(RuntimeError):
    """A model output does not keep the batch dimension, so a merged call cannot be split back."""


def run_merged(run_batch: RunBatch, requests: Sequence[Mapping[str, np.ndarray]], rows: Sequence[int]) -> list[Tensors]:
    """Concatenate `requests` along axis 0, run them in one call, and split every output back by `rows`."""
    if len(requests) == 1:
        return [dict(run_batch(dict(requests[0])))]
    merged = {name: np.concatenate([r[name] for r in requests], axis=0) for name in requests[0]}
    outputs = run_batch(merged)
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise BatchSplitError(
                f"output {name!r} has shape {list(array.shape)} for a batch of {total} rows; the model does not keep "
                "the batch dimension in this output, so it must be served with max_batch_size = 0"
            )
    offsets = itertools.accumulate(rows, initial=0)
    return [{name: array[start:end] for name, array in outputs.items()} for start, end in itertools.pairwise(offsets)]


@dataclass(eq=False)
class _Request:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[Tensors]
    arrived_at: float


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into model calls by a ``BatchPolicy``. Create and use it on one loop."""

    def __init__(self, run_batch: RunBatch, policy: BatchPolicy, *, name: str = "model",
                 observer: BatchObserver | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.name = name
        self.executions = 0  # model calls made (a merged call and its single-request retries count separately)
        self._run_batch = run_batch
        self._observer = observer
        self._clock = clock
        self._queue: BatchQueue[_Request] = BatchQueue(policy)
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0

    @property
    def active_requests(self) -> int:
        """Requests waiting or running."""
        return len(self._queue) + self._in_flight

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.name}")
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> Tensors:
        """Run one request of `rows` rows (every input's axis 0) and return its outputs (`rows` rows each).

        Raises ``OverloadedError`` when the queue is full, ``EngineDeadError`` after shutdown, and whatever the
        model raised for this request.
        """
        if self._closed or self._task is None:
            raise EngineDeadError(f"the batcher of {self.name} is not running")
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        request = _Request(inputs, rows, future, self._clock())
        key = batch_key(inputs) if self.policy.enabled else None
        self._queue.add(request, rows, key, request.arrived_at)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._queue.discard(request)
            raise

    async def shutdown(self) -> None:
        """Fail waiting requests, stop the loop (a running call's requests fail too) and free the executor."""
        self._closed = True
        for request in self._queue.drain():
            _fail(request, EngineDeadError(f"{self.name} was unloaded or the server is shutting down"))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _loop(self) -> None:
        try:
            while True:
                batch = self._queue.next_batch(self._clock())
                if batch is None:
                    self._wakeup.clear()
                    deadline = self._queue.deadline()
                    timeout = None if deadline is None else max(0.0, deadline - self._clock())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
                    continue
                live = [r for r in batch if not r.future.done()]
                if live:
                    await self._run(live)
        except Exception as exc:  # a bug in the loop: no request may wait forever
            logger.exception("batcher of %s crashed", self.name)
            self._closed = True
            for request in self._queue.drain():
                _fail(request, EngineDeadError(f"the batcher of {self.name} crashed: {exc}"))

    async def _run(self, batch: list[_Request]) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        started = self._clock()
        if self._observer is not None:
            for request in batch:
                self._observer.on_queue_time(started - request.arrived_at)
        self._in_flight = len(batch)
        try:
            results = await loop.run_in_executor(self._executor, self._execute, batch)
        except asyncio.CancelledError:
            for request in batch:
                _fail(request, EngineDeadError(f"{self.name} was unloaded while this request was running"))
            raise
        finally:
            self._in_flight = 0
        if self._observer is not None:
            self._observer.on_batch(sum(r.rows for r in batch), len(batch), self._clock() - started)
        for request, result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)

    def _execute(self, batch: Sequence[_Request]) -> list[Tensors | BaseException]:
        """In the executor: one merged call; if it fails with more than one request, each request alone."""
        self.executions += 1
        try:
            return list(run_merged(self._run_batch, [r.inputs for r in batch], [r.rows for r in batch]))
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            logger.warning("merged call of %d requests to %s failed (%s); retrying each alone", len(batch),
                           self.name, exc)
        results: list[Tensors | BaseException] = []
        for request in batch:
            self.executions += 1
            try:
                results.append(dict(self._run_batch(dict(request.inputs))))
            except Exception as exc:
                results.append(exc)
        return results


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
