"""Brook's HTTP routes: health, readiness, the model list and operator API, and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.errors import UnknownModelError
from app.server.auth import is_authorized
from app.server.state import ServerState


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.brook
    return state


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"type": "error", "code": code, "message": message}, status_code=status, headers=headers)


def require_auth(request: Request) -> JSONResponse | None:
    """None when authorized; otherwise the 401 answer."""
    state = _state(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    if is_authorized(state.settings.api_keys, headers, dict(request.query_params)):
        return None
    return error_response(401, "unauthorized", "a valid API key is required: 'Authorization: Bearer <key>' or "
                          "?token=<key>", {"WWW-Authenticate": "Bearer"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    registry = state.registry
    body: dict[str, Any] = {"ready": registry.ready and not state.shutting_down, "models": {
        m["name"]: {str(v["version"]): v["state"] for v in m["versions"]} for m in registry.describe() if m["loaded"]
    }}
    if state.shutting_down:
        body["reason"] = "shutting down"
    status = 200 if body["ready"] else 503
    headers = None if status == 200 else {"Retry-After": str(state.settings.retry_after_s)}
    return JSONResponse(body, status_code=status, headers=headers)


async def list_models(request: Request) -> Response:
    if (denied := require_auth(request)) is not None:
        return denied
    models = _state(request).registry.describe()
    # OpenAI list shape ("object": "list", "data": [{"id", "object": "model", ...}]) with Brook's fields added.
    data = [{"id": m["name"], "object": "model", "owned_by": "brook", "created": 0, **m} for m in models]
    return JSONResponse({"object": "list", "data": data})


async def load_model(request: Request) -> Response:
    if (denied := require_auth(request)) is not None:
        return denied
    name = request.path_params["name"]
    registry = _state(request).registry
    try:
        versions = await registry.load(name)
    except UnknownModelError as exc:
        return error_response(404, "unknown_model", str(exc))
    return JSONResponse({"name": name, "versions": [
        {"version": v.version, "state": v.state.value, **({"error": v.error} if v.error else {})} for v in versions
    ]})


async def unload_model(request: Request) -> Response:
    if (denied := require_auth(request)) is not None:
        return denied
    name = request.path_params["name"]
    try:
        await _state(request).registry.unload(name)
    except UnknownModelError as exc:
        return error_response(404, "unknown_model", str(exc))
    return JSONResponse({"name": name, "state": "unloaded"})


async def metrics(request: Request) -> Response:
    state = _state(request)
    for served in state.registry.served_versions():
        labels = (served.name, str(served.version))
        engine = served.engine
        if engine is None:
            continue
        # Speech engines count streams, text engines generations (and hold KV slots).
        active = int(getattr(engine, "active_streams", 0) or getattr(engine, "active_requests", 0))
        state.metrics.engine_active.labels(*labels).set(active)
        state.metrics.queue_depth.labels(*labels).set(int(getattr(engine, "waiting_requests", 0)))
        if hasattr(engine, "slots_in_use"):
            state.metrics.engine_slots.labels(*labels).set(float(engine.slots_in_use))
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
