"""Where a SmolLM2 decode step spends its time, by operator type (onnxruntime's profiler).

    .venv/bin/python -m scripts.profile_llm_ops [--version 4] [--rows 1] [--steps 64] [--threads 2] [--json FILE]

Loads a converted version from the model repository into ``LlamaRunner`` with profiling on, prefills ``--rows``
prompts of 99 tokens, then runs ``--steps`` greedy decode steps of those rows, and sums the profiler's kernel time
per operator type over the decode steps' calls of the session that ran them (v4's decode graph for up to 4 rows,
else the main graph; v3 runs a step of two rows as two calls). Printed per operator type: milliseconds per call,
share of the kernel time, and nodes of that type in the graph. The profiler adds its own overhead to every node
(the more nodes, the more), so the total is above the step's wall time; the shares still show whether arithmetic
(MatMulNBits, GroupQueryAttention) or the many small operators dominate. Node counts are of the graph file;
onnxruntime fuses some nodes (Gemm, QuickGelu, ...) when it loads it.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

MODEL_NAME = "smollm2-135m-instruct"
PROMPT_TOKENS = 99


class _CountingSession:
    """An InferenceSession with profiling on that counts its runs (to tell the prefill's from the decode steps')."""

    def __init__(self, path: Path, intra_op_threads: int, **_: Any) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"brook_profile_{path.stem}")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run_with_iobinding(self, binding: Any) -> None:
        self.runs += 1
        self.session.run_with_iobinding(binding)


def profile(version: int, rows: int, steps: int, threads: int) -> dict[str, Any]:
    from app.paths import default_model_dir
    from app.repository import ModelRepository
    from app.text import llama_runner

    loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, version, check_hashes=False)
    config = dict(loaded.manifest.config)
    setattr(llama_runner, "create_session", _CountingSession)  # noqa: B010  (this script's own sessions)
    runner = llama_runner.LlamaRunner(
        loaded.directory, config, intra_op_threads=threads, max_batch_size=rows, max_seq_len=512
    )
    slots = [runner.allocate_slot() for _ in range(rows)]
    prompts = [[1 + (row * 7 + i) % 1000 for i in range(PROMPT_TOKENS)] for row in range(rows)]
    logits = runner.step([llama_runner.StepInput(slot, p) for slot, p in zip(slots, prompts, strict=True)])
    on_decode_graph = runner.decode_session is not None and rows <= runner.decode_graph_rows
    session: Any = runner.decode_session if on_decode_graph else runner.session
    skipped = session.runs  # the prefill's calls, if they ran on this session
    for _ in range(steps):
        tokens = [int(t) for t in np.argmax(logits, axis=1)]
        logits = runner.step([llama_runner.StepInput(slot, [t]) for slot, t in zip(slots, tokens, strict=True)])
    trace = json.loads(Path(session.end_profiling()).read_text())
    run_spans = sorted((int(e["ts"]), int(e["ts"]) + int(e["dur"])) for e in trace if e.get("name") == "model_run")
    decode_spans = run_spans[skipped:]
    kernel_us: collections.Counter[str] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            ts = int(event["ts"])
            if any(start <= ts <= end for start, end in decode_spans):
                kernel_us[event["args"]["op_name"]] += int(event["dur"])
    nodes = collections.Counter(
        node.op_type for node in onnx.load(str(session.path), load_external_data=False).graph.node
    )
    total = sum(kernel_us.values())
    runs = max(len(decode_spans), 1)
    return {
        "version": version,
        "rows": rows,
        "steps": steps,
        "calls": len(decode_spans),
        "threads": threads,
        "graph": session.path.name,
        "kernel_ms_per_call": total / runs / 1000,
        "ops": [
            {"op": op, "ms_per_call": us / runs / 1000, "share": us / total, "nodes": nodes.get(op, 0)}
            for op, us in kernel_us.most_common()
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    result = profile(args.version, args.rows, args.steps, args.threads)
    print(
        f"SmolLM2 v{result['version']}, {result['rows']} decode row(s), {result['calls']} calls, "
        f"{result['threads']} thread(s), {result['graph']}: "
        f"{result['kernel_ms_per_call']:.1f} ms of kernel time per call"
    )
    print(f"{'operator':28} {'ms/call':>8} {'share':>6} {'nodes':>6}")
    for op in result["ops"][:15]:
        print(f"{op['op']:28} {op['ms_per_call']:8.2f} {100 * op['share']:5.1f}% {op['nodes']:6d}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
