"""Speculative decoding by task: how much prompt-lookup drafts and a client's prediction speed up one chat stream.

    .venv/bin/python -m scripts.bench_drafts [--rounds 3] [--max-tokens 96] [--threads 2] [--version N]
        [--out docs/bench/drafts.json]

Smoke test: ``.venv/bin/python -m scripts.bench_drafts --rounds 1 --max-tokens 16 --out test-artifacts/drafts.json``.

In-process text engine (no server), one stream at a time, greedy. Each task runs under three settings, interleaved
round by round: drafts off (``max_draft_tokens = 0``), drafts from the conversation (the default, prompt lookup),
and drafts plus the client's ``prediction`` of the reply. Tasks:

- ``essay``: new text (a short essay on a topic): nothing to look up, no prediction (its third setting is the
  second again);
- ``copy-edit``: "repeat this paragraph, changing one word" with the paragraph in the prompt, and the unedited
  paragraph as the prediction (what an editor client sends with OpenAI's Predicted Outputs);
- ``code-edit``: the same with a small Python function;
- ``regenerate``: the question again, with the previous reply as the prediction (a "regenerate" button, or a client
  that caches answers), and nothing of the reply in the prompt.

Per task and setting: median decode tokens/s (tokens after the first / time after the first), the tokens confirmed
from drafts, and CPU ms per token of the process (less sensitive to other load). Every setting must give the same
tokens (a speculative draft never changes the reply); the script says so or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from app.engine.text_engine import TextEngine, TextEngineSettings
from app.engine.text_events import GenerationDone, TokenDelta
from app.text.sampling import SamplingParams
from scripts.bench_common import DOCS_BENCH_DIR, load_average, machine_facts, write_json
from scripts.bench_text_engine import load_model

DEFAULT_OUT: Final = DOCS_BENCH_DIR / "drafts.json"
PARAGRAPH: Final = (
    "The lighthouse stood at the end of a long stone pier. Every evening the keeper climbed the narrow stairs, "
    "trimmed the wick and lit the lamp, and every morning he wrote the weather, the ships he had seen and the hours "
    "of light in a thick green logbook. In winter the waves broke over the pier and the spray froze on the windows."
)
FUNCTION: Final = (
    "def average_speed(distances, times):\n"
    "    total_distance = sum(distances)\n"
    "    total_time = sum(times)\n"
    "    if total_time == 0:\n"
    "        raise ValueError('no time elapsed')\n"
    "    return total_distance / total_time\n"
)
SETTINGS: Final = ("off", "lookup", "lookup+prediction")


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    prediction: str | None  # what the client predicts; None: nothing; PREVIOUS_REPLY: the first drafts-off reply


PREVIOUS_REPLY: Final = "<previous reply>"


TASKS: Final = (
    Task("essay", "Write a short essay about how bees make honey.", None),
    Task(
        "copy-edit",
        f"Repeat the following paragraph exactly, but write 'lantern' instead of 'lamp':\n\n{PARAGRAPH}",
        PARAGRAPH,
    ),
    Task(
        "code-edit",
        f"Rewrite this Python function with the parameter 'times' renamed to 'durations':\n\n{FUNCTION}",
        FUNCTION,
    ),
    Task("regenerate", "Name three red fruits and say one thing about each.", PREVIOUS_REPLY),
)


@dataclass(frozen=True)
class Run:
    task: str
    setting: str
    tokens: tuple[int, ...]
    decode_tok_s: float
    accepted: int
    cpu_ms_per_token: float


async def _reply(engine: TextEngine, prompt: str, params: SamplingParams) -> tuple[tuple[int, ...], GenerationDone]:
    ids: list[int] = []
    done: GenerationDone | None = None
    async for event in engine.chat_once([("user", prompt)], params):
        if isinstance(event, TokenDelta):
            ids += event.token_ids
        else:
            done = event
    assert done is not None
    return tuple(ids), done


async def run_round(
    directory: Path, config: dict[str, Any], args: argparse.Namespace, previous: dict[str, str]
) -> list[Run]:
    """One reply per task under each setting; ``previous`` keeps the first drafts-off replies (regenerate's
    prediction)."""
    runs: list[Run] = []
    for setting in SETTINGS:
        settings = TextEngineSettings(
            max_batch_size=2, max_seq_len=1024, intra_op_threads=args.threads,
            max_draft_tokens=0 if setting == "off" else TextEngineSettings().max_draft_tokens,
        )
        engine = TextEngine.from_directory(directory, config, settings)
        await engine.start()
        try:
            for task in TASKS:
                prediction = previous.get(task.name, "") if task.prediction == PREVIOUS_REPLY else task.prediction
                params = SamplingParams(
                    temperature=0.0, max_tokens=args.max_tokens,
                    prediction=prediction or "" if setting == "lookup+prediction" else "",
                )
                cpu = time.process_time()
                tokens, done = await _reply(engine, task.prompt, params)
                cpu_ms = (time.process_time() - cpu) * 1000 / max(1, len(tokens))
                if setting == "off" and task.name not in previous:
                    previous[task.name] = engine.tokenizer.decode(list(tokens), skip_special=True)
                runs.append(Run(task.name, setting, tokens, done.timings.tokens_per_s,
                                done.timings.accepted_draft_tokens, cpu_ms))
        finally:
            await engine.shutdown()
    return runs


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for task in TASKS:
        reference = next(r.tokens for r in runs if r.task == task.name and r.setting == "off")
        for setting in SETTINGS:
            mine = [r for r in runs if r.task == task.name and r.setting == setting]
            if any(r.tokens != reference for r in mine):
                raise SystemExit(f"{task.name}/{setting}: the reply differs from the reply without drafts")
            rows.append({
                "task": task.name, "setting": setting, "tokens": len(reference),
                "decode_tok_s": [round(r.decode_tok_s, 1) for r in mine],
                "decode_tok_s_median": round(statistics.median(r.decode_tok_s for r in mine), 1),
                "accepted_draft_tokens": statistics.median(r.accepted for r in mine),
                "cpu_ms_per_token_median": round(statistics.median(r.cpu_ms_per_token for r in mine), 1),
            })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'task':<11} {'setting':<18} {'tokens':>6} {'decode tok/s':>12} {'vs off':>6} {'confirmed':>9} "
             f"{'CPU ms/tok':>10}"]
    for row in rows:
        off = next(r for r in rows if r["task"] == row["task"] and r["setting"] == "off")["decode_tok_s_median"]
        ratio = row["decode_tok_s_median"] / off if off else float("nan")
        lines.append(f"{row['task']:<11} {row['setting']:<18} {row['tokens']:>6} {row['decode_tok_s_median']:>12} "
                     f"{ratio:>5.2f}x {row['accepted_draft_tokens']:>9} {row['cpu_ms_per_token_median']:>10}")
    lines.append("Every setting gave the same tokens as drafts off.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    directory, config = load_model(args.model_dir, args.version)
    load_before = load_average()
    previous: dict[str, str] = {}
    runs: list[Run] = []
    for _ in range(args.rounds):
        runs += asyncio.run(run_round(directory, config, args, previous))
    rows = summarize(runs)
    print(render(rows))
    write_json(args.out, {
        "benchmark": "drafts",
        "command": "python -m scripts.bench_drafts " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": {**machine_facts(), "load_average_1m_end": load_average()},
        "load_before": load_before,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
