"""Serve any ONNX model (``task = "generic"``): its onnxruntime session, its tensors, and its dynamic batcher.

The inputs and outputs come from the graph (recorded in the manifest and checked against the session at load).
``model.toml``'s ``[serving]`` table may rename them for the API, narrow their shapes, describe them, and set the
batching policy and the onnxruntime session options::

    [serving]
    max_batch_size = 64            # rows per onnxruntime call; 0 = the model has no batch dimension
    max_queue_delay_ms = 2.0       # how long a request may wait for others to share its call
    preferred_batch_sizes = [32]   # sent at once when reached exactly
    dynamic_batching = true        # false: every request runs alone
    max_queue_size = 0             # requests that may wait; more get "overloaded" (0: unbounded)

    [serving.session]              # onnxruntime SessionOptions
    intra_op_threads = 1
    inter_op_threads = 1
    graph_optimization_level = "all"   # disabled | basic | extended | all
    execution_mode = "sequential"      # sequential | parallel

    [serving.inputs.float_input]   # keyed by the graph's name
    name = "features"              # the name clients use (default: the graph's)
    shape = [-1, 5]                # documented and enforced; -1 is any size
    description = "…"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.engine.batcher import BatchObserver, BatchPolicy, DynamicBatcher
from app.errors import BrookError, ModelError
from app.repository import LoadedVersion

logger = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"  # Triton's name for this backend, reported in model metadata
DEFAULT_MAX_BATCH_SIZE = 32  # when the graph has a free batch dimension and model.toml does not say
DEFAULT_THREADS = 1
ANY_DIM = -1

# Open Inference Protocol datatype <-> numpy dtype (BF16 has no numpy dtype and is not supported).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
_ORT_TYPES = {
    "tensor(bool)": "bool", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64",
    "tensor(string)": "object",
}
_OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
_SERVING_KEYS = {"max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "dynamic_batching",
                 "max_queue_size", "session", "inputs", "outputs", "graph"}
_SESSION_KEYS = {"intra_op_threads", "inter_op_threads", "graph_optimization_level", "execution_mode"}
_TENSOR_KEYS = {"name", "shape", "description"}


class InvalidInputError(BrookError, ValueError):
    """A request's tensors do not fit the model: a missing or unknown input, a wrong datatype or shape."""


class OversizedBatchError(InvalidInputError):
    """A request has more rows than the model's max batch size."""


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol datatype of a numpy dtype (``FP32`` for float32). Raises ModelError for unsupported ones."""
    try:
        return _DATATYPE_OF[np.dtype(dtype)]
    except KeyError:
        raise ModelError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as clients see it. `shape` includes the batch dimension; -1 is any size."""

    name: str  # the name clients use
    graph_name: str  # the name in the ONNX graph
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    description: str = ""

    @property
    def datatype(self) -> str:
        return datatype_of(self.dtype)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class SessionSettings:
    intra_op_threads: int = DEFAULT_THREADS  # onnxruntime intra-op threads (the machine may be shared)
    inter_op_threads: int = DEFAULT_THREADS
    graph_optimization_level: str = "all"
    execution_mode: str = "sequential"

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization_level]
        options.execution_mode = _EXECUTION_MODES[self.execution_mode]
        return options


