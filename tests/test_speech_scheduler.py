"""The pure speech scheduler (app/engine/speech_scheduler.py): VAD plans, markers, decode jobs and batching.

A fake VAD gives each frame a probability from a hand-made list; nothing here loads a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.speech_scheduler import DecodeItem, DecodeKind, SpeechScheduler
from app.engine.utterance import FinalDue, PartialDue, SegmentEvent, UtteranceStarted
from tests.test_utterance import TOY

FRAME = TOY.frame_samples  # the segmenter tests' toy configuration: 100-sample frames, 400-sample partials
S, Q = 0.9, 0.0


def window_frames(n_samples: int, kind: DecodeKind) -> int:
    return 3000 if kind == "final" else 200 * (1 + n_samples // 1000)


def token_limit(n_samples: int) -> int:
    return 10 + n_samples // 100


def make_scheduler(**kwargs: int) -> SpeechScheduler:
    return SpeechScheduler(window_frames, token_limit, **kwargs)


@dataclass
class Recorder:
    """Runs scheduler steps against fake VAD probabilities and records what happens."""

    scheduler: SpeechScheduler
    probabilities: dict[str, Sequence[float]]
    events: dict[str, list[SegmentEvent]] = field(default_factory=dict)
    decoded: list[DecodeItem] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def step(self) -> None:
        for work in self.scheduler.plan_vad():
            first = work.first_sample // FRAME
            values = list(self.probabilities[work.stream_id][first : first + work.n_frames])
            assert len(values) == work.n_frames
            self.events.setdefault(work.stream_id, []).extend(self.scheduler.apply_vad(work.stream_id, values))
        self.ended += self.scheduler.take_ended()
        for group in self.scheduler.plan_decodes():
            assert len({item.frames for item in group.items}) == 1
            for item in group.items:
                completion = self.scheduler.complete(item)
                if completion.deliver:
                    self.decoded.append(item)
                if completion.stream_ended:
                    self.ended.append(item.stream_id)

    def drain(self) -> None:
        while self.scheduler.has_work():
            self.step()


def test_one_stream_end_to_end() -> None:
    scheduler = make_scheduler()
    scheduler.add_stream("a", TOY)
    probabilities = [Q] * 3 + [S] * 8 + [0.1] * 5 + [Q] * 5
    recorder = Recorder(scheduler, {"a": probabilities})
    scheduler.push("a", len(probabilities) * FRAME)
    scheduler.end("a")
    recorder.drain()
    assert recorder.events["a"] == [
        UtteranceStarted(0, 100),
        PartialDue(0, 100, 600),
        PartialDue(0, 100, 1000),
        FinalDue(0, 100, 1300, "silence"),
    ]
    # All of it arrived in one push, so the final made the partials stale before they were handed out.
    assert [(item.kind, item.start, item.end) for item in recorder.decoded] == [("final", 100, 1300)]
    assert recorder.ended == ["a"]
    assert not scheduler.has_work()


def test_vad_is_planned_only_for_whole_frames_and_capped_per_step() -> None:
    scheduler = make_scheduler(max_vad_frames_per_step=4)
    scheduler.add_stream("a", TOY)
    scheduler.push("a", 250)
    [work] = scheduler.plan_vad()
    assert (work.first_sample, work.n_frames) == (0, 2)
    scheduler.apply_vad("a", [Q, Q])
    assert scheduler.plan_vad() == []
    scheduler.push("a", 1000)
    [work] = scheduler.plan_vad()
    assert (work.first_sample, work.n_frames) == (200, 4)
    with pytest.raises(ValueError, match="go past"):
        scheduler.apply_vad("a", [Q] * 20)


def test_finalize_applies_at_its_sample_position() -> None:
    scheduler = make_scheduler()
    scheduler.add_stream("a", TOY)
    recorder = Recorder(scheduler, {"a": [S] * 10})
    scheduler.push("a", 650)
    scheduler.finalize("a")  # at 650: after the frames ending at 600, before the one reaching 700
    scheduler.push("a", 350)
    recorder.drain()
    assert FinalDue(0, 0, 600, "finalize") in recorder.events["a"]
    assert UtteranceStarted(1, 600) in recorder.events["a"]  # the speech goes on after the finalize point


def test_end_without_speech_ends_the_stream_at_once() -> None:
    scheduler = make_scheduler()
    scheduler.add_stream("a", TOY)
    recorder = Recorder(scheduler, {"a": [Q] * 10})
    scheduler.push("a", 1050)
    scheduler.end("a")
    recorder.drain()
    assert recorder.ended == ["a"] and recorder.decoded == [] and recorder.events["a"] == []
    with pytest.raises(ValueError, match="has ended"):
        scheduler.push("a", 10)


def test_finals_first_then_oldest_partials_and_batch_limit() -> None:
    scheduler = make_scheduler(max_batch_size=3)
    for name in "abcd":
        scheduler.add_stream(name, TOY)
    speaking = [S] * 8
    finishing = [S] * 4 + [Q] * 5
    recorder = Recorder(scheduler, {"a": speaking, "b": finishing, "c": speaking, "d": finishing})
    for name, probabilities in recorder.probabilities.items():
        scheduler.push(name, len(probabilities) * FRAME)
    for work in scheduler.plan_vad():
        scheduler.apply_vad(work.stream_id, list(recorder.probabilities[work.stream_id]))
    groups = scheduler.plan_decodes()
    handed_out = [(item.stream_id, item.kind) for group in groups for item in group.items]
    assert sorted(handed_out) == [("a", "partial"), ("b", "final"), ("d", "final")]
    assert {group.frames for group in groups} == {3000, 200}
    assert all(len({item.frames for item in group.items}) == 1 for group in groups)
    [rest] = scheduler.plan_decodes()
    assert [(item.stream_id, item.kind) for item in rest.items] == [("c", "partial")]


def test_newer_partial_replaces_the_waiting_one_and_a_final_makes_partials_stale() -> None:
    scheduler = make_scheduler()
    scheduler.add_stream("a", TOY)
    scheduler.push("a", 1200)
    scheduler.apply_vad("a", [S] * 8)
    [group] = scheduler.plan_decodes()
    [in_flight] = group.items
    assert (in_flight.kind, in_flight.end) == ("partial", 800)
    scheduler.apply_vad("a", [Q] * 4)  # silence starts; still no final
    scheduler.push("a", 100)
    scheduler.apply_vad("a", [Q])  # silence reaches 500: final due
    assert scheduler.complete(in_flight).deliver is False  # its utterance has a final queued
    [group] = scheduler.plan_decodes()
    assert [item.kind for item in group.items] == ["final"]


def test_partials_go_round_robin_when_streams_outnumber_the_batch() -> None:
    scheduler = make_scheduler(max_batch_size=1)
    for name in "ab":
        scheduler.add_stream(name, TOY)
        scheduler.push(name, 4000)
    scheduler.apply_vad("a", [S] * 4)  # a's partial is due first
    scheduler.apply_vad("b", [S] * 4)
    [first] = scheduler.plan_decodes()
    assert [item.stream_id for item in first.items] == ["a"]
    scheduler.complete(first.items[0])
    scheduler.apply_vad("a", [S] * 4)  # a and b each get a newer partial; b has waited longer
    scheduler.apply_vad("b", [S] * 4)
    [second] = scheduler.plan_decodes()
    assert [(item.stream_id, item.end) for item in second.items] == [("b", 8 * FRAME)]  # b's newest window
    [third] = scheduler.plan_decodes()
    assert [item.stream_id for item in third.items] == ["a"]


def test_a_stream_gets_no_decode_while_one_of_its_decodes_is_in_flight() -> None:
    """Batches overlap (one per decode worker), but each stream's results must come back in order. Only a final
    may pass a partial still in flight: that partial's result will be dropped anyway."""
    scheduler = make_scheduler()
    for name in "ab":
        scheduler.add_stream(name, TOY)
        scheduler.push(name, 3000)
    scheduler.apply_vad("a", [S] * 4)
    scheduler.apply_vad("b", [S] * 4)
    [first] = scheduler.plan_decodes()
    a_partial, b_partial = sorted(first.items, key=lambda item: item.stream_id)
    scheduler.apply_vad("b", [S] * 4)  # a newer partial for b while its first one runs
    assert not scheduler.has_ready_decodes() and scheduler.plan_decodes() == []
    scheduler.complete(b_partial)
    [second] = scheduler.plan_decodes()
    [b_newer] = second.items
    assert (b_newer.stream_id, b_newer.end) == ("b", 800)
    scheduler.apply_vad("a", [S] * 4 + [Q] * 5)  # a: its final is due while a_partial still runs
    [third] = scheduler.plan_decodes()
    [a_final] = third.items
    assert (a_final.stream_id, a_final.kind) == ("a", "final")
    scheduler.apply_vad("a", [S] * 8)  # a's next utterance: its partial waits for a's final
    assert scheduler.plan_decodes() == []
    assert scheduler.complete(a_partial).deliver is False  # its utterance is final: the result is dropped
    assert scheduler.plan_decodes() == []  # the final is still in flight
    assert scheduler.complete(a_final).deliver is True
    [fourth] = scheduler.plan_decodes()
    assert [(item.stream_id, item.kind, item.utterance) for item in fourth.items] == [("a", "partial", 1)]


