"""Create onnxruntime sessions with Brook's settings (CPU, bounded threads, full graph optimisation)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def create_session(path: Path, intra_op_threads: int, *, inter_op_threads: int = 1) -> ort.InferenceSession:
    """An `InferenceSession` on the CPU with a fixed thread budget, so that engines do not fight over cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
