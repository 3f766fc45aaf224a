"""Sampling parameters and the batched sampler."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from app.text.sampling import (
    NUCLEUS_PRESELECT_TOKENS,
    ContextLengthError,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    make_generator,
)

CONTEXT = 8192

logit_values = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, width=32)
# Rounded logits make ties common, which is where tie-breaking bugs hide.
tied_logit_values = st.integers(min_value=-3, max_value=3).map(float)


@st.composite
def logits_batches(draw: st.DrawFn) -> npt.NDArray[np.float32]:
    rows = draw(st.integers(min_value=1, max_value=4))
    vocab = draw(st.integers(min_value=1, max_value=40))
    elements = draw(st.sampled_from([logit_values, tied_logit_values]))
    batch: npt.NDArray[np.float32] = draw(arrays(np.float32, (rows, vocab), elements=elements))
    return batch


def sample(logits: npt.NDArray[np.float32], params: SamplingParams, seed: int = 0) -> npt.NDArray[np.int64]:
    rows = logits.shape[0]
    return Sampler().sample(logits, [params] * rows, [make_generator(seed + row) for row in range(rows)])


def sorted_ids(row: npt.NDArray[np.floating]) -> npt.NDArray[np.intp]:
    """Ids by value, highest first, ties by lower id: the order the sampler promises."""
    return np.lexsort((np.arange(row.size), -row.astype(np.float64)))


def reference_allowed(row: npt.NDArray[np.float32], params: SamplingParams) -> set[int]:
    """The ids top-k then top-p may keep, computed the slow obvious way.

    The logits are scaled as the sampler scales them (float32, times the float32 inverse temperature), because
    values that differ only below float32's resolution (a denormal logit times 0.5 is 0) are ties to the sampler,
    and a tie at the boundary may go either way.
    """
    scaled = (row.astype(np.float32) * np.float32(1.0 / params.temperature)).astype(np.float64)
    order = sorted_ids(scaled)
    if params.top_k > 0:
        order = order[: params.top_k]
    probabilities = np.exp(scaled[order] - scaled[order].max())
    probabilities /= probabilities.sum()
    cumulative = np.cumsum(probabilities)
    keep = order.size
    if params.top_p < 1:
        keep = int(np.searchsorted(cumulative, params.top_p * (1 - 1e-9), side="left")) + 1
    floor = scaled[order[: keep + 1]].min()  # one extra for float rounding at the boundary
    return {int(token_id) for token_id in np.flatnonzero(scaled >= floor)}  # and every tie of the last one


# --- SamplingParams ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, r"top_p should be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens should be >= 1"),
        ({"seed": -3}, "seed"),
        ({"stop": ("",)}, "stop\\[0\\]"),
        ({"stop": tuple(f"s{i}" for i in range(17))}, "at most 16"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids\\[0\\]"),
        ({"top_k": 1.5}, "top_k should be an integer"),
        ({"temperature": "hot"}, "temperature should be a number"),
    ],
)
def test_invalid_params(changes: dict[str, object], message: str) -> None:
    params = dataclasses.replace(SamplingParams(), **changes)  # type: ignore[arg-type]
    with pytest.raises(SamplingParamsError, match=message):
        params.validate(CONTEXT, prompt_tokens=10)


def test_errors_are_value_errors() -> None:
    assert issubclass(SamplingParamsError, ValueError)
    assert issubclass(ContextLengthError, ValueError)


def test_context_length() -> None:
    params = SamplingParams(max_tokens=100)
    params.validate(CONTEXT, prompt_tokens=CONTEXT - 1)
    with pytest.raises(ContextLengthError, match="8192 tokens but the context window holds 8192"):
        params.validate(CONTEXT, prompt_tokens=CONTEXT)
    with pytest.raises(ContextLengthError, match="at least 1"):
        params.validate(CONTEXT, prompt_tokens=0)
    assert params.effective_max_tokens(CONTEXT, prompt_tokens=10) == 100
    assert params.effective_max_tokens(CONTEXT, prompt_tokens=CONTEXT - 5) == 5


def test_params_are_immutable_and_hashable() -> None:
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3])  # type: ignore[arg-type]
    assert params.stop == ("a", "b")
    assert params.stop_token_ids == (3,)
    hash(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0  # type: ignore[misc]
    SamplingParams().validate(CONTEXT, prompt_tokens=1)


# --- Sampler: properties ----------------------------------------------------------------------------------------


@settings(deadline=None)
@given(logits=logits_batches())
def test_greedy_is_argmax(logits: npt.NDArray[np.float32]) -> None:
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == np.argmax(logits, axis=1).tolist()


@settings(deadline=None)
@given(logits=logits_batches(), temperature=st.floats(min_value=0.05, max_value=5.0))
def test_top_k_one_is_argmax(logits: npt.NDArray[np.float32], temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=1, top_p=1.0)
    assert sample(logits, params).tolist() == np.argmax(logits, axis=1).tolist()


@settings(deadline=None)
@given(logits=logits_batches(), temperature=st.floats(min_value=0.05, max_value=5.0))
def test_tiny_top_p_is_argmax(logits: npt.NDArray[np.float32], temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=1e-9)
    assert sample(logits, params).tolist() == np.argmax(logits, axis=1).tolist()


@settings(deadline=None, max_examples=200)
@given(
    logits=logits_batches(),
    temperature=st.floats(min_value=0.05, max_value=5.0),
    top_k=st.integers(min_value=0, max_value=10),
    top_p=st.floats(min_value=0.01, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_sampled_ids_stay_in_the_top_k_top_p_set(
    logits: npt.NDArray[np.float32], temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for _ in range(3):
        chosen = sample(logits, params, seed)
        for row, token_id in zip(logits, chosen.tolist(), strict=True):
            assert token_id in reference_allowed(row, params)
        seed += 1000


@settings(deadline=None)
@given(logits=logits_batches(), top_k=st.integers(min_value=1, max_value=10))
def test_top_k_keeps_exactly_the_k_best(logits: npt.NDArray[np.float32], top_k: int) -> None:
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=1.0)
    for row in logits:
        kept = Sampler.kept_token_ids(row, params).tolist()
        assert kept == sorted(sorted_ids(row)[:top_k].tolist())


@settings(deadline=None)
@given(
    logits=logits_batches(),
    temperature=st.floats(min_value=0.05, max_value=5.0),
    top_k=st.integers(min_value=0, max_value=10),
    top_p=st.floats(min_value=0.01, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**63),
)
def test_same_seed_same_sequence(
    logits: npt.NDArray[np.float32], temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def run() -> list[list[int]]:
        generators = [make_generator(params.seed) for _ in range(logits.shape[0])]
        sampler = Sampler()
        return [sampler.sample(logits, [params] * logits.shape[0], generators).tolist() for _ in range(8)]

    assert run() == run()


@settings(deadline=None)
@given(logits=logits_batches(), seed=st.integers(min_value=0, max_value=2**32))
def test_row_result_does_not_depend_on_the_batch(logits: npt.NDArray[np.float32], seed: int) -> None:
    """A request draws the same tokens whether it runs alone or batched with others (greedy or not)."""
    params = [SamplingParams(temperature=0.0 if row % 2 else 0.9, top_k=row) for row in range(logits.shape[0])]
    batched = Sampler().sample(logits, params, [make_generator(seed + row) for row in range(logits.shape[0])])
    for row in range(logits.shape[0]):
        alone = Sampler().sample(logits[row : row + 1], [params[row]], [make_generator(seed + row)])
        assert alone[0] == batched[row]


# --- Sampler: behaviour -----------------------------------------------------------------------------------------


def test_distribution_matches_softmax() -> None:
    probabilities = np.array([0.5, 0.3, 0.2])
    logits = np.log(probabilities).astype(np.float32)[None, :]
    generator = make_generator(1234)
    params = [SamplingParams(temperature=1.0, top_p=1.0)]
    sampler = Sampler()
    draws = [int(sampler.sample(logits, params, [generator])[0]) for _ in range(10_000)]
    frequencies = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(frequencies, probabilities, atol=0.02)


def test_top_p_cuts_the_tail() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]])).astype(np.float32)
    generator = make_generator(7)
    params = [SamplingParams(temperature=1.0, top_p=0.8)]
    draws = {int(Sampler().sample(logits, params, [generator])[0]) for _ in range(2000)}
    assert draws == {0, 1}


def test_masked_tokens_are_never_drawn() -> None:
    logits = np.full((1, 10), -np.inf, dtype=np.float32)
    logits[0, [3, 7]] = 0.0
    generator = make_generator(0)
    params = [SamplingParams(temperature=1.0, top_p=1.0)]
    draws = {int(Sampler().sample(logits, params, [generator])[0]) for _ in range(500)}
    assert draws == {3, 7}


def test_large_vocabulary_nucleus_matches_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-p preselection is exact: same kept set as sorting the vocabulary, same draws as without it."""
    rng = np.random.default_rng(0)
    vocab = 49152
    assert vocab > NUCLEUS_PRESELECT_TOKENS
    cases = [(1.0, 0.9), (8.0, 0.5), (0.1, 0.95), (3.0, 0.999), (30.0, 0.9)]
    batches = [(rng.standard_normal((2, vocab)) * scale).astype(np.float32) for scale, _ in cases]
    params = [SamplingParams(temperature=0.8, top_p=top_p) for _, top_p in cases]

    def draws() -> list[list[int]]:
        return [
            Sampler().sample(logits, [p, p], [make_generator(seed), make_generator(seed + 99)]).tolist()
            for logits, p in zip(batches, params, strict=True)
            for seed in range(5)
        ]

    for logits, p in zip(batches, params, strict=True):
        for row in logits:
            scaled = row * np.float32(1.0 / p.temperature)
            assert set(Sampler.kept_token_ids(scaled, p).tolist()) == _full_sort_nucleus(scaled, p.top_p)
    with_preselection = draws()
    monkeypatch.setattr("app.text.sampling.NUCLEUS_PRESELECT_TOKENS", vocab)
    assert draws() == with_preselection


