"""Preallocated KV-cache buffers for GroupQueryAttention's shared-buffer mode, and the slots that index them.

Every layer has one key and one value buffer of shape ``[max_batch_size, n_kv_heads, buffer_tokens, head_dim]``
(float32, BNSH), where ``buffer_tokens = max_seq_len + spare_tokens``. A slot holds at most ``max_seq_len`` tokens;
the spare positions after them are never written. They exist because GroupQueryAttention requires room for a call's
whole right-padded chunk (``past + chunk <= buffer_tokens``) although it stores only the real tokens, and the runner
pads even a lone decode row to a chunk of 2 (see ``app/text/llama_runner.py``).

Slot ``s`` owns row ``s`` of every buffer for as long as it is allocated. onnxruntime writes new keys and values
into those rows in place (the same memory is bound as ``past_*`` input and ``present_*`` output),
so nothing is copied or concatenated in Python between steps.

Memory: each buffer is an anonymous ``mmap`` (zero-filled, mapped lazily by the kernel) advised against transparent
huge pages, so a slot only makes resident the 4 KiB pages its tokens have touched (16 tokens of one head at head_dim
64). numpy's own large allocations ask for huge pages, and with 2 MiB pages the first token of every slot would make
most of the buffer resident. Freeing a slot hands its pages back to the kernel (``MADV_DONTNEED``; they read as zeros
when touched again), so a server whose long conversations have ended does not keep their KV memory resident (before:
every slot kept the pages of the longest conversation it ever held, 46 KB per token for SmolLM2, up to 1.5 GB with
16 full slots). Truncating a slot hands back the whole pages after its new length in the same way: a chat session
that resets and starts over keeps its slot (the new prompt reuses the cached system prompt), and without this the
slot kept the pages of its longest conversation (measured in the mixed load: RSS crept ~5 MB/min, and 8 slots held
pages for 300-440 tokens each while caching 40-400).
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass

import numpy as np

from app.errors import BrookError

logger = logging.getLogger(__name__)

KV_DTYPE = np.float32
RELEASE_MIN_TOKENS = 32  # truncate gives pages back only when it drops at least this many tokens


class SlotError(BrookError):
    """A slot id is out of range, not allocated, or no slot is free."""


class KVCapacityError(BrookError):
    """A sequence would grow past the cache's ``max_seq_len``."""


