"""LlamaRunner: batching rows of different lengths over one shared KV cache, slot management, and call planning.

Synthetic-model tests run at accuracy_level 0, where the graph is exact up to fp32 summation order, and compare
every row against the numpy reference with its own cache. Batch invariance (a row's results do not depend on the
rows that share its call) is checked bitwise on the synthetic model at accuracy_level 4, whose int8 activations
otherwise amplify float rounding differences, and on SmolLM2 at the default level with greedy continuations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from app.convert.gguf_model import GGUFModel
from app.convert.llama import DEFAULT_ACCURACY_LEVEL, build_llama_onnx
from app.text.kv_cache import KVCapacityError, SlotError
from app.text.llama_runner import MIN_CHUNK_TOKENS, LlamaRunner, StepInput, plan_calls, split_decode_calls
from tests.reference_llama import ReferenceCache, ReferenceLlama, use_single_blas_thread
from tests.smollm2_fixtures import CHAT_PROMPTS, converted_smollm2
from tests.synthetic_llama_gguf import MIXED_TYPES, write_synthetic_gguf

TOLERANCE = 1e-3  # accuracy_level 0 against the fp32 reference
MAX_SEQ_LEN = 64
MAX_BATCH = 6
VOCAB = MIXED_TYPES.vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], ReferenceLlama]:
    use_single_blas_thread()
    directory = tmp_path_factory.mktemp("tiny")
    write_synthetic_gguf(directory / "model.gguf", MIXED_TYPES, seed=3)
    config = build_llama_onnx(GGUFModel(directory / "model.gguf"), directory, {"accuracy_level": 0})
    return directory, config, ReferenceLlama.from_gguf(directory / "model.gguf")


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The same synthetic model at accuracy_level 4 (int8 activations), where batch invariance must be bitwise."""
    directory = tmp_path_factory.mktemp("tiny_int8")
    write_synthetic_gguf(directory / "model.gguf", MIXED_TYPES, seed=3)
    return directory, build_llama_onnx(GGUFModel(directory / "model.gguf"), directory, {"accuracy_level": 4})


@pytest.fixture
def runner(tiny: tuple[Path, dict[str, object], ReferenceLlama]) -> Iterator[LlamaRunner]:
    directory, config, _ = tiny
    yield LlamaRunner(directory, config, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture
def reference(tiny: tuple[Path, dict[str, object], ReferenceLlama]) -> ReferenceLlama:
    return tiny[2]


def _tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, n)]


# -- planning (pure) -------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_plan_covers_each_row_once_with_valid_ranges(data: st.DataObject) -> None:
    max_seq_len = 40
    capacity = max_seq_len + MIN_CHUNK_TOKENS - 1  # the runner's KV buffers keep spare positions for padding
    lengths = np.array(data.draw(st.lists(st.integers(0, max_seq_len), min_size=8, max_size=8)))
    slots = data.draw(st.lists(st.integers(0, 7), unique=True, min_size=1, max_size=8))
    assume(all(lengths[s] < max_seq_len for s in slots))
    n_new = [data.draw(st.integers(1, max_seq_len - int(lengths[s]))) for s in slots]
    plans = plan_calls(slots, n_new, lengths, capacity)
    assert sorted(r for plan in plans for r in plan.rows) == list(range(len(slots)))
    for plan in plans:
        assert plan.chunk == max(MIN_CHUNK_TOKENS, *(n_new[r] for r in plan.rows))
        assert [slots[r] for r in plan.rows] == sorted(slots[r] for r in plan.rows)
        assert plan.first_slot == slots[plan.rows[0]] and plan.end_slot == slots[plan.rows[-1]] + 1
        in_call = {slots[r] for r in plan.rows}
        for slot in range(plan.first_slot, plan.end_slot):
            past = lengths[slot] if slot in in_call else max(lengths[slot], 1)
            assert past + plan.chunk <= capacity, "GroupQueryAttention needs room for the padded chunk"


def test_plan_runs_a_long_prompt_apart_from_many_decodes() -> None:
    lengths = np.full(32, 10)
    slots = list(range(32))
    n_new = [1] * 31 + [200]
    plans = plan_calls(slots, n_new, lengths, 1024)
    assert [(p.first_slot, p.end_slot, p.chunk) for p in plans] == [(0, 31, MIN_CHUNK_TOKENS), (31, 32, 200)]
    mixed = plan_calls([0, 1, 2], [1, 3, 1], lengths, 1024)
    assert [(p.first_slot, p.end_slot, p.chunk) for p in mixed] == [(0, 3, 3)]


