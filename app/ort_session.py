"""Create onnxruntime sessions with Brook's settings (CPU, bounded threads, full graph optimisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import onnxruntime as ort

ALLOW_SPINNING_CONFIG_KEY: Final = "session.intra_op.allow_spinning"
# Idle intra-op threads sleep instead of busy-waiting (onnxruntime's default is to spin). Brook runs several
# sessions (LLM, Whisper, VAD) and other processes on two cores, where a spinning thread burns a core that another
# session needs. Measured on the shared 2-core machine, 2 intra-op threads: SmolLM2 decode used 16 instead of 28 ms
# of CPU per single-stream step and ran 1.2-2.6x faster by wall clock (41-73 against 16-57 tok/s); Whisper tiny.en
# used 0.42 instead of 0.57 s of CPU per 30 s window at an equal or better wall time.
DEFAULT_ALLOW_SPINNING: Final = False


def create_session(
    path: Path,
    intra_op_threads: int,
    *,
    inter_op_threads: int = 1,
    allow_spinning: bool = DEFAULT_ALLOW_SPINNING,
    enable_memory_arena: bool = True,
) -> ort.InferenceSession:
    """An `InferenceSession` on the CPU with a fixed thread budget, so that engines do not fight over cores.

    ``allow_spinning``: whether idle intra-op threads busy-wait for the next parallel section instead of sleeping
    (see ``DEFAULT_ALLOW_SPINNING``). Spinning can shave the wake-up latency off each operator on an otherwise idle
    machine; sleeping leaves the core to other sessions and processes.

    ``enable_memory_arena``: onnxruntime's CPU arena keeps the largest intermediate buffers a session ever needed.
    Turn it off for sessions whose activations scale with a batch of large inputs (the Whisper encoder keeps about
    77 MB per 30 s window of its largest batch otherwise); their memory then goes back after each call.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = enable_memory_arena
    options.add_session_config_entry(ALLOW_SPINNING_CONFIG_KEY, "1" if allow_spinning else "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
