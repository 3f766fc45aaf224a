"""Measure the quantized matmul kernels that bound SmolLM2's decode: CPU time per row of MatMulNBits by batch rows.

    .venv/bin/python -m scripts.bench_llm_kernels [--rows 1,2,4,8,16,32,128] [--levels 0,4] [--seconds 1.5]

A language-model step multiplies every packed token ("row") of the call by each weight matrix. This script times
one ``com.microsoft.MatMulNBits`` node on its own, 4-bit weights in blocks of 32 (SmolLM2's Q4_1 layers as the
converter writes them, without the fp32 offset correction), for the model's shapes summed over its 30 layers:
``576 -> 3072`` (gate+up), ``1536 -> 576`` (down), ``576 -> 960`` (q+k+v) and ``576 -> 576`` (o). One intra-op thread,
so CPU time is the cost; it reports, per accuracy level (0: fp32 activations, Brook v1; 4: int8 activations, v2) and
row count M:

- CPU ms per call of all four shapes x 30 layers (one step's layer matmuls), and per row;
- effective multiply-accumulates per second (GMAC/s): 106 M weights x M rows / CPU time.

It shows where a step's time goes without the rest of the graph: the fixed cost of a call (weights read and, at
level 0 with M > 1, dequantized for the SGEMM path) and the marginal cost of one more row.

A second table times the output projection (576 -> 49152, the tied Q8_0 embedding) as each version runs it: v1 as
two 4-bit products at level 0 (8-bit MatMulNBits at level 0 dequantizes the whole matrix on every call), v2 and v3
as one 8-bit product at level 4 (v3 then rescores its 64 best tokens exactly, a few microseconds per row, not timed
here). Writes ``docs/bench/llm_kernels.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = ROOT / "docs" / "bench" / "llm_kernels.json"
LAYERS: Final = 30
SHAPES: Final = ((576, 3072), (1536, 576), (576, 960), (576, 576))  # (K, N) of gate+up, down, qkv, o
OUTPUT_SHAPE: Final = (576, 49152)
OUTPUT_ROWS: Final = (1, 2, 16, 32)
BLOCK: Final = 32


def _matmul_model(k: int, n: int, level: int, bits: int = 4) -> bytes:
    rng = np.random.default_rng(k * 7 + n)
    blocks = k // BLOCK
    packed = rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "w", "s"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=BLOCK,
        accuracy_level=level,
    )
    graph = helper.make_graph(
        [node],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [onnx.numpy_helper.from_array(packed, "w"), onnx.numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return bytes(model.SerializeToString())


def _session(k: int, n: int, level: int, bits: int = 4) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(_matmul_model(k, n, level, bits), options, providers=["CPUExecutionProvider"])


def _cpu_ms_per_run(session: ort.InferenceSession, x: np.ndarray, seconds: float) -> float:
    session.run(None, {"x": x})
    runs = 0
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall_started < seconds or runs < 2:
        session.run(None, {"x": x})
        runs += 1
    return (time.process_time() - cpu_started) * 1000.0 / runs


def measure_output(rows: int, seconds: float) -> dict[str, Any]:
    """CPU ms of the output projection at ``rows`` rows: v1's two 4-bit level-0 products, v2/v3's 8-bit level 4."""
    k, n = OUTPUT_SHAPE
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    two_4bit = 2 * _cpu_ms_per_run(_session(k, n, 0, 4), x, seconds / 2)
    int8 = _cpu_ms_per_run(_session(k, n, 4, 8), x, seconds / 2)
    return {"rows": rows, "v1_two_4bit_level0_cpu_ms": round(two_4bit, 3), "int8_level4_cpu_ms": round(int8, 3)}


def measure(level: int, rows: int, seconds: float) -> dict[str, Any]:
    """CPU ms of one step's layer matmuls (every shape, 30 layers) at ``rows`` rows."""
    sessions = [
        (_session(k, n, level), np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32))
        for k, n in SHAPES
    ]
    for session, x in sessions:
        session.run(None, {"x": x})
    calls = 0
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall_started < seconds or calls < 2:
        for session, x in sessions:
            session.run(None, {"x": x})
        calls += 1
    cpu_ms = (time.process_time() - cpu_started) * 1000.0 / calls * LAYERS
    weights = LAYERS * sum(k * n for k, n in SHAPES)
    return {
        "accuracy_level": level,
        "rows": rows,
        "cpu_ms_per_step": round(cpu_ms, 3),
        "cpu_ms_per_row": round(cpu_ms / rows, 3),
        "gmac_per_s": round(weights * rows / (cpu_ms / 1000.0) / 1e9, 1),
        "cores_used": round((time.process_time() - cpu_started) / (time.perf_counter() - wall_started), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,8,16,32,128", help="comma-separated row counts M")
    parser.add_argument("--levels", default="0,4", help="MatMulNBits accuracy levels")
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per (level, rows)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = [
        measure(int(level), int(rows), args.seconds)
        for level in args.levels.split(",")
        for rows in args.rows.split(",")
    ]
    outputs = [measure_output(rows, args.seconds) for rows in OUTPUT_ROWS]
    payload = {
        "onnxruntime": ort.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "weights": LAYERS * sum(k * n for k, n in SHAPES),
        "results": results,
        "output_projection": outputs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(
        f"MatMulNBits 4-bit, SmolLM2 layer shapes x {LAYERS}, 1 thread; load {load_before:.2f} -> "
        f"{payload['load_average_after']:.2f}"
    )
    print(f"{'level':>5} {'rows':>5} {'CPU ms/step':>11} {'CPU ms/row':>10} {'GMAC/s':>7}")
    for r in results:
        print(
            f"{r['accuracy_level']:>5} {r['rows']:>5} {r['cpu_ms_per_step']:>11.2f} {r['cpu_ms_per_row']:>10.2f} "
            f"{r['gmac_per_s']:>7.1f}"
        )
    print(f"output projection {OUTPUT_SHAPE[0]} -> {OUTPUT_SHAPE[1]}, CPU ms per call")
    print(f"{'rows':>5} {'v1: 2 x 4-bit, level 0':>23} {'v2/v3: 8-bit, level 4':>22}")
    for o in outputs:
        print(f"{o['rows']:>5} {o['v1_two_4bit_level0_cpu_ms']:>23.2f} {o['int8_level4_cpu_ms']:>22.2f}")


if __name__ == "__main__":
    main()
