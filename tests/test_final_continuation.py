"""Finals that Whisper closes early are decoded on from their last timestamp (DecodePolicy.continue_tail_s).

The real case: the telephone recording cut at 6.5-28.5 s is one 22 s window whose first decoding ends (EOT) at the
timestamp 18.64 s, three seconds of speech before the end of its audio. Without a continuation the final lost
"they all call me a Yankee down here"; offline transcription would have sought to that timestamp and decoded on.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.speech_decode import (
    DecodePolicy,
    PromptRules,
    WindowJob,
    WindowText,
    continuation_offset,
    transcribe_group,
)
from app.speech.wer import normalize_words
from app.speech.whisper_runner import DecodeResult, WhisperRunner

SECOND = 16_000
TIMESTAMP_BEGIN = 50_363  # Whisper tiny.en's <|0.00|>
NO_CONTINUATION = DecodePolicy(continue_tail_s=None)


def stamp(seconds: float) -> int:
    return TIMESTAMP_BEGIN + round(seconds / 0.02)


def result(tokens: list[int], *, reached_eot: bool = True) -> DecodeResult:
    return DecodeResult(tokens, -1.0, -0.1, 0.01, "", reached_eot)


def final_job(samples: int) -> WindowJob:
    return WindowJob(0, "final", np.zeros(samples, dtype=np.float32), 1000, 100)


def test_continuation_starts_at_the_last_timestamp_when_enough_audio_is_left() -> None:
    policy = DecodePolicy()  # continue when >= 2 s are left
    tokens = [stamp(0), 11, 12, stamp(5.0), stamp(5.0), 13, stamp(7.5), stamp(7.5)]
    assert continuation_offset(0, final_job(12 * SECOND), result(tokens), policy, TIMESTAMP_BEGIN) == 7.5 * SECOND
    # the offset of a continuation window adds to its own timestamps
    assert continuation_offset(SECOND, final_job(12 * SECOND), result(tokens), policy, TIMESTAMP_BEGIN) == (
        8.5 * SECOND
    )
    single_ending = [stamp(0), 11, 12, stamp(3.0)]  # a closed segment and EOT: the rest of the window was skipped
    assert continuation_offset(0, final_job(10 * SECOND), result(single_ending), policy, TIMESTAMP_BEGIN) == 3 * SECOND


def test_a_loop_stop_continues_from_its_last_timestamp_too() -> None:
    """A row stopped by the loop stop or the token limit (no EOT) seeks to its last timestamp like offline
    transcription, which decodes the unfinished segment after it again."""
    looping = [stamp(0), 11, stamp(1.0), stamp(1.0), 11, stamp(2.0), stamp(2.0), 11, 11, 11]
    job = final_job(12 * SECOND)
    assert continuation_offset(0, job, result(looping, reached_eot=False), DecodePolicy(), TIMESTAMP_BEGIN) == (
        2 * SECOND
    )


def test_no_continuation_without_progress_or_enough_audio() -> None:
    policy = DecodePolicy()
    tokens = [stamp(0), 11, 12, stamp(5.0)]
    job = final_job(12 * SECOND)
    assert continuation_offset(0, final_job(6 * SECOND), result(tokens), policy, TIMESTAMP_BEGIN) is None  # 1 s left
    assert continuation_offset(0, job, result([stamp(0)]), policy, TIMESTAMP_BEGIN) is None  # no progress
    assert continuation_offset(0, job, result([11, 12]), policy, TIMESTAMP_BEGIN) is None  # no timestamp at all
    assert continuation_offset(0, job, result(tokens), NO_CONTINUATION, TIMESTAMP_BEGIN) is None


def decode_final(served_whisper: WhisperRunner, audio: np.ndarray, policy: DecodePolicy) -> WindowText:
    frames = policy.window_frames(audio.shape[0], "final", served_whisper.max_frames)
    job = WindowJob(0, "final", audio, frames, policy.token_limit(audio.shape[0]))
    texts, _ = transcribe_group(served_whisper, [job], policy, PromptRules.from_config(served_whisper.config))
    return texts[0]


@pytest.mark.slow
def test_a_final_closed_early_is_decoded_on_to_the_end_of_its_audio(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    audio = telephone_audio[int(6.5 * SECOND) : int(28.5 * SECOND)]
    plain = decode_final(served_whisper, audio, NO_CONTINUATION)
    assert plain.continuations == 0 and "yankee" not in normalize_words(plain.text), (
        f"the premise changed: the first decoding now covers the whole window: {plain.text!r}"
    )
    continued = decode_final(served_whisper, audio, DecodePolicy())
    words, first = normalize_words(continued.text), normalize_words(plain.text)
    assert continued.continuations >= 1
    assert words[: len(first)] == first, f"{continued.text!r} does not extend {plain.text!r}"
    assert "yankee" in words[len(first) :], continued.text
    assert not continued.hit_token_limit


@pytest.mark.slow
def test_silence_after_the_speech_adds_no_words(served_whisper: WhisperRunner, telephone_audio: np.ndarray) -> None:
    speech = telephone_audio[int(24.5 * SECOND) : int(30 * SECOND)]
    audio = np.concatenate([speech, np.zeros(4 * SECOND, dtype=np.float32)])
    plain = decode_final(served_whisper, audio, NO_CONTINUATION)
    continued = decode_final(served_whisper, audio, DecodePolicy())
    assert plain.text and continued.text == plain.text
    assert continued.continuations == 1  # it looked at the 4 s of silence and found no speech there


@pytest.mark.slow
@pytest.mark.parametrize("stop_loops", [True, False], ids=["loop-stop", "no-loop-stop"])
def test_a_final_that_loops_from_its_start_is_decoded_again_from_what_the_partials_agreed_on(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray, stop_loops: bool
) -> None:
    """The opening of the telephone recording makes Whisper repeat "Hello?" to the token limit, timestamps and all.
    A browser test once saw a whole 24 s utterance end as the final "Hello." that way. With the words the
    utterance's partials agreed on, the final is decoded again without timestamps and says more, with or without
    the loop stop."""
    audio = telephone_audio[int(0.1 * SECOND) : int(8.6 * SECOND)]
    policy = DecodePolicy(stop_loops=stop_loops)
    frames = policy.window_frames(audio.shape[0], "final", served_whisper.max_frames)
    rules = PromptRules.from_config(served_whisper.config)
    (looped,) = transcribe_group(
        served_whisper, [WindowJob(0, "final", audio, frames, policy.token_limit(audio.shape[0]))], policy, rules
    )[0]
    assert looped.collapsed and looped.hit_token_limit, f"the premise changed: {looped.text!r}"
    agreed = tuple(served_whisper.tokenizer.encode(" Hello? Hello? Oh, hello. I didn't know"))
    job = WindowJob(0, "final", audio, frames, policy.token_limit(audio.shape[0]), agreed=agreed)
    (again,) = transcribe_group(served_whisper, [job], policy, rules)[0]
    assert again.text.startswith("Hello? Hello? Oh, hello. I didn't know"), again.text
    assert len(normalize_words(again.text)) > len(normalize_words(looped.text))
