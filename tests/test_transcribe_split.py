"""Cutting a window's tokens into segments and moving the cursor (app/speech/transcribe.split_by_timestamps)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.speech.transcribe import split_by_timestamps

T = 50363  # tiny.en <|0.00|>
A, B = 1000, 2000  # text tokens


def t(seconds: float) -> int:
    return T + round(seconds / 0.02)


def test_pairs_with_a_single_timestamp_ending_consume_the_window() -> None:
    pieces, seek = split_by_timestamps([t(0), A, t(1), t(1), B, t(2)], 0, 3000, T)
    assert [(start, end) for start, end, _ in pieces] == [(0.0, 1.0), (1.0, 2.0)]
    assert pieces[1][2] == [t(1), B, t(2)]
    assert seek == 3000


def test_an_unfinished_tail_moves_the_cursor_to_the_last_pair() -> None:
    pieces, seek = split_by_timestamps([t(0), A, t(1), t(1), B], 500, 3000, T)
    assert [(start, end) for start, end, _ in pieces] == [(5.0, 6.0)]
    assert seek == 500 + 100  # 1 s = 50 timestamp steps = 100 mel frames


def test_without_a_pair_the_window_is_one_segment_ending_at_the_last_timestamp() -> None:
    pieces, seek = split_by_timestamps([t(0), A, B, t(1.4)], 0, 2500, T)
    assert len(pieces) == 1
    assert pieces[0][0] == 0.0 and pieces[0][1] == pytest.approx(1.4) and pieces[0][2] == [t(0), A, B, t(1.4)]
    assert seek == 2500


def test_text_only_output_spans_the_window() -> None:
    pieces, seek = split_by_timestamps([A, B], 3000, 1234, T)
    assert len(pieces) == 1
    assert pieces[0][0] == 30.0 and pieces[0][1] == pytest.approx(42.34) and pieces[0][2] == [A, B]
    assert seek == 3000 + 1234


fw_transcribe = pytest.importorskip("faster_whisper.transcribe", reason="faster-whisper is the reference")


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.one_of(st.sampled_from([A, B]), st.integers(T, T + 1500)), max_size=14),
    seek=st.integers(0, 9000),
    segment_size=st.integers(1, 3000),
)
def test_equals_faster_whisper(tokens: list[int], seek: int, segment_size: int) -> None:
    model = SimpleNamespace(time_precision=0.02, input_stride=2)
    tokenizer = SimpleNamespace(timestamp_begin=T)
    expected, expected_seek, _ = fw_transcribe.WhisperModel._split_segments_by_timestamps(
        model, tokenizer, tokens, seek * 0.01, segment_size, segment_size * 0.01, seek
    )
    pieces, next_seek = split_by_timestamps(tokens, seek, segment_size, T)
    assert next_seek == expected_seek
    assert [(start, end, piece) for start, end, piece in pieces] == [
        (segment["start"], segment["end"], list(segment["tokens"])) for segment in expected
    ]
