"""Run a converted Llama-family ONNX graph over a batch of sequences that share one preallocated KV cache.

The server calls ``step`` once per scheduling step with any mix of prefill rows (many new tokens) and decode rows
(one token), each naming the KV-cache slot of its sequence. GroupQueryAttention reads and writes the cache in place
("shared buffer" mode: ``past_*`` and ``present_*`` are bound to the same memory) and ``query_seqlens`` lets each
row of the call add a different number of tokens (right padding), so rows of different lengths run together.

GroupQueryAttention takes the cache rows of the batch as one ``[B, ...]`` tensor, so a call covers a *contiguous*
range of slots ``[first_slot, end_slot)``: we bind a pointer into the middle of each layer's buffer, no copy. Slots
inside the range that have nothing to do this step ride along as idle rows (``query_seqlens = 0``): their cache
is untouched, but they cost their padding and (measured) about half the attention work of a decode row.
``plan_calls`` splits a step into calls so that padding stays small (for example a long prompt and many decode rows
run as two calls).

Batch invariance: a row's logits, and the keys and values it caches, must not depend on which other rows share its
call, or a sequence's greedy reply would change with the server's load. onnxruntime's CPU GroupQueryAttention
(1.32) computes a row with a cached past and one new token along a different path when the call's padded chunk is 1
(all rows decodes) than when it is 2 or more. Both agree to float rounding (about 1e-7), but the int8 activation
quantization of ``MatMulNBits`` at accuracy_level 4 turns such rounding differences into different int8 values, and
after 30 layers the logits differ by 0.3 to 1.4 and so do the keys and values the later layers cache: the sequence
drifts for good. (At accuracy_level 0 the same difference stays below 1e-4.) With a chunk of 2 or more a row's
results are bitwise the same whatever the chunk, the padding and the other rows; for a row of several tokens, or
of one token on an empty slot, the chunk never matters. So every call pads to at least ``MIN_CHUNK_TOKENS`` = 2 (a
lone decode row gets one padding row: a few percent more attention work, the projections never see padding), and
the KV buffers keep ``MIN_CHUNK_TOKENS - 1`` spare positions per slot so that a slot holding ``max_seq_len - 1``
tokens still has room for the padded chunk. ``tests/test_llama_runner.py`` checks the invariance on the real model.

The projections have one such path too, on some processors: on an AMD EPYC with AVX2 only (no AVX-512),
accuracy_level 4 ``MatMulNBits`` gives a row of a one-row call different float rounding (6e-7) than the same row
in any call of two or more rows, which are bitwise the same whatever the other rows (measured on the 576 -> 960
layer, calls of 2 to 64 rows, 1 and 2 threads); v2's greedy replies then changed with the server's load (the
engine tests caught it on such a machine; on the Intel AVX-512 machine before it they passed). So an int8 runner
never runs the projections on one packed row: a call with one real token packs it twice (the copy is never
attended to and never cached), and a call with one row computes its logits twice, but only where a probe at
start-up (one decode step each way, logits compared bitwise) finds that it changes results: it costs one more row
in every projection (on that machine 12.3 against 7.8 ms of CPU for the 30 layers' matmuls, one thread, by
``scripts/bench_llm_kernels``), and on the Intel AVX-512 machine the engine tests passed without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from app.ort_session import create_session
from app.text.kv_cache import KVCache, KVCacheLayout, SlotError

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_TOKENS: Final = 512  # longer prompts are prefilled in chunks of this many tokens
MIN_CHUNK_TOKENS: Final = 2  # every call pads to at least this, so each row takes one kernel path (module docstring)
PAD_BUDGET_FACTOR: Final = 2  # a call may hold at most this many padded positions per real token ...
PAD_BUDGET_SLACK: Final = 32  # ... plus this many
MAX_CACHED_BINDINGS: Final = 64  # IO bindings kept, one per slot range
# With fp32 activations (accuracy_level 0) MatMulNBits runs one row as a fused 4-bit GEMV but two or more rows by
# dequantizing every weight for an SGEMM: measured (scripts/bench_llm_kernels.py, one thread) the layer matmuls cost
# 10.5 ms for one row, 34 ms for two, 37 ms for four and 51 ms for sixteen. A call of two decode rows therefore runs
# as two one-row calls (whole step 46 instead of 66 ms of CPU for v1); from three rows on, one call is cheaper.
FP32_SPLIT_DECODE_ROWS: Final = 2


@dataclass(frozen=True)
class StepInput:
    """New tokens for the sequence in ``slot``: a whole prompt, a prompt chunk, or one generated token (plus, when
    decoding speculatively, drafted tokens after it).

    ``logits`` is how many of the last positions return logits: 1 for the next token, more to verify a draft.
    """

    slot: int
    token_ids: Sequence[int]
    logits: int = 1


def logit_offsets(rows: Sequence[StepInput]) -> npt.NDArray[np.int64]:
    """Where each row's logits start in ``LlamaRunner.step``'s result (rows follow each other, ``logits`` rows
    each), and, last, the result's length."""
    return np.concatenate([[0], np.cumsum([row.logits for row in rows], dtype=np.int64)]).astype(np.int64)


