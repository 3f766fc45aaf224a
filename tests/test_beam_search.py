"""Beam search (app.speech.beam_search): the search itself on a scripted decoder, then on the real Whisper model
and in the streaming engine's finals.

The scripted decoder reads each row's token history from its self-attention cache and its window from its
cross-attention cache, so a search that routed a cache to the wrong hypothesis or window would score the wrong
continuations and fail these tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from app.engine.speech_decode import DecodePolicy, PromptRules, WindowJob, transcribe_group, window_features
from app.speech.beam_search import Hypothesis, beam_search
from app.speech.decoding import DecodingRules
from app.speech.whisper_runner import LoopStop, WhisperRunner

A, B, C, D, EOT = 0, 1, 2, 3, 4
RULES = DecodingRules(
    eot=EOT,
    no_timestamps=5,
    timestamp_begin=6,
    n_vocab=6,
    no_speech=5,
    suppress_ids=(5,),
    suppress_ids_begin=(),
    suppress_blank=False,
    with_timestamps=False,
)
SECOND = 16_000


def distribution(probabilities: dict[int, float]) -> np.ndarray:
    logits = np.full(RULES.n_vocab, -30.0, dtype=np.float32)
    for token, probability in probabilities.items():
        logits[token] = math.log(probability)
    return logits


# Window 0: greedy takes A (0.5), after which nothing is likely; B (0.4) is followed by EOT at 0.95.
# Window 1: the same with the roles of A and B swapped, so a search that mixes windows up picks wrongly.
FLAT = {EOT: 0.24, A: 0.19, B: 0.19, C: 0.19, D: 0.19}
TABLES: dict[int, dict[tuple[int, ...], dict[int, float]]] = {
    0: {(): {A: 0.5, B: 0.4, C: 0.1}, (A,): FLAT, (B,): {EOT: 0.95, C: 0.05}},
    1: {(): {B: 0.5, A: 0.4, C: 0.1}, (B,): FLAT, (A,): {EOT: 0.95, C: 0.05}},
}


def scripted_logits(window: int, history: tuple[int, ...]) -> np.ndarray:
    return distribution(TABLES[window].get(history, {EOT: 0.9, D: 0.1}))


def scripted_step(
    tokens: np.ndarray, self_k: np.ndarray, self_v: np.ndarray, cross_k: np.ndarray, cross_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A decoder whose cache is the token history ([1, rows, 1, length, 1]) and whose cross cache is the window,
    one row per window for its consecutive rows when there are fewer cross rows than rows (shared cross-attention)."""
    new_k = np.concatenate([self_k, tokens.astype(np.float32)[None, :, None, :, None]], axis=3)
    rows_per_window = tokens.shape[0] // cross_k.shape[1]
    assert rows_per_window * cross_k.shape[1] == tokens.shape[0], "every window must have the same number of rows"
    logits = np.stack(
        [
            scripted_logits(
                int(cross_k[0, row // rows_per_window, 0, 0, 0]), tuple(int(t) for t in new_k[0, row, 0, :, 0])
            )
            for row in range(tokens.shape[0])
        ]
    )
    return logits[:, None, :], new_k, new_k


def search(windows: list[int], beam_size: int, limit: int = 10, **options: Any) -> list[Hypothesis]:
    rows = len(windows)
    empty = np.zeros((1, rows, 1, 0, 1), dtype=np.float32)
    cross = np.asarray(windows, dtype=np.float32).reshape(1, rows, 1, 1, 1)
    first = np.stack([scripted_logits(window, ()) for window in windows])
    return beam_search(
        scripted_step,
        first,
        (empty, empty, cross, cross),
        limits=[limit] * rows,
        rules=RULES,
        beam_size=beam_size,
        **options,
    )


def test_a_beam_of_one_is_greedy_and_a_wider_beam_finds_the_likelier_text() -> None:
    (greedy,) = search([0], beam_size=1)
    assert greedy.tokens == [A] and greedy.reached_eot
    assert greedy.sum_logprob == pytest.approx(math.log(0.5) + math.log(0.24), abs=1e-5)
    (beam,) = search([0], beam_size=2)
    assert beam.tokens == [B] and beam.reached_eot
    assert beam.sum_logprob == pytest.approx(math.log(0.4) + math.log(0.95), abs=1e-5)


@pytest.mark.parametrize("share_cross", [False, True])
def test_windows_searched_together_each_get_what_they_get_alone(share_cross: bool) -> None:
    together = search([0, 1, 0], beam_size=3, share_cross=share_cross)
    alone = [search([window], beam_size=3, share_cross=share_cross)[0] for window in (0, 1, 0)]
    assert together == alone
    assert [hypothesis.tokens for hypothesis in together] == [[B], [A], [B]]


def test_a_beam_wider_than_the_allowed_tokens_fills_up_with_rows_that_propose_nothing() -> None:
    """Six hypotheses wanted, four text tokens allowed: every window still has six rows (shared cross-attention
    needs equal groups), the filler rows never win."""
    together = search([0, 1], beam_size=6, share_cross=True)
    assert [hypothesis.tokens for hypothesis in together] == [[B], [A]]
    assert together == [search([window], beam_size=6)[0] for window in (0, 1)]


def test_token_limit_and_loop_stop_finish_hypotheses_without_eot() -> None:
    (limited,) = search([0], beam_size=2, limit=1)
    assert len(limited.tokens) == 1 and not limited.reached_eot
    TABLES[2] = {(): {A: 1.0}, **{(A,) * n: {A: 0.99, EOT: 0.01} for n in range(1, 12)}}
    try:
        (looped,) = search([2], beam_size=1, loop_stop=LoopStop(copies=4, max_ngram=1))
    finally:
        del TABLES[2]
    assert looped.tokens == [A] * 4 and not looped.reached_eot


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="beam_size"):
        search([0], beam_size=0)
    with pytest.raises(ValueError, match="at least 1"):
        DecodePolicy(final_beam_size=0)


@pytest.mark.slow
def test_whisper_beam_search_keeps_rows_apart_and_follows_the_timestamp_rules(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    policy = DecodePolicy()
    clips = [telephone_audio[start * SECOND : (start + 6) * SECOND] for start in (2, 9)]
    frames = policy.window_frames(clips[0].shape[0], "final", served_whisper.max_frames)
    jobs = [WindowJob(key, "final", clip, frames, policy.token_limit(clip.shape[0])) for key, clip in enumerate(clips)]
    n_mels = int(served_whisper.config["n_mels"])
    encoded = served_whisper.encode(np.stack([window_features(job.audio, frames, n_mels) for job in jobs]))
    prompts = [[served_whisper.sot]] * 2
    together = served_whisper.decode(encoded, prompts, beam_size=4)
    for row in range(2):
        (alone,) = served_whisper.decode(encoded.select([row]), [prompts[row]], beam_size=4)
        assert together[row].tokens == alone.tokens
        assert together[row].sum_logprob == pytest.approx(alone.sum_logprob, abs=1e-3)
    begin = int(served_whisper.config["timestamp_begin"])
    for result in together:
        assert result.reached_eot and result.text.strip()
        timestamps = [token for token in result.tokens if token >= begin]
        assert result.tokens[0] >= begin and timestamps == sorted(timestamps)  # the rules held in every beam


@pytest.mark.slow
def test_finals_use_the_beam_and_partials_stay_greedy(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = DecodePolicy(final_beam_size=3)
    audio = telephone_audio[2 * SECOND : 8 * SECOND]
    frames = policy.window_frames(audio.shape[0], "final", served_whisper.max_frames)
    limit = policy.token_limit(audio.shape[0])
    jobs = [WindowJob(0, "final", audio, frames, limit), WindowJob(1, "partial", audio, frames, limit)]
    calls: list[tuple[str, int]] = []
    decode = served_whisper.decode

    def recording_decode(*args: Any, **kwargs: Any) -> Any:
        rules = kwargs["rules"]
        calls.append(("final" if rules.with_timestamps else "partial", kwargs.get("beam_size", 1)))
        return decode(*args, **kwargs)

    monkeypatch.setattr(served_whisper, "decode", recording_decode)
    texts, _ = transcribe_group(served_whisper, jobs, policy, PromptRules.from_config(served_whisper.config))
    assert ("final", 3) in calls and ("partial", 1) in calls
    assert all(beam == 3 for kind, beam in calls if kind == "final")
    assert all(beam == 1 for kind, beam in calls if kind == "partial")
    assert texts[0].text and texts[1].text


@pytest.mark.slow
@pytest.mark.parametrize(("threshold", "beamed"), [(0.0, True), (-100.0, False)])
def test_a_gated_beam_decodes_only_the_finals_whisper_is_unsure_of(
    served_whisper: WhisperRunner,
    telephone_audio: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    threshold: float,
    beamed: bool,
) -> None:
    """``final_beam_below_logprob``: greedy first; the beam again only below the threshold (every average
    log-probability is below 0, none below -100)."""
    policy = DecodePolicy(final_beam_size=3, final_beam_below_logprob=threshold, continue_tail_s=None)
    audio = telephone_audio[2 * SECOND : 8 * SECOND]
    frames = policy.window_frames(audio.shape[0], "final", served_whisper.max_frames)
    job = WindowJob(0, "final", audio, frames, policy.token_limit(audio.shape[0]))
    beams: list[int] = []
    decode = served_whisper.decode

    def recording_decode(*args: Any, **kwargs: Any) -> Any:
        if kwargs["rules"].with_timestamps:  # final rules (a looped final's retry decodes without timestamps)
            beams.append(kwargs.get("beam_size", 1))
        return decode(*args, **kwargs)

    monkeypatch.setattr(served_whisper, "decode", recording_decode)
    rules = PromptRules.from_config(served_whisper.config)
    (gated,), _ = transcribe_group(served_whisper, [job], policy, rules)
    assert beams == ([1, 3] if beamed else [1])
    monkeypatch.undo()
    expected = DecodePolicy(final_beam_size=3 if beamed else 1, continue_tail_s=None)
    (direct,), _ = transcribe_group(served_whisper, [job], expected, rules)
    assert gated.text == direct.text and gated.text


@pytest.mark.slow
def test_finals_of_one_batch_can_have_different_beams(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WindowJob.beam_size`` (a stream's own beam) overrides the policy's per final: one call per beam size."""
    policy = DecodePolicy(continue_tail_s=None)
    audio = telephone_audio[2 * SECOND : 8 * SECOND]
    frames = policy.window_frames(audio.shape[0], "final", served_whisper.max_frames)
    limit = policy.token_limit(audio.shape[0])
    jobs = [WindowJob(0, "final", audio, frames, limit, beam_size=3), WindowJob(1, "final", audio, frames, limit)]
    calls: list[tuple[int, int]] = []  # (rows, beam) of the final decoder calls
    decode = served_whisper.decode

    def recording_decode(*args: Any, **kwargs: Any) -> Any:
        if kwargs["rules"].with_timestamps:
            calls.append((len(args[1]), kwargs.get("beam_size", 1)))
        return decode(*args, **kwargs)

    monkeypatch.setattr(served_whisper, "decode", recording_decode)
    texts, _ = transcribe_group(served_whisper, jobs, policy, PromptRules.from_config(served_whisper.config))
    assert sorted(calls) == [(1, 1), (1, 3)]
    monkeypatch.undo()
    (alone,), _ = transcribe_group(served_whisper, jobs[:1], DecodePolicy(final_beam_size=3, continue_tail_s=None),
                                   PromptRules.from_config(served_whisper.config))
    assert texts[0].text == alone.text and texts[1].text
