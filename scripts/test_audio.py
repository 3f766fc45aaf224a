"""Build Brook's test and benchmark recordings from real human speech shipped in a pinned PyPI sdist.

The sdist of pyannote-audio 4.0.7 (MIT) carries short recordings of real conversations: a telephone call and
AMI meeting excerpts. This script fetches it with `pip download` (sha256-checked, cached) and writes 16 kHz
mono float WAV clips. Usage: `python scripts/test_audio.py OUT_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from app.audio import MODEL_SAMPLE_RATE_HZ, load_audio
from app.convert.sources import extract_sources
from app.repository.spec import SourceSpec

AUDIO_SOURCE = SourceSpec(
    package="pyannote-audio",
    version="4.0.7",
    filename="pyannote_audio-4.0.7.tar.gz",
    sha256="3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
    files={
        "telephone": "pyannote_audio-4.0.7/src/pyannote/audio/sample/sample.wav",
        "dev00": "pyannote_audio-4.0.7/tests/data/dev00.wav",
        "dev01": "pyannote_audio-4.0.7/tests/data/dev01.wav",
        "tst00": "pyannote_audio-4.0.7/tests/data/tst00.wav",
    },
)
NOISE_SEED = 1234
NOISE_STD = 0.03  # about -30 dBFS
SILENCE_SECONDS = 10
BENCH_SECONDS = 45


def build_test_clips(out_dir: Path) -> dict[str, Path]:
    """Write the clips (idempotent) and return name -> path. Every clip is 16 kHz mono float32 WAV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s", "silence", "noise", "bench_45s")
    paths = {name: out_dir / f"{name}.wav" for name in names}
    if all(p.is_file() for p in paths.values()):
        return paths
    sources = extract_sources(AUDIO_SOURCE)
    dev00 = load_audio(sources["dev00"])
    meeting_60s = np.concatenate([dev00, load_audio(sources["dev01"])])
    rate = MODEL_SAMPLE_RATE_HZ
    clips = {
        "telephone": load_audio(sources["telephone"]),
        "meeting_dev00": dev00,
        "meeting_tst00": load_audio(sources["tst00"]),
        "meeting_60s": meeting_60s,
        "silence": np.zeros(SILENCE_SECONDS * rate, dtype=np.float32),
        "noise": np.random.default_rng(NOISE_SEED).normal(0, NOISE_STD, SILENCE_SECONDS * rate).astype(np.float32),
        "bench_45s": meeting_60s[: BENCH_SECONDS * rate],
    }
    for name, audio in clips.items():
        sf.write(str(paths[name]), audio, rate, subtype="FLOAT")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name, path in build_test_clips(args.out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