@dataclass(frozen=True)
class CallPlan:
    """One session run over slots ``[first_slot, end_slot)``, padding every row's new tokens to ``chunk``.

    ``chunk`` is the longest row's token count, but at least ``MIN_CHUNK_TOKENS``.
    """

    first_slot: int
    end_slot: int
    chunk: int
    rows: tuple[int, ...]  # indices into the step's rows, in slot order


def padded_chunk(n_new: Iterable[int]) -> int:
    """The chunk a call pads its rows to: the longest row, but at least ``MIN_CHUNK_TOKENS``."""
    return max(MIN_CHUNK_TOKENS, *n_new)


def _call_is_acceptable(
    rows: Sequence[int], slots: Sequence[int], n_new: Sequence[int], lengths: np.ndarray, capacity: int
) -> bool:
    """Whether one call may run these rows: every slot in range has room for the padded chunk, padding is small."""
    first, end = slots[rows[0]], slots[rows[-1]] + 1
    chunk = padded_chunk(n_new[r] for r in rows)
    tokens = sum(n_new[r] for r in rows)
    past = np.maximum(lengths[first:end], 1)  # an idle empty slot is run as holding one (ignored) token
    for r in rows:
        past[slots[r] - first] = lengths[slots[r]]
    padded = (end - first) * chunk
    return bool(np.all(past + chunk <= capacity)) and padded <= PAD_BUDGET_FACTOR * tokens + PAD_BUDGET_SLACK


def _greedy_groups(
    rows: Sequence[int], slots: Sequence[int], n_new: Sequence[int], lengths: np.ndarray, capacity: int
) -> list[list[int]]:
    groups: list[list[int]] = []
    current: list[int] = []
    for row in rows:
        if current and not _call_is_acceptable([*current, row], slots, n_new, lengths, capacity):
            groups.append(current)
            current = [row]
        else:
            current.append(row)
    if current:
        groups.append(current)
    return groups


def plan_calls(slots: Sequence[int], n_new: Sequence[int], lengths: np.ndarray, capacity: int) -> list[CallPlan]:
    """Split a step's rows into session calls.

    ``slots[i]`` and ``n_new[i]`` describe row ``i``; ``lengths`` holds every slot's cached length before the step
    and ``capacity`` the positions per slot of the KV buffers (``KVCacheLayout.buffer_tokens``, at least
    ``max_seq_len + MIN_CHUNK_TOKENS - 1``). Each row's ``lengths[slot] + n_new`` must already fit in ``max_seq_len``.
    The whole step runs as one call when that is cheap; otherwise decode rows and multi-token rows form separate
    groups of neighbouring slots. How rows are grouped never changes their results (module docstring).
    """
    order = sorted(range(len(slots)), key=lambda r: slots[r])
    if not order:
        return []
    if _call_is_acceptable(order, slots, n_new, lengths, capacity):
        groups = [order]
    else:
        decode = [r for r in order if n_new[r] == 1]
        prefill = [r for r in order if n_new[r] > 1]
        groups = _greedy_groups(decode, slots, n_new, lengths, capacity)
        groups += _greedy_groups(prefill, slots, n_new, lengths, capacity)
    return [CallPlan(slots[g[0]], slots[g[-1]] + 1, padded_chunk(n_new[r] for r in g), tuple(g)) for g in groups]


def split_decode_calls(
    plans: Sequence[CallPlan], n_new: Sequence[int], slots: Sequence[int], max_rows: int
) -> list[CallPlan]:
    """Replace each call of 2..``max_rows`` decode rows (one new token each) by one call per row.

    A row's results do not depend on the call it runs in (module docstring), so this only changes the cost.
    """
    result: list[CallPlan] = []
    for plan in plans:
        if 1 < len(plan.rows) <= max_rows and all(n_new[r] == 1 for r in plan.rows):
            result += [CallPlan(slots[r], slots[r] + 1, padded_chunk([1]), (r,)) for r in plan.rows]
        else:
            result.append(plan)
    return result


