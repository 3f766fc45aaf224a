"""Waiting for the version a new session pins: a ``not_loaded`` version is loaded first, within a time limit.

Every session endpoint (``/v1/listen``, ``/v1/chat``, ``/v1/realtime``, the OpenAI HTTP routes) gets its engine
here. A session that pins a version the version policy left unloaded waits while it loads (the load runs off the
event loop, shared by every session that pins it) instead of being refused. The wait is bounded: after
``BROOK_PINNED_LOAD_TIMEOUT_S`` (default 120 s) the session gets a `ModelError` (the load goes on, so a retry finds
it ready); a load that fails surfaces as the `ModelError` that `ModelRegistry.assign` raises for a failed version.
"""

from __future__ import annotations

import asyncio

from app.errors import EngineDeadError, ModelError
from app.server.registry import ModelRegistry, ServedVersion
from app.server.ws_session import Connection


async def acquire_served(
    registry: ModelRegistry,
    name: str,
    version: int | None,
    *,
    task: str,
    connection: Connection | None = None,
    timeout_s: float | None = None,
) -> ServedVersion:
    """The version a new session of `name` uses, like `ModelRegistry.assign`, waiting for a pinned version that is
    still loading. With `connection`, a graceful shutdown during the wait ends it at once.

    Raises `UnknownModelError` for an unknown model or version, `ModelError` when the version failed to load or
    is still loading after `timeout_s` (default: the `pinned_load_timeout_s` setting), `EngineDeadError` when the
    server stops while the session waits.
    """
    if version is None:
        return registry.assign(name, version, task=task)  # A/B assignment among the ready versions: no waiting
    limit_s = registry.settings.pinned_load_timeout_s if timeout_s is None else timeout_s
    acquiring = asyncio.ensure_future(registry.acquire(name, version, task=task))

    def stop_waiting() -> None:  # graceful shutdown while the session waits: it ends now instead of after the grace
        acquiring.cancel()

    previous_hook = connection.on_shutdown if connection is not None else None
    if connection is not None:
        connection.on_shutdown = stop_waiting
    try:
        done, _ = await asyncio.wait({acquiring}, timeout=limit_s)
    finally:
        if connection is not None:
            connection.on_shutdown = previous_hook
        acquiring.cancel()  # a no-op when it finished; the load itself goes on (the registry shields it)
    if not done:
        raise ModelError(f"model {name!r} v{version} is still loading after {limit_s:g} s: retry in a few seconds")
    if acquiring.cancelled():
        raise EngineDeadError(f"the server is shutting down; model {name!r} v{version} was not loaded")
    return acquiring.result()
