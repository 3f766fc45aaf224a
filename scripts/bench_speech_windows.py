"""Replay the streaming engine's windows offline: the cost and accuracy of a window policy, independent of load.

Each test clip (cut to ``--seconds``) is segmented by the engine's VAD segmentation, exactly as a live stream would
be, and every partial (one per ``--partial-interval-s`` of speech) and every final is transcribed with
``transcribe_group`` in batches of up to ``--batch`` windows of equal frame count. Nothing is shed, so every policy
does the same list of windows and the CPU seconds compare fairly even on a busy machine. Reported per policy:
encoder/decoder busy seconds and process CPU seconds per audio second, mean window frames, decoded tokens,
windows stopped at their token limit, WER of the joined finals against offline ``transcribe`` (version 1) of the
same cut, and the partial error (word edits between each partial and the closest prefix of its final, per partial
word).

    .venv/bin/python -m scripts.bench_speech_windows [--seconds 30] [--policies 10:2:2,6:2:1,4:2:1]
        [--partial-interval-s 0.5] [--max-utterance-s 20] [--batch 16] [--whisper-version 1]

A policy is ``min_window_s:pad_s:bucket_s``, with ``:noloop`` appended to turn ``DecodePolicy.stop_loops`` off and
``:nocontinue`` to turn off the continuation of finals that stop early (``DecodePolicy.continue_tail_s``), and
``:silencepad`` to pad windows with silent audio instead of log-mel zeros (``DecodePolicy.silence_padding``), and
``:agreeN`` to start each partial from the words the previous N partials of its utterance agree on
(``DecodePolicy.partial_draft_agreement``, default 2; ``:agree0`` decodes every partial from scratch; with drafts
the partials of an utterance are decoded in order) and ``:draftK`` to leave the draft's last K tokens to decode
(``partial_draft_holdback``, default 0) and ``:multM`` to cut the drafts of a batch's partials to multiples of M
tokens (``partial_draft_multiple``, default 1: never cut) and ``:verify`` to keep drafts only as far as greedy
decoding agrees (``partial_draft_verify``) and ``:beamB`` to decode finals with a beam of B (``final_beam_size``,
default 1: greedy); the ``cont``
column counts the continuation windows decoded, ``drafted`` the partial tokens taken from drafts instead of decoded,
``tokens`` the tokens decoded.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from app.convert.sources import cache_dir
from app.engine.speech_decode import (
    DecodePolicy,
    PromptRules,
    WindowJob,
    WindowKind,
    WindowText,
    partial_draft,
    transcribe_group,
)
from app.engine.speech_engine import SpeechEngineSettings
from app.engine.speech_events import StreamOptions
from app.engine.utterance import VAD_FRAME_SAMPLES, FinalDue, PartialDue, UtteranceSegmenter
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.transcribe import transcribe_batch
from app.speech.vad import VadRunner
from app.speech.wer import edit_distance, normalize_words
from app.speech.whisper_runner import WhisperRunner
from scripts.test_audio import build_test_clips

logger = logging.getLogger("bench_speech_windows")

SAMPLE_RATE_HZ = 16_000
CLIP_NAMES = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s", "bench_45s")


@dataclass(frozen=True)
class Window:
    clip: int
    kind: str
    utterance: int
    start: int
    end: int


def segment(clip: np.ndarray, vad: VadRunner, settings: SpeechEngineSettings) -> list[Window]:
    """The windows the engine's segmentation asks for on one clip."""
    segmenter = UtteranceSegmenter(settings.segmentation(StreamOptions()))
    state = vad.new_stream()
    events = []
    for first in range(0, clip.shape[0] - VAD_FRAME_SAMPLES + 1, VAD_FRAME_SAMPLES):
        probability = float(vad.speech_probabilities([state], clip[None, first : first + VAD_FRAME_SAMPLES])[0])
        events += segmenter.push(probability)
    events += segmenter.end(clip.shape[0])
    return [
        Window(-1, "partial" if isinstance(event, PartialDue) else "final", event.utterance, event.start, event.end)
        for event in events
        if isinstance(event, PartialDue | FinalDue)
    ]