def _full_sort_nucleus(row: npt.NDArray[np.float32], top_p: float) -> set[int]:
    order = sorted_ids(row)
    probabilities = np.exp(row[order].astype(np.float64) - float(row.max()))
    cumulative = np.cumsum(probabilities)
    keep = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
    return {int(token_id) for token_id in order[:keep]}


def test_draws_across_blocks_of_a_large_vocabulary() -> None:
    vocab = 5000
    logits = np.full((1, vocab), -np.inf, dtype=np.float32)
    chosen_ids = [5, 1500, 4999]
    probabilities = np.array([0.2, 0.3, 0.5])
    logits[0, chosen_ids] = np.log(probabilities)
    generator = make_generator(3)
    params = [SamplingParams(temperature=1.0, top_p=1.0)]
    draws = [int(Sampler().sample(logits, params, [generator])[0]) for _ in range(5000)]
    assert set(draws) == set(chosen_ids)
    frequencies = np.array([draws.count(token_id) for token_id in chosen_ids]) / len(draws)
    np.testing.assert_allclose(frequencies, probabilities, atol=0.03)


@pytest.mark.parametrize(
    ("logits", "params", "message"),
    [
        (np.zeros((2, 3, 4), np.float32), [SamplingParams()], "shape"),
        (np.zeros((2, 4), np.float32), [SamplingParams()], "2 logits rows but 1 params"),
        (np.array([[0.0, np.nan]], np.float32), [SamplingParams()], "NaN"),
        (np.full((1, 3), -np.inf, np.float32), [SamplingParams()], "-inf everywhere"),
    ],
)
def test_bad_logits(logits: npt.NDArray[np.float32], params: Sequence[SamplingParams], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampler().sample(logits, params, [make_generator(0) for _ in params])
