"""`brook serve`: fetch the default models if needed, then run uvicorn with Brook's graceful shutdown."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import fields

import uvicorn

from app.config import ENV_PREFIX, Settings, settings_from_env
from app.main import create_app
from app.server.state import ServerState
from app.server.ws_session import drain_connections

logger = logging.getLogger(__name__)
WS_SIZE_HEADROOM = 4  # uvicorn itself refuses frames over this multiple of max_frame_bytes (protocol-level 1009)


class BrookServer(uvicorn.Server):
    """uvicorn closes open WebSockets with 1012 at once on SIGTERM. Brook first stops listening, lets every
    session flush (finals for speech, the end of replies), closes them with 1001, and only then hands over."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._brook_state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        await drain_connections(self._brook_state, self._brook_state.settings.shutdown_grace_s)
        await super().shutdown(sockets)


def fetch_models(settings: Settings) -> None:
    """Fetch and convert every version of the configured models that is missing or stale (idempotent)."""
    from app.convert.build import build_version
    from app.repository import ModelRepository

    repository = ModelRepository(settings.model_dir)
    for name in settings.models:
        spec = repository.spec(name)
        for version in sorted(spec.versions):
            result = build_version(spec, version)
            if result.built:
                logger.info("fetched and converted %s v%d in %.1f s", name, version, result.seconds)


def app_from_env() -> object:
    """App factory for `--workers N` (each worker process reads its settings from BROOK_* variables)."""
    return create_app(settings_from_env())


def _export_settings(settings: Settings) -> None:
    for f in fields(settings):
        value = getattr(settings, f.name)
        os.environ[ENV_PREFIX + f.name.upper()] = ",".join(value) if isinstance(value, tuple) else str(value)


def serve(settings: Settings, *, workers: int = 1, fetch: bool = True) -> None:
    if fetch:
        fetch_models(settings)
    logger.info("limits: %d listen / %d chat sessions, frames ≤ %d bytes, idle timeout %.0f s, utterances ≤ %.0f s",
                settings.max_listen_sessions, settings.max_chat_sessions, settings.max_frame_bytes,
                settings.idle_timeout_s, settings.max_utterance_s)
    logger.info("auth: %s; origins: %s", "API keys required" if settings.api_keys else "open (no API keys set)",
                ", ".join(settings.allowed_origins) or "any")
    common = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "ws_max_size": settings.max_frame_bytes * WS_SIZE_HEADROOM,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s) + 5,
    }
    logger.info("Brook on http://%s:%d/ (WebSocket: ws://%s:%d/v1/listen)", settings.host, settings.port,
                settings.host, settings.port)
    if workers > 1:
        _export_settings(settings)
        uvicorn.run("app.server.serve:app_from_env", factory=True, workers=workers, **common)  # type: ignore[arg-type]
        return
    app = create_app(settings)
    server = BrookServer(uvicorn.Config(app, **common), app.state.brook)  # type: ignore[arg-type]
    server.run()
