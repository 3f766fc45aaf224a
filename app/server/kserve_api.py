"""The Open Inference Protocol (KServe v2) REST API, as Triton, KServe and MLServer speak it, for generic models.

Health, server and model metadata, inference (JSON tensors and the binary tensor data extension), and the model
repository extension (index, load, unload). Errors are ``{"error": "…"}`` with an HTTP status: 400 for a bad
request (bad JSON, a wrong shape or datatype, a missing input, a batch over the model's maximum), 401 without a
valid API key, 404 for an unknown model or version (or one that is not loaded), 413 for a body over
``MAX_BODY_BYTES``, 503 when the model version is not ready or its queue is full, 500 when the model itself fails.

When API keys are configured, everything but ``/v2/health/*`` needs one (the same keys as ``/v1``).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from app.engine.generic_runner import GenericModel, InvalidInputError
from app.errors import EngineDeadError, ModelError, OverloadedError, UnknownModelError
from app.server.auth import is_authorized
from app.server.kserve_codec import InferRequestError, encode_infer_response, parse_infer_request
from app.server.registry import ServedVersion, ServingState
from app.server.state import ServerState

logger = logging.getLogger(__name__)

SERVER_NAME = "brook"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
GENERIC_TASK = "generic"
MAX_BODY_BYTES = 64 << 20  # largest request body, before and after decompression
HEADER_LENGTH = "Inference-Header-Content-Length"
_INDEX_STATES = {ServingState.READY.value: "READY", ServingState.LOADING.value: "LOADING"}  # others: UNAVAILABLE


class V2Error(Exception):
    """An error answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.brook
    return state


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _authorize(request: Request) -> None:
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not is_authorized(_state(request).settings.api_keys, headers, dict(request.query_params)):
        raise V2Error(401, "a valid API key is required: 'Authorization: Bearer <key>' or ?token=<key>")


def _server_version() -> str:
    try:
        return version("brook")
    except PackageNotFoundError:
        return "0"


# --- health and metadata ------------------------------------------------------------------------------------------


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    state = _state(request)
    is_ready = state.registry.ready and not state.shutting_down
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


async def server_metadata(request: Request) -> Response:
    _authorize(request)
    return JSONResponse({"name": SERVER_NAME, "version": _server_version(), "extensions": EXTENSIONS})


def _version_param(request: Request) -> int | None:
    text = request.path_params.get("version")
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise V2Error(404, f"model {request.path_params['name']!r} has no version {text!r}")
    return int(text)


def _not_generic(name: str, task: str) -> V2Error:
    return V2Error(400, f"model {name!r} is a {task} model; the v2 API serves task = \"generic\" models "
                   "(use /v1/listen or /v1/chat for this one)")


def _resolve(request: Request) -> ServedVersion:
    """The served version a request addresses: the pinned one, or one drawn by the A/B weights.

    Loaded models are looked up in memory; the repository is read only to explain why a model is not loaded.
    """
    state = _state(request)
    name = request.path_params["name"]
    pinned = _version_param(request)
    served = [v for v in state.registry.served_versions() if v.name == name]
    if not served:
        try:
            spec = state.registry.repository.spec(name)
        except UnknownModelError as exc:
            raise V2Error(404, str(exc)) from None
        except ModelError as exc:
            raise V2Error(503, f"model {name!r} has a broken model.toml: {exc}") from None
        if spec.task != GENERIC_TASK:
            raise _not_generic(name, spec.task)
        if pinned is not None and pinned not in spec.versions:
            raise V2Error(404, f"model {name!r} has no version {pinned}; versions: {sorted(spec.versions)}")
        raise V2Error(404, f"model {name!r} is not loaded; load it with POST /v2/repository/models/{name}/load")
    if served[0].task != GENERIC_TASK:
        raise _not_generic(name, served[0].task)
    if pinned is not None:
        entry = next((v for v in served if v.version == pinned), None)
        if entry is None:
            raise V2Error(404, f"model {name!r} has no version {pinned}; versions: {sorted(v.version for v in served)}")
        if entry.state is not ServingState.READY:
            raise V2Error(503, f"model {name!r} version {pinned} is not ready ({entry.state.value}: {entry.error})")
        return entry
    try:
        return state.registry.assign(name, None, task=GENERIC_TASK)
    except ModelError as exc:
        raise V2Error(503, str(exc)) from None