def test_small_decode_calls_split_into_one_row_calls() -> None:
    lengths = np.full(8, 10)
    pair = plan_calls([3, 5], [1, 1], lengths, 1024)
    assert [(p.first_slot, p.end_slot, p.rows) for p in split_decode_calls(pair, [1, 1], [3, 5], 2)] == [
        (3, 4, (0,)),
        (5, 6, (1,)),
    ]
    assert split_decode_calls(pair, [1, 1], [3, 5], 0) == pair  # int8 models never split
    three = plan_calls([0, 1, 2], [1, 1, 1], lengths, 1024)
    assert split_decode_calls(three, [1, 1, 1], [0, 1, 2], 2) == three  # one call is cheaper from three rows on
    mixed = plan_calls([0, 1], [1, 4], lengths, 1024)
    assert split_decode_calls(mixed, [1, 4], [0, 1], 2) == mixed  # a prompt row keeps its call


def test_fp32_runners_split_pairs_and_int8_runners_do_not(
    tiny: tuple[Path, dict[str, object], ReferenceLlama], tiny_int8: tuple[Path, dict[str, object]]
) -> None:
    fp32_dir, fp32_config, _ = tiny
    int8_dir, int8_config = tiny_int8
    assert LlamaRunner(fp32_dir, fp32_config, max_batch_size=2).split_decode_rows == 2
    assert LlamaRunner(int8_dir, int8_config, max_batch_size=2).split_decode_rows == 0


# -- synthetic model -------------------------------------------------------------------------------------------------


def test_rows_of_different_lengths_in_one_step_match_reference(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    prompts = [_tokens(1, 9), _tokens(2, 1), _tokens(3, 17), _tokens(4, 4)]
    slots = [runner.allocate_slot() for _ in prompts]
    caches = [ReferenceCache() for _ in prompts]
    logits = runner.step([StepInput(s, p) for s, p in zip(slots, prompts, strict=True)])
    for row, (prompt, cache) in enumerate(zip(prompts, caches, strict=True)):
        np.testing.assert_allclose(logits[row], reference.forward(prompt, cache)[-1], atol=TOLERANCE, rtol=0)
    # Decode steps, rows given out of slot order, plus one row that adds three tokens at once.
    for step in range(4):
        new = [[int(np.argmax(logits[row]))] for row in range(len(prompts))]
        new[2] = new[2] + _tokens(10 + step, 2)
        order = [3, 0, 2, 1]
        logits_in_order = runner.step([StepInput(slots[row], new[row]) for row in order])
        logits = logits_in_order[np.argsort(order)]
        for row, cache in enumerate(caches):
            np.testing.assert_allclose(logits[row], reference.forward(new[row], cache)[-1], atol=TOLERANCE, rtol=0)
    assert [runner.slot_length(s) for s in slots] == [9 + 4, 1 + 4, 17 + 12, 4 + 4]


def test_rows_return_the_logits_of_their_last_positions(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    """Speculative decoding verifies drafted tokens with the logits of every position of a row (StepInput.logits);
    the result holds each row's positions in order, row after row."""
    prompts = [_tokens(40, 6), _tokens(41, 9), _tokens(42, 3)]
    slots = [runner.allocate_slot() for _ in prompts]
    counts = [1, 4, 3]
    logits = runner.step([StepInput(s, p, n) for s, p, n in zip(slots, prompts, counts, strict=True)])
    assert logits.shape == (sum(counts), VOCAB)
    expected = np.concatenate([reference.forward(p)[-n:] for p, n in zip(prompts, counts, strict=True)])
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)
    # a decode token plus two drafted ones, next to a plain decode row
    tails = [_tokens(43, 3), _tokens(44, 1)]
    logits = runner.step([StepInput(slots[0], tails[0], 3), StepInput(slots[2], tails[1])])
    expected = np.concatenate(
        [reference.forward(prompts[0] + tails[0])[-3:], reference.forward(prompts[2] + tails[1])[-1:]]
    )
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="logits must be in"):
        runner.step([StepInput(slots[1], [1, 2], 3)])


