"""The version policy: which versions load at start, and loading a pinned `not_loaded` version on demand."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.config import Settings
from app.errors import ModelError
from app.repository import ModelRepository, ModelSpec, VersionSpec
from app.server.metrics import Metrics
from app.server.registry import ModelRegistry, ServingState, VersionPolicy, versions_to_load
from tests.conftest import ARTIFACT_DIR, require_models
from tests.generic_models import copy_rainfall
from tests.server_process import run_server

GENERIC = "generic"


def spec_with(weights: dict[int, float], default: int) -> ModelSpec:
    versions = {v: VersionSpec(v, "x", {}, weight, "") for v, weight in weights.items()}
    return ModelSpec(name="m", task=GENERIC, directory=Path("."), default_version=default, versions=versions)


def test_weighted_policy_loads_the_default_and_weighted_versions() -> None:
    spec = spec_with({1: 1.0, 2: 0.0, 3: 0.5}, default=1)
    assert versions_to_load(spec, VersionPolicy.WEIGHTED) == {1, 3}
    assert versions_to_load(spec, VersionPolicy.ALL) == {1, 2, 3}
    assert versions_to_load(spec_with({1: 0.0, 2: 1.0}, default=1), VersionPolicy.WEIGHTED) == {1, 2}


def test_policy_names_are_checked() -> None:
    assert VersionPolicy.parse(" ALL ") is VersionPolicy.ALL
    with pytest.raises(ValueError, match="BROOK_VERSION_POLICY"):
        VersionPolicy.parse("latest")
    with pytest.raises(ValueError, match="BROOK_VERSION_POLICY"):
        ModelRegistry(ModelRepository(Path(".")), Settings(version_policy="some"), Metrics())


@pytest.fixture
def rainfall_repo(tmp_path: Path, model_repository: ModelRepository) -> ModelRepository:
    copy_rainfall(model_repository, tmp_path)  # v1 weight 1, v2 weight 0
    return ModelRepository(tmp_path)


def test_pinned_not_loaded_version_loads_on_demand(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(rainfall_repo, Settings(), Metrics())
        states = {v.version: v.state for v in await registry.load("rainfall", policy=VersionPolicy.WEIGHTED)}
        assert states == {1: ServingState.READY, 2: ServingState.NOT_LOADED}
        assert registry.ready
        assert all(registry.assign("rainfall", None, task=GENERIC).version == 1 for _ in range(20))
        with pytest.raises(ModelError, match="loading now"):
            registry.assign("rainfall", 2, task=GENERIC)  # refuses, and starts loading in the background
        assert registry.ready, "an on-demand load does not make the server unready"
        served = await registry.acquire("rainfall", 2, task=GENERIC)  # waits for that load
        assert served.version == 2 and served.state is ServingState.READY and served.on_demand
        assert registry.assign("rainfall", 2, task=GENERIC) is served
        assert all(registry.assign("rainfall", None, task=GENERIC).version == 1 for _ in range(20)), "weight 0"
        await registry.shutdown()

    asyncio.run(scenario())


def test_explicit_load_loads_every_version(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(rainfall_repo, Settings(), Metrics())
        await registry.load("rainfall", policy=VersionPolicy.WEIGHTED)
        states = {v.version: v.state for v in await registry.load("rainfall")}  # what POST .../load calls
        assert states == {1: ServingState.READY, 2: ServingState.READY}
        await registry.shutdown()

    asyncio.run(scenario())


def test_a_version_that_fails_to_load_on_demand_reports_why(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(rainfall_repo, Settings(), Metrics())
        await registry.load("rainfall", policy=VersionPolicy.WEIGHTED)
        model_file = rainfall_repo.spec("rainfall").directory / "2" / "model.onnx"
        model_file.write_bytes(b"not an onnx file")
        with pytest.raises(ModelError, match="failed"):
            await registry.acquire("rainfall", 2, task=GENERIC)
        assert registry.ready and registry.assign("rainfall", None, task=GENERIC).version == 1
        await registry.shutdown()

    asyncio.run(scenario())


async def collect_until_closed(url: str, *frames: str) -> list[dict[str, Any]]:
    """Every message of one socket: the first one, then after sending `frames`, until the server closes."""
    messages: list[dict[str, Any]] = []
    async with connect(url) as ws:
        messages.append(json.loads(await ws.recv()))
        if messages[0]["type"] == "ready":
            for frame in frames:
                await ws.send(frame)
        try:
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=10)))
        except (ConnectionClosed, TimeoutError):
            pass
    return messages


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_default_server_loads_only_the_serving_versions_and_pins_load_on_demand(
    model_repository: ModelRepository,
) -> None:
    require_models(model_repository, "whisper-tiny-en", "silero-vad", "smollm2-135m-instruct")
    spec = model_repository.spec("whisper-tiny-en")
    if 2 not in spec.versions or model_repository.status(spec, 2).state.value != "ready":
        pytest.skip("MISSING: whisper-tiny-en v2 is not built")
    with run_server(ARTIFACT_DIR / "logs", models="whisper-tiny-en,silero-vad") as server:
        ready = get_json(f"{server.http}/readyz")
        assert ready["models"]["whisper-tiny-en"] == {"1": "ready", "2": "not_loaded"}

        async def pinned() -> list[dict[str, Any]]:
            return await collect_until_closed(f"{server.ws}/v1/listen?version=2", '{"type": "end"}')

        first = asyncio.run(pinned())
        assert first[0]["type"] == "error" and "loading now" in first[0]["message"], first
        for _ in range(240):  # until the background load is done (it takes seconds)
            messages = asyncio.run(pinned())
            if messages[0]["type"] == "ready":
                break
            asyncio.run(asyncio.sleep(0.25))
        assert messages[0]["type"] == "ready" and messages[0]["version"] == 2, messages
        assert get_json(f"{server.http}/readyz")["models"]["whisper-tiny-en"] == {"1": "ready", "2": "ready"}