def _engine(entry: ServedVersion) -> GenericModel:
    engine = entry.engine
    if not isinstance(engine, GenericModel):
        raise V2Error(503, f"model {entry.name!r} version {entry.version} has no inference engine")
    return engine


async def model_metadata(request: Request) -> Response:
    _authorize(request)
    entry = _resolve(request)
    engine = _engine(entry)
    if request.path_params.get("version"):
        versions = [str(entry.version)]
    else:
        versions = [str(v.version) for v in _state(request).registry.served_versions()
                    if v.name == entry.name and v.state is ServingState.READY]
    described = engine.describe()
    return JSONResponse({"name": entry.name, "versions": versions, "platform": described["platform"],
                         "inputs": described["inputs"], "outputs": described["outputs"]})


async def model_ready(request: Request) -> Response:
    _authorize(request)
    entry = _resolve(request)  # raises 404/503 when unknown or not ready
    return JSONResponse({"name": entry.name, "version": str(entry.version), "ready": True})


async def model_config(request: Request) -> Response:
    """Triton's `…/config` (tritonclient `get_model_config`): the batching policy and the tensors."""
    _authorize(request)
    entry = _resolve(request)
    engine = _engine(entry)
    described = engine.describe()
    policy = engine.batcher.policy
    return JSONResponse({
        "name": entry.name, "version": str(entry.version), "platform": described["platform"],
        "backend": "onnxruntime", "max_batch_size": engine.max_batch_size,
        "dynamic_batching": {
            "enabled": policy.enabled, "max_queue_delay_microseconds": round(policy.max_queue_delay_s * 1e6),
            "preferred_batch_size": list(policy.preferred_batch_sizes), "max_queue_size": policy.max_queue_size,
        },
        "input": described["inputs"], "output": described["outputs"],
    })


# --- inference ----------------------------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise V2Error(413, f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise V2Error(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(400, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        plain = decompressor.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise V2Error(400, f"the {encoding} body could not be decompressed: {exc}") from None
    if len(plain) > MAX_BODY_BYTES or decompressor.unconsumed_tail:
        raise V2Error(413, f"the decompressed body is over the limit of {MAX_BODY_BYTES} bytes")
    return plain


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise V2Error(400, f"{HEADER_LENGTH} must be a non-negative integer, got {raw!r}")
    return int(raw)


async def infer(request: Request) -> Response:
    started = time.perf_counter()
    _authorize(request)
    entry = _resolve(request)
    engine = _engine(entry)
    state = _state(request)
    labels = (entry.name, str(entry.version))
    outcome = "error"
    try:
        body = await _read_body(request)
        try:
            parsed = parse_infer_request(body, _header_length(request))
        except InferRequestError as exc:
            raise V2Error(400, str(exc)) from None
        known_outputs = [t.name for t in engine.outputs]
        requested = parsed.outputs
        unknown = [o.name for o in requested or [] if o.name not in known_outputs]
        if unknown:
            raise V2Error(400, f"unknown output(s) {unknown}; model {entry.name!r} has {known_outputs}")
        try:
            results = await engine.infer(parsed.inputs)
        except InvalidInputError as exc:
            raise V2Error(400, str(exc)) from None
        except OverloadedError as exc:
            raise V2Error(503, f"model {entry.name!r} is overloaded: {exc}") from None
        except EngineDeadError as exc:
            raise V2Error(503, str(exc)) from None
        except Exception as exc:
            logger.exception("inference failed for %s v%d", entry.name, entry.version)
            raise V2Error(500, f"inference failed in model {entry.name!r}: {type(exc).__name__}: {exc}") from None
        chosen = ([(o.name, results[o.name], o.binary) for o in requested] if requested is not None
                  else [(name, results[name], parsed.binary_output) for name in known_outputs])
        payload, json_length = encode_infer_response(entry.name, entry.version, parsed.id, chosen)
        outcome = "success"
    finally:
        state.metrics.infer_requests.labels(*labels, outcome).inc()
        state.metrics.infer_seconds.labels(*labels).observe(time.perf_counter() - started)
    if json_length is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


