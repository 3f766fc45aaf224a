"""Where does a running server's memory go? ``brook serve`` with a memory reporter thread inside the process.

    .venv/bin/python -m scripts.bench_mixed --minutes 20 --label probe --json /tmp/probe.json \\
        --probe-memory /tmp/brook-memory [--probe-option=--no-arena] [--probe-option=--tracemalloc=8]
    .venv/bin/python -m scripts.probe_server_memory --report-dir DIR [--interval-s 60] [--tracemalloc FRAMES] \\
        [--baseline-s 120] [--no-arena [PATH_PART]] -- serve --no-fetch

The first form runs the mixed load against a server started by the second. The server runs with a thread that
every ``--interval-s`` appends one JSON line to ``DIR/memory.jsonl``:

- ``rss_mb`` and its split by mapping, from ``/proc/self/smaps`` (see ``smaps_split``): the main heap, glibc's
  per-thread arenas, the KV cache, other anonymous memory (onnxruntime's weights and arena chunks, large
  ``malloc`` blocks), mapped files;
- ``python_mb`` (with ``--tracemalloc``): bytes Python's allocators hold, numpy arrays included;
- ``kv_slots``: per KV-cache slot of each text engine, [allocated, cached tokens, tokens its resident pages hold];
- ``objects``: the object types whose count grew most since the first report.

With ``--tracemalloc FRAMES`` it also writes ``DIR/growth-<seconds>.txt``: the allocation sites that grew most
since the baseline, the first report after ``--baseline-s`` (the warm-up). tracemalloc costs CPU and each report
holds the GIL for a moment: use it to find growth, not to measure latency. ``--no-arena`` runs every onnxruntime
session (``--no-arena=decoder``: those whose model path contains "decoder") without its CPU memory arena: an
experiment, does an arena hold the growth?
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import mmap
import re
import sys
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
TOP_SITES = 25
TOP_TYPES = 12
PAGE = mmap.PAGESIZE
ARENA_WINDOW = 64 * 2**20  # glibc's per-thread heaps: mappings of at most 64 MiB that start 64 MiB-aligned


def smaps_split(kv_ranges: Sequence[tuple[int, int]] = (), path: str = "/proc/self/smaps") -> dict[str, float]:
    """Resident MB of the process by kind of mapping.

    ``heap``: the main ``brk`` heap; ``thread_arenas``: glibc's per-thread heaps (and the rest of their 64 MiB
    window); ``kv_cache``: mappings overlapping ``kv_ranges``; ``other_anon``: every other anonymous mapping (large
    ``malloc`` blocks, onnxruntime's weights and arena chunks); ``files``: mapped files (libraries, weights).
    """
    mappings: list[tuple[int, int, str, int]] = []  # start, end, name, rss kB
    with open(path, encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if SMAPS_HEADER.match(line):
                parts = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                mappings.append((start, end, parts[5].strip() if len(parts) > 5 else "", 0))
            elif line.startswith("Rss:") and mappings:
                start, end, name, _ = mappings[-1]
                mappings[-1] = (start, end, name, int(line.split()[1]))
    arena_windows = {
        start // ARENA_WINDOW
        for start, end, name, _ in mappings
        if not name and start % ARENA_WINDOW == 0 and end - start <= ARENA_WINDOW
    }
    totals = dict.fromkeys(("heap", "thread_arenas", "kv_cache", "other_anon", "files"), 0)
    for start, end, name, rss_kb in mappings:
        if name == "[heap]":
            kind = "heap"
        elif name and not name.startswith("[anon"):
            kind = "files"
        elif any(start < high and low < end for low, high in kv_ranges):  # neighbouring buffers share a mapping
            kind = "kv_cache"
        elif start // ARENA_WINDOW in arena_windows and (end - 1) // ARENA_WINDOW == start // ARENA_WINDOW:
            kind = "thread_arenas"
        else:
            kind = "other_anon"
        totals[kind] += rss_kb
    split = {f"{kind}_mb": round(kb / 1024, 1) for kind, kb in totals.items()}
    return {"rss_mb": round(sum(totals.values()) / 1024, 1), **split}


def live_objects() -> tuple[collections.Counter[str], list[Any]]:
    """One pass over the objects the garbage collector tracks: the count per type, and the live KV caches."""
    from app.text.kv_cache import KVCache

    counts: collections.Counter[str] = collections.Counter()
    caches = []
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
        if isinstance(obj, KVCache):
            caches.append(obj)
    return counts, caches


def resident_pages(array: np.ndarray, pagemap: Any | None = None) -> int:
    """Pages of ``array``'s memory that are in RAM (bit 63 of each page's entry in ``/proc/self/pagemap``; pass the
    open file to read many arrays)."""
    if pagemap is None:
        with open("/proc/self/pagemap", "rb") as opened:
            return resident_pages(array, opened)
    start = int(array.ctypes.data)
    first, last = start // PAGE, (start + array.nbytes - 1) // PAGE
    pagemap.seek(first * 8)
    entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype="<u8")
    return int(np.count_nonzero(entries >> np.uint64(63)))


def kv_slot_report(cache: Any) -> list[list[int]]:
    """Per slot: allocated (0/1), cached tokens, and the tokens its resident KV pages could hold."""
    rows = []
    with open("/proc/self/pagemap", "rb") as pagemap:
        for slot in range(cache.layout.max_batch_size):
            pages = sum(resident_pages(buffer[slot], pagemap) for buffer in (*cache.keys, *cache.values))
            tokens = pages * PAGE // cache.layout.bytes_per_token
            allocated = cache.is_allocated(slot)
            rows.append([int(allocated), cache.length(slot) if allocated else 0, tokens])
    return rows


def kv_cache_ranges(caches: Sequence[Any]) -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` of the caches' buffers, from their first page."""
    ranges = []
    for cache in caches:
        for buffer in (*cache.keys, *cache.values):
            start = int(buffer.ctypes.data)
            ranges.append((start - start % PAGE, start + int(buffer.nbytes)))
    return ranges


