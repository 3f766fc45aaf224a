"""glibc heap settings: with a fixed mmap threshold a freed large block goes back to the OS at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings
from app.main import create_app
from app.server.native_heap import MAX_MMAP_THRESHOLD_BYTES, set_mmap_threshold

# Allocate and free an 8 MiB block twice and report how much RSS the process keeps after the second free. glibc's
# adaptive threshold serves the first block with mmap, then raises the threshold to 8 MiB, so the second block comes
# from the heap and stays resident after free (below the heap's trim threshold).
PROGRAM = """
import ctypes, json, sys
from app.server.native_heap import set_mmap_threshold

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

if sys.argv[1] == "fixed":
    assert set_mmap_threshold(1024 * 1024)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 * 1024 * 1024
for _ in range(2):
    before = rss_kib()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(json.dumps({"kept_kib": rss_kib() - before}))
"""


def _kept_after_free(mode: str) -> int:
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True, cwd=repo)
    kept: int = json.loads(done.stdout)["kept_kib"]
    return kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap behaviour (Linux)")
def test_a_fixed_mmap_threshold_returns_freed_large_blocks_at_once() -> None:
    assert _kept_after_free("adaptive") > 6 * 1024  # the default keeps the second 8 MiB block resident
    assert _kept_after_free("fixed") < 1024


def test_thresholds_out_of_glibc_range_are_refused() -> None:
    with pytest.raises(ValueError, match="mmap threshold"):
        set_mmap_threshold(0)
    with pytest.raises(ValueError, match="mmap threshold"):
        set_mmap_threshold(MAX_MMAP_THRESHOLD_BYTES + 1)


def test_the_server_refuses_a_threshold_setting_out_of_range() -> None:
    with pytest.raises(ValueError, match="BROOK_MALLOC_MMAP_THRESHOLD_KB must lie in 0..32768"):
        create_app(Settings(malloc_mmap_threshold_kb=40_000))
