"""`create_app(settings)`: the Starlette application. The only place that wires routes, state and lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from app.config import Settings
from app.errors import BrookError
from app.ort_session import set_thread_spin_us
from app.repository import ModelRepository
from app.server import http_api, kserve_api, openai_api
from app.server.loop_monitor import EventLoopMonitor, event_loop_endpoint
from app.server.metrics import Metrics
from app.server.native_heap import MAX_MMAP_THRESHOLD_BYTES, release_free_memory_every, set_mmap_threshold
from app.server.openai_realtime import realtime_endpoint
from app.server.registry import ModelRegistry
from app.server.state import ServerState
from app.server.ws_chat import chat_endpoint
from app.server.ws_listen import listen_endpoint
from app.server.ws_session import drain_connections

logger = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


async def _load_models(state: ServerState) -> None:
    state.registry.loading_at_start = True  # not ready until every configured model has had its turn
    try:
        for name in state.settings.models:
            try:
                await state.registry.load(name, policy=state.registry.version_policy)
            except BrookError as exc:
                logger.error("could not load %s: %s", name, exc)
    finally:
        state.registry.loading_at_start = False
    described = state.registry.describe()
    for model in described:
        if model["loaded"]:
            versions = ", ".join(f"v{v['version']} {v['state']} (weight {v['weight']:g})" for v in model["versions"])
            logger.info("model %s [%s]: %s", model["name"], model["task"], versions)


def _set_mmap_threshold(kib: int) -> None:
    if kib == 0:
        return
    try:
        taken = set_mmap_threshold(kib * 1024)
    except ValueError:
        limit = MAX_MMAP_THRESHOLD_BYTES // 1024
        raise ValueError(f"BROOK_MALLOC_MMAP_THRESHOLD_KB must lie in 0..{limit}, got {kib}") from None
    if not taken:
        logger.warning("the C library refused BROOK_MALLOC_MMAP_THRESHOLD_KB (not glibc?); using its default")


def create_app(settings: Settings, *, registry: ModelRegistry | None = None) -> Starlette:
    _set_mmap_threshold(settings.malloc_mmap_threshold_kb)  # process-wide, before any engine allocates
    set_thread_spin_us(settings.ort_spin_us)  # process-wide, before any engine creates a session
    metrics = Metrics()
    repository = ModelRepository(settings.model_dir)
    state = ServerState(settings, metrics, registry or ModelRegistry(repository, settings, metrics))
    if settings.loop_monitor_interval_ms > 0:
        state.loop_monitor = EventLoopMonitor(settings.loop_monitor_interval_ms / 1000,
                                              observe=metrics.event_loop_lag.observe)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.loop_monitor is not None:
            state.loop_monitor.start()
        loader = asyncio.create_task(_load_models(state), name="brook-load-models")
        background = [loader]
        if settings.memory_trim_interval_s > 0:
            background.append(asyncio.create_task(release_free_memory_every(settings.memory_trim_interval_s),
                                                  name="brook-release-free-memory"))
        try:
            yield
        finally:
            await drain_connections(state, settings.shutdown_grace_s)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await state.registry.shutdown()
            if state.loop_monitor is not None:
                await state.loop_monitor.stop()

    routes = [
        Route("/healthz", http_api.healthz),
        Route("/readyz", http_api.readyz),
        Route("/metrics", http_api.metrics),
        Route("/metrics/event-loop", event_loop_endpoint),
        Route("/v1/models", http_api.list_models),
        Route("/v1/models/{name}/load", http_api.load_model, methods=["POST"]),
        Route("/v1/models/{name}/unload", http_api.unload_model, methods=["POST"]),
        WebSocketRoute("/v1/listen", listen_endpoint),
        WebSocketRoute("/v1/chat", chat_endpoint),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        WebSocketRoute("/v1/realtime", realtime_endpoint),
        *kserve_api.routes(),
    ]
    if WEB_DIR.is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=WEB_DIR, html=True), name="web"))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.brook = state
    return app