@dataclass(frozen=True)
class ServingConfig:
    """The parsed ``[serving]`` table of a generic model."""

    max_batch_size: int | None = None  # None: DEFAULT_MAX_BATCH_SIZE if the graph can batch, else 0
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    dynamic_batching: bool = True
    max_queue_size: int = 0
    graph: str | None = None  # which ONNX file (manifest graph name) when a version holds several
    session: SessionSettings = field(default_factory=SessionSettings)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # graph name -> {name, shape, description}
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str) -> ServingConfig:
        """Validate `[serving]`; every problem is a ModelError naming the key."""
        _check_keys(settings, _SERVING_KEYS, where)
        session = settings.get("session", {})
        _check_keys(session, _SESSION_KEYS, f"{where}.session")
        session_settings = SessionSettings(
            intra_op_threads=_int(session, "intra_op_threads", DEFAULT_THREADS, f"{where}.session", minimum=1)
            or DEFAULT_THREADS,
            inter_op_threads=_int(session, "inter_op_threads", DEFAULT_THREADS, f"{where}.session", minimum=1)
            or DEFAULT_THREADS,
            graph_optimization_level=_choice(session, "graph_optimization_level", "all", _OPTIMIZATION_LEVELS,
                                             f"{where}.session"),
            execution_mode=_choice(session, "execution_mode", "sequential", _EXECUTION_MODES, f"{where}.session"),
        )
        preferred = settings.get("preferred_batch_sizes", [])
        if not isinstance(preferred, list) or not all(isinstance(p, int) and p >= 1 for p in preferred):
            raise ModelError(f"{where}.preferred_batch_sizes must be a list of positive integers, got {preferred!r}")
        delay = settings.get("max_queue_delay_ms", 0.0)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ModelError(f"{where}.max_queue_delay_ms must be a number >= 0, got {delay!r}")
        dynamic = settings.get("dynamic_batching", True)
        if not isinstance(dynamic, bool):
            raise ModelError(f"{where}.dynamic_batching must be true or false, got {dynamic!r}")
        graph = settings.get("graph")
        if graph is not None and not isinstance(graph, str):
            raise ModelError(f"{where}.graph must be a string, got {graph!r}")
        return cls(
            max_batch_size=_int(settings, "max_batch_size", None, where, minimum=0),
            max_queue_delay_ms=float(delay),
            preferred_batch_sizes=tuple(sorted(set(preferred))),
            dynamic_batching=dynamic,
            max_queue_size=_int(settings, "max_queue_size", 0, where, minimum=0) or 0,
            graph=graph,
            session=session_settings,
            inputs=_tensor_overrides(settings.get("inputs", {}), f"{where}.inputs"),
            outputs=_tensor_overrides(settings.get("outputs", {}), f"{where}.outputs"),
        )


def _check_keys(table: Any, known: set[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ModelError(f"{where} must be a table, got {table!r}")
    unknown = set(table) - known
    if unknown:
        raise ModelError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")


def _int(table: Mapping[str, Any], key: str, default: int | None, where: str, *, minimum: int) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(table: Mapping[str, Any], key: str, default: str, choices: Mapping[str, Any], where: str) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise ModelError(f"{where}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _tensor_overrides(table: Any, where: str) -> dict[str, dict[str, Any]]:
    _check_keys(table, set(table) if isinstance(table, Mapping) else set(), where)
    overrides: dict[str, dict[str, Any]] = {}
    for graph_name, body in table.items():
        _check_keys(body, _TENSOR_KEYS, f"{where}.{graph_name}")
        shape = body.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= ANY_DIM for d in shape)):
            raise ModelError(f"{where}.{graph_name}.shape must be a list of integers (-1 for any), got {shape!r}")
        if "name" in body and not (isinstance(body["name"], str) and body["name"]):
            raise ModelError(f"{where}.{graph_name}.name must be a non-empty string")
        overrides[graph_name] = dict(body)
    return overrides


def _graph_dims(shape: Sequence[int | str | None]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else ANY_DIM for d in shape)


def _tensor_spec(graph_name: str, dtype: np.dtype[Any], graph_shape: tuple[int, ...],
                 override: Mapping[str, Any], where: str) -> TensorSpec:
    shape = graph_shape
    if "shape" in override:
        wanted = tuple(override["shape"])
        compatible = len(wanted) == len(graph_shape) and all(
            g in (ANY_DIM, w) for g, w in zip(graph_shape, wanted, strict=True))
        if not compatible:
            raise ModelError(f"{where}: shape {list(wanted)} does not fit the graph's {list(graph_shape)} "
                             "(same rank; fixed dimensions must match)")
        shape = wanted
    return TensorSpec(str(override.get("name", graph_name)), graph_name, dtype, shape,
                      str(override.get("description", "")))


class GenericRunner:
    """An onnxruntime session over one ONNX file: numpy arrays in, numpy arrays out, by graph names."""

    def __init__(self, path: Path, session: SessionSettings) -> None:
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=session.options(),
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, dict(inputs))
        return {name: np.asarray(value) for name, value in zip(self.output_names, values, strict=True)}

    def signature(self) -> tuple[list[tuple[str, str, tuple[int, ...]]], list[tuple[str, str, tuple[int, ...]]]]:
        """(inputs, outputs) as (graph name, numpy dtype name, shape). Raises ModelError for non-tensor values."""
        def read(args: Sequence[Any], kind: str) -> list[tuple[str, str, tuple[int, ...]]]:
            out = []
            for arg in args:
                dtype = _ORT_TYPES.get(arg.type)
                if dtype is None:
                    hint = " (export scikit-learn classifiers with zipmap disabled)" if "map" in arg.type else ""
                    raise ModelError(f"{self.path.name}: {kind} {arg.name!r} is {arg.type}, not a supported "
                                     f"tensor type{hint}")
                out.append((arg.name, dtype, _graph_dims(arg.shape)))
            return out
        return read(self.session.get_inputs(), "input"), read(self.session.get_outputs(), "output")


