"""Compare two whisper-tiny-en versions window by window: same tokens? how much decoder CPU per token?

Windows: 3, 7, 12 and 18 s cuts at offsets 0, 5, 12, 20 and 31 s of the four test recordings (those that fit),
each padded like the streaming engine pads it (at least 1000 frames, audio + 2 s, rounded up to 2 s), decoded
greedily as a partial (no timestamps) and as a final (timestamps), with the engine's token limit and loop stop,
on one thread. Reports identical token sequences, the largest no-speech probability and average log-probability
differences, and CPU ms per decoded token of each version (decoder only).

    .venv/bin/python -m scripts.compare_whisper_versions [--reference 1] [--candidate 3]
"""

from __future__ import annotations

import argparse
import math
import time

import soundfile as sf

from app.convert.sources import cache_dir
from app.engine.speech_decode import DecodePolicy, window_features
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.whisper_runner import LoopStop, WhisperRunner
from scripts.test_audio import build_test_clips

SAMPLE_RATE_HZ = 16_000
CLIPS = ("telephone", "meeting_dev00", "meeting_tst00", "meeting_60s")
OFFSETS_S = (0, 5, 12, 20, 31)
LENGTHS_S = (3, 7, 12, 18)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=int, default=1)
    parser.add_argument("--candidate", type=int, default=3)
    args = parser.parse_args(argv)
    repository = ModelRepository(default_model_dir())
    runners = []
    for version in (args.reference, args.candidate):
        loaded = repository.load("whisper-tiny-en", version)
        runners.append(WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=1))
    reference = runners[0]
    policy = DecodePolicy()
    paths = build_test_clips(cache_dir() / "test-audio")
    windows = []
    for clip in CLIPS:
        audio = sf.read(str(paths[clip]), dtype="float32")[0]
        for offset in OFFSETS_S:
            for seconds in LENGTHS_S:
                cut = audio[offset * SAMPLE_RATE_HZ : (offset + seconds) * SAMPLE_RATE_HZ]
                if cut.shape[0] == seconds * SAMPLE_RATE_HZ:
                    frames = policy.window_frames(cut.shape[0], "partial", reference.max_frames)
                    windows.append((cut.shape[0], window_features(cut, frames, int(reference.config["n_mels"]))))
    cpu = [0.0, 0.0]
    tokens = [0, 0]
    same = 0
    worst_no_speech = worst_logprob = 0.0
    total = 0
    for prompt in ([reference.sot, reference.no_timestamps], [reference.sot]):
        for n_samples, mel in windows:
            results = []
            for index, runner in enumerate(runners):
                encoded = runner.encode(mel[None])
                started = time.process_time()
                [result] = runner.decode(
                    encoded, [prompt], max_new_tokens=policy.token_limit(n_samples), loop_stop=LoopStop()
                )
                cpu[index] += time.process_time() - started
                tokens[index] += len(result.tokens) + 1
                results.append(result)
            total += 1
            same += results[0].tokens == results[1].tokens
            worst_no_speech = max(worst_no_speech, abs(results[0].no_speech_prob - results[1].no_speech_prob))
            if math.isfinite(results[0].avg_logprob) and math.isfinite(results[1].avg_logprob):
                worst_logprob = max(worst_logprob, abs(results[0].avg_logprob - results[1].avg_logprob))
    print(f"{len(windows)} windows x (partial, final) = {total} decodes")
    print(f"identical token sequences: {same}/{total}")
    print(f"largest differences: no-speech probability {worst_no_speech:.4f}, avg log-probability {worst_logprob:.4f}")
    for index, version in enumerate((args.reference, args.candidate)):
        print(f"v{version}: {1000 * cpu[index] / tokens[index]:.2f} ms of decoder CPU per token (batch 1, 1 thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
