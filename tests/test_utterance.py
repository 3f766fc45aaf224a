"""The per-stream segmentation state machine (app/engine/utterance.py) on hand-made VAD probability sequences.

Toy units for readable numbers: 100-sample frames, min speech 300, silence 500, pad 200, partials every 400,
utterances cut at 3000 after searching the last 1000 samples for the quietest frame.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.utterance import (
    FinalDue,
    PartialDue,
    SegmentationConfig,
    SegmenterState,
    SegmentEvent,
    UtteranceSegmenter,
    UtteranceStarted,
)

TOY = SegmentationConfig(
    threshold=0.5,
    neg_threshold=0.35,
    min_speech_samples=300,
    silence_samples=500,
    speech_pad_samples=200,
    partial_interval_samples=400,
    max_utterance_samples=3000,
    cut_search_samples=1000,
    frame_samples=100,
)
S, Q = 0.9, 0.0  # speech, quiet


def run(
    probabilities: list[float], config: SegmentationConfig = TOY, *, total: int | None = None
) -> list[SegmentEvent]:
    segmenter = UtteranceSegmenter(config)
    events: list[SegmentEvent] = []
    for probability in probabilities:
        events += segmenter.push(probability)
    if total is not None:
        events += segmenter.end(total)
    return events


def test_silence_gives_nothing() -> None:
    assert run([Q] * 200, total=200 * 100 + 37) == []


def test_one_utterance_start_partials_and_final() -> None:
    events = run([Q] * 3 + [S] * 8 + [0.1] * 5 + [Q] * 5)
    assert events == [
        UtteranceStarted(0, 100),  # onset 300 minus the 200 pad; reported once 300 samples are voiced (at 600)
        PartialDue(0, 100, 600),  # 500 >= 400 samples since the start
        PartialDue(0, 100, 1000),
        FinalDue(0, 100, 1300, "silence"),  # silence from 1100; final at 1600; ends 200 after the speech
    ]


def test_no_partials_during_a_silence_run() -> None:
    events = run([S] * 6 + [Q] * 5)
    partial_ends = [event.end for event in events if isinstance(event, PartialDue)]
    assert partial_ends == [400]  # not at 800 (silence since 600) nor later
    assert events[-1] == FinalDue(0, 0, 800, "silence")


def test_a_click_shorter_than_min_speech_is_ignored() -> None:
    assert run([Q, S, S, Q, Q, Q, Q, Q, Q, Q]) == []


def test_a_candidate_survives_a_short_gap() -> None:
    events = run([S, Q, Q, S, S, Q, Q, Q, Q, Q])  # voiced 100, gap 200, voiced 200 more -> 300 voiced
    assert events[0] == UtteranceStarted(0, 0)
    assert events[-1] == FinalDue(0, 0, 700, "silence")


def test_hysteresis_between_the_thresholds() -> None:
    # 0.4 is voiced (>= neg) but does not cancel a silence run; 0.2 starts one.
    keeps_speaking = run([S] * 4 + [0.4] * 10)
    assert not any(isinstance(event, FinalDue) for event in keeps_speaking)
    events = run([S] * 4 + [0.2, 0.4, 0.4, 0.4, 0.4])
    assert events[-1] == FinalDue(0, 0, 600, "silence")  # silence run from 400 despite the 0.4 frames
    cancelled = run([S] * 4 + [0.2, 0.4, 0.6, 0.2, 0.2, 0.2, 0.2])
    assert not any(isinstance(event, FinalDue) for event in cancelled)  # 0.6 cancelled the run from 400


def test_pre_roll_never_reaches_into_the_previous_utterance() -> None:
    events = run([S] * 4 + [Q] * 5 + [S] * 4 + [Q] * 5)
    finals = [event for event in events if isinstance(event, FinalDue)]
    starts = [event for event in events if isinstance(event, UtteranceStarted)]
    assert finals[0] == FinalDue(0, 0, 600, "silence")
    assert starts[1] == UtteranceStarted(1, 700)  # onset 900 minus 200


def test_after_finalize_the_next_pre_roll_starts_at_the_finalize_point() -> None:
    segmenter = UtteranceSegmenter(TOY)
    events: list[SegmentEvent] = []
    for probability in [S] * 5:
        events += segmenter.push(probability)
    events += segmenter.finalize()
    for probability in [S] * 3:
        events += segmenter.push(probability)
    assert events[-1] == UtteranceStarted(1, 500)  # onset 500: the 200 pre-roll stops at the finalize point


def test_long_utterance_is_cut_at_the_quietest_recent_frame() -> None:
    probabilities = [S] * 25 + [0.45] + [S] * 10  # the quiet frame is 2500..2600
    events = run(probabilities)
    finals = [event for event in events if isinstance(event, FinalDue)]
    assert finals == [FinalDue(0, 0, 2600, "max_length")]
    assert UtteranceStarted(1, 2600) in events
    assert events.index(finals[0]) < events.index(UtteranceStarted(1, 2600))


def test_forced_cut_without_a_quiet_frame_cuts_at_the_end() -> None:
    events = run([S] * 31)
    assert FinalDue(0, 0, 3000, "max_length") in events
    assert UtteranceStarted(1, 3000) in events


def test_finalize_ends_speech_and_drops_a_candidate() -> None:
    segmenter = UtteranceSegmenter(TOY)
    events: list[SegmentEvent] = []
    for probability in [S] * 5:
        events += segmenter.push(probability)
    events += segmenter.finalize()
    assert events[-1] == FinalDue(0, 0, 500, "finalize")
    assert segmenter.state is SegmenterState.IDLE
    assert segmenter.push(S) == [] and segmenter.push(S) == []  # a new candidate...
    assert segmenter.finalize() == []  # ...dropped before it was reported
    assert segmenter.next_utterance == 1


def test_end_includes_the_trailing_part_frame_and_clamps_in_silence() -> None:
    assert run([S] * 5, total=537)[-1] == FinalDue(0, 0, 537, "end")
    assert run([S] * 5 + [Q] * 3, total=850)[-1] == FinalDue(0, 0, 700, "end")  # silence from 500, pad 200


def test_no_partials_without_interim_results() -> None:
    config = SegmentationConfig(**{**TOY.__dict__, "partial_interval_samples": None})
    events = run([S] * 20 + [Q] * 5, config)
    assert not any(isinstance(event, PartialDue) for event in events)
    assert len(events) == 2


def test_no_frames_after_end() -> None:
    segmenter = UtteranceSegmenter(TOY)
    segmenter.end(0)
    with pytest.raises(RuntimeError, match="after end"):
        segmenter.push(S)


def test_config_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="neg_threshold"):
        SegmentationConfig(threshold=0.3, neg_threshold=0.4)
    with pytest.raises(ValueError, match="speech_pad"):
        SegmentationConfig(speech_pad_samples=9000, silence_samples=8000)


def test_from_ms_uses_16_khz_samples() -> None:
    config = SegmentationConfig.from_ms(silence_ms=700, partial_interval_s=None)
    assert config.silence_samples == 11_200 and config.speech_pad_samples == 4_800
    assert config.partial_interval_samples is None and config.max_utterance_samples == 320_000


@settings(max_examples=300, deadline=None)
@given(
    probabilities=st.lists(st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.9]), max_size=300),
    finalize_at=st.sets(st.integers(min_value=0, max_value=300), max_size=4),
    tail=st.integers(min_value=0, max_value=99),
)
def test_any_sequence_gives_well_formed_utterances(
    probabilities: list[float], finalize_at: set[int], tail: int
) -> None:
    segmenter = UtteranceSegmenter(TOY)
    events: list[SegmentEvent] = []
    for index, probability in enumerate(probabilities):
        if index in finalize_at:
            events += segmenter.finalize()
        events += segmenter.push(probability)
    events += segmenter.end(len(probabilities) * 100 + tail)

    open_utterance: UtteranceStarted | None = None
    last_end = 0
    last_partial_end = -1
    for event in events:
        if isinstance(event, UtteranceStarted):
            assert open_utterance is None, "an utterance started before the previous one ended"
            assert event.start >= last_end
            open_utterance, last_partial_end = event, event.start
        elif isinstance(event, PartialDue):
            assert open_utterance is not None and event.utterance == open_utterance.utterance
            assert event.start == open_utterance.start and event.end > last_partial_end
            last_partial_end = event.end
        else:
            assert open_utterance is not None and event.utterance == open_utterance.utterance
            assert event.start == open_utterance.start < event.end
            assert event.end - event.start <= TOY.max_utterance_samples
            assert event.end >= last_partial_end or event.reason == "max_length"  # a cut may go back a little
            last_end, open_utterance = event.end, None
    assert open_utterance is None, "end() must close the last utterance"
    started = [event.utterance for event in events if isinstance(event, UtteranceStarted)]
    assert started == list(range(len(started)))