# --- the model repository extension ------------------------------------------------------------------------------


async def repository_index(request: Request) -> Response:
    _authorize(request)
    body = await _optional_json(request)
    only_ready = bool(body.get("ready", False))
    rows = []
    for model in _state(request).registry.describe():
        for v in model["versions"]:
            entry: dict[str, Any] = {"name": model["name"], "version": str(v["version"]),
                                     "state": _INDEX_STATES.get(v["state"], "UNAVAILABLE")}
            if entry["state"] != "READY":
                entry["reason"] = v.get("error") or v["state"]
            if not only_ready or entry["state"] == "READY":
                rows.append(entry)
    return JSONResponse(rows)


async def _optional_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise V2Error(400, f"the body is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise V2Error(400, "the body must be a JSON object")
    return data


async def repository_load(request: Request) -> Response:
    _authorize(request)
    name = request.path_params["name"]
    params = (await _optional_json(request)).get("parameters", {})
    if isinstance(params, dict) and set(params) - {"unload_dependents"}:
        raise V2Error(400, "loading with a config override or files is not supported; put the model in the "
                      "repository folder and call load with an empty body")
    try:
        versions = await _state(request).registry.load(name)
    except UnknownModelError as exc:
        raise V2Error(404, str(exc)) from None
    except ModelError as exc:
        raise V2Error(400, f"failed to load {name!r}: {exc}") from None
    if not any(v.state is ServingState.READY for v in versions):
        # Keep nothing half-loaded: a model with no ready version would hold the whole server unready.
        await _state(request).registry.unload(name)
        reasons = "; ".join(f"v{v.version} {v.state.value}: {v.error}" for v in versions)
        raise V2Error(400, f"failed to load {name!r}: no version is ready ({reasons})")
    return JSONResponse({})


async def repository_unload(request: Request) -> Response:
    _authorize(request)
    name = request.path_params["name"]
    registry = _state(request).registry
    try:
        registry.repository.spec(name)
    except UnknownModelError as exc:
        raise V2Error(404, str(exc)) from None
    except ModelError:
        pass  # a broken model.toml must not keep an operator from unloading what is loaded
    if name in registry.loaded_names():
        await registry.unload(name)
    return JSONResponse({})


Endpoint = Callable[[Request], Awaitable[Response]]


def _handled(endpoint: Endpoint) -> Endpoint:
    """Answer `V2Error`s in the v2 shape."""

    async def wrapper(request: Request) -> Response:
        try:
            response: Response = await endpoint(request)
        except V2Error as exc:
            return _error(exc.status, exc.message)
        return response

    wrapper.__name__ = endpoint.__name__
    wrapper.__doc__ = endpoint.__doc__
    return wrapper


def routes() -> list[BaseRoute]:
    """Every v2 route, for `create_app`."""
    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    table: list[BaseRoute] = [
        Route("/v2", _handled(server_metadata), methods=["GET"]),
        Route("/v2/health/live", _handled(live), methods=["GET"]),
        Route("/v2/health/ready", _handled(ready), methods=["GET"]),
        Route("/v2/repository/index", _handled(repository_index), methods=["POST"]),
        Route("/v2/repository/models/{name}/load", _handled(repository_load), methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", _handled(repository_unload), methods=["POST"]),
    ]
    for path in model_paths:
        table += [
            Route(path, _handled(model_metadata), methods=["GET"]),
            Route(path + "/ready", _handled(model_ready), methods=["GET"]),
            Route(path + "/config", _handled(model_config), methods=["GET"]),
            Route(path + "/infer", _handled(infer), methods=["POST"]),
        ]
    return table