class LlamaRunner:
    """Batched, KV-cached next-token logits for a model written by ``app.convert.llama``. Not thread-safe.

    Slots: ``allocate_slot`` hands out a KV-cache slot (length 0) for a sequence; ``step`` appends tokens to slots
    and returns each row's last-position logits; ``truncate`` rolls a slot back to a prefix it already holds (to
    reuse a conversation's cached prompt); ``free_slot`` returns it. A slot's KV rows belong to it until freed.
    """

    def __init__(
        self,
        model_dir: Path,
        config: Mapping[str, Any],
        *,
        intra_op_threads: int = 2,
        max_batch_size: int = 32,
        max_seq_len: int | None = None,
        max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
        spin_us: int | None = None,
    ) -> None:
        max_seq_len = int(config["max_seq_len"]) if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= int(config["context_length"]):
            raise ValueError(f"max_seq_len must be in [1, {config['context_length']}], got {max_seq_len}")
        self.n_layers = int(config["n_layers"])
        self.vocab_size = int(config["vocab_size"])
        self.max_chunk_tokens = max_chunk_tokens
        # Decode-only calls of at most this many rows run one row per call (0: never); see FP32_SPLIT_DECODE_ROWS.
        int8_activations = int(config.get("accuracy_level", 0)) == 4
        # Calls of at most this many decode rows run on the two-level int8 decode graph, when the model has one
        # (app/convert/llama.py, "Two-level activations"); it also replaces splitting them into one-row calls.
        self.decode_graph_rows = int(config.get("decode_graph_rows", 0)) if config.get("decode_model_file") else 0
        self.split_decode_rows = 0 if int8_activations or self.decode_graph_rows else FP32_SPLIT_DECODE_ROWS
        self.min_packed_rows = 1  # 2 where one-row projections round differently (module docstring), probed below
        # Speculative decoding verifies drafted tokens as one row of several tokens, whose attention takes another
        # kernel path than one token at a time (module docstring): with fp32 activations the logits agree to float
        # rounding, but int8 activations turn that into different tokens, so such runners must not take drafts.
        self.verifies_drafts_exactly = not int8_activations
        self.cache = KVCache(
            KVCacheLayout(
                self.n_layers,
                int(config["n_kv_heads"]),
                int(config["head_dim"]),
                max_batch_size,
                max_seq_len,
                spare_tokens=MIN_CHUNK_TOKENS - 1,
            )
        )
        self.session: ort.InferenceSession = create_session(
            model_dir / str(config["model_file"]), intra_op_threads, spin_us=spin_us
        )
        self.decode_session: ort.InferenceSession | None = None
        if self.decode_graph_rows:
            self.decode_session = create_session(
                model_dir / str(config["decode_model_file"]), intra_op_threads, spin_us=spin_us
            )
        for session in (self.session, self.decode_session):
            if session is not None:
                self._check_session(session)
        self._bindings: dict[tuple[bool, int, int], ort.IOBinding] = {}
        self._pending_copies: list[tuple[int, int, int]] = []  # (source, destination, length), see copy_prefix
        # written by the session in place; at least two rows for the doubled single row of int8 runners
        self._logits = np.empty((max(max_batch_size, 2), self.vocab_size), np.float32)
        if int8_activations:
            self.min_packed_rows = 2 if self._one_row_calls_round_differently() else 1
            logger.info("int8 runner: one-token calls packed %d time(s) (batch invariance)", self.min_packed_rows)

    def _check_session(self, session: ort.InferenceSession) -> None:
        inputs = {i.name for i in session.get_inputs()}
        expected = {
            "input_ids",
            "chunk_index",
            "packed_index",
            "logit_index",
            "seqlens_k",
            "query_lens",
            "total_sequence_length",
        }
        expected |= {f"past_{kind}.{layer}" for kind in ("key", "value") for layer in range(self.n_layers)}
        if inputs != expected:
            raise ValueError(
                f"model inputs differ from the runner's: missing {sorted(expected - inputs)}, "
                f"unexpected {sorted(inputs - expected)}"
            )

    def _session(self, decode_graph: bool) -> ort.InferenceSession:
        """The decode graph's session when asked for and present, else the main graph's."""
        return self.decode_session if decode_graph and self.decode_session is not None else self.session

    def _binding(self, first_slot: int, end_slot: int, decode_graph: bool = False) -> ort.IOBinding:
        """An IO binding of the main or the decode graph with the KV rows of slots ``[first_slot, end_slot)`` bound,
        cached per graph and range.

        ``past_*`` and ``present_*`` are bound to the same memory, which puts GroupQueryAttention in shared-buffer
        mode: it appends the new keys and values in place. Callers bind the per-call inputs and ``logits`` before
        each run.
        """
        key = (decode_graph, first_slot, end_slot)
        binding = self._bindings.get(key)
        if binding is not None:
            return binding
        if len(self._bindings) >= MAX_CACHED_BINDINGS:
            self._bindings.clear()
        session = self._session(decode_graph)
        binding = session.io_binding()
        shape = [end_slot - first_slot, *self.cache.layout.buffer_shape[1:]]
        for layer in range(self.n_layers):
            for kind, buffers in (("key", self.cache.keys), ("value", self.cache.values)):
                pointer = self.cache.row_pointer(buffers[layer], first_slot)
                binding.bind_input(f"past_{kind}.{layer}", "cpu", 0, np.float32, shape, pointer)
                binding.bind_output(f"present_{kind}.{layer}", "cpu", 0, np.float32, shape, pointer)
        self._bindings[key] = binding
        return binding

    def _one_row_calls_round_differently(self) -> bool:
        """Whether this processor's kernels give a lone decode row other numbers than the same row packed twice (the
        layout of every call of two or more rows): one decode step each way on a scratch slot, logits compared
        bitwise. Packing twice costs one more row in every projection (measured on the AVX2 machine: 12.3 against
        7.8 ms of CPU for the layers' matmuls), so it is only done where it changes results."""
        slot = self.cache.allocate()
        try:
            self.step([StepInput(slot, [1, 2, 3])])
            self.min_packed_rows = 1
            alone = self.step([StepInput(slot, [4])])[0].copy()
            self.cache.truncate(slot, 3)
            self.min_packed_rows = 2
            packed_twice = self.step([StepInput(slot, [4])])[0].copy()
            return not np.array_equal(alone, packed_twice)
        finally:
            self.cache.free(slot)

    # -- slots ---------------------------------------------------------------------------------------------------

    def allocate_slot(self) -> int:
        """A free KV-cache slot with nothing cached; raises ``SlotError`` when all are in use."""
        return self.cache.allocate()

    def free_slot(self, slot: int) -> None:
        self._run_copies_touching(slot)
        self.cache.free(slot)

    def slot_length(self, slot: int) -> int:
        """Tokens cached in the slot (the position of its next token)."""
        return self.cache.length(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Forget every cached token after the first ``length``."""
        self._run_copies_touching(slot)
        self.cache.truncate(slot, length)

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Start the empty slot ``destination`` with the first ``length`` cached tokens of slot ``source``.

        The slot's length changes now; the data moves at the start of the next ``step``, on the thread that runs
        it (the engine calls this from its event loop, and 500 tokens are 23 MB to copy into fresh pages), or at once
        if either slot is freed or truncated first. Copies run in the order asked, so a
        copy from a slot that is itself waiting for one sees its data."""
        self.cache.reserve_copy(source, destination, length)
        self._pending_copies.append((source, destination, length))

    def _run_copies_touching(self, slot: int) -> None:
        if any(slot in (source, destination) for source, destination, _ in self._pending_copies):
            self._run_copies()

    def _run_copies(self) -> None:
        pending, self._pending_copies = self._pending_copies, []
        for source, destination, length in pending:
            self.cache.run_copy(source, destination, length)

    # -- stepping ------------------------------------------------------------------------------------------------

    def step(self, batch: Sequence[StepInput]) -> np.ndarray:
        """Append each row's tokens to its slot; return float32 logits ``[sum of rows' logits, vocab]``: each row's
        last ``logits`` positions, in order, row after row (one row per input when every ``logits`` is 1).

        All rows are checked before anything runs (allocated, distinct slots, at least one token, room left), so a
        rejected step leaves the cache unchanged.
        """
        slots = [row.slot for row in batch]
        if len(set(slots)) != len(slots):
            raise SlotError(f"a step may name each slot once, got slots {slots}")
        tokens = [np.asarray(row.token_ids, np.int64) for row in batch]
        for slot, ids in zip(slots, tokens, strict=True):
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"slot {slot}: expected a non-empty list of token ids, got shape {ids.shape}")
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                raise ValueError(f"slot {slot}: token ids must be in [0, {self.vocab_size})")
            self.cache.check_room(slot, ids.size)
        for row in batch:  # a prompt longer than a chunk runs in several calls: only the last one's logits exist
            most = len(row.token_ids) if len(row.token_ids) <= self.max_chunk_tokens else 1
            if not 1 <= row.logits <= most:
                raise ValueError(f"slot {row.slot}: logits must be in [1, {most}], got {row.logits}")
        self._run_copies()  # prefixes copied into new slots (copy_prefix), here on the engine's inference thread
        # Prefill long prompts chunk by chunk; only the last chunk's logits are needed.
        for i, slot in enumerate(slots):
            while tokens[i].size > self.max_chunk_tokens:
                self._run(
                    [slot],
                    [tokens[i][: self.max_chunk_tokens]],
                    [0],
                    CallPlan(slot, slot + 1, padded_chunk([self.max_chunk_tokens]), (0,)),
                )
                tokens[i] = tokens[i][self.max_chunk_tokens :]
        firsts = logit_offsets(batch)
        logits = np.empty((int(firsts[-1]), self.vocab_size), np.float32)
        n_new = [ids.size for ids in tokens]
        lengths = self.cache.lengths(0, self.cache.layout.max_batch_size)
        plans = plan_calls(slots, n_new, lengths, self.cache.layout.buffer_tokens)
        for plan in split_decode_calls(plans, n_new, slots, self.split_decode_rows):
            rows = list(plan.rows)
            targets = np.concatenate([np.arange(firsts[r], firsts[r + 1]) for r in rows])
            logits[targets] = self._run(slots, tokens, rows, plan, [batch[r].logits for r in rows])
        return logits

    def _run(
        self,
        slots: Sequence[int],
        tokens: Sequence[np.ndarray],
        rows: list[int],
        plan: CallPlan,
        logit_counts: Sequence[int] | None = None,
    ) -> np.ndarray:
        """One session call; advances the slots and returns the logits of each row's last ``logit_counts[i]``
        positions (default one), row after row in ``rows`` order.

        The logits are a view of a buffer that the next call overwrites.
        """
        logit_counts = [1] * len(rows) if logit_counts is None else logit_counts
        batch = plan.end_slot - plan.first_slot
        chunk = plan.chunk
        lengths = self.cache.lengths(plan.first_slot, plan.end_slot)
        query_lens = np.zeros(batch, np.int32)
        chunk_index = np.zeros((batch, chunk), np.int64)  # padding points at token 0; GQA ignores it
        packed_index = np.empty(sum(tokens[r].size for r in rows), np.int64)
        logit_index = np.empty(sum(logit_counts), np.int64)
        offset = logit_offset = 0
        for r, count in zip(rows, logit_counts, strict=True):
            b, n = slots[r] - plan.first_slot, tokens[r].size
            query_lens[b] = n
            chunk_index[b, :n] = np.arange(offset, offset + n)
            packed_index[offset : offset + n] = b * chunk + np.arange(n)
            logit_index[logit_offset : logit_offset + count] = np.arange(offset + n - count, offset + n)
            offset += n
            logit_offset += count
        seqlens_k = (np.maximum(lengths + query_lens, 1) - 1).astype(np.int32)
        input_ids = np.concatenate([tokens[r] for r in rows])
        if offset < self.min_packed_rows:  # one real token: pack it twice (module docstring)
            input_ids = np.repeat(input_ids, self.min_packed_rows)
            packed_index = np.repeat(packed_index, self.min_packed_rows)
        n_logits = logit_index.size
        if n_logits < self.min_packed_rows:  # likewise the output projection: one row's logits computed twice
            logit_index = np.repeat(logit_index, self.min_packed_rows)
        feeds = {
            "input_ids": input_ids,
            "chunk_index": chunk_index,
            "packed_index": packed_index,
            "logit_index": logit_index,
            "seqlens_k": seqlens_k,
            "query_lens": query_lens,
            # An upper bound of every row's total; GroupQueryAttention also wants it >= the chunk.
            "total_sequence_length": np.array(max(int(seqlens_k.max()) + 1, chunk), np.int32),
        }
        # Few tokens (decode rows, drafts to verify): the two-level graph, where fp32 activations cost the most.
        decode_graph = offset <= self.decode_graph_rows
        binding = self._binding(plan.first_slot, plan.end_slot, decode_graph)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        if logit_index.size > self._logits.shape[0]:  # drafts: more logits rows than slots
            self._logits = np.empty((logit_index.size, self.vocab_size), np.float32)
        logits = self._logits[: logit_index.size]
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        session = self._session(decode_graph)
        session.run_with_iobinding(binding)
        for r in rows:
            self.cache.advance(slots[r], tokens[r].size)
        return logits[:n_logits]
