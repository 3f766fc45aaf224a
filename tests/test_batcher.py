"""The dynamic batcher: the pure queue policy (examples and properties) and the asyncio façade with a fake model."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.batcher import (
    BatchPolicy,
    BatchQueue,
    BatchSplitError,
    DynamicBatcher,
    batch_key,
    run_merged,
)
from app.errors import EngineDeadError, OverloadedError

# --- the pure queue -------------------------------------------------------------------------------------------


def test_a_lone_request_waits_for_the_queue_delay() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.01))
    queue.add("a", 1, "k", now=1.0)
    assert queue.next_batch(1.005) is None
    assert queue.deadline() == pytest.approx(1.01)
    assert queue.next_batch(1.01) == ["a"]
    assert len(queue) == 0 and queue.deadline() is None


def test_zero_delay_sends_whatever_is_waiting() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8))
    for item in "abc":
        queue.add(item, 2, "k", now=0.0)
    assert queue.next_batch(0.0) == ["a", "b", "c"]


def test_a_full_batch_goes_at_once_and_the_rest_waits() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=4, max_queue_delay_s=10.0))
    for item in "abcde":
        queue.add(item, 1, "k", now=0.0)
    assert queue.next_batch(0.0) == ["a", "b", "c", "d"]
    assert queue.next_batch(0.0) is None
    assert queue.next_batch(10.0) == ["e"]


def test_a_batch_goes_when_the_next_request_would_not_fit() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=4, max_queue_delay_s=10.0))
    queue.add("three", 3, "k", now=0.0)
    assert queue.next_batch(0.0) is None
    queue.add("two", 2, "k", now=0.0)
    assert queue.next_batch(0.0) == ["three"], "waiting longer can not grow this batch"
    assert queue.next_batch(0.0) is None


def test_preferred_sizes_are_sent_without_waiting() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0,
                                                    preferred_batch_sizes=(2, 4)))
    queue.add("a", 1, "k", now=0.0)
    assert queue.next_batch(0.0) is None
    queue.add("b", 1, "k", now=0.0)
    queue.add("c", 1, "k", now=0.0)
    assert queue.next_batch(0.0) == ["a", "b"], "the largest preferred size reached exactly (2) is sent"
    assert queue.next_batch(0.0) is None


def test_incompatible_requests_wait_for_their_own_batch() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8))
    queue.add("a", 1, "shape-5", now=0.0)
    queue.add("b", 1, "shape-7", now=0.0)
    queue.add("c", 1, "shape-5", now=0.0)
    assert queue.next_batch(0.0) == ["a", "c"]
    assert queue.next_batch(0.0) == ["b"]


def test_disabled_batching_runs_each_request_alone_in_order() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0, enabled=False))
    for item in "abc":
        queue.add(item, 2, "k", now=0.0)
    assert [queue.next_batch(0.0) for _ in range(3)] == [["a"], ["b"], ["c"]]


def test_oversized_requests_and_a_full_queue_are_refused() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=4, max_queue_size=2))
    with pytest.raises(ValueError, match="1..4 rows, got 5"):
        queue.add("big", 5, "k", now=0.0)
    with pytest.raises(ValueError, match="got 0"):
        queue.add("empty", 0, "k", now=0.0)
    queue.add("a", 1, "k", now=0.0)
    queue.add("b", 1, "k", now=0.0)
    with pytest.raises(OverloadedError):
        queue.add("c", 1, "k", now=0.0)


def test_discard_removes_a_waiting_request() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=4))
    queue.add("a", 1, "k", now=0.0)
    queue.add("b", 1, "k", now=0.0)
    assert queue.discard("a") and not queue.discard("zzz")
    assert queue.next_batch(0.0) == ["b"]


@pytest.mark.parametrize("kwargs", [
    {"max_batch_size": 0}, {"max_batch_size": 4, "max_queue_delay_s": -1.0},
    {"max_batch_size": 4, "preferred_batch_sizes": (8,)}, {"max_batch_size": 4, "max_queue_size": -1},
])
def test_invalid_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)  # type: ignore[arg-type]


_arrivals = st.lists(st.tuples(st.integers(1, 4), st.sampled_from("xy"), st.integers(0, 3)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(arrivals=_arrivals, max_batch=st.integers(4, 9), delay=st.sampled_from([0.0, 1.0, 2.5]),
       preferred=st.sets(st.integers(1, 4), max_size=2), enabled=st.booleans())
def test_every_request_runs_exactly_once_in_order_and_within_limits(
    arrivals: list[tuple[int, str, int]], max_batch: int, delay: float, preferred: set[int], enabled: bool,
) -> None:
    policy = BatchPolicy(max_batch, delay, tuple(sorted(preferred)), enabled)
    queue: BatchQueue[tuple[int, int, str, float]] = BatchQueue(policy)
    batches: list[tuple[float, list[tuple[int, int, str, float]]]] = []
    now = 0.0
    for index, (rows, key, gap) in enumerate(arrivals):
        now += gap
        queue.add((index, rows, key, now), rows, key, now)
        while (batch := queue.next_batch(now)) is not None:
            batches.append((now, batch))
    now += delay + 1
    while (batch := queue.next_batch(now)) is not None:
        batches.append((now, batch))
    assert len(queue) == 0
    ran = [item for _, batch in batches for item in batch]
    assert sorted(i for i, *_ in ran) == list(range(len(arrivals))), "each request exactly once"
    for key in "xy":
        order = [i for i, _, k, _ in ran if k == key]
        assert order == sorted(order), "requests of one shape run in arrival order"
    for sent_at, batch in batches:
        rows = sum(r for _, r, _, _ in batch)
        assert rows <= max_batch and len({k for _, _, k, _ in batch}) == 1
        if not enabled:
            assert len(batch) == 1
        oldest = min(arrived for *_, arrived in batch)
        early = sent_at < oldest + delay
        if early and enabled:
            # Sent before the delay ran out: only because it was full, could not grow, or hit a preferred size.
            assert rows == max_batch or rows in preferred or _blocked(batch, arrivals, max_batch, sent_at)


def _blocked(batch: list[tuple[int, int, str, float]], arrivals: list[tuple[int, str, int]], max_batch: int,
             sent_at: float) -> bool:
    """True when a later compatible request, already queued when the batch was sent, would not have fit in it."""
    rows = sum(r for _, r, _, _ in batch)
    key = batch[0][2]
    last = max(i for i, *_ in batch)
    arrived_at = list(itertools.accumulate(gap for *_, gap in arrivals))
    return any(k == key and rows + r > max_batch and arrived_at[i] <= sent_at
               for i, (r, k, _) in enumerate(arrivals) if i > last)


# --- merging and splitting --------------------------------------------------------------------------------------


def _double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2, "rows": np.arange(inputs["x"].shape[0])}


def test_run_merged_splits_outputs_back_by_rows() -> None:
    requests = [{"x": np.full((n, 3), n, dtype=np.float32)} for n in (1, 3, 2)]
    results = run_merged(_double, requests, [1, 3, 2])
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["y"], request["x"] * 2)
    np.testing.assert_array_equal(results[1]["rows"], [1, 2, 3])


def test_run_merged_refuses_outputs_without_a_batch_dimension() -> None:
    def summed(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"total": np.asarray(inputs["x"].sum())}

    with pytest.raises(BatchSplitError, match="max_batch_size = 0"):
        run_merged(summed, [{"x": np.ones((1, 2))}, {"x": np.ones((1, 2))}], [1, 1])


def test_batch_key_ignores_the_batch_dimension_only() -> None:
    assert batch_key({"x": np.zeros((1, 5), np.float32)}) == batch_key({"x": np.zeros((7, 5), np.float32)})
    assert batch_key({"x": np.zeros((1, 5), np.float32)}) != batch_key({"x": np.zeros((1, 6), np.float32)})
    assert batch_key({"x": np.zeros((1, 5), np.float32)}) != batch_key({"x": np.zeros((1, 5), np.float64)})


# --- the asyncio façade -------------------------------------------------------------------------------------------


class CountingModel:
    """A fake model: doubles `x`; fails on any row holding -1. Records the rows of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(int(inputs["x"].shape[0]))
        if (inputs["x"] == -1).any():
            raise ValueError("row holds -1")
        return {"y": inputs["x"] * 2}


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.queue_times: list[float] = []

    def on_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.batches.append((rows, requests))

    def on_queue_time(self, seconds: float) -> None:
        self.queue_times.append(seconds)


