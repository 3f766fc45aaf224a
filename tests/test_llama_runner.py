"""LlamaRunner: batching rows of different lengths over one shared KV cache, slot management, and call planning.

Synthetic-model tests run at accuracy_level 0, where the graph is exact up to fp32 summation order, and compare
every row against the numpy reference with its own cache. SmolLM2 tests run at the default level.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.convert.gguf_model import GGUFModel
from app.convert.llama import DEFAULT_ACCURACY_LEVEL, build_llama_onnx
from app.text.kv_cache import KVCapacityError, SlotError
from app.text.llama_runner import LlamaRunner, StepInput, plan_calls
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
    capacity = 40
    lengths = np.array(data.draw(st.lists(st.integers(0, capacity - 1), min_size=8, max_size=8)))
    slots = data.draw(st.lists(st.integers(0, 7), unique=True, min_size=1, max_size=8))
    n_new = [data.draw(st.integers(1, capacity - int(lengths[s]))) for s in slots]
    plans = plan_calls(slots, n_new, lengths, capacity)
    assert sorted(r for plan in plans for r in plan.rows) == list(range(len(slots)))
    for plan in plans:
        assert plan.chunk == max(n_new[r] for r in plan.rows)
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
    assert [(p.first_slot, p.end_slot, p.chunk) for p in plans] == [(0, 31, 1), (31, 32, 200)]
    mixed = plan_calls([0, 1, 2], [1, 3, 1], lengths, 1024)
    assert [(p.first_slot, p.end_slot, p.chunk) for p in mixed] == [(0, 3, 3)]


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


def test_smollm2_prefill_in_two_steps_equals_one(smollm2_runner: LlamaRunner) -> None:
    first, second = CHAT_PROMPTS[0], CHAT_PROMPTS[1][3:]
    split_slot, whole_slot = smollm2_runner.allocate_slot(), smollm2_runner.allocate_slot()
    smollm2_runner.step([StepInput(split_slot, first)])
    split = smollm2_runner.step([StepInput(split_slot, second)])[0]
    whole = smollm2_runner.step([StepInput(whole_slot, first + second)])[0]
    np.testing.assert_allclose(split, whole, atol=TOLERANCE, rtol=0)
    smollm2_runner.free_slot(split_slot)
    smollm2_runner.free_slot(whole_slot)
