"""Run a real `brook serve` (uvicorn) in a subprocess on a free port, for end-to-end tests.

The process handling (free port, readiness on ``/readyz``, SIGTERM then SIGKILL) is the benchmarks' own, from
``scripts/bench_common.py``; this module only fixes the tests' log location and timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from scripts.bench_common import ServerProcess, brook_server_with, free_port

READY_TIMEOUT_S = 180.0

RunningServer = ServerProcess
__all__ = ["READY_TIMEOUT_S", "RunningServer", "free_port", "run_server"]


@contextlib.contextmanager
def run_server(log_dir: Path, **settings: str) -> Iterator[RunningServer]:
    """Start `brook serve --no-fetch` with BROOK_* settings (keyword names without the prefix, lower case); its log
    is ``log_dir/server-<port>.log``."""
    with brook_server_with("server", settings, log_dir=log_dir, timeout_s=READY_TIMEOUT_S) as server:
        yield server
