"""`WS /v1/listen` against a real `brook serve`: transcripts match offline, partials stream, silence is quiet."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from app.audio import load_audio
from app.convert.sources import cache_dir
from app.errors import FetchError
from app.repository import ModelRepository
from app.speech.wer import word_error_rate
from scripts.labelled_speech import build_corpus
from tests.conftest import missing
from tests.server_process import RunningServer
from tests.whisper_test_audio import offline_transcript
from tests.ws_clients import stream_audio

# Streaming cuts the audio at pauses the VAD finds and decodes each utterance alone, so a few words at the
# utterance edges can differ from offline 30 s windows. Measured on these clips: 0.00-0.06.
MAX_STREAMING_WER = 0.15


def test_real_time_stream_matches_offline_and_partials_arrive_while_speaking(
    brook_server: RunningServer, model_repository: ModelRepository, speech_clips: dict[str, Path]
) -> None:
    audio = load_audio(speech_clips["telephone"])
    result = asyncio.run(stream_audio(f"{brook_server.ws}/v1/listen", audio, speed=1.0))
    assert result.ready["type"] == "ready" and result.ready["version"] == 3
    finals, partials = result.of("final"), result.of("partial")
    assert finals, result.events
    assert result.events[-1]["type"] == "end" and result.close_code == 1000
    wer = word_error_rate(offline_transcript(model_repository, speech_clips["telephone"]), result.final_text)
    assert wer <= MAX_STREAMING_WER, (wer, result.final_text)
    # Partials arrive while the audio is still being sent, not only at the end.
    last_chunk_sent = result.sent_until[-1]
    assert any(p["_received"] < last_chunk_sent - 2.0 for p in partials), "no partial arrived mid-stream"
    for event in result.of("speech_started") + partials + finals:
        assert 0.0 <= event["start"] <= 30.0
    for final in finals:
        assert final["end"] >= final["start"]
    utterances = [f["utterance"] for f in finals]
    assert utterances == sorted(set(utterances)), "one final per utterance, in order"


def test_read_speech_streams_to_its_human_transcript(brook_server: RunningServer) -> None:
    """Five sentences of a LibriVox reading (pocketsphinx's test data), each after a 1 s pause: one final per
    sentence, scored against the words actually read. Measured: 4 of 71 words (0.056), of which "Mr." for
    "mister" and the reader's repeated "a" cost offline transcription the same two."""
    try:
        clip = build_corpus("librivox", cache_dir() / "labelled-speech")
    except FetchError as error:
        missing(f"the LibriVox test utterances could not be fetched: {error}")
    result = asyncio.run(stream_audio(f"{brook_server.ws}/v1/listen", load_audio(clip.path), speed=4.0))
    assert len(result.of("final")) == clip.utterances, result.of("final")
    wer = word_error_rate(clip.reference, result.final_text)
    assert wer <= 0.12, (wer, result.final_text)


def test_four_times_real_time_at_44k1_matches_offline(
    brook_server: RunningServer, model_repository: ModelRepository, speech_clips: dict[str, Path]
) -> None:
    audio = load_audio(speech_clips["telephone"])
    at_44k1 = soxr.resample(audio, 16000, 44100).astype(np.float32)
    url = f"{brook_server.ws}/v1/listen?sample_rate=44100"
    result = asyncio.run(stream_audio(url, at_44k1, speed=4.0, rate=44100))
    assert result.ready["sample_rate"] == 44100
    wer = word_error_rate(offline_transcript(model_repository, speech_clips["telephone"]), result.final_text)
    assert wer <= MAX_STREAMING_WER, (wer, result.final_text)


def test_silence_and_noise_produce_no_transcripts(
    brook_server: RunningServer, speech_clips: dict[str, Path]
) -> None:
    for name in ("silence", "noise"):
        result = asyncio.run(stream_audio(f"{brook_server.ws}/v1/listen", load_audio(speech_clips[name]), speed=0))
        kinds = [e["type"] for e in result.events]
        assert kinds == ["end"], (name, result.events)


def test_interim_results_false_sends_only_finals(
    brook_server: RunningServer, speech_clips: dict[str, Path]
) -> None:
    audio = load_audio(speech_clips["meeting_dev00"])[: 16000 * 12]
    result = asyncio.run(stream_audio(f"{brook_server.ws}/v1/listen?interim_results=false", audio, speed=0))
    assert result.of("final") and not result.of("partial")


def test_a_stream_can_ask_for_a_beam_for_its_finals(brook_server: RunningServer) -> None:
    """``?beam_size=5``: the ready message confirms it and the finals come (decoded with the beam; the engine
    tests check which decoder calls use it). The LibriVox reading's errors with a beam of 5: 5 of 71 words."""
    try:
        clip = build_corpus("librivox", cache_dir() / "labelled-speech")
    except FetchError as error:
        missing(f"the LibriVox test utterances could not be fetched: {error}")
    url = f"{brook_server.ws}/v1/listen?beam_size=5"
    result = asyncio.run(stream_audio(url, load_audio(clip.path), speed=0))
    assert result.ready["type"] == "ready" and result.ready["beam_size"] == 5
    assert len(result.of("final")) == clip.utterances, result.of("final")
    wer = word_error_rate(clip.reference, result.final_text)
    assert wer <= 0.12, (wer, result.final_text)
    default = asyncio.run(stream_audio(f"{brook_server.ws}/v1/listen", np.zeros(1600, np.float32), speed=0))
    assert default.ready["beam_size"] == 1  # the server's default: greedy finals


def test_brook_listen_passes_its_beam_and_prints_every_message(brook_server: RunningServer, tmp_path: Path) -> None:
    try:
        clip = build_corpus("librivox", cache_dir() / "labelled-speech")
    except FetchError as error:
        missing(f"the LibriVox test utterances could not be fetched: {error}")
    short = tmp_path / "two_sentences.wav"
    sf.write(str(short), load_audio(clip.path)[: 12 * 16_000], 16_000)
    command = [sys.executable, "-m", "app.cli", "listen", str(short), "--url", f"{brook_server.ws}/v1/listen",
               "--speed", "0", "--json", "--beam-size", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    assert messages[0]["type"] == "ready" and messages[0]["beam_size"] == 4
    assert [m for m in messages if m["type"] == "final"] and messages[-1]["type"] == "end"
