"""The compute ceiling of streaming Whisper on this machine: how many streams p95 <= 1 s partials could ever serve.

Measures, on one onnxruntime thread (CPU time, medians of ``--repeats``):

1. the core's fp32 matrix-multiply speed: onnxruntime ``MatMul`` at the encoder's largest shape
   ([positions, d_model] x [d_model, 4 d_model]), the kernel the encoder spends most of its time in;
2. the Whisper encoder on windows of 10 s (the engine's minimum, 1000 frames), 20 s and 30 s, and its achieved
   GFLOP/s (FLOPs counted from the model's dimensions: convolutions, attention projections, attention scores,
   MLP, and the cross-attention K/V projection of every decoder layer);
3. the decoder: CPU ms per decoded token per row at batch 1 and 2 (a 10 s window, partial prompt).

Then the arithmetic: a partial latency p95 <= ``--target-s`` needs a fresh partial every ``target / 2`` s per
stream at the very least (half the budget waiting for the next window, half computing it), so each stream costs
``window CPU / (target / 2)`` CPU seconds per second; with ``--cores`` cores that bounds the number of streams.

    .venv/bin/python -m scripts.bench_speech_ceiling [--version 3] [--repeats 5] [--tokens 25]

Writes ``docs/bench/speech_ceiling.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import soundfile as sf
from onnx import TensorProto, helper, numpy_helper

from app.convert.sources import cache_dir
from app.engine.speech_decode import window_features
from app.ort_session import create_session
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.whisper_runner import WhisperRunner
from scripts.bench_common import DOCS_BENCH_DIR, load_average, machine_facts, write_json
from scripts.test_audio import build_test_clips

SAMPLE_RATE_HZ = 16_000
WINDOW_SECONDS = (10, 20, 30)


def encoder_flops(config: dict[str, Any], frames: int) -> float:
    """FLOPs (2 per multiply-add) of one encoder window of ``frames`` mel frames."""
    d, layers, mels = int(config["d_model"]), int(config["n_layers"]), int(config["n_mels"])
    positions = frames // 2
    ff = 4 * d
    convolutions = 2 * mels * d * 3 * frames + 2 * d * d * 3 * positions
    per_layer = 2 * 4 * d * d * positions + 2 * 2 * positions * positions * d + 2 * 2 * d * ff * positions
    cross_kv = 2 * 2 * layers * d * d * positions
    return float(convolutions + layers * per_layer + cross_kv)


def cpu_ms(function: Callable[[], object], repeats: int) -> float:
    """Median CPU milliseconds of ``function`` (after one warm-up call)."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def matmul_gflops(rows: int, inner: int, cols: int, repeats: int, work_dir: Path) -> float:
    """onnxruntime's fp32 MatMul speed on one thread, GFLOP/s."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, inner])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [rows, cols])],
        initializer=[numpy_helper.from_array(np.random.default_rng(0).random((inner, cols), np.float32), "b")],
    )
    path = work_dir / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = create_session(path, 1)
    feed = {"a": np.random.default_rng(1).random((rows, inner), np.float32)}
    calls = 20
    milliseconds = cpu_ms(lambda: [session.run(None, feed) for _ in range(calls)], repeats) / calls
    return 2.0 * rows * inner * cols / (milliseconds / 1000) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, default=None, help="whisper-tiny-en version (default: the default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=25, help="tokens decoded per partial window (typical)")
    parser.add_argument("--target-s", type=float, default=1.0, help="partial latency p95 target")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DOCS_BENCH_DIR / "speech_ceiling.json")
    args = parser.parse_args(argv)

    loaded = ModelRepository(default_model_dir()).load("whisper-tiny-en", args.version)
    config = dict(loaded.manifest.config)
    runner = WhisperRunner(loaded.directory, config, intra_op_threads=1)
    clips = build_test_clips(cache_dir() / "test-audio")
    audio, _ = sf.read(str(clips["telephone"]), dtype="float32")
    load_before = load_average()

    d_model = int(config["d_model"])
    with tempfile.TemporaryDirectory() as work_dir:
        peak = matmul_gflops(1500, d_model, 4 * d_model, args.repeats, Path(work_dir))
    encoder = []
    for seconds in WINDOW_SECONDS:
        frames = seconds * 100
        mel = window_features(audio[: max(0, seconds - 2) * SAMPLE_RATE_HZ], frames, int(config["n_mels"]))[None]
        def encode(mel: np.ndarray = mel) -> object:
            return runner.encode(mel)

        milliseconds = cpu_ms(encode, args.repeats)
        flops = encoder_flops(config, frames)
        encoder.append(
            {"seconds": seconds, "frames": frames, "cpu_ms": round(milliseconds, 1), "gflop": round(flops / 1e9, 2),
             "gflops": round(flops / (milliseconds / 1000) / 1e9, 1)}
        )
    mel = window_features(audio[: 8 * SAMPLE_RATE_HZ], 1000, int(config["n_mels"]))[None]
    decoder = []
    for batch in (1, 2):
        encoded = runner.encode(np.repeat(mel, batch, axis=0))
        prompts = [[runner.sot, runner.no_timestamps]] * batch

        def decode(encoded: Any = encoded, prompts: list[list[int]] = prompts) -> object:
            return runner.decode(encoded, prompts, max_new_tokens=args.tokens, rules=None)

        total = cpu_ms(decode, args.repeats)
        decoder.append({"batch": batch, "cpu_ms_per_token_row": round(total / (args.tokens * batch), 2)})

    window_cpu_s = (encoder[0]["cpu_ms"] + args.tokens * decoder[0]["cpu_ms_per_token_row"]) / 1000
    interval_s = args.target_s / 2
    per_stream = window_cpu_s / interval_s
    result = {
        "benchmark": "speech_ceiling",
        "command": " ".join([".venv/bin/python -m scripts.bench_speech_ceiling", *(argv or sys.argv[1:])]),
        "machine": machine_facts(),
        "load_1m_before": load_before,
        "load_1m_after": load_average(),
        "model": f"whisper-tiny-en v{loaded.version}",
        "matmul_gflops_one_thread": round(peak, 1),
        "encoder": encoder,
        "decoder": decoder,
        "window_cpu_s": round(window_cpu_s, 3),
        "partial_every_s": interval_s,
        "cpu_s_per_s_per_stream": round(per_stream, 3),
        "max_streams": round(args.cores / per_stream, 1),
        "encoder_only_max_streams": round(args.cores / (encoder[0]["cpu_ms"] / 1000 / interval_s), 1),
    }
    write_json(args.json, result)
    print(f"onnxruntime fp32 MatMul, 1 thread: {peak:.0f} GFLOP/s")
    for row in encoder:
        print(f"encoder {row['seconds']:>2} s window: {row['cpu_ms']:6.1f} ms CPU, {row['gflop']:5.1f} GFLOP, "
              f"{row['gflops']:5.0f} GFLOP/s ({row['gflops'] / peak:.0%} of MatMul)")
    for row in decoder:
        print(f"decoder batch {row['batch']}: {row['cpu_ms_per_token_row']:.2f} ms CPU per token per row")
    print(f"one 10 s partial window with {args.tokens} tokens: {window_cpu_s:.3f} CPU s; a partial every "
          f"{interval_s:g} s costs {per_stream:.2f} CPU s per second per stream")
    print(f"at most {result['max_streams']} streams on {args.cores} cores "
          f"(the encoders alone: {result['encoder_only_max_streams']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
