"""Dynamic batching on a real model: concurrent requests land in fewer onnxruntime calls than requests, and every
request gets exactly the answer it gets alone.

"Exactly" is bit-for-bit for the gradient-boosted trees (rainfall v2). The logistic regression (v1) goes through
onnxruntime's Gemm, whose single-row kernel rounds the last float32 bit differently from its multi-row kernel, so a
one-row request alone can differ from the same row inside a batch by about one unit in the last place; that version
is compared with a 1e-6 tolerance and identical labels.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from app.engine.generic_runner import GenericModel, GenericRunner, ServingConfig, SessionSettings
from app.repository import ModelRepository
from tests.conftest import ARTIFACT_DIR, load_model
from tests.generic_models import copy_rainfall
from tests.server_process import RunningServer, run_server

INPUT = "weather_today"
OUTPUTS = ("label", "probabilities")


class CountingRunner(GenericRunner):
    """The real onnxruntime runner, counting its calls and their rows."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SessionSettings())
        self.calls: list[int] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(int(next(iter(inputs.values())).shape[0]))
        return super().run(inputs)


def weather_requests(count: int) -> list[np.ndarray]:
    """`count` requests of 1-3 rows of plausible Seattle weather (deterministic)."""
    rng = np.random.default_rng(7)
    requests = []
    for index in range(count):
        rows = 1 + index % 3
        day = rng.integers(1, 366, size=rows)
        temp_max = 12 + 10 * np.sin((day - 100) / 365 * 2 * np.pi) + rng.normal(0, 3, rows)
        requests.append(np.stack([rng.exponential(3, rows) * (rng.random(rows) < 0.5), temp_max,
                                  temp_max - rng.uniform(3, 10, rows), rng.uniform(0.5, 8, rows), day],
                                 axis=1).astype(np.float32))
    return requests


def assert_same_answers(version: int, got: list[dict[str, np.ndarray]], alone: list[dict[str, np.ndarray]]) -> None:
    for batched, single in zip(got, alone, strict=True):
        np.testing.assert_array_equal(batched["label"], single["label"])
        if version == 2:
            np.testing.assert_array_equal(batched["probabilities"], single["probabilities"])
        else:
            np.testing.assert_allclose(batched["probabilities"], single["probabilities"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_concurrent_requests_share_onnxruntime_calls(model_repository: ModelRepository, version: int) -> None:
    loaded = load_model(model_repository, "rainfall", version)
    requests = weather_requests(40)
    reference = CountingRunner(loaded.directory / "model.onnx")
    alone = [reference.run({INPUT: rows}) for rows in requests]

    runner = CountingRunner(loaded.directory / "model.onnx")
    model = GenericModel("rainfall", version, runner, ServingConfig(max_batch_size=32, max_queue_delay_ms=50.0))

    async def serve_concurrently() -> list[dict[str, np.ndarray]]:
        await model.start()
        try:
            return await asyncio.gather(*(model.infer({INPUT: rows}) for rows in requests))
        finally:
            await model.shutdown()

    got = asyncio.run(serve_concurrently())
    assert len(runner.calls) < len(requests) // 4, f"40 requests took {len(runner.calls)} calls: {runner.calls}"
    assert sum(runner.calls) == sum(len(r) for r in requests) and max(runner.calls) <= 32
    assert_same_answers(version, got, alone)


def test_with_batching_off_every_request_is_its_own_call(model_repository: ModelRepository) -> None:
    loaded = load_model(model_repository, "rainfall", 2)
    requests = weather_requests(12)
    runner = CountingRunner(loaded.directory / "model.onnx")
    model = GenericModel("rainfall", 2, runner, ServingConfig(dynamic_batching=False, max_queue_delay_ms=50.0))

    async def serve_concurrently() -> None:
        await model.start()
        try:
            await asyncio.gather(*(model.infer({INPUT: rows}) for rows in requests))
        finally:
            await model.shutdown()

    asyncio.run(serve_concurrently())
    assert runner.calls == [len(r) for r in requests]


# --- through the server, with the official client --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_repository: ModelRepository) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("batching-repo")
    # A 25 ms window instead of the model's 0, so that requests meet even on a busy two-core machine.
    wider = {"max_queue_delay_ms = 0.0": "max_queue_delay_ms = 25.0"}
    copy_rainfall(model_repository, repo, serving_replacements=wider)
    with run_server(ARTIFACT_DIR / "logs", model_dir=str(repo), models="rainfall", version_policy="all") as running:
        yield running


def metric(server: RunningServer, name: str, **labels: str) -> float:
    with urllib.request.urlopen(server.http + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def test_concurrent_tritonclient_requests_are_batched_by_the_server(server: RunningServer,
                                                                     model_repository: ModelRepository) -> None:
    aio = pytest.importorskip("tritonclient.http.aio", reason="tritonclient[http] is in the dev extra")
    loaded = load_model(model_repository, "rainfall", 2)
    requests = weather_requests(48)
    reference = CountingRunner(loaded.directory / "model.onnx")
    alone = [reference.run({INPUT: rows}) for rows in requests]

    async def clients() -> list[dict[str, np.ndarray]]:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            async def one(rows: np.ndarray) -> dict[str, np.ndarray]:
                tensor = aio.InferInput(INPUT, list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows)
                result = await client.infer("rainfall", [tensor], model_version="2")
                return {name: result.as_numpy(name) for name in OUTPUTS}
            return await asyncio.gather(*(one(rows) for rows in requests))
        finally:
            await client.close()

    got = asyncio.run(clients())
    assert_same_answers(2, got, alone)
    labels = {"model": "rainfall", "version": "2"}
    calls = metric(server, "brook_batch_size_count", stage="infer", **labels)
    rows = metric(server, "brook_batch_size_sum", stage="infer", **labels)
    assert metric(server, "brook_queue_seconds_count", **labels) == len(requests)
    assert rows == sum(len(r) for r in requests)
    assert calls < len(requests) / 2, f"{len(requests)} concurrent requests took {calls:.0f} onnxruntime calls"
