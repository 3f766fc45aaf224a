"""The speech load benchmark's per-stream measures (scripts/speech_load_clients.py), on hand-made records."""

from __future__ import annotations

import pytest

from scripts.speech_load_clients import Result, StreamRecord


def record(*results: Result, chunks: int = 10, flush: bool = True) -> StreamRecord:
    """Ten 100 ms chunks, chunk k sent at t = 100 + 0.1 (k + 1)."""
    made = StreamRecord("clip", 0.1, kind_has_flush=flush)
    made.sent_at = [100.0 + 0.1 * (k + 1) for k in range(chunks)]
    made.results = list(results)
    made.end_sent_at = made.sent_at[-1]
    return made


def test_partial_latency_is_measured_per_chunk_at_the_first_result_covering_it() -> None:
    stream = record(
        Result(100.5, "partial", 0.0, 0.3, "a"),  # covers chunks 0-2
        Result(100.9, "partial", 0.0, 0.6, "a b"),  # newly covers chunks 3-5
        Result(101.2, "final", 0.0, 0.6, "a b c"),  # nothing new
    )
    latencies = stream.coverage_latencies()
    assert latencies == pytest.approx([0.4, 0.3, 0.2, 0.5, 0.4, 0.3])


def test_silence_between_utterances_is_not_counted() -> None:
    stream = record(Result(100.5, "final", 0.0, 0.2, "a"), Result(101.1, "final", 0.7, 1.0, "b"))
    assert sorted(stream.first_cover_times()) == [0, 1, 7, 8, 9]


def test_final_latency_starts_at_the_send_of_the_audio_at_its_end() -> None:
    stream = record(Result(100.9, "final", 0.1, 0.45, "a"), Result(101.3, "final", 0.5, 1.0, "b"))
    assert stream.final_latencies() == pytest.approx([100.9 - 100.5, 101.3 - 101.0])


def test_drain_is_end_to_end_message_with_a_flush_and_coverage_catch_up_without() -> None:
    brook = record(Result(101.2, "final", 0.0, 1.0, "a"))
    brook.ended_at = 101.5
    assert brook.drain_s() == pytest.approx(0.5)
    anchor = record(Result(100.8, "partial", 0.0, 0.6, "a"), Result(101.4, "partial", 0.0, 0.9, "a b"), flush=False)
    anchor.ended_at = 106.0
    assert anchor.drain_s() == pytest.approx(0.4)


def test_hypothesis_joins_finals_and_keeps_a_trailing_open_segment() -> None:
    stream = record(
        Result(100.3, "partial", 0.0, 0.2, "Hel"),
        Result(100.5, "final", 0.0, 0.3, " Hello."),
        Result(100.9, "partial", 0.4, 0.8, " How are"),
    )
    assert stream.hypothesis() == "Hello. How are"
