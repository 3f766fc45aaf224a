"""Create onnxruntime sessions with Brook's settings (CPU, bounded threads, full graph optimisation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import onnxruntime as ort

logger = logging.getLogger(__name__)

ALLOW_SPINNING_CONFIG_KEY: Final = "session.intra_op.allow_spinning"
SPIN_DURATION_CONFIG_KEY: Final = "session.intra_op.spin_duration_us"
# The first onnxruntime release that bounds the spin by time. An older one would ignore the key and spin for its
# fixed iteration count (~16-47 ms per idle wait, depending on the processor), so there Brook does not spin at all.
SPIN_DURATION_SINCE: Final = (1, 26)
MAX_SPIN_US: Final = 10_000
# How long an idle intra-op thread busy-waits for the next parallel section before it sleeps. A model call is a
# chain of operators a few microseconds to a few milliseconds long, and a thread that sleeps between them pays a
# wake-up each time; but a spinning thread holds a core that another engine's thread may be waiting for. Measured on
# the 2-core AVX2 machine (docs/benchmarks.md, "onnxruntime threads: spin or sleep"): with one engine busy, spinning
# up to 100 us made SmolLM2 decode steps 7-23% faster at the same CPU time per step (16 chat sessions: 125 against
# 117 tok/s, medians of six alternated rounds); with 8 speech and 8 chat streams sharing the cores it made speech
# finals later (p95 3.5 against 2.7 s, medians of four rounds) and chat 8% slower. Unbounded spinning
# (onnxruntime's default) also burns a core per idle thread between calls. Hence 0, sleeping at once, by default;
# ``BROOK_ORT_SPIN_US=100`` suits a process whose only busy engine is chat (speech alone: not measured).
DEFAULT_SPIN_US: Final = 0


class _ProcessSpin:
    """The process's spin setting (``set_thread_spin_us``)."""

    us: int = DEFAULT_SPIN_US


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def bounded_spinning_supported() -> bool:
    """Whether this onnxruntime bounds its threads' spinning by ``SPIN_DURATION_CONFIG_KEY``."""
    return _version(ort.__version__) >= SPIN_DURATION_SINCE


def set_thread_spin_us(spin_us: int) -> None:
    """The spin of every session created from now on in this process (``BROOK_ORT_SPIN_US``, set at start-up)."""
    if not 0 <= spin_us <= MAX_SPIN_US:
        raise ValueError(f"BROOK_ORT_SPIN_US must lie in 0..{MAX_SPIN_US} microseconds, got {spin_us}")
    if spin_us and not bounded_spinning_supported():
        logger.warning("onnxruntime %s cannot bound thread spinning (needs %d.%d): threads will not spin",
                       ort.__version__, *SPIN_DURATION_SINCE)
    _ProcessSpin.us = spin_us


def thread_spin_us() -> int:
    """The spin sessions get when they do not ask for their own: 0 where onnxruntime cannot bound it."""
    return _ProcessSpin.us if bounded_spinning_supported() else 0


def create_session(
    path: Path,
    intra_op_threads: int,
    *,
    inter_op_threads: int = 1,
    spin_us: int | None = None,
    enable_memory_arena: bool = True,
) -> ort.InferenceSession:
    """An `InferenceSession` on the CPU with a fixed thread budget, so that engines do not fight over cores.

    ``spin_us``: how long idle intra-op threads busy-wait for the next parallel section before sleeping (see
    ``DEFAULT_SPIN_US``); None takes the process's setting (``set_thread_spin_us``), 0 never spins.

    ``enable_memory_arena``: onnxruntime's CPU arena keeps the largest intermediate buffers a session ever needed.
    Turn it off for sessions whose activations scale with a batch of large inputs (the Whisper encoder keeps about
    77 MB per 30 s window of its largest batch otherwise); their memory then goes back after each call.
    """
    spin = thread_spin_us() if spin_us is None else (spin_us if bounded_spinning_supported() else 0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = enable_memory_arena
    options.add_session_config_entry(ALLOW_SPINNING_CONFIG_KEY, "1" if spin > 0 else "0")
    if spin > 0:
        options.add_session_config_entry(SPIN_DURATION_CONFIG_KEY, str(spin))
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