def test_concurrent_requests_share_calls_and_get_their_own_rows() -> None:
    model, observer = CountingModel(), RecordingObserver()

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=16, max_queue_delay_s=0.05), name="fake",
                                 observer=observer)
        await batcher.start()
        try:
            requests = [np.full((1 + i % 3, 2), i, dtype=np.float32) for i in range(12)]
            return await asyncio.gather(*(batcher.submit({"x": x}, x.shape[0]) for x in requests))
        finally:
            await batcher.shutdown()

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((1 + i % 3, 2), 2 * i, dtype=np.float32))
    assert len(model.calls) < 12, f"12 concurrent requests took {len(model.calls)} calls"
    assert max(model.calls) <= 16
    assert sum(rows for rows, _ in observer.batches) == sum(1 + i % 3 for i in range(12))
    assert len(observer.queue_times) == 12 and all(t >= 0 for t in observer.queue_times)


def test_a_failing_request_does_not_fail_its_neighbours() -> None:
    model = CountingModel()

    async def scenario() -> list[dict[str, np.ndarray] | BaseException]:
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_s=0.05), name="fake")
        await batcher.start()
        try:
            inputs = [np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32), np.ones((1, 2), np.float32)]
            return await asyncio.gather(*(batcher.submit({"x": x}, 1) for x in inputs), return_exceptions=True)
        finally:
            await batcher.shutdown()

    good, bad, also_good = asyncio.run(scenario())
    assert isinstance(bad, ValueError)
    assert isinstance(good, dict) and isinstance(also_good, dict)
    np.testing.assert_array_equal(good["y"], [[2, 2]])
    assert model.calls[0] == 3, "the three requests were first merged into one call"


def test_shutdown_fails_waiting_requests_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(CountingModel(), BatchPolicy(max_batch_size=8, max_queue_delay_s=60.0), name="slow")
        await batcher.start()
        waiting = asyncio.create_task(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1))
        await asyncio.sleep(0.01)
        await batcher.shutdown()
        with pytest.raises(EngineDeadError):
            await waiting
        with pytest.raises(EngineDeadError):
            await batcher.submit({"x": np.ones((1, 2), np.float32)}, 1)

    asyncio.run(scenario())


def test_a_cancelled_request_leaves_the_queue() -> None:
    model = CountingModel()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_s=0.2), name="fake")
        await batcher.start()
        try:
            gone = asyncio.create_task(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1))
            await asyncio.sleep(0.01)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            assert batcher.active_requests == 0
            result = await batcher.submit({"x": np.full((2, 2), 3, np.float32)}, 2)
            np.testing.assert_array_equal(result["y"], np.full((2, 2), 6))
        finally:
            await batcher.shutdown()

    asyncio.run(scenario())
    assert model.calls == [2]
