"""Transcribe utterance windows for the streaming engine, with guards against Whisper's failures on short windows.

Runs on the engine's inference thread: numpy audio in, text out. A group of windows with the same frame count is
one batched encoder call, then one batched decoder call per kind (final, partial), each row with its own token limit.

The guards (Whisper tiny.en loops on encoder inputs shorter than 3000 frames, see
/work/shared/notes/whisper-tiny-en-ct2.md, and sometimes on full windows too):

- ``token_limit``: at most ``tokens_base + tokens_per_s * duration`` new tokens, so a runaway decoder stops early
  (real speech measured at 2-5 tokens per second, timestamps included, on the test recordings);
- ``collapse_repeats``: ``repeat_limit`` or more back-to-back copies of the same token n-gram collapse to one;
- ``stop_loops``: a row stops decoding as soon as it ends in ``repeat_limit`` copies of an n-gram (the copies
  collapse to one anyway; the steps to the token limit were the main waste of looping rows, and a batch's
  decoding lasts as long as its longest row);
- the offline no-speech rule: no text when P(no speech) > 0.6 while the average log-probability is < -1.0;
- a partial whose text still compresses too well (zlib ratio > 2.4, a loop ``collapse_repeats`` missed) is not
  shown (a final keeps its collapsed text);
- continuation: a final whose decoding stops (EOT, or the loop stop) with its last timestamp ``continue_tail_s`` or
  more before the end of its audio is decoded on from that timestamp, prompted with the text so far (as offline
  transcription seeks to the last timestamp, drops the unfinished segment after it and conditions on the previous
  text), at most ``max_continuations`` times. Whisper sometimes closes a long window after its first sentences (on
  the telephone recording cut at 6.5-28.5 s the first decode stops at 18.6 s and the continuation adds "They all
  call me a Yankee down here."), and a window that starts "Hello? Hello? Hello? Hello?" trips the loop stop (a
  browser test saw 24 s of speech end as the final "Hello."); without this the rest of the utterance was lost.

- a final that loops to the loop stop or the token limit with no continuation (Whisper repeating "Hello?" from the
  start of the window) is decoded again without timestamps from the words its utterance's partials agreed on, and
  that result is kept if it says more once repeats are collapsed.

Partial drafts (``partial_draft_agreement``, 2 by default): a partial starts from the words the previous two
partials of its utterance agree on (minus ``partial_draft_holdback`` tokens, 0 by default), fed after
``<|notimestamps|>`` in one decoder call (``partial_draft``); only the rest is decoded token by token. By default
the draft is a commitment (agreed words stay until the final); with ``partial_draft_verify`` the runner checks it
against the logits of every draft position and keeps it only as far as greedy decoding agrees, so a partial says
exactly what it would say decoded from scratch. Finals never use drafts.
Optionally (``partial_draft_multiple``, off by default) the drafts of a batch are cut to a multiple of that many
tokens so that they share decoder calls (``align_drafts``).

Text: the window's text tokens (timestamps dropped) decoded at once; Whisper starts every segment with a space, so
this is the segments' texts, each stripped, joined with one space (runs of whitespace become one space).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from app.engine.conversation import common_prefix_length
from app.speech.decoding import TIME_PRECISION_S, DecodingRules, compression_ratio
from app.speech.features import HOP_LENGTH, SAMPLE_RATE_HZ, TRANSCRIBE_PADDING_SAMPLES, log_mel_spectrogram
from app.speech.whisper_runner import DecodeResult, EncoderOutput, LoopStop, WhisperRunner

logger = logging.getLogger(__name__)

WindowKind = Literal["partial", "final"]
MIN_WINDOW_SAMPLES: Final = 201  # log_mel_spectrogram needs more than N_FFT // 2 samples


@dataclass(frozen=True)
class DecodePolicy:
    """How windows are sized and decoded, and when a result is thrown away."""

    final_full_window: bool = False  # True: finals use the full 30 s window like offline (1.6x the cost)
    pad_s: float = 2.0  # zero padding after the audio of a bucketed window
    min_window_s: float = 10.0  # a bucketed window is never shorter than this (shorter ones loop more)
    bucket_s: float = 2.0  # bucketed windows are rounded up to a multiple of this, so streams share calls
    tokens_base: int = 10  # new-token limit: tokens_base + tokens_per_s * seconds of audio
    tokens_per_s: float = 8.0
    repeat_limit: int = 4  # this many back-to-back copies of an n-gram collapse to one
    max_repeat_ngram: int = 16  # longest n-gram (in tokens) checked for repeats
    no_speech_threshold: float = 0.6  # no text when P(no speech) is above this ...
    logprob_threshold: float = -1.0  # ... and the average log-probability is below this
    compression_ratio_threshold: float = 2.4  # a partial whose text compresses more than this is not shown
    stop_loops: bool = True  # stop a row's decoding once it ends in repeat_limit copies of an n-gram
    continue_tail_s: float | None = 2.0  # a final whose timestamps end this long before its audio is decoded on
    silence_padding: bool = False  # pad windows with silent audio, not log-mel zeros (worse: see window_features)
    max_continuations: int = 2  # continuation windows per final at most
    # A partial starts from the text its utterance's last ``partial_draft_agreement`` partials agree on, minus the last
    # ``partial_draft_holdback`` tokens, fed in one decoder call instead of decoded again token by token; agreement 0:
    # every partial is decoded from scratch. See ``partial_draft``.
    partial_draft_agreement: int = 2
    partial_draft_holdback: int = 0
    # False: a draft is a commitment, fed as part of the prompt (agreed words stay until the final; partials come
    # soonest). True: the runner verifies it and keeps it only as far as greedy decoding agrees, so a partial says
    # exactly what it would decoded from scratch (fewer tokens saved). See docs/benchmarks.md, "Partial drafts".
    partial_draft_verify: bool = False
    # Drafts of different lengths cannot share a decoder call (the rows of a call share positions). M > 1: when
    # several partials of one batch have drafts, each is cut to a multiple of M tokens so that they fall into a few
    # shared calls (see ``align_drafts``). Off by default: measured at 8 it made partials more accurate but not
    # sooner (docs/benchmarks.md, "Partial drafts").
    partial_draft_multiple: int = 1
    # Finals (and their continuation windows) are decoded with a beam of this many hypotheses; 1: greedy, as
    # partials always are. With ``final_beam_below_logprob`` set, a final is decoded greedily first and again with
    # the beam only when its average log-probability is below that (Whisper is unsure: that is where the beam
    # changes words). See docs/benchmarks.md, "Beam search for finals".
    final_beam_size: int = 1
    final_beam_below_logprob: float | None = None

    def __post_init__(self) -> None:
        if self.final_beam_size < 1:
            raise ValueError(f"final_beam_size must be at least 1 (1: greedy), got {self.final_beam_size}")

    def beam_of(self, job: WindowJob) -> int:
        """The beam of a final window: its stream's own, else ``final_beam_size``."""
        return job.beam_size or self.final_beam_size

    def window_frames(self, n_samples: int, kind: WindowKind, max_frames: int) -> int:
        """Encoder frames of the window for ``n_samples`` of audio: the full window or a padded bucket."""
        if kind == "final" and self.final_full_window:
            return max_frames
        frames_per_s = SAMPLE_RATE_HZ / HOP_LENGTH
        bucket = max(2, round(self.bucket_s * frames_per_s) // 2 * 2)
        wanted = max(n_samples / HOP_LENGTH + self.pad_s * frames_per_s, self.min_window_s * frames_per_s)
        return min(max_frames, max(bucket, math.ceil(wanted / bucket) * bucket))

    def token_limit(self, n_samples: int) -> int:
        return self.tokens_base + math.ceil(self.tokens_per_s * n_samples / SAMPLE_RATE_HZ)


@dataclass(frozen=True)
class WindowJob:
    """One window to transcribe: ``audio`` (a private copy) padded to ``frames`` encoder frames."""

    key: int  # the caller's index of this window, handed back with the result
    kind: WindowKind
    audio: np.ndarray  # float32 [samples], 16 kHz
    frames: int
    max_new_tokens: int
    draft: tuple[int, ...] = ()  # partials: the first text tokens, forced or verified (see ``partial_draft``)
    # Finals: the words the utterance's partials agreed on; the draft of the fallback decoding of a final that loops
    # before its first timestamp (see ``_decode_looped_finals_again``). Unused otherwise.
    agreed: tuple[int, ...] = ()
    beam_size: int | None = None  # finals: the stream's own beam (None: ``DecodePolicy.final_beam_size``)


@dataclass(frozen=True)
class WindowText:
    """What one window said."""

    key: int
    text: str  # "" for no speech (or a rejected partial)
    no_speech: bool  # the no-speech rule fired
    collapsed: bool  # repeated n-grams were collapsed
    hit_token_limit: bool  # the decoder was stopped by ``max_new_tokens``
    n_tokens: int  # tokens of the result, the kept part of a partial's draft included
    continuations: int = 0  # continuation windows decoded after the first (finals only)
    drafted: int = 0  # tokens of ``n_tokens`` taken from the draft in one call, not decoded one by one
    text_tokens: tuple[int, ...] = ()  # a partial's text tokens, the next partial's draft (empty if not shown)


@dataclass(frozen=True)
class GroupTiming:
    """Seconds spent in each stage of one group (for the engine's observer)."""

    size: int
    features_s: float
    encode_s: float
    decode_s: float  # beam decoding included
    beamed_finals: int = 0  # final windows (continuations included) decoded with a beam
    beam_s: float = 0.0  # the seconds of those beam decodings


@dataclass
class BeamTally:
    """Counts the beam decodings of one group's finals (see ``GroupTiming``)."""

    finals: int = 0
    seconds: float = 0.0


def collapse_repeats(tokens: Sequence[int], repeat_limit: int, max_ngram: int) -> tuple[list[int], bool]:
    """Collapse every run of ``repeat_limit`` or more back-to-back copies of one n-gram (of at most ``max_ngram``
    tokens) to a single copy, until no such run is left."""
    result = list(tokens)
    changed = False
    while _collapse_pass(result, repeat_limit, max_ngram):
        changed = True
    return result, changed


def _collapse_pass(tokens: list[int], repeat_limit: int, max_ngram: int) -> bool:
    """One left-to-right pass over ``tokens``, collapsing runs in place; True if anything changed."""
    changed = False
    index = 0
    while index < len(tokens):
        for size in range(1, max_ngram + 1):
            if index + size * repeat_limit > len(tokens):
                break
            gram = tokens[index : index + size]
            copies = 1
            while tokens[index + copies * size : index + (copies + 1) * size] == gram:
                copies += 1
            if copies >= repeat_limit:
                del tokens[index + size : index + copies * size]
                changed = True
                break
        index += 1
    return changed


def window_text_from_tokens(tokens: Sequence[int], runner: WhisperRunner) -> str:
    """Text of a window's text tokens (timestamps dropped): segments' leading spaces stripped, single spaces."""
    return " ".join(runner.tokenizer.decode(list(tokens)).split())


def window_features(audio: np.ndarray, frames: int, n_mels: int, *, silence_padding: bool = False) -> np.ndarray:
    """Log-mel [n_mels, frames] of the audio, zero-padded in the log-mel domain (as offline transcription pads).

    ``silence_padding``: zero-pad the audio before the log-mel instead, so the padding sits at the spectrogram's
    floor. Measured (``DecodePolicy.silence_padding``): finals on the labelled corpora 7.5% WER against 8.3%, but on
    the meeting and telephone clips finals 0.61 against 0.41 WER vs offline and partials 0.57 against 0.17 error
    (Whisper writes words into the silent padding), so it is off."""
    if silence_padding and audio.shape[0] < frames * HOP_LENGTH:
        audio = np.pad(audio, (0, frames * HOP_LENGTH - audio.shape[0]))
    if audio.shape[0] < MIN_WINDOW_SAMPLES:
        audio = np.pad(audio, (0, MIN_WINDOW_SAMPLES - audio.shape[0]))
    mel = log_mel_spectrogram(audio, n_mels=n_mels, padding_samples=TRANSCRIBE_PADDING_SAMPLES)
    content = min(frames, audio.shape[0] // HOP_LENGTH)
    window = np.zeros((n_mels, frames), dtype=np.float32)
    window[:, :content] = mel[:, :content]
    return window


def partial_draft(recent: Sequence[Sequence[int]], policy: DecodePolicy) -> tuple[int, ...]:
    """The draft of an utterance's next partial from the text tokens of its ``recent`` partials (oldest first): the
    longest prefix the last ``partial_draft_agreement`` of them share (with 2, a word must have been read the same
    way twice, as whisper_streaming's LocalAgreement commits), without its last ``partial_draft_holdback`` tokens
    (the end of a partial is the least settled part: its last word may be cut); () when drafts are off, too few
    partials agree, or nothing would be left. By default a partial started from a draft keeps it until the final,
    which is always decoded from scratch; with ``partial_draft_verify`` the runner keeps the draft only as far as
    greedy decoding agrees with it, so a draft saves decoder calls but never changes a partial."""
    holdback, agreement = policy.partial_draft_holdback, policy.partial_draft_agreement
    if agreement < 1 or len(recent) < agreement:
        return ()
    voters = recent[len(recent) - agreement :]
    agreed = min(common_prefix_length(voters[0], other) for other in voters[1:]) if agreement > 1 else len(voters[0])
    if agreed <= holdback:
        return ()
    return tuple(voters[-1][: agreed - holdback])


def align_drafts(jobs: Sequence[WindowJob], policy: DecodePolicy) -> list[WindowJob]:
    """The jobs of one batch with their partials' drafts cut to a multiple of ``partial_draft_multiple`` tokens when
    more than one partial has a draft: rows share a decoder call only with rows of the same prompt length, so drafts
    of 5, 9, 11 and 14 tokens would need four decoding loops, and cut to 0, 8, 8 and 8 they need two (the draft of 5
    becomes a plain partial). The cut tokens are decoded again, which costs steps that are shared with the other
    rows of the call. A lone drafted partial keeps its whole draft."""
    multiple = policy.partial_draft_multiple
    if multiple <= 1 or sum(1 for job in jobs if job.kind == "partial" and job.draft) < 2:
        return list(jobs)
    return [
        dataclasses.replace(job, draft=job.draft[: len(job.draft) // multiple * multiple]) if job.draft else job
        for job in jobs
    ]


@dataclass(frozen=True)
class PromptRules:
    """The decoding rules of each kind of window."""

    final: DecodingRules  # timestamps on, blank suppressed at the start: exactly as offline transcription
    partial: DecodingRules  # no timestamps (fewer tokens), blank suppressed at the start

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PromptRules:
        return cls(
            final=DecodingRules.from_config(config),
            partial=DecodingRules.from_config(config, with_timestamps=False),
        )


def transcribe_group(
    runner: WhisperRunner, jobs: Sequence[WindowJob], policy: DecodePolicy, rules: PromptRules
) -> tuple[list[WindowText], GroupTiming]:
    """Encode windows of equal frame count in one batch, then decode them in as few batched calls as possible.

    Finals are decoded from ``<|startoftranscript|>`` with timestamps, as offline; partials from
    ``<|startoftranscript|><|notimestamps|>`` (no timestamp tokens to sample: about 10% fewer decoder steps).
    All rows of one kind are decoded together, each stopping at its own token limit (the runner compacts its
    caches only when half of the rows are done, so short rows cost little once finished).
    """
    frames = {job.frames for job in jobs}
    if len(frames) != 1:
        raise ValueError(f"expected windows of one frame count per group, got {sorted(frames)}")
    jobs = align_drafts(jobs, policy)
    n_mels = int(runner.config["n_mels"])
    started = time.perf_counter()
    padding = policy.silence_padding
    mel = np.stack([window_features(job.audio, job.frames, n_mels, silence_padding=padding) for job in jobs])
    featured = time.perf_counter()
    encoded = runner.encode(mel)
    encoded_at = time.perf_counter()
    ceiling = runner.n_text_ctx // 2
    tally = BeamTally()
    kinds: dict[WindowKind, list[int]] = {}
    for row, job in enumerate(jobs):
        kinds.setdefault(job.kind, []).append(row)
    results: dict[int, DecodeResult] = {}
    partials = kinds.get("partial", [])
    forced = [] if policy.partial_draft_verify else [row for row in partials if jobs[row].draft]
    calls = [
        (kinds.get("final", []), rules.final),
        ([row for row in partials if row not in forced], rules.partial),
        # Forced drafts: a blank or EOT right after the draft is allowed (no suppress_blank).
        (forced, dataclasses.replace(rules.partial, suppress_blank=False)),
    ]
    for rows, row_rules in calls:
        if not rows:
            continue
        prompts = [_prompt(runner, jobs[row]) for row in rows]
        verified = [0 if row in forced else len(jobs[row].draft) for row in rows]  # draft tokens the runner checks
        fixed_lengths = [len(prompt) - length for prompt, length in zip(prompts, verified, strict=True)]
        room = runner.n_text_ctx - max(fixed_lengths) + 1
        limits = [
            max(1, min(ceiling, room, jobs[row].max_new_tokens - (len(jobs[row].draft) if row in forced else 0)))
            for row in rows
        ]
        chosen = encoded if len(rows) == len(jobs) else encoded.select(rows)
        loop_stop = LoopStop(policy.repeat_limit, policy.max_repeat_ngram) if policy.stop_loops else None
        if row_rules is rules.final:
            beams = [policy.beam_of(jobs[row]) for row in rows]
            decoded = decode_finals(runner, chosen, prompts, limits, row_rules, loop_stop, policy, beams, tally)
        else:
            decoded = runner.decode(
                chosen, prompts, max_new_tokens=limits, rules=row_rules, loop_stop=loop_stop, drafts=verified
            )
        for row, result in zip(rows, decoded, strict=True):
            draft = jobs[row].draft  # forced: part of the prompt, so the result goes on from it
            results[row] = (
                dataclasses.replace(result, tokens=[*draft, *result.tokens], drafted=len(draft))
                if row in forced
                else result
            )
    continued = _continue_early_finals(runner, jobs, results, policy, rules, tally)
    results.update(_decode_looped_finals_again(runner, encoded, jobs, results, continued, policy, rules))
    texts = [
        _window_text(job, *continued.get(row, (results[row], job.max_new_tokens, 0)), runner, policy)
        for row, job in enumerate(jobs)
    ]
    decode_s = time.perf_counter() - encoded_at  # continuation windows (rare) count as decoding
    timing = GroupTiming(len(jobs), featured - started, encoded_at - featured, decode_s, tally.finals, tally.seconds)
    return texts, timing


def decode_finals(
    runner: WhisperRunner,
    encoded: EncoderOutput,
    prompts: Sequence[Sequence[int]],
    limits: Sequence[int],
    rules: DecodingRules,
    loop_stop: LoopStop | None,
    policy: DecodePolicy,
    beams: Sequence[int],
    tally: BeamTally | None = None,
) -> list[DecodeResult]:
    """Decode final windows, row ``i`` with a beam of ``beams[i]`` (1: greedy): at once, or, with
    ``final_beam_below_logprob`` set, greedily first and again with the beam only for the rows whose average
    log-probability is below it (no-speech windows excepted). ``tally`` counts the beam decodings."""

    def decode(rows: Sequence[int], beam_of_row: Sequence[int]) -> dict[int, DecodeResult]:
        """Decode ``rows``, one call per beam size."""
        by_beam: dict[int, list[int]] = {}
        for row in rows:
            by_beam.setdefault(beam_of_row[row], []).append(row)
        decoded: dict[int, DecodeResult] = {}
        for beam, group in by_beam.items():
            started = time.perf_counter()
            results = runner.decode(
                encoded if len(group) == encoded.batch_size else encoded.select(group),
                [prompts[row] for row in group],
                max_new_tokens=[limits[row] for row in group],
                rules=rules,
                loop_stop=loop_stop,
                beam_size=beam,
            )
            decoded.update(zip(group, results, strict=True))
            if beam > 1 and tally is not None:
                tally.finals += len(group)
                tally.seconds += time.perf_counter() - started
        return decoded

    threshold = policy.final_beam_below_logprob
    every_row = range(len(prompts))
    results = decode(every_row, [1 if threshold is not None else beam for beam in beams])
    if threshold is not None:
        unsure = [
            row
            for row in every_row
            if beams[row] > 1 and results[row].avg_logprob < threshold and not _is_no_speech(results[row], policy)
        ]
        results.update(decode(unsure, beams))
    return [results[row] for row in every_row]


@dataclass
class _Continuation:
    """A final being decoded on past the point where its last window stopped."""

    row: int
    offset: int  # samples of the job's audio already transcribed
    tokens: list[int]  # every sampled token so far (timestamps of each window relative to that window)
    text_tokens: list[int]  # the text tokens so far (the next window's prompt)
    result: DecodeResult  # merged so far
    max_new_tokens: int  # token budget so far
    rounds: int = 0


def _continue_early_finals(
    runner: WhisperRunner,
    jobs: Sequence[WindowJob],
    results: Mapping[int, DecodeResult],
    policy: DecodePolicy,
    rules: PromptRules,
    tally: BeamTally | None = None,
) -> dict[int, tuple[DecodeResult, int, int]]:
    """Decode on the finals that stopped early (see ``DecodePolicy.continue_tail_s``): row -> (merged result,
    merged token budget, continuation windows). Rows not continued are absent."""
    if policy.continue_tail_s is None or policy.max_continuations < 1:
        return {}
    timestamp_begin = int(runner.config["timestamp_begin"])
    active: list[_Continuation] = []
    for row, job in enumerate(jobs):
        result = results[row]
        if job.kind != "final" or _is_no_speech(result, policy):
            continue
        offset = continuation_offset(0, job, result, policy, timestamp_begin)
        if offset is not None:
            kept = _through_last_timestamp(result.tokens, timestamp_begin)
            text_tokens = [token for token in kept if token < timestamp_begin]
            active.append(_Continuation(row, offset, kept, text_tokens, result, job.max_new_tokens))
    done: dict[int, tuple[DecodeResult, int, int]] = {}
    n_mels = int(runner.config["n_mels"])
    sot_prev = int(runner.config["sot_prev"])
    max_previous = runner.n_text_ctx // 2 - 1
    while active:
        by_frames: dict[int, list[_Continuation]] = {}
        for state in active:
            state.rounds += 1
            samples = jobs[state.row].audio.shape[0] - state.offset
            by_frames.setdefault(policy.window_frames(samples, "final", runner.max_frames), []).append(state)
        still: list[_Continuation] = []
        for frames, group in by_frames.items():
            audios = [jobs[state.row].audio[state.offset :] for state in group]
            features = [window_features(a, frames, n_mels, silence_padding=policy.silence_padding) for a in audios]
            encoded = runner.encode(np.stack(features))
            prompts = [[sot_prev, *state.text_tokens[-max_previous:], runner.sot] for state in group]
            limits = [
                max(1, min(runner.n_text_ctx // 2, runner.n_text_ctx - len(prompt) + 1, policy.token_limit(len(audio))))
                for prompt, audio in zip(prompts, audios, strict=True)
            ]
            loop_stop = LoopStop(policy.repeat_limit, policy.max_repeat_ngram) if policy.stop_loops else None
            beams = [policy.beam_of(jobs[state.row]) for state in group]
            decoded = decode_finals(runner, encoded, prompts, limits, rules.final, loop_stop, policy, beams, tally)
            for state, result, limit in zip(group, decoded, limits, strict=True):
                if _is_no_speech(result, policy):
                    done[state.row] = (state.result, state.max_new_tokens, state.rounds)
                    continue
                offset = continuation_offset(state.offset, jobs[state.row], result, policy, timestamp_begin)
                going_on = offset is not None and state.rounds < policy.max_continuations
                new_tokens = _through_last_timestamp(result.tokens, timestamp_begin) if going_on else result.tokens
                state.tokens += new_tokens
                state.text_tokens += [token for token in new_tokens if token < timestamp_begin]
                state.max_new_tokens += limit
                state.result = DecodeResult(
                    tokens=state.tokens,
                    sum_logprob=state.result.sum_logprob + result.sum_logprob,
                    avg_logprob=state.result.avg_logprob,
                    no_speech_prob=state.result.no_speech_prob,
                    text=runner.tokenizer.decode(state.text_tokens),
                    reached_eot=result.reached_eot,
                )
                if going_on and offset is not None:
                    state.offset = offset
                    still.append(state)
                else:
                    done[state.row] = (state.result, state.max_new_tokens, state.rounds)
        active = still
    return done


def _decode_looped_finals_again(
    runner: WhisperRunner,
    encoded: EncoderOutput,
    jobs: Sequence[WindowJob],
    results: Mapping[int, DecodeResult],
    continued: Mapping[int, object],
    policy: DecodePolicy,
    rules: PromptRules,
) -> dict[int, DecodeResult]:
    """Finals whose decoding looped until the loop stop or the token limit and that no continuation decoded on:
    Whisper repeated itself from the start ("Hello. Hello. Hello. Hello." on a 24 s window that starts with two
    hellos, or "Hello?" segments with made-up timestamps to the end of the window), and the collapsed text would
    lose the utterance. Such a final is decoded again without timestamps, from the words its partials agreed on
    (``WindowJob.agreed``, if any), and the new result is kept if it says more once repeats are collapsed.
    Returns the replaced results. (With ``stop_loops`` off such a final runs on to the token limit; it is decoded
    again all the same, also without the loop stop.)"""
    timestamp_begin = int(runner.config["timestamp_begin"])
    loop_stop = LoopStop(policy.repeat_limit, policy.max_repeat_ngram) if policy.stop_loops else None
    said = {
        row: _said(results[row].tokens, timestamp_begin, policy)
        for row, job in enumerate(jobs)
        if job.kind == "final" and row not in continued and not results[row].reached_eot
    }
    replaced: dict[int, DecodeResult] = {}
    for row, before in said.items():
        if before == sum(token < timestamp_begin for token in results[row].tokens):
            continue  # nothing was collapsed: it did not loop
        job = jobs[row]
        prompt = [runner.sot, runner.no_timestamps, *job.agreed]
        limit = max(
            1, min(runner.n_text_ctx // 2, runner.n_text_ctx - len(prompt) + 1, job.max_new_tokens - len(job.agreed))
        )
        row_rules = dataclasses.replace(rules.partial, suppress_blank=not job.agreed)
        (again,) = runner.decode(
            encoded.select([row]), [prompt], max_new_tokens=[limit], rules=row_rules, loop_stop=loop_stop
        )
        again = dataclasses.replace(again, tokens=[*job.agreed, *again.tokens])
        after = _said(again.tokens, timestamp_begin, policy)
        logger.info(
            "a final of %.1f s looped (%d text tokens once collapsed); decoded again "
            "without timestamps from %d agreed tokens: %d text tokens, %s",
            job.audio.shape[0] / SAMPLE_RATE_HZ,
            before,
            len(job.agreed),
            after,
            "kept" if after > before else "not kept",
        )
        if after > before:
            replaced[row] = again
    return replaced


def _said(tokens: Sequence[int], timestamp_begin: int, policy: DecodePolicy) -> int:
    """Text tokens left once repeated n-grams are collapsed: how much a decoding says."""
    text = [token for token in tokens if token < timestamp_begin]
    return len(collapse_repeats(text, policy.repeat_limit, policy.max_repeat_ngram)[0])


def continuation_offset(
    offset: int, job: WindowJob, last: DecodeResult, policy: DecodePolicy, timestamp_begin: int
) -> int | None:
    """Where to continue when ``last``, the decoding of ``job.audio[offset:]``, stopped (EOT, the loop stop or the
    token limit) with its last timestamp at least ``continue_tail_s`` before the audio's end: the sample of that
    timestamp; None otherwise."""
    if policy.continue_tail_s is None:
        return None
    stamps = [token for token in last.tokens if token >= timestamp_begin]
    if not stamps or stamps[-1] == timestamp_begin:
        return None  # no progress to continue from
    until = offset + round((stamps[-1] - timestamp_begin) * TIME_PRECISION_S * SAMPLE_RATE_HZ)
    if job.audio.shape[0] - until < policy.continue_tail_s * SAMPLE_RATE_HZ:
        return None
    return until


def _through_last_timestamp(tokens: Sequence[int], timestamp_begin: int) -> list[int]:
    """The tokens up to and including the last timestamp: an unfinished segment after it is decoded again by the
    continuation that starts there."""
    last = max((index for index, token in enumerate(tokens) if token >= timestamp_begin), default=-1)
    return list(tokens[: last + 1])


def _is_no_speech(result: DecodeResult, policy: DecodePolicy) -> bool:
    return result.no_speech_prob > policy.no_speech_threshold and result.avg_logprob < policy.logprob_threshold


def _prompt(runner: WhisperRunner, job: WindowJob) -> list[int]:
    if job.kind == "final":
        return [runner.sot]
    return [runner.sot, runner.no_timestamps, *job.draft]


def _window_text(
    job: WindowJob,
    result: DecodeResult,
    max_new_tokens: int,
    continuations: int,
    runner: WhisperRunner,
    policy: DecodePolicy,
) -> WindowText:
    kept = result.tokens[:max_new_tokens]
    hit_limit = not result.reached_eot or len(result.tokens) > max_new_tokens
    no_speech = _is_no_speech(result, policy)
    timestamp_begin = int(runner.config["timestamp_begin"])
    text_tokens = [token for token in kept if token < timestamp_begin]
    collapsed_tokens, collapsed = collapse_repeats(text_tokens, policy.repeat_limit, policy.max_repeat_ngram)
    text = "" if no_speech else window_text_from_tokens(collapsed_tokens, runner)
    if job.kind == "partial" and text and compression_ratio(text) > policy.compression_ratio_threshold:
        text = ""
    draft_source = tuple(text_tokens) if job.kind == "partial" and text and not collapsed else ()
    if job.kind == "final" and hit_limit:
        logger.info(
            "a final of %.1f s stopped without EOT (loop stop or token limit) after %d tokens, %d continuation(s): "
            "%r; tokens %s",
            job.audio.shape[0] / SAMPLE_RATE_HZ,
            len(kept),
            continuations,
            text[:80],
            kept[:40],
        )
    return WindowText(
        job.key, text, no_speech, collapsed, hit_limit, len(kept), continuations, result.drafted, draft_source
    )