def test_stale_partials_are_dropped_but_finals_never() -> None:
    scheduler = make_scheduler()
    for name in "ab":
        scheduler.add_stream(name, TOY)
        scheduler.push(name, 1000)
    scheduler.apply_vad("a", [S] * 8)  # partial due
    scheduler.apply_vad("b", [S] * 4 + [Q] * 5)  # final due
    [group] = scheduler.plan_decodes(is_stale=lambda item: True)
    assert [(item.stream_id, item.kind) for item in group.items] == [("b", "final")]
    assert scheduler.plan_decodes() == []  # the stale partial is gone, not postponed


def test_a_removed_stream_drops_its_work() -> None:
    scheduler = make_scheduler()
    scheduler.add_stream("a", TOY)
    scheduler.push("a", 800)
    scheduler.apply_vad("a", [S] * 8)
    [group] = scheduler.plan_decodes()
    scheduler.remove_stream("a")
    scheduler.remove_stream("a")  # idempotent
    assert scheduler.complete(group.items[0]).deliver is False
    assert scheduler.apply_vad("a", [S]) == []
    assert len(scheduler) == 0 and not scheduler.has_work()


def test_backlog_counts_audio_not_yet_settled() -> None:
    scheduler = make_scheduler()
    scheduler.add_stream("a", TOY)
    scheduler.push("a", 1000)
    assert scheduler.backlog("a") == 1000
    scheduler.apply_vad("a", [S] * 4 + [Q] * 5)  # final [0, 600) due at 900
    assert scheduler.backlog("a") == 400  # settled up to the end of the waiting final
    [group] = scheduler.plan_decodes()
    assert scheduler.backlog("a") == 400  # in flight: still not settled
    assert scheduler.retain_from("a") == 700  # the in-flight final already has its audio
    scheduler.complete(group.items[0])
    assert scheduler.backlog("a") == 100