def prefix_error(partial: str, final: str) -> tuple[int, int]:
    """(edits to the closest prefix of ``final``, words of the partial)."""
    words, reference = normalize_words(partial), normalize_words(final)
    if not words:
        return 0, 0
    best = min(edit_distance(reference[:length], words) for length in range(len(reference) + 1))
    return best, len(words)


def rounds(windows: list[Window], sequential: bool) -> list[list[int]]:
    """Indices of the windows to decode together. With ``sequential`` (partial drafts on), the n-th partial of every
    utterance goes in round n, after the partial whose text it starts from; finals go in the first round."""
    if not sequential:
        return [list(range(len(windows)))]
    seen: dict[tuple[int, int], int] = {}
    by_round: dict[int, list[int]] = {}
    for index, window in enumerate(windows):
        number = 0
        if window.kind == "partial":
            number = seen.get((window.clip, window.utterance), 0)
            seen[(window.clip, window.utterance)] = number + 1
        by_round.setdefault(number, []).append(index)
    return [by_round[number] for number in sorted(by_round)]


def run_policy(
    runner: WhisperRunner, clips: list[np.ndarray], windows: list[Window], policy: DecodePolicy, batch: int
) -> tuple[dict[int, list[tuple[Window, WindowText]]], dict[str, float]]:
    rules = PromptRules.from_config(runner.config)
    texts: dict[int, WindowText] = {}
    frames_used: list[int] = []
    drafts: dict[tuple[int, int], list[tuple[int, ...]]] = {}  # (clip, utterance) -> its partials' text tokens
    stats = {"encode_s": 0.0, "decode_s": 0.0, "cpu_s": 0.0, "wall_s": 0.0}
    for indices in rounds(windows, sequential=policy.partial_draft_agreement > 0):
        by_frames: dict[int, list[WindowJob]] = {}
        for index in indices:
            window = windows[index]
            audio = clips[window.clip][window.start : window.end]
            kind: WindowKind = "final" if window.kind == "final" else "partial"
            frames = policy.window_frames(audio.shape[0], kind, runner.max_frames)
            draft = partial_draft(drafts.get((window.clip, window.utterance), []), policy) if kind == "partial" else ()
            job = WindowJob(index, kind, audio, frames, policy.token_limit(audio.shape[0]), draft)
            by_frames.setdefault(job.frames, []).append(job)
            frames_used.append(frames)
        for group in by_frames.values():
            for first in range(0, len(group), batch):
                chunk = group[first : first + batch]
                cpu, wall = time.process_time(), time.perf_counter()
                results, timing = transcribe_group(runner, chunk, policy, rules)
                stats["cpu_s"] += time.process_time() - cpu
                stats["wall_s"] += time.perf_counter() - wall
                stats["encode_s"] += timing.features_s + timing.encode_s
                stats["decode_s"] += timing.decode_s
                texts.update((result.key, result) for result in results)
        for index in indices:
            window = windows[index]
            if window.kind == "partial" and texts[index].text_tokens:
                drafts.setdefault((window.clip, window.utterance), []).append(texts[index].text_tokens)
    per_clip: dict[int, list[tuple[Window, WindowText]]] = {}
    for index, window in enumerate(windows):
        per_clip.setdefault(window.clip, []).append((window, texts[index]))
    stats["frames_mean"] = float(np.mean(frames_used))
    stats["tokens"] = float(sum(text.n_tokens - text.drafted for text in texts.values()))
    stats["drafted"] = float(sum(text.drafted for text in texts.values()))
    stats["token_limit_hits"] = float(sum(text.hit_token_limit for text in texts.values()))
    stats["continuations"] = float(sum(text.continuations for text in texts.values()))
    return per_clip, stats


