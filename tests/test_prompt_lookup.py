"""Draft proposals by prompt lookup (app/engine/prompt_lookup.py): pure, no model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.engine.prompt_lookup import TokenHistory, draft_from_prediction, propose_draft


def test_the_continuation_of_the_latest_earlier_occurrence_is_proposed() -> None:
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7]
    # the last two tokens (6, 7) occurred twice before; the later occurrence is followed by 3, 4, 2, ...
    assert propose_draft(tokens, max_tokens=3, min_ngram=2) == (3, 4, 2)
    assert propose_draft(tokens, max_tokens=10, min_ngram=2) == (3, 4, 2, 6, 7)
    assert propose_draft(tokens, max_tokens=3) == ()  # by default runs of 3 to 5 tokens: "2 6 7" is new


def test_longer_ngrams_win_over_more_recent_shorter_ones() -> None:
    tokens = [1, 2, 3, 40, 41, 9, 2, 3, 50, 51, 1, 2, 3]
    assert propose_draft(tokens, max_tokens=2, max_ngram=3, min_ngram=2) == (40, 41)  # 1 2 3 matched
    assert propose_draft(tokens, max_tokens=2, max_ngram=2, min_ngram=2) == (50, 51)  # only 2 3: the latest


def test_nothing_is_proposed_without_a_match_or_room() -> None:
    assert propose_draft([1, 2, 3, 4, 5], max_tokens=4) == ()
    assert propose_draft([1, 2, 1, 2], max_tokens=0) == ()
    assert propose_draft([1, 1], max_tokens=4, min_ngram=2) == ()  # too short for a 2-gram and an earlier copy
    assert propose_draft([], max_tokens=4) == ()
    # one matching token is not enough when the shortest n-gram is 2
    assert propose_draft([7, 8, 9, 3, 7], max_tokens=4, min_ngram=2) == ()
    assert propose_draft([7, 8, 9, 3, 7], max_tokens=4, min_ngram=1) == (8, 9, 3, 7)


@given(
    tokens=st.lists(st.integers(0, 4), max_size=60),
    max_tokens=st.integers(0, 6),
    min_ngram=st.integers(1, 3),
    extra=st.integers(0, 2),
)
def test_a_draft_continues_the_latest_occurrence_of_the_longest_repeated_tail(
    tokens: list[int], max_tokens: int, min_ngram: int, extra: int
) -> None:
    max_ngram = min_ngram + extra
    draft = propose_draft(tokens, max_tokens=max_tokens, max_ngram=max_ngram, min_ngram=min_ngram)
    # earlier occurrences (start i) of the last n tokens, longest n first, by a plain scan
    matches = [
        (n, i)
        for n in range(max_ngram, min_ngram - 1, -1)
        if n < len(tokens)
        for i in range(len(tokens) - n)
        if tokens[i : i + n] == tokens[-n:]
    ]
    if not matches or max_tokens < 1:
        assert draft == ()
        return
    best_n = matches[0][0]
    latest = max(i for n, i in matches if n == best_n)
    assert draft == tuple(tokens[latest + best_n : latest + best_n + max_tokens])


def test_a_prediction_is_followed_from_where_the_reply_lines_up_with_it() -> None:
    prediction = [10, 11, 12, 13, 14, 15, 11, 12, 16, 17]
    assert draft_from_prediction([10], prediction, max_tokens=3) == (11, 12, 13)
    assert draft_from_prediction([10, 11, 12, 13], prediction, max_tokens=3) == (14, 15, 11)
    # "11 12" occurs twice: the occurrence nearest the reply's length (8 tokens so far) wins
    assert draft_from_prediction([9, 9, 9, 9, 9, 9, 11, 12], prediction, max_tokens=2) == (16, 17)
    assert draft_from_prediction([9, 11, 12], prediction, max_tokens=2) == (13, 14)
    # the reply left the prediction: its last token alone still finds a place to continue from
    assert draft_from_prediction([10, 11, 99, 15], prediction, max_tokens=2) == (11, 12)
    assert draft_from_prediction([98, 99], prediction, max_tokens=4) == ()
    assert draft_from_prediction([17], prediction, max_tokens=4) == ()  # nothing follows the prediction's end
    assert draft_from_prediction([], prediction, max_tokens=4) == ()
    assert draft_from_prediction([10], prediction, max_tokens=0) == ()


def test_token_history_converts_only_what_was_added_and_follows_a_cut() -> None:
    history = TokenHistory()
    assert len(history) == 0 and history.ids.tolist() == []
    tokens = list(range(100))
    assert history.sync(0, tokens[:10]).tolist() == tokens[:10]
    assert history.sync(10, tokens[10:100]).tolist() == tokens  # grown past its first buffer
    assert history.sync(50, [7, 8]).tolist() == [*tokens[:50], 7, 8]  # the end cut off, then new tokens
    assert history.ids.dtype == np.int64 and len(history) == 52
    assert propose_draft(history.sync(52, [*tokens[:4]]), max_tokens=3) == (4, 5, 6)
    with pytest.raises(ValueError, match="length"):
        history.sync(57, [])  # beyond the 56 tokens it holds
