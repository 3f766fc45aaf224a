"""The models a running server holds: which versions are loaded, their engines, and A/B version assignment.

Which versions load at start is the version policy (``BROOK_VERSION_POLICY``): ``weighted`` loads each model's
default version and every version with an A/B weight above 0; the others (fetched, weight 0) stay ``not_loaded``
until a session pins one (it loads in the background) or an operator loads the model. ``all`` loads every fetched
version at start.
"""

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
from app.server.native_heap import release_free_memory

logger = logging.getLogger(__name__)


class ServingState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"  # not fetched, or not loaded on this server
    NOT_LOADED = "not_loaded"  # fetched but left out by the version policy: loads when a session pins it


class VersionPolicy(StrEnum):
    """Which fetched versions of a model load with it (Triton calls this a model's version_policy)."""

    WEIGHTED = "weighted"  # the default version and every version with an A/B weight > 0
    ALL = "all"  # every fetched version

    @classmethod
    def parse(cls, value: str) -> VersionPolicy:
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"BROOK_VERSION_POLICY must be one of {choices}, got {value!r}") from None


def versions_to_load(spec: ModelSpec, policy: VersionPolicy) -> set[int]:
    """The versions of ``spec`` that ``policy`` loads at start (fetched or not: missing ones are reported)."""
    if policy is VersionPolicy.ALL:
        return set(spec.versions)
    return {spec.default_version} | {version for version, vspec in spec.versions.items() if vspec.weight > 0}


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
    on_demand: bool = False  # loading (or loaded) after start because a session pinned it


