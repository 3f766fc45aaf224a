"""Window sizing and decode guards of the streaming engine (app/engine/speech_decode.py), without a model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.speech_decode import DecodePolicy, WindowJob, align_drafts, collapse_repeats, partial_draft
from app.engine.speech_streams import StreamState

SECOND = 16_000


def test_windows_are_padded_bucketed_and_at_least_the_minimum() -> None:
    policy = DecodePolicy()  # 2 s padding, 10 s minimum, 2 s buckets
    assert policy.window_frames(1 * SECOND, "partial", 3000) == 1000
    assert policy.window_frames(8 * SECOND, "partial", 3000) == 1000  # 8 s + 2 s fits the minimum exactly
    assert policy.window_frames(8 * SECOND + 1, "final", 3000) == 1200
    assert policy.window_frames(29 * SECOND, "partial", 3000) == 3000  # never past Whisper's window
    assert DecodePolicy(final_full_window=True).window_frames(SECOND, "final", 3000) == 3000
    assert DecodePolicy(final_full_window=True).window_frames(SECOND, "partial", 3000) == 1000


@given(st.integers(min_value=0, max_value=30 * SECOND))
def test_window_frames_are_even_multiples_of_the_bucket_and_hold_the_audio(n_samples: int) -> None:
    frames = DecodePolicy(min_window_s=0.0).window_frames(n_samples, "partial", 3000)
    assert frames % 200 == 0 and 200 <= frames <= 3000
    assert frames >= min(3000, n_samples / 160)


def test_token_limit_grows_with_the_audio() -> None:
    policy = DecodePolicy()
    assert policy.token_limit(0) == 10
    assert policy.token_limit(10 * SECOND) == 90


def test_collapse_repeats_keeps_one_copy_of_a_loop() -> None:
    loop = [5, 6, 7] + [1, 2] * 6 + [9]
    assert collapse_repeats(loop, 4, 16) == ([5, 6, 7, 1, 2, 9], True)
    assert collapse_repeats([3] * 10, 4, 16) == ([3], True)


def test_collapse_repeats_leaves_short_repetitions_alone() -> None:
    hello = [10, 11, 10, 11, 10, 11, 12]  # "Hello. Hello. Hello. Oh" is real speech: three copies stay
    assert collapse_repeats(hello, 4, 16) == (hello, False)


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=3), max_size=60))
def test_collapse_repeats_output_has_no_long_runs_and_is_stable(tokens: list[int]) -> None:
    collapsed, changed = collapse_repeats(tokens, 4, 8)
    assert changed == (collapsed != tokens)
    assert len(collapsed) <= len(tokens)
    assert collapse_repeats(collapsed, 4, 8) == (collapsed, False)
    for size in range(1, 9):
        for start in range(len(collapsed) - 4 * size + 1):
            gram = collapsed[start : start + size]
            assert any(collapsed[start + k * size : start + (k + 1) * size] != gram for k in range(1, 4))


def test_a_partial_draft_from_the_previous_partial_alone_drops_its_last_tokens() -> None:
    previous = (10, 11, 12, 13, 14)
    alone = {"partial_draft_agreement": 1}
    assert partial_draft([previous], DecodePolicy(partial_draft_agreement=0)) == ()  # drafts off
    assert partial_draft([previous], DecodePolicy(**alone, partial_draft_holdback=2)) == (10, 11, 12)
    assert partial_draft([(1, 2), previous], DecodePolicy(**alone, partial_draft_holdback=2)) == (10, 11, 12)
    assert partial_draft([previous], DecodePolicy(**alone)) == previous
    assert partial_draft([previous[:2]], DecodePolicy(**alone, partial_draft_holdback=2)) == ()  # nothing left
    assert partial_draft([], DecodePolicy(**alone)) == ()


def test_with_agreement_a_draft_is_what_the_last_partials_share() -> None:
    policy = DecodePolicy(partial_draft_holdback=1, partial_draft_agreement=2)
    older, newer = (10, 11, 12, 13), (10, 11, 12, 20, 21)
    assert partial_draft([newer], policy) == ()  # one partial is not an agreement
    assert partial_draft([older, newer], policy) == (10, 11)  # 3 agreed tokens, minus the holdback
    assert partial_draft([(5,), older, newer], policy) == (10, 11)  # only the last two vote
    assert partial_draft([(9, 10), newer], policy) == ()
    assert partial_draft([older, newer], DecodePolicy()) == (10, 11, 12)  # the default: two agree, nothing held back


def _job(key: int, kind: str, draft: tuple[int, ...]) -> WindowJob:
    return WindowJob(key, kind, np.zeros(160, dtype=np.float32), 1000, 50, draft)  # type: ignore[arg-type]


def test_the_drafts_of_a_batch_are_cut_to_shared_lengths() -> None:
    jobs = [
        _job(0, "partial", tuple(range(5))),
        _job(1, "partial", tuple(range(9))),
        _job(2, "partial", tuple(range(100, 114))),
        _job(3, "partial", ()),
        _job(4, "final", ()),
    ]
    aligned = align_drafts(jobs, DecodePolicy(partial_draft_multiple=4))
    assert [job.draft for job in aligned] == [(0, 1, 2, 3), tuple(range(8)), tuple(range(100, 112)), (), ()]
    assert [job.key for job in aligned] == [0, 1, 2, 3, 4]
    by_eight = align_drafts(jobs, DecodePolicy(partial_draft_multiple=8))
    assert sorted({len(job.draft) for job in by_eight}) == [0, 8]  # two decoder calls for the partials, not four
    assert align_drafts(jobs, DecodePolicy()) == jobs  # off by default


def test_a_lone_draft_is_not_cut() -> None:
    jobs = [_job(0, "partial", tuple(range(5))), _job(1, "partial", ()), _job(2, "final", ())]
    assert align_drafts(jobs, DecodePolicy(partial_draft_multiple=8)) == jobs


def test_a_stream_keeps_the_partials_that_reach_furthest_in_the_current_utterance() -> None:
    state = StreamState("s", options=None, vad=None)  # type: ignore[arg-type]
    assert state.partial_history(0) == []
    state.note_partial(0, 16_000, (1, 2))
    state.note_partial(0, 24_000, (1, 2, 3))
    state.note_partial(0, 20_000, (9,))  # an older partial finishing late (another worker) stays behind the newest
    assert state.partial_history(0) == [(9,), (1, 2, 3)]
    state.note_partial(0, 12_000, (8,), keep=2)  # older than both kept: dropped
    assert state.partial_history(0) == [(9,), (1, 2, 3)]
    assert state.partial_history(1) == []  # a new utterance starts without a draft
    state.note_partial(1, 8_000, (7,))
    assert state.partial_history(1) == [(7,)] and state.partial_history(0) == []
    state.note_partial(0, 30_000, (6,))  # a late partial of the previous utterance is dropped
    assert state.partial_history(1) == [(7,)] and state.partial_history(0) == []
