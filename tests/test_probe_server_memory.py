"""The memory probe's split of a process's mappings (scripts/probe_server_memory.py), on a synthetic smaps file."""

from __future__ import annotations

from pathlib import Path

from scripts.probe_server_memory import ARENA_WINDOW, smaps_split


def _mapping(start: int, end: int, name: str, rss_kb: int) -> str:
    return f"{start:x}-{end:x} rw-p 00000000 00:00 0    {name}\nSize: {(end - start) // 1024} kB\nRss: {rss_kb} kB\n"


def test_smaps_split_sorts_mappings_by_kind(tmp_path: Path) -> None:
    mib = 2**20
    arena = 300 * ARENA_WINDOW  # a glibc thread heap: 64 MiB-aligned, split in two by mprotect
    kv = 0x7F0000000000
    smaps = "".join(
        [
            _mapping(0x5500_0000_0000, 0x5500_0000_0000 + 8 * mib, "[heap]", 4096),
            _mapping(arena, arena + 16 * mib, "", 10240),
            _mapping(arena + 16 * mib, arena + ARENA_WINDOW, "", 0),
            _mapping(kv, kv + 100 * mib, "", 20480),  # two KV buffers merged into one mapping
            _mapping(kv + 100 * mib, kv + 180 * mib, "", 51200),  # the weights right after them
            _mapping(0x7F1000000000, 0x7F1000000000 + 2 * mib, "/usr/lib/libfoo.so", 1024),
        ]
    )
    path = tmp_path / "smaps"
    path.write_text(smaps)
    split = smaps_split([(kv, kv + 50 * mib), (kv + 50 * mib, kv + 100 * mib)], str(path))
    assert split == {
        "rss_mb": 85.0,
        "heap_mb": 4.0,
        "thread_arenas_mb": 10.0,
        "kv_cache_mb": 20.0,
        "other_anon_mb": 50.0,
        "files_mb": 1.0,
    }