class ModelRegistry:
    """Loads model versions into engines and picks a version for each new session.

    A session that does not pin a version gets one drawn by the A/B weights of the versions that are ready;
    it keeps it for its lifetime. A session that pins a ``not_loaded`` version starts loading it (see
    ``acquire``, which waits for it, and ``assign``, which refuses while it loads).
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
        self.version_policy = VersionPolicy.parse(settings.version_policy)
        self._on_demand: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.loading_at_start = False  # True while the server loads its configured models one after another

    @property
    def ready(self) -> bool:
        """True when every requested model has at least one ready version and nothing is still loading (the
        configured models load one after another: a model not started yet is not in ``_models``)."""
        if not self._models or self.loading_at_start:
            return False
        versions = [v for served in self._models.values() for v in served.values()]
        starting = [v for v in versions if v.state is ServingState.LOADING and not v.on_demand]
        return not starting and all(
            any(v.state is ServingState.READY for v in served.values()) for served in self._models.values()
        )

    def loaded_names(self) -> list[str]:
        return sorted(self._models)

    async def load(self, name: str, *, policy: VersionPolicy = VersionPolicy.ALL) -> list[ServedVersion]:
        """Load the fetched versions of `name` that `policy` selects (replacing any loaded before); the other
        fetched versions stay ``not_loaded``. Raises `UnknownModelError`."""
        async with self._lock:
            spec = self.repository.spec(name)
            if name in self._models:
                await self._unload_locked(name)
            self._specs[name] = spec
            served: dict[int, ServedVersion] = {}
            self._models[name] = served
            selected = versions_to_load(spec, policy)
            for version, vspec in sorted(spec.versions.items()):
                status = self.repository.status(spec, version)
                entry = ServedVersion(name, spec.task, version, vspec.weight, ServingState.LOADING)
                served[version] = entry
                if status.state is not VersionState.READY:
                    entry.state, entry.error = ServingState.UNAVAILABLE, status.detail or status.state.value
                elif version not in selected:
                    entry.state = ServingState.NOT_LOADED
                else:
                    await self._load_entry(entry)
            await asyncio.to_thread(release_free_memory)
            return list(served.values())

    async def _load_entry(self, entry: ServedVersion) -> None:
        """Build and start the engine of `entry` (state LOADING) with the lock held; READY or FAILED after."""
        name, version = entry.name, entry.version
        entry.state = ServingState.LOADING
        try:
            built = await asyncio.to_thread(self._build, name, version)
            if built.engine is not None:
                await built.engine.start()
        except Exception as exc:  # a broken version must not take the server down
            logger.exception("failed to load %s v%d", name, version)
            entry.state, entry.error = ServingState.FAILED, f"{type(exc).__name__}: {exc}"
            return
        entry.engine, entry.info, entry.state = built.engine, built.info, ServingState.READY
        self.metrics.models_loaded.labels(name, str(version)).set(1)
        how = " on demand" if entry.on_demand else ""
        logger.info("loaded %s v%d%s (%s, A/B weight %.2f)", name, version, how, entry.task, entry.weight)

    async def load_version(self, name: str, version: int) -> ServedVersion:
        """Load one ``not_loaded`` version of a loaded model (what a pinning session triggers); a no-op when it
        is ready. Raises `UnknownModelError` for a model or version the server does not hold, `ModelError` when
        the version can not load."""
        async with self._lock:
            entry = self._models.get(name, {}).get(version)
            if entry is None:
                raise UnknownModelError(f"model {name!r} v{version} is not held by this server")
            if entry.state is ServingState.NOT_LOADED or (entry.state is ServingState.LOADING and entry.on_demand):
                entry.on_demand = True
                await self._load_entry(entry)
                await asyncio.to_thread(release_free_memory)
            return self._ready_or_raise(entry)

    def _ready_or_raise(self, entry: ServedVersion) -> ServedVersion:
        """``entry`` when it is ready; else start its on-demand load if the policy allows one and raise
        `ModelError` saying why it can not serve now."""
        if self._loads_on_demand(entry):
            self._start_on_demand(entry)
            raise ModelError(
                f"model {entry.name!r} v{entry.version} was not loaded at start (BROOK_VERSION_POLICY="
                f"{self.version_policy.value}); it is loading now: retry in a few seconds"
            )
        if entry.state is not ServingState.READY:
            raise ModelError(f"model {entry.name!r} v{entry.version} is {entry.state.value}: {entry.error}")
        return entry

    def _start_on_demand(self, entry: ServedVersion) -> asyncio.Task[None]:
        """The background task loading `entry` (one per version, shared by every session that pins it)."""
        key = (entry.name, entry.version)
        task = self._on_demand.get(key)
        if task is None or task.done():
            entry.state, entry.on_demand = ServingState.LOADING, True
            task = asyncio.get_running_loop().create_task(self._load_on_demand(entry.name, entry.version),
                                                          name=f"brook-load-{entry.name}-v{entry.version}")
            self._on_demand[key] = task
        return task

    async def _load_on_demand(self, name: str, version: int) -> None:
        try:
            await self.load_version(name, version)
        except ModelError as exc:
            logger.error("on-demand load of %s v%d failed: %s", name, version, exc)
        finally:
            self._on_demand.pop((name, version), None)

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
        for task in list(self._on_demand.values()):
            task.cancel()
        await asyncio.gather(*self._on_demand.values(), return_exceptions=True)
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
            return self._ready_or_raise(entry)
        ready = [v for v in served.values() if v.state is ServingState.READY]
        if not ready:
            raise ModelError(f"model {name!r} has no ready version")
        weighted = [v for v in ready if v.weight > 0] or ready
        return self._rng.choices(weighted, weights=[v.weight or 1.0 for v in weighted])[0]

    async def acquire(self, name: str, version: int | None, *, task: str) -> ServedVersion:
        """Like `assign`, but a pinned ``not_loaded`` version is loaded (or its load awaited) first."""
        entry = self._models.get(name, {}).get(version) if version is not None else None
        if entry is not None and entry.task == task and self._loads_on_demand(entry):
            await asyncio.shield(self._start_on_demand(entry))
        return self.assign(name, version, task=task)

    @staticmethod
    def _loads_on_demand(entry: ServedVersion) -> bool:
        return entry.state is ServingState.NOT_LOADED or (entry.state is ServingState.LOADING and entry.on_demand)

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
