"""`brook transcribe` as a user runs it: real files in, timestamped text or JSON out, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from app.repository import ModelRepository
from tests.conftest import load_model

GOLDEN_DIR = Path(__file__).resolve().parent / "goldens" / "whisper"


def brook(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_json_output_equals_the_golden_transcript(
    model_repository: ModelRepository, speech_clips: dict[str, Path], tmp_path: Path
) -> None:
    load_model(model_repository, "whisper-tiny-en", 3)
    # A stereo 44.1 kHz FLAC of the recording: the CLI down-mixes and resamples it.
    audio, rate = sf.read(str(speech_clips["telephone"]), dtype="float32")
    flac = tmp_path / "telephone.flac"
    sf.write(str(flac), np.stack([audio, audio], axis=1), rate, format="FLAC")
    result = brook("transcribe", str(speech_clips["telephone"]), "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    golden = json.loads((GOLDEN_DIR / "telephone.json").read_text())
    assert output["text"].strip() == golden["text"].strip()
    assert output["version"] == 3 and len(output["segments"]) == len(golden["segments"])
    plain = brook("transcribe", str(flac))
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.strip().splitlines()
    assert lines[0].startswith("[00:00.000 --> ") and "Hello" in plain.stdout


def test_bad_files_give_one_line_errors_and_a_nonzero_exit(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    text = tmp_path / "notes.ogg"
    text.write_text("not audio at all")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    for path, fragment in ((corrupt, "not a readable audio file"), (text, "not a readable audio file"),
                           (empty, "holds no audio samples"), (tmp_path / "absent.flac", "no such file")):
        result = brook("transcribe", str(path))
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("brook: error:")]
        assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_beam_size_is_checked_and_a_beam_transcribes(speech_clips: dict[str, Path], tmp_path: Path) -> None:
    refused = brook("transcribe", str(speech_clips["telephone"]), "--beam-size", "0")
    assert refused.returncode == 2 and "brook: error: --beam-size must be at least 1" in refused.stderr
    audio, rate = sf.read(str(speech_clips["telephone"]), dtype="float32")
    short = tmp_path / "short.wav"
    sf.write(str(short), audio[: 8 * rate], rate)
    beam = brook("transcribe", str(short), "--json", "--beam-size", "3")
    assert beam.returncode == 0, beam.stderr
    output = json.loads(beam.stdout)
    assert "Hello" in output["text"] and output["segments"]