def flag_value(fields: list[str], prefix: str, default: int) -> int:
    """The number of a policy flag such as ``agree2`` (``prefix`` + digits), or ``default`` without one."""
    return next((int(field.removeprefix(prefix)) for field in fields if field.startswith(prefix)), default)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--policies", default="10:2:2,6:2:1,4:2:1")
    parser.add_argument("--partial-interval-s", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-utterance-s", type=float, default=None, help="SpeechEngineSettings.max_utterance_s")
    parser.add_argument("--whisper-version", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    repository = ModelRepository(default_model_dir())
    loaded = repository.load("whisper-tiny-en", args.whisper_version, check_hashes=False)
    runner = WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=2)
    vad_model = repository.load("silero-vad", 1)
    vad = VadRunner(vad_model.directory, vad_model.manifest.config)
    paths = build_test_clips(cache_dir() / "test-audio")
    limit = int(args.seconds * SAMPLE_RATE_HZ)
    clips = [np.asarray(sf.read(paths[name], dtype="float32")[0][:limit], dtype=np.float32) for name in CLIP_NAMES]
    offline = runner
    if args.whisper_version != 1:  # the reference is offline ``brook transcribe``: version 1
        reference_model = repository.load("whisper-tiny-en", 1, check_hashes=False)
        offline = WhisperRunner(reference_model.directory, reference_model.manifest.config, intra_op_threads=2)
    references = [result.text for result in transcribe_batch(clips, offline)]
    settings = dataclasses.replace(SpeechEngineSettings(), partial_interval_s=args.partial_interval_s)
    if args.max_utterance_s is not None:
        settings = dataclasses.replace(settings, max_utterance_s=args.max_utterance_s)
    windows = [
        dataclasses.replace(window, clip=index)
        for index, clip in enumerate(clips)
        for window in segment(clip, vad, settings)
    ]
    audio_s = sum(clip.shape[0] for clip in clips) / SAMPLE_RATE_HZ
    n_partials = sum(window.kind == "partial" for window in windows)
    print(
        f"{len(clips)} clips, {audio_s:.0f} s of audio, {n_partials} partials, {len(windows) - n_partials} finals, "
        f"max utterance {settings.max_utterance_s} s"
    )
    print(
        f"{'policy':>18} {'enc s/s':>8} {'dec s/s':>8} {'CPU s/s':>8} {'frames':>7} {'tokens':>7} {'limit':>6} "
        f"{'cont':>5} {'drafted':>7} {'WER':>6} {'partial err':>11}"
    )
    for text in args.policies.split(","):
        fields = text.split(":")
        min_window, pad, bucket = (float(value) for value in fields[:3])
        policy = DecodePolicy(
            min_window_s=min_window,
            pad_s=pad,
            bucket_s=bucket,
            stop_loops="noloop" not in fields,
            continue_tail_s=None if "nocontinue" in fields else DecodePolicy.continue_tail_s,
            silence_padding="silencepad" in fields,
            partial_draft_agreement=flag_value(fields, "agree", DecodePolicy.partial_draft_agreement),
            partial_draft_holdback=flag_value(fields, "draft", DecodePolicy.partial_draft_holdback),
            partial_draft_multiple=flag_value(fields, "mult", DecodePolicy.partial_draft_multiple),
            partial_draft_verify="verify" in fields,
            final_beam_size=flag_value(fields, "beam", DecodePolicy.final_beam_size),
        )
        per_clip, stats = run_policy(runner, clips, windows, policy, args.batch)
        edits = words = partial_edits = partial_words = 0
        for index, reference in enumerate(references):
            pairs = per_clip.get(index, [])
            finals = {window.utterance: result.text for window, result in pairs if window.kind == "final"}
            hypothesis = " ".join(finals[key] for key in sorted(finals))
            edits += edit_distance(normalize_words(reference), normalize_words(hypothesis))
            words += len(normalize_words(reference))
            for window, result in pairs:
                if window.kind == "partial":
                    wrong, count = prefix_error(result.text, finals.get(window.utterance, ""))
                    partial_edits, partial_words = partial_edits + wrong, partial_words + count
        print(
            f"{text:>18} {stats['encode_s'] / audio_s:>8.4f} {stats['decode_s'] / audio_s:>8.4f} "
            f"{stats['cpu_s'] / audio_s:>8.4f} {stats['frames_mean']:>7.0f} {stats['tokens']:>7.0f} "
            f"{stats['token_limit_hits']:>6.0f} {stats['continuations']:>5.0f} {stats['drafted']:>7.0f} "
            f"{edits / max(1, words):>6.3f} "
            f"{partial_edits / max(1, partial_words):>11.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
