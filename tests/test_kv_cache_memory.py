"""KV-cache slots give their memory pages back when freed or truncated, and a reused slot starts from zeros."""

from __future__ import annotations

import mmap

import numpy as np

from app.text.kv_cache import KVCache, KVCacheLayout
from scripts.probe_server_memory import resident_pages


def _resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_truncating_a_slot_returns_the_pages_after_its_new_length() -> None:
    layout = KVCacheLayout(n_layers=2, n_kv_heads=3, head_dim=64, max_batch_size=3, max_seq_len=1024, spare_tokens=1)
    cache = KVCache(layout)
    slots = [cache.allocate() for _ in range(3)]
    tokens_per_page = mmap.PAGESIZE // (layout.head_dim * 4)  # 16 positions of one head per 4 KiB page
    for slot in slots:
        for buffer in cache.keys + cache.values:
            buffer[slot, :, :800] = slot + 1.0
        cache.advance(slot, 800)
    full = [resident_pages(cache.keys[0][slot]) for slot in slots]

    cache.truncate(slots[1], 100)
    cache.truncate(slots[2], 800)  # not shorter: nothing to give back
    cache.truncate(slots[2], 800 - 10)  # a few unconfirmed draft tokens: their pages stay for the next tokens
    assert resident_pages(cache.keys[0][slots[2]]) == full[2]
    cache.advance(slots[2], 10)
    for buffer in cache.keys + cache.values:
        row = buffer[slots[1]]
        kept_pages = -(-100 // tokens_per_page) * layout.n_kv_heads
        assert resident_pages(row) <= kept_pages + layout.n_kv_heads  # at most one partial page per head more
        assert np.all(row[:, :100] == 2.0)  # the kept prefix is intact
        assert np.all(buffer[slots[0]][:, :800] == 1.0) and np.all(buffer[slots[2]][:, :800] == 3.0)
    assert resident_pages(cache.keys[0][slots[0]]) == full[0]
    assert resident_pages(cache.keys[0][slots[2]]) == full[2]
    assert cache.length(slots[1]) == 100

    for buffer in cache.keys + cache.values:  # the slot grows again over released pages: they read as zeros
        assert not np.any(buffer[slots[1]][:, 112:800])
        buffer[slots[1], :, 100:300] = 5.0
    cache.advance(slots[1], 200)
    assert all(np.all(buffer[slots[1]][:, 100:300] == 5.0) for buffer in cache.keys + cache.values)


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
