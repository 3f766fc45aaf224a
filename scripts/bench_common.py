"""Shared pieces of the load benchmarks: start servers, percentiles, machine facts, JSON output.

Every ``scripts/bench_*.py`` load benchmark starts the servers it measures as real subprocesses on free ports and
drives them with real network clients. This module holds what they all need:

- ``brook_server(...)``: a ``brook serve --no-fetch`` subprocess with ``BROOK_*`` settings, ready on ``/readyz``;
- ``process_server(...)``: any other server command (the anchors), ready when a URL answers or a port opens;
- ``rss_bytes(pid)`` (with children), ``percentile``, ``machine_facts()`` (load average, cores, commit);
- ``write_json(path, payload)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

logger = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
BENCH_DIR: Final = REPO_ROOT / ".bench"  # anchors' venvs and builds (gitignored)
LOG_DIR: Final = REPO_ROOT / "test-artifacts" / "bench-logs"
DOCS_BENCH_DIR: Final = REPO_ROOT / "docs" / "bench"
READY_TIMEOUT_S: Final = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A running server subprocess on 127.0.0.1:``port``."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        return rss_bytes(self.process.pid)

    def log(self) -> str:
        """Everything the server has written to its log so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]


def rss_bytes(pid: int, *, with_children: bool = True) -> int:
    """Resident memory of ``pid`` (and its child processes), from /proc."""
    total = _vm_rss(pid)
    if with_children:
        for child in _children(pid):
            total += rss_bytes(child)
    return total


def _vm_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return 0
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            found.extend(int(value) for value in (task / "children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(server: ServerProcess, ready_url: str | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        if ready_url is not None and _http_ok(ready_url):
            return
        if ready_url is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} was not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def process_server(
    name: str,
    command: Sequence[str],
    port: int,
    *,
    ready_path: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    log_dir: Path = LOG_DIR,
) -> Iterator[ServerProcess]:
    """Run ``command`` (which must listen on ``port``) until the block ends; SIGTERM, then SIGKILL after 30 s.
    Its output goes to ``log_dir/<name>-<port>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(name, process, port, log_path)
    try:
        ready_url = None if ready_path is None else f"http://127.0.0.1:{port}{ready_path}"
        _wait_ready(server, ready_url, timeout_s)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def brook_server(name: str = "brook", **settings: str) -> Iterator[ServerProcess]:
    """``brook serve --no-fetch`` with ``BROOK_<KEY>`` settings (keyword names without the prefix, lower case)."""
    with brook_server_with(name, settings) as server:
        yield server


@contextlib.contextmanager
def brook_server_with(
    name: str,
    settings: Mapping[str, str],
    *,
    log_dir: Path = LOG_DIR,
    timeout_s: float = READY_TIMEOUT_S,
    launcher: Sequence[str] = ("app.cli",),
) -> Iterator[ServerProcess]:
    """``brook_server`` with its log folder and readiness timeout chosen: ready once ``/readyz`` answers 200.

    ``launcher``: the module run with ``python -m`` and its arguments before ``serve --no-fetch`` (a wrapper such as
    ``scripts.probe_server_memory`` passes the rest on to ``app.cli``)."""
    port = free_port()
    env = {f"BROOK_{key.upper()}": value for key, value in settings.items()}
    env["BROOK_PORT"] = str(port)
    command = [sys.executable, "-m", *launcher, "serve", "--no-fetch"]
    with process_server(
        name, command, port, ready_path="/readyz", env=env, timeout_s=timeout_s, log_dir=log_dir
    ) as server:
        yield server


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` (0..1) percentile, NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), fraction * 100)) if values else float("nan")


def load_average() -> float:
    return os.getloadavg()[0]


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge a run: time, cores, load, commit."""
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    return {
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "load_average_1m": load_average(),
        "commit": commit,
        "python": sys.version.split()[0],
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