@dataclass(frozen=True)
class KVCacheLayout:
    """Dimensions of the per-layer KV buffers."""

    n_layers: int  # transformer blocks (one key and one value buffer each)
    n_kv_heads: int  # key/value heads
    head_dim: int  # width of one head
    max_batch_size: int  # slots
    max_seq_len: int  # tokens a slot can hold
    spare_tokens: int = 0  # buffer positions after max_seq_len: room for padding rows, never written

    @property
    def buffer_tokens(self) -> int:
        """Positions per slot in each buffer: ``max_seq_len + spare_tokens``."""
        return self.max_seq_len + self.spare_tokens

    @property
    def buffer_shape(self) -> tuple[int, int, int, int]:
        return (self.max_batch_size, self.n_kv_heads, self.buffer_tokens, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one cached token takes across all layers."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * np.dtype(KV_DTYPE).itemsize

    @property
    def bytes_per_slot(self) -> int:
        """Address space one slot reserves (only touched pages become resident)."""
        return self.bytes_per_token * self.buffer_tokens


class KVCache:
    """The KV buffers, each slot's cached length, and which slots are allocated. Not thread-safe."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        self._maps: list[mmap.mmap] = []
        self.keys = [self._lazy_zeros(layout.buffer_shape) for _ in range(layout.n_layers)]
        self.values = [self._lazy_zeros(layout.buffer_shape) for _ in range(layout.n_layers)]
        self._lengths = np.zeros(layout.max_batch_size, np.int64)
        self._allocated = np.zeros(layout.max_batch_size, bool)
        self._slot_bytes = int(self.keys[0][0].nbytes)
        logger.info(
            "KV cache: %d slots x %d tokens, %.0f MiB address space",
            layout.max_batch_size,
            layout.max_seq_len,
            layout.bytes_per_slot * layout.max_batch_size / 2**20,
        )

    def _lazy_zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """A zeroed float32 array whose pages the kernel maps on first write, in 4 KiB pages."""
        n_bytes = int(np.prod(shape)) * np.dtype(KV_DTYPE).itemsize
        region = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE)  # private: MADV_DONTNEED really frees pages
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            region.madvise(mmap.MADV_NOHUGEPAGE)
        self._maps.append(region)
        return np.frombuffer(region, KV_DTYPE).reshape(shape)

    def allocate(self) -> int:
        """The lowest free slot, now allocated with length 0 (low slots keep the bound row ranges short)."""
        free = np.flatnonzero(~self._allocated)
        if free.size == 0:
            raise SlotError(f"all {self.layout.max_batch_size} KV-cache slots are in use")
        slot = int(free[0])
        self._allocated[slot] = True
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give the slot back and return the memory pages of its rows to the kernel."""
        self.check_allocated(slot)
        self._allocated[slot] = False
        self._lengths[slot] = 0
        self._release_pages(slot)

    def _release_pages(self, slot: int) -> None:
        """``MADV_DONTNEED`` the whole pages inside slot ``slot``'s row of every buffer (zero-filled on next use)."""
        row_start = slot * self._slot_bytes
        self._release_range(row_start, row_start + self._slot_bytes)

    def _release_positions_from(self, slot: int, position: int) -> None:
        """``MADV_DONTNEED`` the whole pages holding positions ``position..`` of every head of the slot's rows."""
        position_bytes = self.layout.head_dim * np.dtype(KV_DTYPE).itemsize
        head_bytes = self.layout.buffer_tokens * position_bytes
        for head in range(self.layout.n_kv_heads):
            head_start = slot * self._slot_bytes + head * head_bytes
            self._release_range(head_start + position * position_bytes, head_start + head_bytes)

    def _release_range(self, start_byte: int, end_byte: int) -> None:
        """``MADV_DONTNEED`` the whole pages inside ``[start_byte, end_byte)`` of every buffer."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-start_byte // page) * page  # first page boundary inside the range
        end = end_byte // page * page
        if end <= start:
            return
        for region in self._maps:
            region.madvise(mmap.MADV_DONTNEED, start, end - start)

    def length(self, slot: int) -> int:
        """Tokens cached in the slot."""
        self.check_allocated(slot)
        return int(self._lengths[slot])

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first ``length`` cached tokens (for reusing a conversation's prefix); the whole pages after
        them go back to the kernel, unless fewer than ``RELEASE_MIN_TOKENS`` tokens were dropped (speculative
        decoding drops a few unconfirmed draft tokens almost every step: the next tokens overwrite them, and giving
        their pages back cost ~0.2 ms of system calls and page faults each time)."""
        current = self.length(slot)
        if not 0 <= length <= current:
            raise ValueError(f"truncate length must be in [0, {current}] for slot {slot}, got {length}")
        self._lengths[slot] = length
        if current - length >= RELEASE_MIN_TOKENS:
            self._release_positions_from(slot, length)

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of slot ``source`` into the empty slot ``destination`` (a prompt
        that starts like another conversation's, such as a shared system prompt, need not be prefilled again).
        Rows of different slots never overlap, so the copy is exact."""
        self.reserve_copy(source, destination, length)
        self.run_copy(source, destination, length)

    def reserve_copy(self, source: int, destination: int, length: int) -> None:
        """Check a copy and give ``destination`` its length now; ``run_copy`` moves the data later (the caller must
        run it before ``source`` loses those tokens and before anything reads ``destination``)."""
        held, occupied = self.length(source), self.length(destination)
        if source == destination or occupied != 0 or not 0 <= length <= held:
            raise ValueError(
                f"copy_prefix({source}, {destination}, {length}) needs two slots, the destination empty (it holds "
                f"{occupied}) and at most the source's {held} tokens"
            )
        self._lengths[destination] = length

    def run_copy(self, source: int, destination: int, length: int) -> None:
        """Move the data of a reserved copy: ``length`` positions of every head of every buffer."""
        for buffer in (*self.keys, *self.values):
            buffer[destination, :, :length] = buffer[source, :, :length]

    def advance(self, slot: int, n_tokens: int) -> None:
        """Record that ``n_tokens`` more tokens were written into the slot."""
        self._lengths[slot] += n_tokens

    def is_allocated(self, slot: int) -> bool:
        return bool(self._allocated[slot])

    def check_allocated(self, slot: int) -> None:
        if not 0 <= slot < self.layout.max_batch_size:
            raise SlotError(f"slot must be in [0, {self.layout.max_batch_size}), got {slot}")
        if not self._allocated[slot]:
            raise SlotError(f"slot {slot} is not allocated")

    def check_room(self, slot: int, n_new: int) -> None:
        """Raise ``KVCapacityError`` if ``n_new`` more tokens do not fit in the slot."""
        total = self.length(slot) + n_new
        if total > self.layout.max_seq_len:
            raise KVCapacityError(
                f"slot {slot} would hold {total} tokens; the KV cache holds at most {self.layout.max_seq_len}"
            )

    def lengths(self, first_slot: int, end_slot: int) -> np.ndarray:
        """Cached lengths of slots ``[first_slot, end_slot)`` (free slots count as 0)."""
        return self._lengths[first_slot:end_slot].copy()

    def row_pointer(self, buffer: np.ndarray, first_slot: int) -> int:
        """Address of slot ``first_slot``'s row in ``buffer``: rows of consecutive slots are contiguous."""
        return int(buffer.ctypes.data) + first_slot * self._slot_bytes
