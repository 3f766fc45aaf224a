"""glibc's C heap, where onnxruntime and numpy allocate: return free memory to the OS, and keep large blocks out of
the heap. Each function is a no-op where the C library is not glibc."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from typing import Any, Final

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD: Final = -3  # mallopt parameter (glibc's malloc.h)
MAX_MMAP_THRESHOLD_BYTES: Final = 32 * 2**20  # glibc refuses larger thresholds on 64-bit (HEAP_MAX_SIZE / 2)


def release_free_memory() -> None:
    """Give heap memory that is free but still mapped back to the OS (glibc ``malloc_trim``).

    onnxruntime parses each model file into a protobuf and copies the weights out of it; glibc keeps the freed
    protobuf pages in its heap, where they count as resident memory. Measured: SmolLM2 v1 +250 MB without, +200 MB
    with the trim. While serving, freed numpy temporaries and socket buffers stay mapped the same way.
    """
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


def set_mmap_threshold(n_bytes: int) -> bool:
    """Serve every allocation of at least ``n_bytes`` from its own ``mmap`` (glibc ``mallopt(M_MMAP_THRESHOLD)``),
    so that freeing it returns the pages to the OS at once. Returns whether the C library took it.

    By default glibc raises this threshold each time such a block is freed, up to 32 MiB; from then on the Whisper
    encoder's activations (a few MB each, freed after every call) and numpy's audio windows come from the worker
    threads' heaps, which keep them resident and fragment. Measured under 8 speech + 8 chat streams for 20 minutes
    (scripts/bench_mixed.py, docs/benchmarks.md): RSS medians 618-645 MB with a fixed 1 MiB threshold against
    731-809 MB without, the same latencies and throughput within noise.
    """
    if not 0 < n_bytes <= MAX_MMAP_THRESHOLD_BYTES:
        raise ValueError(f"the mmap threshold must lie in 1..{MAX_MMAP_THRESHOLD_BYTES} bytes, got {n_bytes}")
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, n_bytes) == 1


async def release_free_memory_every(interval_s: float) -> None:
    """`release_free_memory` every ``interval_s`` seconds, off the event loop, until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        await asyncio.to_thread(release_free_memory)
        logger.debug("malloc_trim took %.1f ms", 1000 * (time.perf_counter() - started))


@functools.cache  # find_library runs ldconfig: once per function, not at every periodic trim
def _glibc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    """``name`` from the C library with its argument types and an int result, or None if it has no such symbol."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function
