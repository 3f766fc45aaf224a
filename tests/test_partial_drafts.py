"""Partials started from a draft (DecodePolicy.partial_draft_agreement), with the real model.

Greedy decoding is self-consistent: a window decoded from a draft made of its own tokens (fed in one decoder call)
must say what it says decoded token by token, whether the draft leaves some of the text to decode or all of it.
With ``partial_draft_verify`` (the runner keeps a draft only as far as greedy decoding agrees with it) that holds
for any draft.
"""

from __future__ import annotations

import numpy as np

from app.engine.speech_decode import DecodePolicy, PromptRules, WindowJob, WindowText, transcribe_group
from app.speech.whisper_runner import WhisperRunner

SECOND = 16_000
POLICY = DecodePolicy()
VERIFY = DecodePolicy(partial_draft_verify=True)


def partial_job(key: int, served_whisper: WhisperRunner, audio: np.ndarray, draft: tuple[int, ...] = ()) -> WindowJob:
    frames = POLICY.window_frames(audio.shape[0], "partial", served_whisper.max_frames)
    return WindowJob(key, "partial", audio, frames, POLICY.token_limit(audio.shape[0]), draft)


def decode(served_whisper: WhisperRunner, jobs: list[WindowJob], policy: DecodePolicy = POLICY) -> list[WindowText]:
    texts, _ = transcribe_group(served_whisper, jobs, policy, PromptRules.from_config(served_whisper.config))
    return texts


def test_a_partial_decoded_from_its_own_tokens_says_the_same(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    audio = telephone_audio[9 * SECOND : 14 * SECOND]
    (plain,) = decode(served_whisper, [partial_job(0, served_whisper, audio)])
    tokens = plain.text_tokens
    assert plain.text and len(tokens) > 6 and plain.drafted == 0
    for draft in (tokens[:-3], tokens):  # some text left to decode; all of it (EOT must be allowed at once)
        (drafted,) = decode(served_whisper, [partial_job(0, served_whisper, audio, draft)])
        assert drafted.drafted == len(draft)
        assert drafted.text == plain.text and drafted.text_tokens == tokens


def test_drafted_and_plain_partials_in_one_batch_each_say_what_they_say_alone(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    first = telephone_audio[22 * SECOND : 28 * SECOND]
    second = telephone_audio[12 * SECOND : 17 * SECOND]
    (first_alone,) = decode(served_whisper, [partial_job(0, served_whisper, first)])
    (second_alone,) = decode(served_whisper, [partial_job(0, served_whisper, second)])
    draft = first_alone.text_tokens[:-2]
    together = decode(
        served_whisper, [partial_job(0, served_whisper, first, draft), partial_job(1, served_whisper, second)]
    )
    assert [text.key for text in together] == [0, 1]
    assert together[0].text == first_alone.text and together[0].drafted == len(draft)
    assert together[1].text == second_alone.text and together[1].drafted == 0


def test_a_draft_from_other_words_is_kept_and_the_rest_is_decoded(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    """By default a draft is a commitment: what the window is decoded on from is the draft, even where Whisper alone
    would have read the audio differently (the final, decoded from scratch, settles it)."""
    audio = telephone_audio[9 * SECOND : 14 * SECOND]
    (plain,) = decode(served_whisper, [partial_job(0, served_whisper, audio)])
    draft = tuple(served_whisper.tokenizer.encode(" Goodbye."))
    (drafted,) = decode(served_whisper, [partial_job(0, served_whisper, audio, draft)])
    assert drafted.text_tokens[: len(draft)] == draft and drafted.text.startswith("Goodbye.")
    assert drafted.text != plain.text and drafted.drafted == len(draft)


def test_a_verified_draft_is_kept_only_as_far_as_greedy_decoding_reads_the_same(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    """``partial_draft_verify``: a partial keeps its draft up to the first token greedy decoding would not pick
    there, and decodes on from that point, so it says what it says decoded from scratch, whatever the draft."""
    audio = telephone_audio[9 * SECOND : 14 * SECOND]
    (plain,) = decode(served_whisper, [partial_job(0, served_whisper, audio)])
    tokens = plain.text_tokens
    wrong = tuple(served_whisper.tokenizer.encode(" Goodbye."))
    assert tokens[: len(wrong)] != wrong
    for draft, kept in ((wrong, 0), ((*tokens[:4], *wrong), 4), (tokens[:-3], len(tokens) - 3), (tokens, len(tokens))):
        (drafted,) = decode(served_whisper, [partial_job(0, served_whisper, audio, draft)], VERIFY)
        assert drafted.drafted == kept
        assert drafted.text == plain.text and drafted.text_tokens == tokens


def test_verified_drafts_of_one_length_share_a_call_and_each_row_says_what_it_says_alone(
    served_whisper: WhisperRunner, telephone_audio: np.ndarray
) -> None:
    """Rows whose drafts have the same length decode together: the group rolls back to the shortest kept prefix
    (here the wrong draft's 2 tokens), and the other row decodes its own longer prefix again, to the same tokens."""
    first = telephone_audio[9 * SECOND : 14 * SECOND]
    second = telephone_audio[22 * SECOND : 27 * SECOND]
    (first_alone,) = decode(served_whisper, [partial_job(0, served_whisper, first)])
    (second_alone,) = decode(served_whisper, [partial_job(0, served_whisper, second)])
    length = 6
    assert len(first_alone.text_tokens) > length and len(second_alone.text_tokens) > length
    wrong = (*first_alone.text_tokens[:2], *served_whisper.tokenizer.encode(" Goodbye to all of them."))[:length]
    assert len(wrong) == length and wrong[2] != first_alone.text_tokens[2]
    jobs = [
        partial_job(0, served_whisper, first, wrong),
        partial_job(1, served_whisper, second, second_alone.text_tokens[:length]),
    ]
    together = decode(served_whisper, jobs, VERIFY)
    assert [text.drafted for text in together] == [2, 2]
    assert together[0].text_tokens == first_alone.text_tokens and together[1].text_tokens == second_alone.text_tokens