class MemoryReporter:
    """The reporter thread: one JSON line per interval; with tracemalloc, the growth since the baseline by site."""

    def __init__(self, report_dir: Path, interval_s: float, baseline_s: float) -> None:
        self.report_dir = report_dir
        self.interval_s = interval_s
        self.baseline_s = baseline_s
        self.started = time.monotonic()
        self.baseline: tracemalloc.Snapshot | None = None
        self.first_types: collections.Counter[str] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.report()
            except Exception as exc:  # a probe must never take the server down
                print(f"memory probe: report failed: {exc!r}", file=sys.stderr, flush=True)

    def report(self) -> None:
        elapsed = time.monotonic() - self.started
        gc.collect()
        counts, caches = live_objects()
        if self.first_types is None:
            self.first_types = counts
        line: dict[str, Any] = {"t_s": round(elapsed, 1), **smaps_split(kv_cache_ranges(caches))}
        line["kv_slots"] = [kv_slot_report(cache) for cache in caches]
        if tracemalloc.is_tracing():
            line["python_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
        line["objects"] = dict((counts - self.first_types).most_common(TOP_TYPES))
        with (self.report_dir / "memory.jsonl").open("a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        if tracemalloc.is_tracing():
            self.write_growth(elapsed)

    def write_growth(self, elapsed: float) -> None:
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if self.baseline is None:
            if elapsed >= self.baseline_s:
                self.baseline = snapshot
            return
        stats = snapshot.compare_to(self.baseline, "traceback")[:TOP_SITES]
        with (self.report_dir / f"growth-{elapsed:05.0f}.txt").open("w", encoding="utf-8") as out:
            for stat in stats:
                out.write(f"{stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+8d} blocks\n")
                out.writelines(f"    {frame}\n" for frame in stat.traceback.format())


def disable_onnxruntime_arenas(path_part: str) -> None:
    """onnxruntime sessions created from now on, of model files whose path contains ``path_part`` ("" = all), run
    without their CPU memory arena (an experiment knob)."""
    import app.ort_session

    create = app.ort_session.create_session

    def maybe_without_arena(path: Path, intra_op_threads: int, **options: Any) -> Any:
        if path_part in str(path):
            options["enable_memory_arena"] = False
        return create(path, intra_op_threads, **options)

    app.ort_session.create_session = maybe_without_arena  # type: ignore[assignment]
    users = ("app.text.llama_runner", "app.speech.vad", "app.speech.whisper_runner")
    early = [name for name in users if name in sys.modules]
    if early:
        raise RuntimeError(f"imported before the patch, arenas stay on: {early}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("--interval-s", type=float, default=60.0)
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace Python allocations")
    parser.add_argument("--baseline-s", type=float, default=120.0, help="tracemalloc: warm-up before the baseline")
    parser.add_argument(
        "--no-arena",
        nargs="?",
        const="",
        metavar="PATH_PART",
        help="onnxruntime sessions (of model files whose path contains PATH_PART) without their memory arena",
    )
    parser.add_argument("brook_args", nargs=argparse.REMAINDER, help="-- and the brook command, e.g. serve")
    args = parser.parse_args(argv)
    brook_args = [a for a in args.brook_args if a != "--"] or ["serve", "--no-fetch"]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    if args.no_arena is not None:
        disable_onnxruntime_arenas(args.no_arena)
    reporter = MemoryReporter(args.report_dir, args.interval_s, args.baseline_s)
    threading.Thread(target=reporter.run, name="memory-probe", daemon=True).start()
    from app.cli import main as brook_main

    try:
        return brook_main(brook_args)
    finally:
        reporter.stop.set()


if __name__ == "__main__":
    raise SystemExit(main())
