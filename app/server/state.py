"""The state one running server shares between its routes (built in the lifespan, read via `app.state.brook`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.server.metrics import Metrics

if TYPE_CHECKING:
    from app.server.loop_monitor import EventLoopMonitor
    from app.server.registry import ModelRegistry


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    open_sessions: Counter[str] = field(default_factory=Counter)  # endpoint -> open sockets
    connections: set[Any] = field(default_factory=set)  # open `Connection`s, for graceful shutdown
    shutting_down: bool = False
    loop_monitor: EventLoopMonitor | None = None  # None when BROOK_LOOP_MONITOR_INTERVAL_MS is 0
