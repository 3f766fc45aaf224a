"""Benchmark the Open Inference Protocol (KServe v2) API: requests/s and latency with dynamic batching on and off.

For each model, two real `brook serve` processes run side by side on copies of the model: one with its dynamic
batching, one with ``dynamic_batching = false`` (every request its own onnxruntime call, in arrival order). At each
concurrency level N, N closed-loop clients (tritonclient's asyncio client, one request in flight each, binary
tensors) send one-row requests. The two servers are measured in alternation, ``--repeats`` times for ``--seconds``
each, so that whatever else the machine is doing weighs on both alike; the results pool the repeats. Reported:
requests/s, latency p50/p95/p99, and the mean rows per onnxruntime call (from the server's /metrics).

Models: ``rainfall`` (the real scikit-learn model: microseconds of compute, so HTTP and JSON dominate) and
``mlp`` (a synthetic 256-2048-2048-16 float32 MLP: 4.7 M multiply-adds and 19 MB of weights read per call,
so one row is memory-bound and a batch reads the weights once for all its rows).

    .venv/bin/python scripts/bench_kserve.py [--models rainfall,mlp] [--clients 1,8,32] [--seconds 2]
                                             [--repeats 3] [--out test-artifacts/bench_kserve.json]

The client runs on the same machine as the server and competes with it for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.convert.generic_onnx import import_onnx_version
from app.paths import default_model_dir
from app.repository import load_model_spec

READY_TIMEOUT_S = 120.0
MLP_LAYERS = (256, 2048, 2048, 16)
MLP_SERVING = """[serving]
max_batch_size = 64
max_queue_delay_ms = 2.0
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def brook_server(model_dir: Path, models: str, log: Path) -> Iterator[str]:
    """`brook serve --no-fetch` on a free port; yields host:port once /readyz answers 200."""
    port = _free_port()
    env = {**os.environ, "BROOK_MODEL_DIR": str(model_dir), "BROOK_MODELS": models, "BROOK_PORT": str(port),
           "BROOK_LOG_LEVEL": "warning"}
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-fetch"], env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"brook serve did not become ready; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def write_mlp(directory: Path, serving: str) -> None:
    """A synthetic MLP (fixed seed): x FP32 [N, 256] -> y FP32 [N, 16]."""
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "x"
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(MLP_LAYERS)):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        output = "y" if index == len(MLP_LAYERS) - 2 else f"h{index}"
        matmul = output if output == "y" else f"m{index}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [matmul]))
        if output != "y":
            nodes.append(helper.make_node("Relu", [matmul], [output]))
        previous = output
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (directory / "1").mkdir(parents=True)
    onnx.save(model, str(directory / "1" / "model.onnx"))
    (directory / "model.toml").write_text(f'name = "mlp"\ntask = "generic"\n\n[versions.1]\n\n{serving}',
                                          encoding="utf-8")
    import_onnx_version(load_model_spec(directory), 1)


def prepare(model: str, root: Path, batching: bool) -> Path:
    """A repository holding one model, with batching on (its own settings) or off."""
    repo = root / f"{model}-{'on' if batching else 'off'}"
    repo.mkdir()
    if model == "mlp":
        write_mlp(repo / "mlp", MLP_SERVING if batching else MLP_SERVING + "dynamic_batching = false\n")
        return repo
    source = default_model_dir() / model
    shutil.copytree(source, repo / model, ignore=shutil.ignore_patterns(".*"))
    if not batching:
        toml = repo / model / "model.toml"
        toml.write_text(toml.read_text(encoding="utf-8").replace("dynamic_batching = true", "dynamic_batching = false"),
                        encoding="utf-8")
    return repo


def request_rows(model: str) -> tuple[str, np.ndarray]:
    if model == "mlp":
        return "x", np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    return "weather_today", np.array([[3.0, 12.0, 6.0, 6.1, 330]], dtype=np.float32)