def step_through(pushes: Sequence[int], markers: dict[int, str], probabilities: Sequence[float]) -> Recorder:
    """Push the audio in the given sizes, placing each marker after the push that ends at its position."""
    scheduler = make_scheduler(max_vad_frames_per_step=7)
    scheduler.add_stream("a", TOY)
    recorder = Recorder(scheduler, {"a": probabilities})
    position = 0
    for size in pushes:
        scheduler.push("a", size)
        position += size
        if markers.get(position) == "finalize":
            scheduler.finalize("a")
        recorder.step()
    scheduler.end("a")
    recorder.drain()
    return recorder


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[list[float], list[int], list[int], dict[int, str]]:
    probabilities = draw(st.lists(st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.9]), min_size=1, max_size=150))
    total = len(probabilities) * FRAME + draw(st.integers(min_value=0, max_value=99))
    finalize_at = draw(st.sets(st.integers(min_value=1, max_value=total), max_size=3))
    markers = dict.fromkeys(finalize_at, "finalize")

    def splits() -> list[int]:
        cuts = set(draw(st.lists(st.integers(min_value=1, max_value=total), max_size=20))) | finalize_at
        points = [0, *sorted(point for point in cuts if point < total), total]
        return [b - a for a, b in itertools.pairwise(points)]

    return probabilities, splits(), splits(), markers


@settings(max_examples=200, deadline=None)
@given(split_streams())
def test_any_split_into_pushes_gives_the_same_events_and_finals(
    case: tuple[list[float], list[int], list[int], dict[int, str]],
) -> None:
    probabilities, first_split, second_split, markers = case
    one = step_through(first_split, markers, probabilities)
    other = step_through(second_split, markers, probabilities)
    assert one.events == other.events
    finals = [(item.utterance, item.start, item.end) for item in one.decoded if item.kind == "final"]
    assert finals == [(item.utterance, item.start, item.end) for item in other.decoded if item.kind == "final"]
    expected = [(e.utterance, e.start, e.end) for e in one.events.get("a", []) if isinstance(e, FinalDue)]
    assert finals == expected  # every final is decoded, once, in order
    due = {(e.utterance, e.end) for e in one.events.get("a", []) if isinstance(e, PartialDue)}
    for recorder in (one, other):
        partials = {(item.utterance, item.end) for item in recorder.decoded if item.kind == "partial"}
        assert partials <= due  # partials are decoded only at due positions (some coalesced away)
        assert recorder.ended == ["a"]
