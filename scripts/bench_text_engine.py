"""Benchmark the text engine in-process: multi-turn chat sessions under concurrency, with CPU time per token.

    .venv/bin/python -m scripts.bench_text_engine [--version 1] [--sessions 1,4,16] [--turns 2] [--new-tokens 64]
        [--stagger-ms 0] [--threads 2] [--out docs/bench/text_engine.json]

Smoke test: ``.venv/bin/python -m scripts.bench_text_engine --sessions 1,2 --turns 2 --new-tokens 8``.

For each concurrency level N, N chat sessions start (session ``i`` after ``i * --stagger-ms``) and each runs
``--turns`` turns on its own conversation: the first user message is a ~100-token request for a story, each later
one a short follow-up, so later turns reuse the conversation's cached KV prefix (multi-turn history) and prefill only
the new message. Replies are greedy and at most ``--new-tokens`` long (a reply that ends at the model's stop token
counts only its real tokens). No server, no network: this measures the engine (scheduler, runner, sampler,
detokenizer); ``scripts/bench_chat_load.py`` measures the served path against llama.cpp.

Per level: wall time; generated tokens; aggregate tokens/s (generated tokens / wall time); TTFT p50/p95 of first
turns and of later turns; mean per-stream decode tokens/s; cached prompt tokens (share of prompt tokens reused);
the process's CPU time per generated token (prefill included) and cores used (CPU / wall time), which are less
sensitive than tokens/s to other processes on a shared machine; the 1-minute load average before and after.
The JSON (``--out``) is rewritten after every level, so an interrupted run keeps the levels it finished.

The model comes from the repository (``smollm2-135m-instruct``, ``--version``) unless ``--model-dir`` (or
``$BROOK_LLM_MODEL_DIR``) names a converted folder with ``manifest.json`` or ``config.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.engine.text_engine import TextEngine, TextEngineSettings
from app.engine.text_events import GenerationDone
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.text.sampling import SamplingParams
from scripts.bench_common import DOCS_BENCH_DIR, machine_facts, percentile, write_json

logger = logging.getLogger("bench_text_engine")

MODEL_NAME = "smollm2-135m-instruct"
MODEL_DIR_ENV = "BROOK_LLM_MODEL_DIR"
DEFAULT_OUT = DOCS_BENCH_DIR / "text_engine.json"
TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a mountain village",
    "a deep-sea diver",
    "an old library",
    "a desert caravan",
    "a space station",
    "a clockmaker",
    "a river pilot",
    "a winter market",
    "a night train",
    "a beekeeper",
    "a glass city",
    "a retired pirate",
    "a small bakery",
    "a storm chaser",
]
FILLER = (
    "The story should have a clear beginning, a surprising middle and a gentle ending. Use simple words, "
    "short sentences and vivid details about colours, sounds and smells. Give the main character a name, a "
    "worry and a friend who helps. Avoid violence. Keep the tone warm and hopeful, like a bedtime story "
    "read aloud to a child who is almost asleep."
)
FOLLOW_UPS = [
    "Now tell me what happens the next morning, in the same style.",
    "Give the story a title and explain why you chose it.",
    "Rewrite the ending so that it happens at night during a storm.",
]


def load_model(model_dir: str | None, version: int | None) -> tuple[Path, dict[str, Any]]:
    if model_dir is None and MODEL_DIR_ENV not in os.environ:
        loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, version, check_hashes=False)
        return loaded.directory, dict(loaded.manifest.config)
    directory = Path(model_dir or os.environ[MODEL_DIR_ENV])
    if (directory / "manifest.json").is_file():
        return directory, dict(json.loads((directory / "manifest.json").read_text())["config"])
    return directory, dict(json.loads((directory / "config.json").read_text()))


@dataclass(frozen=True)
class TurnResult:
    session: int
    turn: int
    done: GenerationDone


@dataclass(frozen=True)
class LevelResult:
    sessions: int
    turns: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    first_prompt_tokens: float  # mean rendered prompt length of first turns
    ttft_first_p50_ms: float
    ttft_first_p95_ms: float
    ttft_later_p50_ms: float  # NaN with one turn
    ttft_later_p95_ms: float
    stream_tokens_per_s: float  # mean over turns of each reply's decode speed after its first token
    cached_share: float  # prompt tokens reused from the KV cache / all prompt tokens
    cpu_ms_per_token: float  # process CPU time / generated tokens (prefill included)
    cores_used: float  # process CPU time / wall time
    load_before: float
    load_after: float
    ttft_first_ms: list[float]
    ttft_later_ms: list[float]


def first_message(index: int) -> str:
    return f"Please write a story about {TOPICS[index % len(TOPICS)]} (story number {index}). {FILLER}"


async def one_session(
    engine: TextEngine, index: int, turns: int, params: SamplingParams, delay_s: float
) -> list[TurnResult]:
    await asyncio.sleep(delay_s)
    conversation = engine.open_conversation()
    results: list[TurnResult] = []
    try:
        for turn in range(turns):
            message = first_message(index) if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
            done: GenerationDone | None = None
            async for event in engine.chat(conversation, [("user", message)], params):
                if isinstance(event, GenerationDone):
                    done = event
            if done is None:
                raise RuntimeError("generation ended without GenerationDone")
            results.append(TurnResult(index, turn, done))
        return results
    finally:
        engine.close_conversation(conversation)


async def run_level(
    engine: TextEngine, sessions: int, turns: int, params: SamplingParams, stagger_s: float
) -> LevelResult:
    load_before = os.getloadavg()[0]
    cpu_started, started = time.process_time(), time.perf_counter()
    per_session = await asyncio.gather(*(one_session(engine, i, turns, params, i * stagger_s) for i in range(sessions)))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    results = [result for session in per_session for result in session]
    first = [r.done for r in results if r.turn == 0]
    later = [r.done for r in results if r.turn > 0]
    tokens = sum(r.done.usage.completion_tokens for r in results)
    prompt_tokens = sum(r.done.usage.prompt_tokens for r in results)
    ttft_first = [d.timings.ttft_ms for d in first]
    ttft_later = [d.timings.ttft_ms for d in later]
    return LevelResult(
        sessions=sessions,
        turns=turns,
        wall_s=round(wall, 3),
        tokens=tokens,
        tokens_per_s=round(tokens / wall, 2),
        first_prompt_tokens=round(statistics.mean(d.usage.prompt_tokens for d in first), 1),
        ttft_first_p50_ms=round(percentile(ttft_first, 0.5), 1),
        ttft_first_p95_ms=round(percentile(ttft_first, 0.95), 1),
        ttft_later_p50_ms=round(percentile(ttft_later, 0.5), 1),
        ttft_later_p95_ms=round(percentile(ttft_later, 0.95), 1),
        stream_tokens_per_s=round(statistics.mean(r.done.timings.tokens_per_s for r in results), 2),
        cached_share=round(sum(r.done.usage.cached_tokens for r in results) / max(prompt_tokens, 1), 3),
        cpu_ms_per_token=round(cpu * 1000.0 / max(tokens, 1), 2),
        cores_used=round(cpu / wall, 2),
        load_before=round(load_before, 2),
        load_after=round(os.getloadavg()[0], 2),
        ttft_first_ms=[round(t, 1) for t in ttft_first],
        ttft_later_ms=[round(t, 1) for t in ttft_later],
    )


def print_table(results: list[LevelResult]) -> None:
    print(
        f"{'N':>3} {'turns':>5} {'prompt':>6} {'tokens':>6} {'wall s':>7} {'agg tok/s':>9} {'TTFT1 p50':>9} "
        f"{'TTFT1 p95':>9} {'TTFTn p50':>9} {'TTFTn p95':>9} {'stream':>6} {'cached':>6} {'CPU ms/tok':>10} "
        f"{'cores':>5} {'load':>9}"
    )
    for r in results:
        print(
            f"{r.sessions:>3} {r.turns:>5} {r.first_prompt_tokens:>6.0f} {r.tokens:>6} {r.wall_s:>7.2f} "
            f"{r.tokens_per_s:>9.1f} {r.ttft_first_p50_ms:>7.0f}ms {r.ttft_first_p95_ms:>7.0f}ms "
            f"{r.ttft_later_p50_ms:>7.0f}ms {r.ttft_later_p95_ms:>7.0f}ms {r.stream_tokens_per_s:>6.1f} "
            f"{r.cached_share:>6.2f} {r.cpu_ms_per_token:>10.2f} {r.cores_used:>5.2f} "
            f"{r.load_before:>4.1f}-{r.load_after:<4.1f}"
        )


async def main_async(args: argparse.Namespace) -> list[LevelResult]:
    directory, config = load_model(args.model_dir, args.version)
    levels = [int(level) for level in args.sessions.split(",")]
    settings = TextEngineSettings(
        max_batch_size=max(16, *levels),
        max_seq_len=1024,
        prefill_chunk_tokens=args.prefill_chunk,
        intra_op_threads=args.threads,
    )
    engine = TextEngine.from_directory(directory, config, settings)
    await engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    payload: dict[str, Any] = {
        "machine": machine_facts(),
        "model_dir": str(directory),
        "accuracy_level": config.get("accuracy_level"),
        "settings": asdict(settings),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "levels": [],
    }
    results: list[LevelResult] = []
    try:
        await run_level(engine, 1, 1, SamplingParams(temperature=0.0, max_tokens=4), 0.0)  # warm caches
        for level in levels:
            result = await run_level(engine, level, args.turns, params, args.stagger_ms / 1000.0)
            results.append(result)
            payload["levels"].append(asdict(result))
            write_json(args.out, payload)
            print_table([result])
        return results
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="converted model folder (default: the repository)")
    parser.add_argument("--version", type=int, default=None, help="repository model version (default: its default)")
    parser.add_argument("--sessions", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--turns", type=int, default=2, help="turns per session (later turns reuse the KV cache)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max tokens per reply")
    parser.add_argument("--stagger-ms", type=float, default=0.0, help="delay between session starts")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="engine token budget per step")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (rewritten after every level)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(main_async(args))
    print()
    print_table(results)


if __name__ == "__main__":
    main()