def batch_counters(url: str, model: str) -> tuple[float, float]:
    """(onnxruntime calls, rows) of the model's dynamic batcher so far."""
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {"count": 0.0, "sum": 0.0}
    for kind in values:
        for match in re.finditer(rf'^brook_batch_size_{kind}\{{(.*)\}} (\S+)$', text, re.MULTILINE):
            if f'model="{model}"' in match.group(1) and 'stage="infer"' in match.group(1):
                values[kind] += float(match.group(2))
    return values["count"], values["sum"]


async def closed_loop(url: str, model: str, clients: int, seconds: float) -> list[float]:
    """`clients` coroutines, each sending its next request when the previous answer arrives; latencies in s."""
    from tritonclient.http import aio

    name, rows = request_rows(model)
    client = aio.InferenceServerClient(url, conn_limit=clients + 4)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def one_client() -> None:
        tensor = aio.InferInput(name, list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await client.infer(model, [tensor])
            latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(one_client() for _ in range(clients)))
    finally:
        await client.close()
    return latencies


def measure(urls: dict[bool, str], model: str, clients: int, seconds: float,
            repeats: int) -> dict[bool, dict[str, Any]]:
    """Both servers (batching on/off) in alternation; latencies and counters pooled over the repeats."""
    latencies: dict[bool, list[float]] = {True: [], False: []}
    elapsed = dict.fromkeys(latencies, 0.0)
    for url in urls.values():
        asyncio.run(closed_loop(url, model, clients, 0.5))  # warm up connections and the model
    before = {batching: batch_counters(url, model) for batching, url in urls.items()}
    for _ in range(repeats):
        for batching, url in urls.items():
            started = time.perf_counter()
            latencies[batching] += asyncio.run(closed_loop(url, model, clients, seconds))
            elapsed[batching] += time.perf_counter() - started
    results = {}
    for batching, url in urls.items():
        calls, rows = batch_counters(url, model)
        pooled = latencies[batching]
        quantiles = statistics.quantiles(pooled, n=100)
        results[batching] = {
            "requests": len(pooled),
            "requests_per_s": round(len(pooled) / elapsed[batching], 1),
            "p50_ms": round(statistics.median(pooled) * 1000, 2),
            "p95_ms": round(quantiles[94] * 1000, 2),
            "p99_ms": round(quantiles[98] * 1000, 2),
            "rows_per_call": round((rows - before[batching][1]) / max(calls - before[batching][0], 1), 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="rainfall,mlp")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per server and level")
    parser.add_argument("--out", type=Path, default=Path("test-artifacts/bench_kserve.json"))
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-kserve-") as tmp:
        root = Path(tmp)
        for model in args.models.split(","):
            repos = {batching: prepare(model, root, batching) for batching in (True, False)}
            with brook_server(repos[True], model, root / f"{model}-on.log") as on, \
                    brook_server(repos[False], model, root / f"{model}-off.log") as off:
                for clients in levels:
                    measured = measure({True: on, False: off}, model, clients, args.seconds, args.repeats)
                    for batching in (True, False):
                        row = {"model": model, "batching": batching, "clients": clients, **measured[batching]}
                        results.append(row)
                        print(f"{model:<9} batching {'on ' if batching else 'off'} {clients:>3} clients: "
                              f"{row['requests_per_s']:>7.1f} req/s  p50 {row['p50_ms']:>7.2f} ms  "
                              f"p95 {row['p95_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  "
                              f"{row['rows_per_call']:>5.2f} rows/call", flush=True)
    print("\n| model | batching | clients | req/s | p50 ms | p95 ms | p99 ms | rows/call |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['model']} | {'on' if row['batching'] else 'off'} | {row['clients']} | "
              f"{row['requests_per_s']:.1f} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p99_ms']:.2f} | "
              f"{row['rows_per_call']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": args.seconds, "repeats": args.repeats, "load_average":
                                    os.getloadavg(), "results": results}, indent=2) + "\n",
                        encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
