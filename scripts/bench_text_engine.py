"""Benchmark the text engine in-process: aggregate decode throughput and time to first token under concurrency.

For each concurrency level N, N chat sessions each send one ~100-token prompt at the same moment and stream a
64-token reply (greedy; a reply that ends early at the model's stop token counts only its real tokens). Reported per
level: wall time, total generated tokens, aggregate tokens/s (generated tokens / wall time), TTFT p50/p95, and the
mean per-stream decode speed.

    .venv/bin/python scripts/bench_text_engine.py [--model-dir DIR] [--sessions 1,4,16] [--new-tokens 64]

The model comes from the repository (``smollm2-135m-instruct``) unless ``--model-dir`` (or ``$BROOK_LLM_MODEL_DIR``)
names a converted folder with ``manifest.json`` or ``config.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine.text_engine import TextEngine, TextEngineSettings
from app.engine.text_events import GenerationDone
from app.errors import ModelError
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.text.sampling import SamplingParams

logger = logging.getLogger("bench_text_engine")

MODEL_NAME = "smollm2-135m-instruct"
MODEL_DIR_ENV = "BROOK_LLM_MODEL_DIR"
DEFAULT_DIR = "/tmp/brook-llm/1"
TOPICS = ["a lighthouse keeper", "a lost robot", "a mountain village", "a deep-sea diver", "an old library",
          "a desert caravan", "a space station", "a clockmaker", "a river pilot", "a winter market",
          "a night train", "a beekeeper", "a glass city", "a retired pirate", "a small bakery", "a storm chaser"]
FILLER = ("The story should have a clear beginning, a surprising middle and a gentle ending. Use simple words, "
          "short sentences and vivid details about colours, sounds and smells. Give the main character a name, a "
          "worry and a friend who helps. Avoid violence. Keep the tone warm and hopeful, like a bedtime story "
          "read aloud to a child who is almost asleep.")


def load_model(model_dir: str | None) -> tuple[Path, dict[str, Any]]:
    if model_dir is None and MODEL_DIR_ENV not in os.environ:
        try:
            loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, check_hashes=False)
            return loaded.directory, dict(loaded.manifest.config)
        except ModelError as error:
            logger.info("model repository: %s; trying %s", error, DEFAULT_DIR)
    directory = Path(model_dir or os.environ.get(MODEL_DIR_ENV, DEFAULT_DIR))
    if (directory / "manifest.json").is_file():
        return directory, dict(json.loads((directory / "manifest.json").read_text())["config"])
    return directory, dict(json.loads((directory / "config.json").read_text()))


@dataclass(frozen=True)
class LevelResult:
    sessions: int
    wall_s: float
    tokens: int
    prompt_tokens: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    stream_tokens_per_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def one_session(engine: TextEngine, index: int, params: SamplingParams) -> GenerationDone:
    conversation = engine.open_conversation()
    prompt = f"Please write a story about {TOPICS[index % len(TOPICS)]} (story number {index}). {FILLER}"
    try:
        async for event in engine.chat(conversation, [("user", prompt)], params):
            if isinstance(event, GenerationDone):
                return event
        raise RuntimeError("generation ended without GenerationDone")
    finally:
        engine.close_conversation(conversation)


async def run_level(engine: TextEngine, sessions: int, params: SamplingParams) -> LevelResult:
    started = time.perf_counter()
    dones = await asyncio.gather(*(one_session(engine, i, params) for i in range(sessions)))
    wall = time.perf_counter() - started
    ttfts = [done.timings.ttft_ms for done in dones]
    return LevelResult(
        sessions=sessions,
        wall_s=wall,
        tokens=sum(done.usage.completion_tokens for done in dones),
        prompt_tokens=statistics.mean(done.usage.prompt_tokens for done in dones),
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p95_ms=percentile(ttfts, 0.95),
        stream_tokens_per_s=statistics.mean(done.timings.tokens_per_s for done in dones),
    )


async def main_async(args: argparse.Namespace) -> list[LevelResult]:
    directory, config = load_model(args.model_dir)
    levels = [int(level) for level in args.sessions.split(",")]
    settings = TextEngineSettings(
        max_batch_size=max(levels),
        max_seq_len=1024,
        prefill_chunk_tokens=args.prefill_chunk,
        intra_op_threads=args.threads,
    )
    engine = TextEngine.from_directory(directory, config, settings)
    await engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    try:
        await run_level(engine, 1, SamplingParams(temperature=0.0, max_tokens=4))  # warm caches
        return [await run_level(engine, level, params) for level in levels]
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="converted model folder (default: the repository)")
    parser.add_argument("--sessions", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--new-tokens", type=int, default=64, help="max tokens per reply")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="engine token budget per step")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(main_async(args))
    print(f"{'sessions':>8} {'prompt':>7} {'tokens':>7} {'wall s':>7} {'agg tok/s':>9} {'ttft p50':>9} "
          f"{'ttft p95':>9} {'stream tok/s':>12}")
    for r in results:
        print(f"{r.sessions:>8} {r.prompt_tokens:>7.0f} {r.tokens:>7} {r.wall_s:>7.2f} {r.tokens_per_s:>9.1f} "
              f"{r.ttft_p50_ms:>7.0f}ms {r.ttft_p95_ms:>7.0f}ms {r.stream_tokens_per_s:>12.1f}")


if __name__ == "__main__":
    main()
