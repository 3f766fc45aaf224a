"""Word error rate (app/speech/wer.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.speech.wer import edit_distance, normalize_words, word_error_rate


def test_normalisation_drops_case_and_punctuation_but_keeps_apostrophes_in_words() -> None:
    assert normalize_words("Okay, well I think we're READY to begin.") == [
        "okay",
        "well",
        "i",
        "think",
        "we're",
        "ready",
        "to",
        "begin",
    ]
    assert normalize_words("'quoted' E-R") == ["quoted", "e", "r"]


def test_substitution_deletion_insertion() -> None:
    assert word_error_rate("a b c d", "a x c d") == 0.25
    assert word_error_rate("a b c d", "a c d") == 0.25
    assert word_error_rate("a b c d", "a b c d e") == 0.25
    assert word_error_rate("Hello, world.", "hello world") == 0.0
    assert word_error_rate("Hello, world.", "hello world", normalize=False) == 1.0


def test_empty_reference() -> None:
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("", "thank you") == 2.0


words = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=8)


@given(reference=words, hypothesis=words)
def test_edit_distance_is_a_bounded_symmetric_metric(reference: list[str], hypothesis: list[str]) -> None:
    distance = edit_distance(reference, hypothesis)
    assert distance == edit_distance(hypothesis, reference)
    assert abs(len(reference) - len(hypothesis)) <= distance <= max(len(reference), len(hypothesis))
    assert (distance == 0) == (reference == hypothesis)


@pytest.mark.parametrize("text", ["", "one", "one two three"])
def test_identity_has_no_errors(text: str) -> None:
    assert word_error_rate(text, text) == 0.0
