"""The version policy: which versions load at start, and loading a pinned `not_loaded` version on demand."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.config import Settings
from app.errors import EngineDeadError, ModelError
from app.repository import ModelRepository, ModelSpec, VersionSpec
from app.server.engines import BuiltEngine
from app.server.metrics import Metrics
from app.server.pinned_versions import acquire_served
from app.server.registry import ModelRegistry, ServingState, VersionPolicy, versions_to_load
from app.server.ws_session import Connection
from tests.conftest import ARTIFACT_DIR, missing, require_models
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


class HeldBuilds:
    """Makes a registry's engine builds of one version wait until `release()`: a load that is "still running"
    for as long as a test needs, without timing."""

    def __init__(self, registry: ModelRegistry, version: int) -> None:
        self.started = threading.Event()
        self.released = threading.Event()
        self.count = 0
        build = registry._build

        def held(name: str, built_version: int) -> BuiltEngine:
            if built_version == version:
                self.count += 1
                self.started.set()
                self.released.wait(timeout=60)
            return build(name, built_version)

        registry._build = held  # type: ignore[method-assign,assignment]

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 60), "the on-demand load never started"

    def release(self) -> None:
        self.released.set()


async def weighted_rainfall(repo: ModelRepository) -> ModelRegistry:
    registry = ModelRegistry(repo, Settings(), Metrics())
    await registry.load("rainfall", policy=VersionPolicy.WEIGHTED)
    return registry


def test_sessions_pinning_a_cold_version_wait_for_one_shared_load(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = await weighted_rainfall(rainfall_repo)
        builds = HeldBuilds(registry, 2)
        waiting = [asyncio.ensure_future(acquire_served(registry, "rainfall", 2, task=GENERIC)) for _ in range(3)]
        await builds.wait_started()
        assert not any(w.done() for w in waiting), "sessions wait for the load instead of being refused"
        assert registry.ready, "an on-demand load does not make the server unready"
        builds.release()
        served = await asyncio.gather(*waiting)
        assert all(s is served[0] for s in served) and served[0].version == 2
        assert served[0].state is ServingState.READY and builds.count == 1, "one load, shared"
        await registry.shutdown()

    asyncio.run(scenario())


def test_the_wait_is_bounded_and_the_load_goes_on(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = await weighted_rainfall(rainfall_repo)
        builds = HeldBuilds(registry, 2)
        with pytest.raises(ModelError, match="still loading after"):
            await acquire_served(registry, "rainfall", 2, task=GENERIC, timeout_s=0.01)
        builds.release()
        served = await acquire_served(registry, "rainfall", 2, task=GENERIC)
        assert served.version == 2 and served.state is ServingState.READY and builds.count == 1
        await registry.shutdown()

    asyncio.run(scenario())


def test_a_failed_on_demand_load_is_the_waiting_sessions_error(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = await weighted_rainfall(rainfall_repo)
        (rainfall_repo.spec("rainfall").directory / "2" / "model.onnx").write_bytes(b"not an onnx file")
        for _ in range(2):  # the session that triggered the load, then one after it
            with pytest.raises(ModelError, match="v2 is failed"):
                await acquire_served(registry, "rainfall", 2, task=GENERIC)
        assert (await acquire_served(registry, "rainfall", None, task=GENERIC)).version == 1
        await registry.shutdown()

    asyncio.run(scenario())


def test_graceful_shutdown_ends_a_waiting_session_at_once(rainfall_repo: ModelRepository) -> None:
    async def scenario() -> None:
        registry = await weighted_rainfall(rainfall_repo)
        builds = HeldBuilds(registry, 2)
        connection = Connection(cast(Any, None), cast(Any, None), "listen")
        waiting = asyncio.ensure_future(acquire_served(registry, "rainfall", 2, task=GENERIC,
                                                       connection=connection))
        await builds.wait_started()
        connection.request_shutdown()  # what drain_connections does on SIGTERM
        with pytest.raises(EngineDeadError, match="shutting down"):
            await waiting
        assert connection.on_shutdown is None, "the session sets its own shutdown hook after the wait"
        builds.release()
        assert (await acquire_served(registry, "rainfall", 2, task=GENERIC)).version == 2, "the load went on"
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


async def first_realtime_events(url: str, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """The first event of a realtime socket, then one answer to each of `events`."""
    async with connect(url) as ws:
        answers: list[dict[str, Any]] = [json.loads(await ws.recv())]
        for event in events:
            await ws.send(json.dumps(event))
            answers.append(json.loads(await ws.recv()))
        return answers


def test_default_server_loads_only_the_serving_versions_and_pins_wait_for_their_load(
    model_repository: ModelRepository,
) -> None:
    require_models(model_repository, "whisper-tiny-en", "silero-vad", "smollm2-135m-instruct")
    spec = model_repository.spec("whisper-tiny-en")
    if 2 not in spec.versions or model_repository.status(spec, 2).state.value != "ready":
        missing("whisper-tiny-en v2 is not built")
    with run_server(ARTIFACT_DIR / "logs", models="whisper-tiny-en,silero-vad", idle_timeout_s="2") as server:
        ready = get_json(f"{server.http}/readyz")
        assert ready["models"]["whisper-tiny-en"] == {"1": "not_loaded", "2": "not_loaded", "3": "ready"}

        realtime = f"{server.ws}/v1/realtime?intent=transcription"
        switch = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": "whisper-tiny-en@2"}}}}}

        async def first_pins() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
            # Every session arrives while v2 is cold: each waits for its one load (perhaps longer than the idle
            # timeout on a busy machine: waiting for the server is not idleness).
            return await asyncio.gather(
                collect_until_closed(f"{server.ws}/v1/listen?version=2", '{"type": "end"}'),
                first_realtime_events(f"{realtime}&model=whisper-tiny-en@2"),
                first_realtime_events(realtime, switch),
            )

        listen, realtime_pinned, realtime_switched = asyncio.run(first_pins())
        assert listen[0]["type"] == "ready" and listen[0]["version"] == 2, listen
        assert listen[-1]["type"] == "end", listen
        assert realtime_pinned[0]["type"] == "session.created", realtime_pinned
        assert [e["type"] for e in realtime_switched] == ["session.created", "session.updated"], realtime_switched
        assert get_json(f"{server.http}/readyz")["models"]["whisper-tiny-en"] == {
            "1": "not_loaded", "2": "ready", "3": "ready"}
        assert server.log().count("loaded whisper-tiny-en v2 on demand") == 1


def test_server_is_not_ready_until_every_configured_model_had_its_turn(rainfall_repo: ModelRepository) -> None:
    """Models load one after another; /readyz must not say ready once the first one is up."""
    from app.main import _load_models
    from app.server.state import ServerState

    async def scenario() -> None:
        settings = Settings(models=("rainfall", "not-in-the-repository"))
        registry = ModelRegistry(rainfall_repo, settings, Metrics())
        ready_before_each_load: list[bool] = []
        load = registry.load

        async def recording_load(name: str, *, policy: VersionPolicy = VersionPolicy.ALL) -> list[Any]:
            ready_before_each_load.append(registry.ready)
            return await load(name, policy=policy)

        registry.load = recording_load  # type: ignore[method-assign]
        await _load_models(ServerState(settings, Metrics(), registry))
        assert ready_before_each_load == [False, False], "rainfall was up, but the second model had not loaded yet"
        assert registry.ready
        await registry.shutdown()

    asyncio.run(scenario())
