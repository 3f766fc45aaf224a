"""Recordings with known transcripts, for word error rates against the words actually spoken.

The test recordings of ``scripts.test_audio`` (a telephone call, AMI meetings) come without transcripts, so their
streamed finals can only be compared with another Whisper output. These corpora have references:

- ``librivox``: five utterances of LibriVox's public-domain reading of *Sense and Sensibility* (a human reader,
  16 kHz, 25 s of speech, 71 words) with their transcripts, shipped in the pocketsphinx 5.0.4 sdist's tests
  (BSD). Fetched with ``pip download`` and checked by sha256 like the models. Its metadata step needs
  scikit-build-core < 0.10, hence the build constraint. The reference keeps the reader's slip ("a more a amiable")
  and spells "mister" where Whisper writes "Mr.": both cost every system the same two words.
- ``espeak-<voice>``: ``SENTENCES`` (voice-assistant requests and dictation, no digits or abbreviations, so that
  no spelling convention counts as an error) spoken by Debian's ``espeak-ng`` (``apt-get install espeak-ng``) in
  the given voice. Synthetic speech, but exact references and as many words as wanted.

Each corpus is one 16 kHz mono clip: every utterance after ``GAP_S`` of silence, and the same silence at the end,
so the engine's voice activity detection cuts it into utterances as it would a person pausing between requests.

    .venv/bin/python -m scripts.labelled_speech OUT_DIR [--corpora librivox,espeak-en-us]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import soundfile as sf

from app.audio import MODEL_SAMPLE_RATE_HZ, load_audio
from app.convert.sources import extract_sources
from app.errors import FetchError
from app.repository.spec import SourceSpec

logger = logging.getLogger(__name__)

GAP_S: Final = 1.0
_LIBRIVOX_DIR: Final = "pocketsphinx-5.0.4/test/data/librivox"
_LIBRIVOX_IDS: Final = tuple(
    f"sense_and_sensibility_01_austen_64kb-{number}" for number in ("0870", "0880", "0890", "0920", "0930")
)
LIBRIVOX_SOURCE: Final = SourceSpec(
    package="pocketsphinx",
    version="5.0.4",
    filename="pocketsphinx-5.0.4.tar.gz",
    sha256="17d2971e998490def9554b6ba41886708422af5b4ae888723b1b077aab0fe8d4",
    files={
        "transcription": f"{_LIBRIVOX_DIR}/transcription",
        **{name: f"{_LIBRIVOX_DIR}/{name}.wav" for name in _LIBRIVOX_IDS},
    },
    build_constraints=("scikit-build-core<0.10",),
)
SENTENCES: Final = (
    "Set a timer for the pasta and remind me to check the oven.",
    "What is the weather going to be like in Boston tomorrow morning?",
    "Turn off the lights in the kitchen and lock the front door.",
    "Send a message to Sarah saying that I will be late for dinner tonight.",
    "Play some quiet piano music in the living room.",
    "How long does it take to drive from here to the airport?",
    "Add milk, eggs and fresh bread to my shopping list.",
    "Remind me to call the dentist when I get home from work.",
    "The meeting has been moved to Thursday afternoon because the manager is travelling.",
    "Please write down that the package arrived damaged and the box was open.",
    "I would like to book a table for the whole family at the Italian restaurant.",
    "Can you explain how a heat pump keeps a house warm in the winter?",
    "Read me the latest news about the football match last night.",
    "Change the thermostat to a slightly warmer setting before we wake up.",
    "My flight leaves early in the morning, so wake me up before sunrise.",
    "Tell me a short story about a dragon who is afraid of the dark.",
    "The quarterly report shows that sales grew faster than anyone expected.",
    "Open the garage door and turn on the porch light.",
    "Which planet in our solar system has the most moons?",
    "Cancel my alarm for tomorrow because I am working from home.",
    "Translate the phrase good morning into French and Spanish.",
    "We need to order more paper for the printer upstairs.",
    "Start a workout playlist and set the volume to medium.",
    "Thank you, that is all I needed for now.",
)


@dataclass(frozen=True)
class LabelledClip:
    """One corpus: its 16 kHz mono WAV and the words spoken in it."""

    name: str
    path: Path
    reference: str
    utterances: int


def build_corpus(name: str, out_dir: Path) -> LabelledClip:
    """Write corpus ``name`` (``librivox`` or ``espeak-<voice>``) to ``out_dir`` (idempotent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == "librivox":
        return _librivox(out_dir)
    if name.startswith("espeak-"):
        return _espeak(name, name.removeprefix("espeak-"), out_dir)
    raise ValueError(f"unknown corpus {name!r}: expected 'librivox' or 'espeak-<voice>'")


def _librivox(out_dir: Path) -> LabelledClip:
    files = extract_sources(LIBRIVOX_SOURCE)
    transcripts: dict[str, str] = {}
    for line in files["transcription"].read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        if match:
            transcripts[match.group(2)] = match.group(1)
    missing = [name for name in _LIBRIVOX_IDS if name not in transcripts]
    if missing:
        raise FetchError(f"{LIBRIVOX_SOURCE.filename}: no transcript for {missing}")
    path = out_dir / "librivox.wav"
    if not path.is_file():
        _write(path, [load_audio(files[name]) for name in _LIBRIVOX_IDS])
    reference = " ".join(transcripts[name] for name in _LIBRIVOX_IDS)
    return LabelledClip("librivox", path, reference, len(_LIBRIVOX_IDS))


def _espeak(name: str, voice: str, out_dir: Path) -> LabelledClip:
    reference = " ".join(SENTENCES)
    path = out_dir / f"{name}.wav"
    if not path.is_file():
        espeak = shutil.which("espeak-ng")
        if espeak is None:
            raise FileNotFoundError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
        utterances = []
        with tempfile.TemporaryDirectory(prefix="brook-espeak-") as scratch:
            for index, sentence in enumerate(SENTENCES):
                wav = Path(scratch) / f"{index}.wav"
                subprocess.run([espeak, "-v", voice, "-s", "160", "-w", str(wav), sentence], check=True)
                utterances.append(load_audio(wav))
        _write(path, utterances)
    return LabelledClip(name, path, reference, len(SENTENCES))


def _write(path: Path, utterances: list[np.ndarray]) -> Path:
    gap = np.zeros(round(GAP_S * MODEL_SAMPLE_RATE_HZ), dtype=np.float32)
    pieces = [piece for utterance in utterances for piece in (gap, utterance.astype(np.float32))] + [gap]
    sf.write(str(path), np.concatenate(pieces), MODEL_SAMPLE_RATE_HZ, subtype="FLOAT")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpora", default="librivox,espeak-en-us")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in args.corpora.split(","):
        clip = build_corpus(name, args.out_dir)
        print(f"{clip.name}: {clip.path} ({clip.utterances} utterances, {len(clip.reference.split())} words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