def test_prefill_in_two_steps_equals_one(runner: LlamaRunner) -> None:
    first, second = _tokens(5, 11), _tokens(6, 7)
    split_slot, whole_slot = runner.allocate_slot(), runner.allocate_slot()
    runner.step([StepInput(split_slot, first)])
    split = runner.step([StepInput(split_slot, second)])[0]
    whole = runner.step([StepInput(whole_slot, first + second)])[0]
    np.testing.assert_allclose(split, whole, atol=TOLERANCE, rtol=0)


def test_truncate_reuses_the_cached_prefix(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    prefix, old_tail, new_tail = _tokens(7, 8), _tokens(8, 6), _tokens(9, 5)
    slot = runner.allocate_slot()
    runner.step([StepInput(slot, prefix + old_tail)])
    runner.truncate(slot, len(prefix))
    assert runner.slot_length(slot) == len(prefix)
    logits = runner.step([StepInput(slot, new_tail)])[0]
    np.testing.assert_allclose(logits, reference.forward(prefix + new_tail)[-1], atol=TOLERANCE, rtol=0)


def test_a_copied_prefix_continues_like_its_source(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    prefix, source_tail, new_tail = _tokens(30, 9), _tokens(31, 4), _tokens(32, 3)
    source = runner.allocate_slot()
    runner.step([StepInput(source, prefix + source_tail)])
    destination = runner.allocate_slot()
    runner.copy_prefix(source, destination, len(prefix))
    assert runner.slot_length(destination) == len(prefix) and runner.slot_length(source) == len(prefix + source_tail)
    logits = runner.step([StepInput(destination, new_tail), StepInput(source, [5])])
    np.testing.assert_allclose(logits[0], reference.forward(prefix + new_tail)[-1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits[1], reference.forward([*prefix, *source_tail, 5])[-1], atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="destination empty"):
        runner.copy_prefix(source, destination, 2)  # the destination already holds tokens
    with pytest.raises(ValueError, match="at most the source"):
        runner.copy_prefix(source, runner.allocate_slot(), 100)


def test_a_copy_survives_its_source_being_freed_or_copied_on_before_the_next_step(
    runner: LlamaRunner, reference: ReferenceLlama
) -> None:
    """The data of a copy moves at the next step; freeing or truncating a slot involved first makes it move then."""
    prefix, tail = _tokens(33, 10), _tokens(34, 3)
    source = runner.allocate_slot()
    runner.step([StepInput(source, prefix + tail)])
    first, second = runner.allocate_slot(), runner.allocate_slot()
    runner.copy_prefix(source, first, len(prefix))
    runner.copy_prefix(first, second, 6)  # from a slot whose own copy has not run yet
    runner.free_slot(source)  # its pages go back to the kernel: the copies must have run before
    logits = runner.step([StepInput(first, [9]), StepInput(second, [8])])
    np.testing.assert_allclose(logits[0], reference.forward([*prefix, 9])[-1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits[1], reference.forward([*prefix[:6], 8])[-1], atol=TOLERANCE, rtol=0)


def test_idle_slots_between_rows_keep_their_cache(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    prompts = [_tokens(20 + i, 5 + i) for i in range(5)]
    slots = [runner.allocate_slot() for _ in prompts]
    runner.step([StepInput(s, p) for s, p in zip(slots, prompts, strict=True)])
    runner.free_slot(slots[2])  # an empty slot inside the range
    for _ in range(3):  # slots 1 and 3 sit idle while their neighbours decode and prefill
        runner.step([StepInput(slots[0], [1]), StepInput(slots[4], [2, 3, 4])])
    logits = runner.step([StepInput(slots[1], [5]), StepInput(slots[3], [6])])
    np.testing.assert_allclose(logits[0], reference.forward([*prompts[1], 5])[-1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits[1], reference.forward([*prompts[3], 6])[-1], atol=TOLERANCE, rtol=0)


def test_long_prompt_is_prefilled_in_chunks(
    tiny: tuple[Path, dict[str, object], ReferenceLlama], reference: ReferenceLlama
) -> None:
    directory, config, _ = tiny
    chunked = LlamaRunner(directory, config, max_batch_size=2, max_seq_len=MAX_SEQ_LEN, max_chunk_tokens=8)
    prompt = _tokens(30, 29)
    slot = chunked.allocate_slot()
    logits = chunked.step([StepInput(slot, prompt)])[0]
    np.testing.assert_allclose(logits, reference.forward(prompt)[-1], atol=TOLERANCE, rtol=0)
    assert chunked.slot_length(slot) == 29


@settings(max_examples=12, deadline=None)
@given(schedule=st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6)), max_size=4), min_size=1, max_size=5))
def test_random_schedules_match_reference(
    tiny: tuple[Path, dict[str, object], ReferenceLlama], schedule: list[list[tuple[int, int]]]
) -> None:
    directory, config, reference = tiny
    runner = LlamaRunner(directory, config, max_batch_size=4, max_seq_len=MAX_SEQ_LEN)
    slots = [runner.allocate_slot() for _ in range(4)]
    caches = [ReferenceCache() for _ in range(4)]
    rng = np.random.default_rng(len(schedule))
    for step in schedule:
        rows = {sequence: n for sequence, n in step}  # one row per sequence and step
        batch = [StepInput(slots[s], rng.integers(0, VOCAB, n).tolist()) for s, n in rows.items()]
        if not batch:
            continue
        logits = runner.step(batch)
        for row, item in enumerate(batch):
            sequence = slots.index(item.slot)
            expected = reference.forward(list(item.token_ids), caches[sequence])[-1]
            np.testing.assert_allclose(logits[row], expected, atol=TOLERANCE, rtol=0)


# -- batch invariance --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceScript:
    """A sequence in a mixed schedule: from global step ``start`` it feeds its prompt chunks, one per step, and then
    its greedy tokens one at a time, until it has produced ``n_generate`` tokens."""

    start: int
    chunks: tuple[tuple[int, ...], ...]
    n_generate: int


@dataclass
class SequenceRun:
    """What one sequence saw: its logits after each of its rows and the greedy tokens it produced."""

    logits: list[np.ndarray]
    tokens: list[int]


def _next_input(script: SequenceScript, run: SequenceRun) -> list[int] | None:
    """The sequence's next row, or None once it has produced all its tokens."""
    if len(run.tokens) >= script.n_generate:
        return None
    done = len(run.logits)
    if done < len(script.chunks):
        return list(script.chunks[done])
    return [run.tokens[-1]]


def _record(run: SequenceRun, script: SequenceScript, logits: np.ndarray) -> None:
    run.logits.append(logits.copy())
    if len(run.logits) >= len(script.chunks):  # the whole prompt is in: every row from now on yields a token
        run.tokens.append(int(np.argmax(logits)))


def _run_alone(runner: LlamaRunner, script: SequenceScript) -> SequenceRun:
    run = SequenceRun([], [])
    slot = runner.allocate_slot()
    while (row := _next_input(script, run)) is not None:
        _record(run, script, runner.step([StepInput(slot, row)])[0])
    runner.free_slot(slot)
    return run


def _run_together(runner: LlamaRunner, scripts: Sequence[SequenceScript]) -> tuple[list[SequenceRun], int]:
    """Run the scripts interleaved, one ``runner.step`` per global step; also count the steps that mixed a row with
    a cached past and fewer tokens than another row of the same session call (the case that must stay exact)."""
    runs = [SequenceRun([], []) for _ in scripts]
    slots: dict[int, int] = {}
    mixed_calls = 0
    step = 0
    while True:
        rows = []
        for index, (script, run) in enumerate(zip(scripts, runs, strict=True)):
            row = _next_input(script, run) if step >= script.start else None
            if row is not None:
                if index not in slots:
                    slots[index] = runner.allocate_slot()
                rows.append((index, row))
        if not rows and step > max(script.start for script in scripts):
            break
        step += 1
        if not rows:
            continue
        batch = [StepInput(slots[index], row) for index, row in rows]
        lengths = runner.cache.lengths(0, runner.cache.layout.max_batch_size)
        n_new = [len(row) for _, row in rows]
        for plan in plan_calls([b.slot for b in batch], n_new, lengths, runner.cache.layout.buffer_tokens):
            chunk = max(n_new[r] for r in plan.rows)
            mixed_calls += any(lengths[batch[r].slot] > 0 and n_new[r] < chunk for r in plan.rows)
        logits = runner.step(batch)
        for (index, _), row_logits in zip(rows, logits, strict=True):
            _record(runs[index], scripts[index], row_logits)
    for slot in slots.values():
        runner.free_slot(slot)
    return runs, mixed_calls


def _check_together_equals_alone(
    runner: LlamaRunner, scripts: Sequence[SequenceScript], assert_logits: Callable[[np.ndarray, np.ndarray], None]
) -> None:
    alone = [_run_alone(runner, script) for script in scripts]
    together, mixed_calls = _run_together(runner, scripts)
    assert mixed_calls >= 3, "the schedule should pad rows that have a past in several mixed calls"
    for index, (single, batched) in enumerate(zip(alone, together, strict=True)):
        assert batched.tokens == single.tokens, f"sequence {index}: greedy tokens differ"
        assert len(batched.logits) == len(single.logits)
        for batched_logits, single_logits in zip(batched.logits, single.logits, strict=True):
            assert_logits(batched_logits, single_logits)


def _mixed_scripts(prompts: Sequence[Sequence[int]], n_generate: int) -> list[SequenceScript]:
    """Decodes with a past next to longer prefills and to a continued prompt chunk, in several steps."""
    first, second, third, fourth = (tuple(p) for p in prompts[:4])
    return [
        SequenceScript(0, (first,), n_generate),  # decodes from step 1 on, padded in every mixed step below
        SequenceScript(2, (second,), n_generate),  # a prompt next to one decode with a past
        SequenceScript(4, (third[:6], third[6:]), n_generate),  # a chunk with a past, longer than the decodes
        SequenceScript(7, (fourth,), n_generate),  # a prompt next to three decodes
    ]


def test_decode_rows_with_a_past_next_to_longer_rows_equal_each_row_alone(
    tiny_int8: tuple[Path, dict[str, object]],
) -> None:
    directory, config = tiny_int8
    runner = LlamaRunner(directory, config, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN)
    prompts = [_tokens(40, 12), _tokens(41, 8), _tokens(42, 13), _tokens(43, 10)]
    _check_together_equals_alone(runner, _mixed_scripts(prompts, 20), np.testing.assert_array_equal)


def test_mixed_steps_match_reference(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    prompts = [_tokens(50, 12), _tokens(51, 8), _tokens(52, 13), _tokens(53, 10)]
    together, mixed_calls = _run_together(runner, _mixed_scripts(prompts, 8))
    assert mixed_calls >= 3
    for prompt, run in zip(prompts, together, strict=True):
        cache = ReferenceCache()
        expected = [reference.forward(prompt, cache)[-1]] + [reference.forward([t], cache)[-1] for t in run.tokens[:-1]]
        np.testing.assert_allclose(run.logits[-len(expected) :], expected, atol=TOLERANCE, rtol=0)


def test_a_slot_fills_to_max_seq_len_next_to_other_rows(runner: LlamaRunner, reference: ReferenceLlama) -> None:
    """The last token of a full slot still gets a padded chunk; the spare buffer position is never written."""
    long_prompt, short_prompt = _tokens(60, MAX_SEQ_LEN - 2), _tokens(61, 3)
    full, other = runner.allocate_slot(), runner.allocate_slot()
    runner.step([StepInput(full, long_prompt)])
    for token in (7, 8):  # the first decode runs alone, the second next to a 3-token prompt
        batch = [StepInput(full, [token])] + ([StepInput(other, short_prompt)] if token == 8 else [])
        logits = runner.step(batch)
    assert runner.slot_length(full) == MAX_SEQ_LEN
    np.testing.assert_allclose(logits[0], reference.forward([*long_prompt, 7, 8])[-1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits[1], reference.forward(short_prompt)[-1], atol=TOLERANCE, rtol=0)
    for buffer in (*runner.cache.keys, *runner.cache.values):
        assert not buffer[:, :, MAX_SEQ_LEN:].any(), "GroupQueryAttention wrote into the spare positions"
    with pytest.raises(KVCapacityError):
        runner.step([StepInput(full, [9])])


def test_slot_errors_leave_the_cache_unchanged(runner: LlamaRunner) -> None:
    slot = runner.allocate_slot()
    runner.step([StepInput(slot, [1, 2, 3])])
    with pytest.raises(SlotError, match="once"):
        runner.step([StepInput(slot, [4]), StepInput(slot, [5])])
    with pytest.raises(SlotError, match="not allocated"):
        runner.step([StepInput(slot, [4]), StepInput(slot + 1, [5])])
    with pytest.raises(ValueError, match="non-empty"):
        runner.step([StepInput(slot, [])])
    with pytest.raises(ValueError, match="token ids"):
        runner.step([StepInput(slot, [VOCAB])])
    with pytest.raises(KVCapacityError, match="at most"):
        runner.step([StepInput(slot, [1] * (MAX_SEQ_LEN - 2))])
    with pytest.raises(ValueError, match="truncate"):
        runner.truncate(slot, 4)
    assert runner.slot_length(slot) == 3
    runner.free_slot(slot)
    with pytest.raises(SlotError):
        runner.slot_length(slot)


def test_slots_are_handed_out_lowest_first(runner: LlamaRunner) -> None:
    slots = [runner.allocate_slot() for _ in range(MAX_BATCH)]
    assert slots == list(range(MAX_BATCH))
    with pytest.raises(SlotError, match="in use"):
        runner.allocate_slot()
    runner.free_slot(3)
    runner.free_slot(1)
    assert runner.allocate_slot() == 1


# -- SmolLM2-135M-Instruct -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_runner() -> LlamaRunner:
    model_dir, config = converted_smollm2(DEFAULT_ACCURACY_LEVEL)
    return LlamaRunner(model_dir, config, max_batch_size=16, max_seq_len=128)


def _greedy(runner: LlamaRunner, slots: list[int], logits: np.ndarray, n: int) -> list[list[int]]:
    generated: list[list[int]] = [[] for _ in slots]
    for _ in range(n):
        tokens = np.argmax(logits, axis=1)
        for row, token in enumerate(tokens):
            generated[row].append(int(token))
        logits = runner.step([StepInput(s, [int(t)]) for s, t in zip(slots, tokens, strict=True)])
    return generated


def test_smollm2_batched_equals_alone(smollm2_runner: LlamaRunner) -> None:
    prompts = CHAT_PROMPTS[:10]
    alone_logits, alone_tokens = [], []
    for prompt in prompts:
        slot = smollm2_runner.allocate_slot()
        logits = smollm2_runner.step([StepInput(slot, prompt)])
        alone_logits.append(logits[0])
        alone_tokens.append(_greedy(smollm2_runner, [slot], logits, 20)[0])
        smollm2_runner.free_slot(slot)
    slots = [smollm2_runner.allocate_slot() for _ in prompts]
    logits = smollm2_runner.step([StepInput(s, p) for s, p in zip(slots, prompts, strict=True)])
    np.testing.assert_allclose(logits, np.stack(alone_logits), atol=TOLERANCE, rtol=0)
    assert _greedy(smollm2_runner, slots, logits, 20) == alone_tokens
    for slot in slots:
        smollm2_runner.free_slot(slot)


def test_smollm2_decodes_next_to_longer_rows_equal_each_row_alone(smollm2_runner: LlamaRunner) -> None:
    """The engine's mixed steps: greedy replies and every logit equal the same sequences run alone."""
    prompts = [CHAT_PROMPTS[0], CHAT_PROMPTS[4], CHAT_PROMPTS[2], CHAT_PROMPTS[3]]

    def close(batched: np.ndarray, single: np.ndarray) -> None:
        np.testing.assert_allclose(batched, single, atol=TOLERANCE, rtol=0)

    _check_together_equals_alone(smollm2_runner, _mixed_scripts(prompts, 20), close)


def test_smollm2_prefill_in_two_steps_equals_one(smollm2_runner: LlamaRunner) -> None:
    first, second = CHAT_PROMPTS[0], CHAT_PROMPTS[1][3:]
    split_slot, whole_slot = smollm2_runner.allocate_slot(), smollm2_runner.allocate_slot()
    smollm2_runner.step([StepInput(split_slot, first)])
    split = smollm2_runner.step([StepInput(split_slot, second)])[0]
    whole = smollm2_runner.step([StepInput(whole_slot, first + second)])[0]
    np.testing.assert_allclose(split, whole, atol=TOLERANCE, rtol=0)
    smollm2_runner.free_slot(split_slot)
    smollm2_runner.free_slot(whole_slot)
