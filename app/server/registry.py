"""The models a running server holds: which versions are loaded, their engines, and A/B version assignment."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from app.config import Settings
from app.errors import ModelError, UnknownModelError
from app.repository import ModelRepository, ModelSpec, VersionState
from app.server.engines import BuiltEngine, build_engine
from app.server.metrics import Metrics

logger = logging.getLogger(__name__)


class ServingState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"  # not fetched, or not loaded on this server


@dataclass
class ServedVersion:
    """One model version as the server holds it."""

    name: str
    task: str
    version: int
    weight: float
    state: ServingState
    engine: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class ModelRegistry:
    """Loads model versions into engines and picks a version for each new session.

    A session that does not pin a version gets one drawn by the A/B weights of the versions that are ready;
    it keeps it for its lifetime.
    """

    def __init__(self, repository: ModelRepository, settings: Settings, metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._specs: dict[str, ModelSpec] = {}
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        """True when every requested model has at least one ready version and nothing is still loading."""
        if not self._models:
            return False
        versions = [v for served in self._models.values() for v in served.values()]
        return not any(v.state is ServingState.LOADING for v in versions) and all(
            any(v.state is ServingState.READY for v in served.values()) for served in self._models.values()
        )

    def loaded_names(self) -> list[str]:
        return sorted(self._models)

    async def load(self, name: str) -> list[ServedVersion]:
        """Load every fetched version of `name` (replacing any loaded before). Raises `UnknownModelError`."""
        async with self._lock:
            spec = self.repository.spec(name)
            if name in self._models:
                await self._unload_locked(name)
            self._specs[name] = spec
            served: dict[int, ServedVersion] = {}
            self._models[name] = served
            for version, vspec in sorted(spec.versions.items()):
                status = self.repository.status(spec, version)
                entry = ServedVersion(name, spec.task, version, vspec.weight, ServingState.LOADING)
                served[version] = entry
                if status.state is not VersionState.READY:
                    entry.state, entry.error = ServingState.UNAVAILABLE, status.detail or status.state.value
                    continue
                try:
                    built = await asyncio.to_thread(self._build, name, version)
                    if built.engine is not None:
                        await built.engine.start()
                except Exception as exc:  # a broken version must not take the server down
                    logger.exception("failed to load %s v%d", name, version)
                    entry.state, entry.error = ServingState.FAILED, f"{type(exc).__name__}: {exc}"
                    continue
                entry.engine, entry.info, entry.state = built.engine, built.info, ServingState.READY
                self.metrics.models_loaded.labels(name, str(version)).set(1)
                logger.info("loaded %s v%d (%s, A/B weight %.2f)", name, version, spec.task, vspec.weight)
            return list(served.values())

    def _build(self, name: str, version: int) -> BuiltEngine:
        loaded = self.repository.load(name, version)
        return build_engine(loaded, self.repository, self.settings, self.metrics)

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._models:
                raise UnknownModelError(f"model {name!r} is not loaded; loaded: {', '.join(self.loaded_names())}")
            await self._unload_locked(name)

    async def _unload_locked(self, name: str) -> None:
        for entry in self._models.pop(name, {}).values():
            if entry.engine is not None:
                await entry.engine.shutdown()
            self.metrics.models_loaded.labels(name, str(entry.version)).set(0)
            entry.engine, entry.state = None, ServingState.UNAVAILABLE
        logger.info("unloaded %s", name)

    async def shutdown(self) -> None:
        async with self._lock:
            for name in list(self._models):
                await self._unload_locked(name)

    def assign(self, name: str, version: int | None, *, task: str) -> ServedVersion:
        """The version a new session of `name` uses: the pinned one, or one drawn by the A/B weights."""
        served = self._models.get(name)
        if served is None:
            known = [n for n, s in self._models.items() if any(v.task == task for v in s.values())]
            raise UnknownModelError(f"unknown model {name!r} for this endpoint; available: {', '.join(known)}")
        sample = next(iter(served.values()))
        if sample.task != task:
            raise UnknownModelError(f"model {name!r} is a {sample.task} model, not {task}")
        if version is not None:
            entry = served.get(version)
            if entry is None:
                raise UnknownModelError(f"model {name!r} has no version {version}; versions: {sorted(served)}")
            if entry.state is not ServingState.READY:
                raise ModelError(f"model {name!r} v{version} is {entry.state.value}: {entry.error}")
            return entry
        ready = [v for v in served.values() if v.state is ServingState.READY]
        if not ready:
            raise ModelError(f"model {name!r} has no ready version")
        weighted = [v for v in ready if v.weight > 0] or ready
        return self._rng.choices(weighted, weights=[v.weight or 1.0 for v in weighted])[0]

    def served_versions(self) -> list[ServedVersion]:
        return [entry for served in self._models.values() for entry in served.values()]

    def describe(self) -> list[dict[str, Any]]:
        """Every model in the repository with its versions, their state, default version and A/B weights."""
        out = []
        for spec in self.repository.specs():
            served = self._models.get(spec.name, {})
            versions = []
            for version, vspec in sorted(spec.versions.items()):
                entry = served.get(version)
                state = entry.state.value if entry else (
                    "not_loaded" if self.repository.status(spec, version).state is VersionState.READY else "missing"
                )
                versions.append({
                    "version": version, "state": state, "weight": vspec.weight, "description": vspec.description,
                    **({"error": entry.error} if entry and entry.error else {}),
                    **(entry.info if entry else {}),
                })
            out.append({"name": spec.name, "task": spec.task, "default_version": spec.default_version,
                        "description": spec.description, "loaded": spec.name in self._models, "versions": versions})
        return out
