"""KV-cache slots give their memory pages back when freed, and a reused slot starts from zeros."""

from __future__ import annotations

import numpy as np

from app.text.kv_cache import KVCache, KVCacheLayout


def _resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_freeing_a_slot_returns_its_pages_and_keeps_the_others() -> None:
    layout = KVCacheLayout(n_layers=2, n_kv_heads=2, head_dim=64, max_batch_size=4, max_seq_len=4096)
    cache = KVCache(layout)
    first, second = cache.allocate(), cache.allocate()
    before = _resident_kib()
    for buffer in cache.keys + cache.values:
        buffer[first] = 1.0
        buffer[second] = 2.0
    filled = _resident_kib()
    slot_kib = layout.bytes_per_slot // 1024
    assert filled - before >= 1.5 * slot_kib  # both slots became resident (pages are mapped lazily)

    cache.free(first)
    assert filled - _resident_kib() >= 0.9 * slot_kib  # the freed slot's pages went back to the kernel
    assert all(np.all(buffer[second] == 2.0) for buffer in cache.keys + cache.values)

    again = cache.allocate()
    assert again == first and cache.length(again) == 0
    assert all(not np.any(buffer[again]) for buffer in cache.keys + cache.values)
