"""Whisper greedy decoding rules (app/speech/decoding.py) on hand-made logits over a toy vocabulary."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.speech.decoding import (
    MASKED_LOGIT,
    DecodingRules,
    average_logprob,
    compression_ratio,
    log_softmax,
    mask_logits,
    no_speech_probability,
    pick_tokens,
)

# Toy vocabulary: text 0..4, EOT 5, SOT 6, no-speech 7, no-timestamps 8, timestamps 9..19 (<|0.00|>..<|0.20|>).
EOT, SOT, NO_SPEECH, NO_TIMESTAMPS, TS0, N_VOCAB = 5, 6, 7, 8, 9, 20
TOY_CONFIG = {
    "eot": EOT,
    "sot": SOT,
    "no_speech": NO_SPEECH,
    "no_timestamps": NO_TIMESTAMPS,
    "timestamp_begin": TS0,
    "n_vocab": N_VOCAB,
    "suppress_ids": [1, SOT, NO_SPEECH],
    "suppress_ids_begin": [0, EOT],
}


def rules(**overrides: object) -> DecodingRules:
    base = DecodingRules.from_config(TOY_CONFIG, max_initial_timestamp_s=0.06)  # index 3 -> <|0.06|> = 12
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def allowed(masked: np.ndarray, row: int = 0) -> set[int]:
    return {int(i) for i in np.flatnonzero(masked[row] > MASKED_LOGIT)}


def flat(batch: int = 1) -> np.ndarray:
    return np.zeros((batch, N_VOCAB), dtype=np.float32)


def test_from_config_rounds_the_initial_timestamp_to_a_token_index() -> None:
    assert DecodingRules.from_config(TOY_CONFIG).max_initial_timestamp_index == 50
    assert DecodingRules.from_config(TOY_CONFIG, max_initial_timestamp_s=None).max_initial_timestamp_index is None


def test_from_config_names_missing_keys() -> None:
    with pytest.raises(KeyError, match="timestamp_begin"):
        DecodingRules.from_config({k: v for k, v in TOY_CONFIG.items() if k != "timestamp_begin"})


def test_suppress_ids_are_masked_at_every_step_and_masked_value_is_lowest_float() -> None:
    no_ts = rules(with_timestamps=False)
    for history in ([], [3], [3, 4, 0]):
        masked = mask_logits(flat(), [history], no_ts)
        assert not {1, SOT, NO_SPEECH} & allowed(masked)
    masked = mask_logits(flat(), [[3]], no_ts)
    assert masked[0, 1] == np.finfo(np.float32).min
    assert np.isfinite(masked).all()


def test_suppress_blank_only_at_the_first_sampled_step() -> None:
    no_ts = rules(with_timestamps=False)
    assert not {0, EOT} & allowed(mask_logits(flat(), [[]], no_ts))
    assert {0, EOT} <= allowed(mask_logits(flat(), [[2]], no_ts))
    assert {0, EOT} <= allowed(mask_logits(flat(), [[]], rules(with_timestamps=False, suppress_blank=False)))


def test_first_token_is_a_timestamp_no_later_than_the_initial_limit() -> None:
    masked = mask_logits(flat(), [[]], rules())
    assert allowed(masked) == {TS0, TS0 + 1, TS0 + 2, TS0 + 3}
    unlimited = mask_logits(flat(), [[]], rules(max_initial_timestamp_index=None))
    assert allowed(unlimited) == set(range(TS0, N_VOCAB))


def test_no_timestamps_token_is_never_sampled_with_timestamps() -> None:
    for history in ([], [TS0], [TS0, 3], [TS0, 3, TS0 + 2]):
        assert NO_TIMESTAMPS not in allowed(mask_logits(flat(), [history], rules()))


def test_after_a_timestamp_pair_only_text_or_eot() -> None:
    masked = mask_logits(flat(), [[TS0, 2, TS0 + 4, TS0 + 4]], rules())
    assert allowed(masked) == {0, 2, 3, 4, EOT}


def test_a_lone_first_timestamp_counts_as_a_pair() -> None:
    # CTranslate2: with one sampled token the penultimate is the token itself, so text must follow.
    assert allowed(mask_logits(flat(), [[TS0 + 1]], rules())) == {0, 2, 3, 4, EOT}


def test_after_a_lone_timestamp_only_a_later_or_equal_timestamp_or_eot() -> None:
    logits = flat()
    logits[0, EOT] = 5.0  # EOT beats the timestamp mass, so the forced rule does not change the picture
    masked = mask_logits(logits, [[TS0, 2, TS0 + 4]], rules())
    assert allowed(masked) == {EOT, *range(TS0 + 4, N_VOCAB)}
    logits[0, EOT] = 0.0  # now the timestamps win: even EOT is masked
    assert allowed(mask_logits(logits, [[TS0, 2, TS0 + 4]], rules())) == set(range(TS0 + 4, N_VOCAB))


def test_after_text_timestamps_must_be_strictly_later_than_the_last() -> None:
    logits = flat()
    logits[0, 3] = 10.0  # text dominates: no forced timestamp
    masked = mask_logits(logits, [[TS0, 2, TS0 + 4, TS0 + 4, 3]], rules())
    assert allowed(masked) == {0, 2, 3, 4, EOT, *range(TS0 + 5, N_VOCAB)}


def test_forced_timestamp_when_timestamp_mass_beats_every_text_token() -> None:
    logits = flat()
    logits[0, 3] = 1.0  # best text token: p ~ e / Z
    logits[0, TS0 + 2 :] = 0.5  # nine timestamps at e^0.5 each: their sum beats e^1
    masked = mask_logits(logits, [[TS0, 3]], rules())
    assert allowed(masked) == set(range(TS0 + 1, N_VOCAB))
    token, _ = pick_tokens(masked)
    assert token[0] >= TS0


def test_no_forced_timestamp_when_a_text_token_beats_the_mass() -> None:
    logits = flat()
    logits[0, 3] = 4.0
    logits[0, TS0 + 2 :] = 0.5
    masked = mask_logits(logits, [[TS0, 3]], rules())
    assert 3 in allowed(masked)
    assert int(pick_tokens(masked)[0][0]) == 3


def test_forced_check_uses_probabilities_after_suppression() -> None:
    # Token 1 is suppressed; were it counted, it would beat the timestamps and prevent the forcing.
    logits = flat()
    logits[0, 1] = 50.0
    logits[0, 3] = 1.0
    logits[0, TS0 + 2 :] = 0.5
    assert allowed(mask_logits(logits, [[TS0, 3]], rules())) == set(range(TS0 + 1, N_VOCAB))


def test_rows_are_masked_independently() -> None:
    histories = [[], [TS0, 2, TS0 + 4, TS0 + 4], [TS0 + 1]]
    batch = mask_logits(flat(3), histories, rules())
    for row, history in enumerate(histories):
        np.testing.assert_array_equal(batch[row], mask_logits(flat(), [history], rules())[0])


def test_mask_logits_checks_shapes() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        mask_logits(np.zeros((1, N_VOCAB + 1), np.float32), [[]], rules())
    with pytest.raises(ValueError, match="token histories"):
        mask_logits(flat(2), [[]], rules())


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, width=32), min_size=N_VOCAB, max_size=N_VOCAB),
    history=st.lists(st.integers(0, N_VOCAB - 1).filter(lambda t: t not in (1, SOT, NO_SPEECH, EOT)), max_size=6),
)
def test_masking_only_lowers_logits_and_keeps_a_choice(logits: list[float], history: list[int]) -> None:
    raw = np.asarray([logits], dtype=np.float32)
    masked = mask_logits(raw, [history], rules())
    kept = masked > MASKED_LOGIT
    np.testing.assert_array_equal(masked[kept], raw[kept])
    assert kept.any()  # EOT or a timestamp is always allowed after the first step, a timestamp at the first


def test_pick_tokens_returns_argmax_and_its_log_probability() -> None:
    logits = np.log(np.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32))
    tokens, log_probs = pick_tokens(logits)
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(log_probs, np.log([0.6, 0.5]), rtol=1e-6)


def test_no_speech_probability_is_the_softmax_of_raw_logits() -> None:
    logits = np.log(np.asarray([[0.2, 0.7, 0.1]], dtype=np.float32)) + 3.0
    np.testing.assert_allclose(no_speech_probability(logits, 1), [0.7], rtol=1e-6)


def test_log_softmax_ignores_masked_entries() -> None:
    logits = np.asarray([[0.0, MASKED_LOGIT, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(np.exp(log_softmax(logits)), [[0.5, 0.0, 0.5]], atol=1e-12)


def test_average_logprob_counts_the_eot_step() -> None:
    assert average_logprob(-3.0, 2) == -1.0
    assert average_logprob(0.0, 0) == 0.0


def test_compression_ratio_flags_repetition() -> None:
    assert compression_ratio("He's a platform. " * 20) > 2.4
    assert compression_ratio("Okay, well I think we're ready to begin.") < 2.4
    text = "abc"
    assert math.isclose(compression_ratio(text), 3 / 11)
