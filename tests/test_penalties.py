"""Repetition penalties (app/text/penalties.py) and their parameters: pure, no model."""

from __future__ import annotations

import numpy as np
import pytest

from app.text.penalties import TokenPenalties
from app.text.sampling import SamplingParams, SamplingParamsError


def test_no_penalty_means_no_state() -> None:
    assert TokenPenalties.for_request(SamplingParams(), [1, 2, 3]) is None
    assert not SamplingParams(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0).adjusts_logits


def test_presence_and_frequency_count_only_generated_tokens() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    penalties = TokenPenalties.for_request(params, prompt_ids=[0, 1])
    assert penalties is not None
    row = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    assert np.array_equal(penalties.apply(row), row)  # nothing generated yet; the prompt does not count
    for token in (3, 3, 4, 7):  # 7 lies outside this row: ignored
        penalties.add(token)
    expected = np.array([1.0, 2.0, 3.0, 4.0 - 0.5 - 2 * 0.25, 5.0 - 0.5 - 0.25], dtype=np.float32)
    assert np.allclose(penalties.apply(row), expected)
    assert row[3] == 4.0  # the caller's row is left alone
    encouraging = TokenPenalties.for_request(SamplingParams(frequency_penalty=-1.0), [])
    assert encouraging is not None
    encouraging.add(0)
    assert encouraging.apply(row)[0] == 2.0


def test_logit_bias_adds_to_the_listed_tokens_and_counts_as_an_adjustment() -> None:
    params = SamplingParams(logit_bias={1: -100.0, 3: 2.5, 99: 5.0})  # 99 lies outside this row: ignored
    assert params.adjusts_logits and params.logit_bias == ((1, -100.0), (3, 2.5), (99, 5.0))
    penalties = TokenPenalties.for_request(params, [])
    assert penalties is not None
    row = np.zeros(4, dtype=np.float32)
    assert penalties.apply(row).tolist() == [0.0, -100.0, 0.0, 2.5]
    penalties.add(3)  # generated tokens do not change a bias
    assert penalties.apply(row).tolist() == [0.0, -100.0, 0.0, 2.5]


def test_repetition_penalty_covers_prompt_and_reply_and_respects_the_sign() -> None:
    penalties = TokenPenalties.for_request(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1])
    assert penalties is not None
    row = np.array([4.0, -4.0, 4.0, -4.0], dtype=np.float32)
    assert penalties.apply(row).tolist() == [2.0, -8.0, 4.0, -4.0]  # positive halved, negative doubled
    penalties.add(3)
    assert penalties.apply(row).tolist() == [2.0, -8.0, 4.0, -8.0]
    penalties.add(3)  # a second occurrence changes nothing for the multiplicative penalty
    assert penalties.apply(row).tolist() == [2.0, -8.0, 4.0, -8.0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("presence_penalty", 2.5, "presence_penalty should be in"),
        ("frequency_penalty", -3.0, "frequency_penalty should be in"),
        ("frequency_penalty", float("nan"), "frequency_penalty should be in"),
        ("repetition_penalty", 0.0, "repetition_penalty should be in"),
        ("repetition_penalty", 11.0, "repetition_penalty should be in"),
        ("presence_penalty", True, "presence_penalty should be a number"),
        ("logit_bias", {5: 101.0}, r"logit_bias\[5\] should be in \[-100, 100\]"),
        ("logit_bias", {-1: 1.0}, "logit_bias token ids should be >= 0"),
        ("logit_bias", {5: float("nan")}, r"logit_bias\[5\] should be in"),
        ("logit_bias", {token: 1.0 for token in range(1025)}, "logit_bias has 1025 tokens; at most 1024"),
        ("logprobs", 21, r"top log-probabilities should be in \[0, 20\]"),
        ("logprobs", -1, r"top log-probabilities should be in \[0, 20\]"),
    ],
)
def test_out_of_range_penalties_are_refused_with_their_name(field: str, value: object, message: str) -> None:
    params = SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(SamplingParamsError, match=message):
        params.validate(context_length=100, prompt_tokens=5)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=10.0).validate(100, 5)
