"""How long onnxruntime's idle threads should spin before sleeping (``BROOK_ORT_SPIN_US``), in process.

    .venv/bin/python -m scripts.bench_ort_spin [--spins 0,50,100,200] [--rows 1,4,16] [--rounds 9] [--steps 10]
        [--version 3] [--threads 2] [--json docs/bench/ort_spin/runner.json]

One ``LlamaRunner`` of SmolLM2 per spin setting, all loaded at once (``app.ort_session.create_session`` with
``spin_us``), each with ``--rows`` slots holding a 200-token prompt. Every round runs every setting once, in an
order that rotates per round, and measures:

- a decode step of all rows (median wall ms of ``--steps`` greedy steps, with 2 ms of sleep between steps standing
  in for the engine's own work between model calls), and the process CPU ms per step;
- a 125-token prompt prefilled alone on one slot (wall ms);
- the CPU the process burns during 50 ms of sleep right after (the cost of spinning once the engine is idle).

The table shows medians over rounds, with the min-max range. This measures one engine alone on the machine; with
speech and chat engines sharing the cores, run ``scripts/bench_mixed.py --server-env ORT_SPIN_US=...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_common import DOCS_BENCH_DIR, machine_facts, write_json

MODEL_NAME = "smollm2-135m-instruct"
CONTEXT_TOKENS = 200
PROMPT_TOKENS = 125
IDLE_S = 0.05
BETWEEN_STEPS_S = 0.002
DEFAULT_JSON = DOCS_BENCH_DIR / "ort_spin" / "runner.json"


def _tokens(row: int, count: int) -> list[int]:
    return [1 + (row * 7 + i) % 1000 for i in range(count)]


def measure(spins: Sequence[int], rows: int, rounds: int, steps: int, version: int, threads: int) -> dict[str, Any]:
    from app.paths import default_model_dir
    from app.repository import ModelRepository
    from app.text.llama_runner import LlamaRunner, StepInput

    loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, version, check_hashes=False)
    config = dict(loaded.manifest.config)
    runners = {
        spin: LlamaRunner(loaded.directory, config, intra_op_threads=threads, max_batch_size=rows,
                          max_seq_len=512, spin_us=spin)
        for spin in spins
    }
    slots = {spin: [runner.allocate_slot() for _ in range(rows)] for spin, runner in runners.items()}
    samples: dict[int, dict[str, list[float]]] = {
        spin: {"step_ms": [], "cpu_ms_per_step": [], "prefill_ms": [], "idle_cpu_ms": []} for spin in spins
    }
    for round_index in range(rounds):
        shift = round_index % len(spins)
        for spin in [*spins[shift:], *spins[:shift]]:
            runner, own = runners[spin], slots[spin]
            for row, slot in enumerate(own):
                runner.truncate(slot, 0)
                runner.step([StepInput(slot, _tokens(row, CONTEXT_TOKENS))])
            tokens = [5] * rows
            walls = []
            cpu_start = time.process_time()
            for _ in range(steps):
                started = time.perf_counter()
                logits = runner.step([StepInput(slot, [token]) for slot, token in zip(own, tokens, strict=True)])
                walls.append(time.perf_counter() - started)
                tokens = [int(token) for token in np.argmax(logits, axis=1)]
                time.sleep(BETWEEN_STEPS_S)
            samples[spin]["cpu_ms_per_step"].append((time.process_time() - cpu_start) / steps * 1000)
            samples[spin]["step_ms"].append(statistics.median(walls) * 1000)
            runner.truncate(own[0], 0)
            started = time.perf_counter()
            runner.step([StepInput(own[0], _tokens(0, PROMPT_TOKENS))])
            samples[spin]["prefill_ms"].append((time.perf_counter() - started) * 1000)
            cpu_start = time.process_time()
            time.sleep(IDLE_S)
            samples[spin]["idle_cpu_ms"].append((time.process_time() - cpu_start) * 1000)
    return {"rows": rows, "results": [{"spin_us": spin, **samples[spin]} for spin in spins]}


def _cell(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def render(payload: dict[str, Any]) -> str:
    lines = [
        "| rows | spin (us) | decode step ms | CPU ms / step | 125-token prefill ms | CPU ms in 50 ms idle |",
        "|---:|---:|---|---|---|---|",
    ]
    for block in payload["runs"]:
        for result in block["results"]:
            lines.append(
                f"| {block['rows']} | {result['spin_us']} | {_cell(result['step_ms'])} | "
                f"{_cell(result['cpu_ms_per_step'])} | {_cell(result['prefill_ms'])} | {_cell(result['idle_cpu_ms'])} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--spins", default="0,50,100,200", help="spin durations to compare, microseconds")
    parser.add_argument("--rows", default="1,4,16", help="decode rows per step")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="decode steps per measurement")
    parser.add_argument("--version", type=int, default=3, help="SmolLM2 version")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--render", action="store_true", help="only print the table of --json")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.json.read_text())))
        return 0
    spins = [int(value) for value in args.spins.split(",")]
    facts = machine_facts()
    runs = [measure(spins, int(rows), args.rounds, args.steps, args.version, args.threads)
            for rows in args.rows.split(",")]
    payload = {
        "benchmark": "ort_spin",
        "command": "python -m scripts.bench_ort_spin " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**facts, **{"load_average_1m_end": machine_facts()["load_average_1m"]}},
        "workload": {"version": args.version, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                     "context_tokens": CONTEXT_TOKENS, "prompt_tokens": PROMPT_TOKENS},
        "runs": runs,
    }
    write_json(args.json, payload)
    print(render(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
