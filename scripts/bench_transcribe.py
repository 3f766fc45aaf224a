"""Offline transcription speed: Brook (onnxruntime, v1 fp32 and v2 int8) against faster-whisper float32.

Both transcribe the same 45 s real recording with the same settings (greedy, beam 1, conditioning on previous
text, timestamps, 2 threads), interleaved and repeated; the medians of the real-time factor (processing time /
audio duration) are compared in the same run. Usage:

    .venv/bin/python scripts/bench_transcribe.py [--repeats 7] [--json docs/bench/transcribe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from test_audio import build_test_clips  # scripts/ is on sys.path when run as a script

from app.audio import MODEL_SAMPLE_RATE_HZ, load_audio
from app.convert.sources import cache_dir, extract_sources
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.transcribe import transcribe
from app.speech.wer import word_error_rate
from app.speech.whisper_runner import WhisperRunner

THREADS = 2


def faster_whisper_transcriber(repository: ModelRepository) -> Any:
    from faster_whisper import WhisperModel

    spec = repository.spec("whisper-tiny-en")
    assert spec.source is not None
    files = extract_sources(spec.source)
    model = WhisperModel(str(files["model.bin"].parent), device="cpu", compute_type="float32", cpu_threads=THREADS)

    def run(audio: Any) -> str:
        segments, _ = model.transcribe(audio, beam_size=1, best_of=1, temperature=0.0, language="en",
                                       condition_on_previous_text=True, vad_filter=False)
        return "".join(segment.text for segment in segments)

    return run


def brook_transcriber(repository: ModelRepository, version: int) -> Any:
    loaded = repository.load("whisper-tiny-en", version)
    runner = WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=THREADS)
    return lambda audio: transcribe(audio, runner).text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clip", default="bench_45s")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    audio = load_audio(build_test_clips(cache_dir() / "test-audio")[args.clip])
    duration = len(audio) / MODEL_SAMPLE_RATE_HZ
    repository = ModelRepository(default_model_dir())
    engines = {
        "faster-whisper fp32": faster_whisper_transcriber(repository),
        "brook v1 fp32": brook_transcriber(repository, 1),
        "brook v2 int8": brook_transcriber(repository, 2),
    }
    texts = {name: run(audio) for name, run in engines.items()}  # warm-up, and the texts for WER
    times: dict[str, list[float]] = {name: [] for name in engines}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, run in engines.items():
            started = time.perf_counter()
            run(audio)
            times[name].append(time.perf_counter() - started)
        loads.append(os.getloadavg()[0])
    reference = texts["faster-whisper fp32"]
    rows = []
    anchor = statistics.median(times["faster-whisper fp32"]) / duration
    print(f"{args.clip}: {duration:.1f} s of audio, {args.repeats} interleaved repeats, {THREADS} threads, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'engine':<22} {'median s':>9} {'RTF':>7} {'vs faster-whisper':>18} {'WER vs fw':>10}")
    for name, samples in times.items():
        median = statistics.median(samples)
        rtf = median / duration
        wer = word_error_rate(reference, texts[name])
        rows.append({"engine": name, "median_s": median, "rtf": rtf, "speedup_vs_faster_whisper": anchor / rtf,
                     "wer_vs_faster_whisper": wer, "samples_s": samples})
        print(f"{name:<22} {median:>9.3f} {rtf:>7.4f} {anchor / rtf:>17.2f}x {wer:>10.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"clip": args.clip, "duration_s": duration, "threads": THREADS,
                                         "repeats": args.repeats, "load_average": loads, "rows": rows,
                                         "command": " ".join(["python", *sys.argv])}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