class GenericModel:
    """One generic model version being served: its tensors, its runner and its dynamic batcher."""

    def __init__(self, name: str, version: int, runner: GenericRunner, config: ServingConfig,
                 observer: BatchObserver | None = None) -> None:
        self.name, self.version, self.config = name, version, config
        self._runner = runner
        graph_inputs, graph_outputs = runner.signature()
        where = f"model {name!r} v{version} [serving]"
        for kind, overrides, graph in (("inputs", config.inputs, graph_inputs),
                                       ("outputs", config.outputs, graph_outputs)):
            unknown = set(overrides) - {g for g, _, _ in graph}
            if unknown:
                raise ModelError(f"{where}.{kind}: the graph has no {sorted(unknown)}; it has {[g for g, *_ in graph]}")
        self.inputs = [_tensor_spec(g, np.dtype(d), s, config.inputs.get(g, {}), f"{where}.inputs.{g}")
                       for g, d, s in graph_inputs]
        self.outputs = [_tensor_spec(g, np.dtype(d), s, config.outputs.get(g, {}), f"{where}.outputs.{g}")
                        for g, d, s in graph_outputs]
        for specs, kind in ((self.inputs, "input"), (self.outputs, "output")):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ModelError(f"{where}: two {kind}s share a name: {names}")
        self.max_batch_size = self._resolve_max_batch_size(where)
        policy = BatchPolicy(
            max_batch_size=max(self.max_batch_size, 1),
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            preferred_batch_sizes=config.preferred_batch_sizes if self.max_batch_size else (),
            enabled=config.dynamic_batching and self.max_batch_size > 0,
            max_queue_size=config.max_queue_size,
        )
        self.batcher = DynamicBatcher(runner.run, policy, name=f"{name}-v{version}", observer=observer)
        self._input_by_name = {t.name: t for t in self.inputs}

    def _resolve_max_batch_size(self, where: str) -> int:
        tensors = self.inputs + self.outputs
        can_batch = all(len(t.shape) >= 1 and t.shape[0] == ANY_DIM for t in tensors)
        configured = self.config.max_batch_size
        if configured is None:
            configured = DEFAULT_MAX_BATCH_SIZE if can_batch else 0
        elif configured > 0 and not can_batch:
            fixed = [f"{t.name} {list(t.shape)}" for t in tensors if not t.shape or t.shape[0] != ANY_DIM]
            raise ModelError(f"{where}: max_batch_size = {configured} needs a free first dimension on every input "
                             f"and output, but these have none: {', '.join(fixed)}; set max_batch_size = 0")
        bad = [p for p in self.config.preferred_batch_sizes if p > configured] if configured else []
        if bad:
            raise ModelError(f"{where}: preferred_batch_sizes {bad} exceed max_batch_size {configured}")
        return configured

    @classmethod
    def from_loaded(cls, loaded: LoadedVersion, observer: BatchObserver | None = None) -> GenericModel:
        """Build from a verified repository version. Blocking (creates the session): call off the event loop."""
        where = f"{loaded.spec.directory}/model.toml [serving]"
        config = ServingConfig.from_settings(loaded.spec.settings, where)
        graphs = loaded.manifest.graphs
        if config.graph is not None:
            signature = loaded.manifest.graph(config.graph)
        elif len(graphs) == 1:
            signature = next(iter(graphs.values()))
        else:
            raise ModelError(f"model {loaded.name!r} v{loaded.version} has {len(graphs)} ONNX graphs "
                             f"({sorted(graphs)}); name one with [serving] graph = \"…\"")
        runner = GenericRunner(loaded.directory / signature.file, config.session)
        graph_inputs, graph_outputs = runner.signature()
        recorded = ([(t.name, t.dtype) for t in signature.inputs], [(t.name, t.dtype) for t in signature.outputs])
        actual = ([(n, d) for n, d, _ in graph_inputs], [(n, d) for n, d, _ in graph_outputs])
        if recorded != actual:
            raise ModelError(f"model {loaded.name!r} v{loaded.version}: {signature.file} has inputs/outputs "
                             f"{actual}, but the manifest records {recorded}; rebuild the version")
        return cls(loaded.name, loaded.version, runner, config, observer)

    @property
    def active_requests(self) -> int:
        return self.batcher.active_requests

    def describe(self) -> dict[str, Any]:
        """What model metadata reports: platform, batch size, and the tensors."""
        return {"platform": PLATFORM, "max_batch_size": self.max_batch_size,
                "inputs": [t.describe() for t in self.inputs], "outputs": [t.describe() for t in self.outputs]}

    def validate(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Check names, dtypes and shapes against the model; return the request's rows (1 for unbatched models)."""
        missing = [t.name for t in self.inputs if t.name not in inputs]
        if missing:
            raise InvalidInputError(f"missing input(s) {missing}; model {self.name!r} expects "
                                    f"{[t.name for t in self.inputs]}")
        unknown = sorted(set(inputs) - set(self._input_by_name))
        if unknown:
            raise InvalidInputError(f"unknown input(s) {unknown}; model {self.name!r} expects "
                                    f"{[t.name for t in self.inputs]}")
        rows: dict[str, int] = {}
        for spec in self.inputs:
            array = inputs[spec.name]
            if array.dtype != spec.dtype:
                got = _DATATYPE_OF.get(array.dtype, str(array.dtype))
                raise InvalidInputError(f"input {spec.name!r} has datatype {got}; the model expects {spec.datatype}")
            shape_ok = array.ndim == len(spec.shape) and all(
                want in (ANY_DIM, got) for want, got in zip(spec.shape, array.shape, strict=True))
            if not shape_ok:
                raise InvalidInputError(f"input {spec.name!r} has shape {list(array.shape)}; the model expects "
                                        f"{list(spec.shape)} (-1 is any size)")
            if self.max_batch_size:
                rows[spec.name] = int(array.shape[0])
        if not self.max_batch_size:
            return 1
        sizes = set(rows.values())
        if len(sizes) > 1:
            raise InvalidInputError(f"inputs disagree on the batch size (first dimension): {rows}")
        batch = sizes.pop()
        if batch < 1:
            raise InvalidInputError("the batch size (first dimension) must be at least 1, got 0")
        if batch > self.max_batch_size:
            raise OversizedBatchError(f"batch size {batch} exceeds the max batch size {self.max_batch_size} of "
                                      f"model {self.name!r}")
        return batch

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, queue for a (possibly shared) onnxruntime call, and return every output by its public name."""
        rows = self.validate(inputs)
        graph_inputs = {spec.graph_name: inputs[spec.name] for spec in self.inputs}
        outputs = await self.batcher.submit(graph_inputs, rows)
        return {spec.name: outputs[spec.graph_name] for spec in self.outputs}

    def warm_up(self) -> None:
        """One call with zeros (free dimensions set to 1), so the first request does not pay initialisation."""
        inputs = {}
        for spec in self.inputs:
            shape = tuple(1 if d == ANY_DIM else d for d in spec.shape)
            inputs[spec.graph_name] = (np.full(shape, "", dtype=object) if spec.dtype == np.object_
                                       else np.zeros(shape, dtype=spec.dtype))
        try:
            self._runner.run(inputs)
        except Exception as exc:  # some graphs reject zeros; serving can still work
            logger.warning("warm-up of %s v%d with zeros failed (%s); continuing", self.name, self.version, exc)

    async def start(self) -> None:
        await self.batcher.start()

    async def shutdown(self) -> None:
        await self.batcher.shutdown()
