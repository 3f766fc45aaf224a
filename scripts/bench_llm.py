"""Benchmark Brook's language-model runner against llama.cpp (llama-cpp-python) on the same SmolLM2 GGUF.

    .venv/bin/python scripts/bench_llm.py [--repeats 5] [--batch-repeats 3] [--versions 1] [--threads 2]

Each engine runs in its own worker process (so peak RSS is its own), loaded once, with the same thread count, and
is driven by this coordinator over a pipe. Measured, greedy (argmax of the logits, no stop: every run does the same
number of forward passes):

- prefill: one forward pass over a fresh 200-token prompt (tokens/s);
- decode: after that prompt, 128 single-token forward passes, each fed the previous argmax (tokens/s, one stream);
- batched decode (Brook only): B sequences, each a different 32-token prompt, then 128 steps in which every sequence
  adds one token; aggregate tokens/s = B * 128 / time, and its ratio to B = 1;
- peak RSS (VmHWM) of each worker after the single-stream runs, and of Brook's worker after the batched runs.

Brook is measured at the model-runner level (``LlamaRunner.step``), like llama.cpp's ``llama_decode`` loop: no
detokenizer, sampler or scheduler on either side (``scripts/bench_text_engine.py`` measures the whole engine).
llama.cpp gets ``n_threads = n_threads_batch = --threads``; Brook ``intra_op_num_threads = --threads``.

Runs are interleaved and repeated: every repeat runs llama.cpp and each Brook version back to back, in a rotating
order, and records the 1-minute load average (``os.getloadavg``) before and after, and each run's CPU time divided
by its wall time (cores actually used; 2.0 = both threads busy the whole time) and per token (CPU ms per token is
less sensitive to other processes than tokens/s, but counts busy-waiting threads as work). Medians are reported,
with the min-max range. OpenBLAS/OpenMP settings are recorded; workers default to ``OPENBLAS_NUM_THREADS=1`` (numpy
is not on either hot path, and idle OpenBLAS threads only add contention).

The table is printed and the raw data written to ``docs/bench/llm.json`` (``--render FILE`` prints an earlier run's
table). Each ratio is median against median, and "best/best" is the fastest run of each engine against each other:
on a shared machine that is the closer estimate of what each does with its cores to itself.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bench_llm")

MODEL_NAME = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "bench" / "llm.json"
PREFILL_TOKENS = 200
DECODE_TOKENS = 128
BATCH_PROMPT_TOKENS = 32
BATCH_SIZES = (1, 4, 16, 32)
RUNNER_MAX_SEQ_LEN = 512  # prompt + decoded tokens of every run fit
LLAMA_CONTEXT_TOKENS = 512
PREFILL_TARGET = 3.0  # issue 3: Brook prefill >= 3x llama.cpp's tokens/s
DECODE_TARGET = 1.3  # issue 3: Brook one-stream decode >= 1.3x llama.cpp's tokens/s
ENV_KEYS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
# Prose for the prompts (any text works; it only has to be long enough for 200 tokens and 32 distinct slices).
PROMPT_TEXT = (
    "The harbour town woke slowly. Fishermen checked their nets by lantern light while the baker pulled the first "
    "loaves from an oven that had been burning since midnight. Gulls argued over scraps on the pier, and the tide, "
    "indifferent to all of it, crept up the stone steps one by one. Mara, who kept the lighthouse at the end of the "
    "breakwater, climbed down from the lamp room with a mug of tea and a notebook full of numbers: wind speeds, wave "
    "heights, the names of ships that had passed in the night. She had kept such notebooks for twenty-two years. "
    "Nobody had ever asked to read them, but she believed that one day somebody would need to know exactly how the "
    "sea had behaved on a particular Tuesday in March, and on that day she would be ready. Her brother thought this "
    "was foolish. He repaired engines in a shed behind the church and trusted only what he could take apart and put "
    "back together. Still, every Sunday he walked out along the breakwater with a basket of apples, and the two of "
    "them sat on the warm stones and argued about the weather, the price of diesel, the new mayor, and whether the "
    "old ferry would survive another winter. The ferry, for its part, said nothing. It had crossed the strait eleven "
    "thousand times and intended to cross it eleven thousand more. Its captain, a quiet woman called Ines, painted "
    "the hull every spring in the same shade of blue, because her father had done so, and his mother before him. "
    "Children waved at it from the cliffs; tourists photographed it; the cook sold hot soup and sandwiches to anyone "
    "brave enough to stand on the open deck when the wind came from the north. In the evenings the town gathered "
    "in the square to listen to the brass band practise, badly and with great enthusiasm, while the sun went down "
    "behind the islands and the first lights came on along the coast."
)


# -- workers -------------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Timer:
    """Wall and CPU seconds of a block."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    _wall0: float = field(default=0.0, repr=False)
    _cpu0: float = field(default=0.0, repr=False)

    def __enter__(self) -> Timer:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.process_time() - self._cpu0


def _timing(timer: Timer, tokens: int) -> dict[str, float]:
    return {"seconds": timer.wall_s, "tokens": tokens, "tokens_per_s": tokens / timer.wall_s,
            "cores_used": timer.cpu_s / timer.wall_s, "cpu_ms_per_token": 1000.0 * timer.cpu_s / tokens}


class LlamaCppWorker:
    """llama.cpp through llama-cpp-python: ``Llama.eval`` (one ``llama_decode``) and the argmax of its logits."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llm: Any = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=LLAMA_CONTEXT_TOKENS, n_batch=LLAMA_CONTEXT_TOKENS, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )
        self.vocab = int(self.llm.n_vocab())
        self.info = {"llama_cpp_python": llama_cpp.__version__,
                     "system_info": llama_cpp.llama_print_system_info().decode().strip()}

    def _argmax(self) -> int:
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab,))
        return int(np.argmax(logits))

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        self.llm.reset()
        with Timer() as prefill:
            self.llm.eval(prompt)
            token = self._argmax()
        generated = [token]
        with Timer() as decode:
            for _ in range(new_tokens):
                self.llm.eval([token])
                token = self._argmax()
                generated.append(token)
        return {"prefill": _timing(prefill, len(prompt)), "decode": _timing(decode, new_tokens),
                "generated": generated}


class BrookWorker:
    """Brook's ``LlamaRunner`` over a converted version from the model repository."""

    def __init__(self, version: int, threads: int, slots: int) -> None:
        from app.paths import default_model_dir
        from app.repository import ModelRepository
        from app.text.llama_runner import LlamaRunner

        loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, version, check_hashes=False)
        config = dict(loaded.manifest.config)
        self.runner = LlamaRunner(loaded.directory, config, intra_op_threads=threads, max_batch_size=slots,
                                  max_seq_len=RUNNER_MAX_SEQ_LEN)
        import onnxruntime

        self.info = {"version": version, "accuracy_level": config.get("accuracy_level"),
                     "onnxruntime": onnxruntime.__version__, "slots": slots}

    def _step(self, rows: Sequence[tuple[int, list[int]]]) -> list[int]:
        from app.text.llama_runner import StepInput

        logits = self.runner.step([StepInput(slot, tokens) for slot, tokens in rows])
        return [int(t) for t in np.argmax(logits, axis=1)]

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        slot = self.runner.allocate_slot()
        try:
            with Timer() as prefill:
                (token,) = self._step([(slot, prompt)])
            generated = [token]
            with Timer() as decode:
                for _ in range(new_tokens):
                    (token,) = self._step([(slot, [token])])
                    generated.append(token)
        finally:
            self.runner.free_slot(slot)
        return {"prefill": _timing(prefill, len(prompt)), "decode": _timing(decode, new_tokens),
                "generated": generated}

    def batch(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        slots = [self.runner.allocate_slot() for _ in prompts]
        try:
            tokens = self._step(list(zip(slots, prompts, strict=True)))
            with Timer() as decode:
                for _ in range(new_tokens):
                    tokens = self._step([(slot, [token]) for slot, token in zip(slots, tokens, strict=True)])
        finally:
            for slot in slots:
                self.runner.free_slot(slot)
        return {"decode": _timing(decode, new_tokens * len(prompts))}


def run_worker(kind: str, args: argparse.Namespace) -> int:
    """Serve JSON-line requests on stdin: generate, batch, rss, quit."""
    started = time.perf_counter()
    worker: LlamaCppWorker | BrookWorker
    if kind == "llamacpp":
        worker = LlamaCppWorker(Path(args.gguf), args.threads)
    else:
        worker = BrookWorker(int(kind.removeprefix("brook-v")), args.threads, max(BATCH_SIZES))
    out = sys.stdout
    hello = {"ready": True, "load_s": time.perf_counter() - started, "rss_mb": _peak_rss_mb(), **worker.info}
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            break
        if op == "generate":
            reply = worker.generate(request["prompt"], request["new_tokens"])
        elif op == "batch" and isinstance(worker, BrookWorker):
            reply = worker.batch(request["prompts"], request["new_tokens"])
        elif op == "rss":
            reply = {}
        else:
            raise SystemExit(f"worker {kind}: unknown op {op!r}")
        reply["peak_rss_mb"] = _peak_rss_mb()
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


# -- coordinator ---------------------------------------------------------------------------------------------------


class WorkerProcess:
    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        env = dict(os.environ)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(args.threads),
                   "--gguf", str(args.gguf)]
        self.kind = kind
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=ROOT)
        self.hello = self._read()
        logger.info("%s ready in %.1f s: %s", kind, self.hello["load_s"], self.hello)

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.kind} exited with code {self.process.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, op: str, **payload: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **payload}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def call_with_load(worker: WorkerProcess, op: str, **payload: Any) -> dict[str, Any]:
    """One worker call, with the 1-minute load average before and after it."""
    before = load_average()
    result = worker.call(op, **payload)
    result["load_before"], result["load_after"] = before, load_average()
    return result


def build_prompts(gguf: Path) -> tuple[list[int], list[list[int]]]:
    """The 200-token prompt and 32 distinct 32-token prompts, tokenized by Brook's tokenizer (the same ids go to
    both engines)."""
    from app.paths import default_model_dir
    from app.repository import ModelRepository
    from app.text.tokenizer import TextTokenizer

    loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, check_hashes=False)
    tokenizer = TextTokenizer.from_files(loaded.directory / "tokenizer.json", loaded.manifest.config)
    ids = tokenizer.encode(PROMPT_TEXT, allow_special=False)
    if len(ids) < PREFILL_TOKENS or len(ids) < BATCH_PROMPT_TOKENS + 7 * max(BATCH_SIZES):
        raise SystemExit(f"PROMPT_TEXT has only {len(ids)} tokens")
    batch_prompts = [ids[7 * i : 7 * i + BATCH_PROMPT_TOKENS] for i in range(max(BATCH_SIZES))]
    return ids[:PREFILL_TOKENS], batch_prompts


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def environment_record(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": " ".join([".venv/bin/python", "scripts/bench_llm.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor()},
        "threads": args.threads,
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
        "worker_env_defaults": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")},
        "numpy_blas": _numpy_blas(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _numpy_blas() -> str:
    try:
        config: Any = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except (TypeError, KeyError):
        return "unknown"


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    prompt, batch_prompts = build_prompts(args.gguf)
    kinds = ["llamacpp", *(f"brook-v{v}" for v in args.versions)]
    workers = {kind: WorkerProcess(kind, args) for kind in kinds}
    result: dict[str, Any] = {"environment": environment_record(args),
                              "workers": {kind: w.hello for kind, w in workers.items()},
                              "config": {"prefill_tokens": len(prompt), "decode_tokens": args.decode_tokens,
                                         "batch_prompt_tokens": BATCH_PROMPT_TOKENS,
                                         "batch_decode_tokens": args.batch_tokens, "batch_sizes": args.batch_sizes,
                                         "repeats": args.repeats, "batch_repeats": args.batch_repeats}}
    try:
        for worker in workers.values():  # one untimed warm-up run each
            worker.call("generate", prompt=prompt, new_tokens=8)
        pairs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            order = kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]
            before = load_average()
            runs = {kind: call_with_load(workers[kind], "generate", prompt=prompt, new_tokens=args.decode_tokens)
                    for kind in order}
            pairs.append({"repeat": repeat, "order": order, "load_before": before, "load_after": load_average(),
                          "runs": runs})
            logger.info("repeat %d (%s): %s", repeat, ", ".join(order), ", ".join(
                f"{k} prefill {r['prefill']['tokens_per_s']:.0f} decode {r['decode']['tokens_per_s']:.1f} tok/s"
                for k, r in runs.items()))
        result["single_stream"] = pairs
        result["peak_rss_mb_single_stream"] = {kind: w.call("rss")["peak_rss_mb"] for kind, w in workers.items()}
        batched: list[dict[str, Any]] = []
        for repeat in range(args.batch_repeats):
            for size in args.batch_sizes:
                for kind in kinds[1:]:
                    run = call_with_load(workers[kind], "batch", prompts=batch_prompts[:size],
                                         new_tokens=args.batch_tokens)
                    batched.append({"repeat": repeat, "kind": kind, "batch": size, **run})
                    logger.info("batch %2d %s: %.1f tok/s (load %.2f -> %.2f)", size, kind,
                                run["decode"]["tokens_per_s"], run["load_before"], run["load_after"])
        result["batched"] = batched
        result["peak_rss_mb_final"] = {kind: w.call("rss")["peak_rss_mb"] for kind, w in workers.items()}
        result["generated_agree"] = _agreement(pairs, kinds)
    finally:
        for worker in workers.values():
            worker.close()
    result["summary"] = summarize_result(result, kinds)
    return result


def _agreement(pairs: list[dict[str, Any]], kinds: list[str]) -> dict[str, int]:
    """How many leading greedy tokens each Brook version shares with llama.cpp (a sanity check, not a target)."""
    reference = pairs[0]["runs"]["llamacpp"]["generated"]
    shared: dict[str, int] = {}
    for kind in kinds[1:]:
        count = 0
        for a, b in zip(reference, pairs[0]["runs"][kind]["generated"], strict=False):
            if a != b:
                break
            count += 1
        shared[kind] = count
    return shared


def summarize_result(result: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in kinds:
        summary[kind] = {
            phase: summarize([p["runs"][kind][phase]["tokens_per_s"] for p in result["single_stream"]])
            for phase in ("prefill", "decode")
        }
        for phase in ("prefill", "decode"):
            for key in ("cores_used", "cpu_ms_per_token"):
                summary[kind][f"{key}_{phase}"] = summarize(
                    [p["runs"][kind][phase][key] for p in result["single_stream"]])
        summary[kind]["peak_rss_mb_single_stream"] = result["peak_rss_mb_single_stream"][kind]
        summary[kind]["peak_rss_mb_final"] = result["peak_rss_mb_final"][kind]
        if kind == "llamacpp":
            continue
        llama = summary["llamacpp"]
        for phase in ("prefill", "decode"):
            summary[kind][f"{phase}_ratio"] = summary[kind][phase]["median"] / llama[phase]["median"]
            # Best run against best run: what each engine does when the other processes leave it its cores.
            summary[kind][f"{phase}_best_ratio"] = summary[kind][phase]["max"] / llama[phase]["max"]
        batches: dict[str, Any] = {}
        for size in result["config"]["batch_sizes"]:
            rates = [b["decode"]["tokens_per_s"] for b in result["batched"] if b["kind"] == kind and b["batch"] == size]
            batches[str(size)] = summarize(rates)
        one = batches[str(min(result["config"]["batch_sizes"]))]["median"]
        for stats in batches.values():
            stats["ratio_to_one_stream"] = stats["median"] / one
        summary[kind]["batched"] = batches
    loads = [p["load_before"] for p in result["single_stream"]] + [p["load_after"] for p in result["single_stream"]]
    loads += [b["load_before"] for b in result["batched"]] + [b["load_after"] for b in result["batched"]]
    summary["load_average"] = summarize(loads)
    return summary


def format_table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    kinds = [k for k in summary if k.startswith("brook")]
    llama = summary["llamacpp"]

    def rate(stats: dict[str, float], digits: int = 0) -> str:
        return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    header = "| metric (median, min-max) | llama.cpp | " + " | ".join(
        f"Brook v{k.removeprefix('brook-v')}" for k in kinds) + " | target |"
    lines = [header, "|" + "---|" * (3 + len(kinds))]
    prefill = result["config"]["prefill_tokens"]
    decode = result["config"]["decode_tokens"]
    lines.append(f"| prefill, {prefill}-token prompt (tok/s) | {rate(llama['prefill'])} | " + " | ".join(
        f"{rate(summary[k]['prefill'])} = **{summary[k]['prefill_ratio']:.2f}x** "
        f"(best/best {summary[k]['prefill_best_ratio']:.2f}x)" for k in kinds) + f" | >= {PREFILL_TARGET:g}x |")
    lines.append(f"| decode, {decode} tokens, one stream (tok/s) | {rate(llama['decode'], 1)} | " + " | ".join(
        f"{rate(summary[k]['decode'], 1)} = **{summary[k]['decode_ratio']:.2f}x** "
        f"(best/best {summary[k]['decode_best_ratio']:.2f}x)" for k in kinds) + f" | >= {DECODE_TARGET:g}x |")
    for phase in ("prefill", "decode"):
        lines.append(f"| {phase}: cores used (CPU time / wall time) | {rate(llama[f'cores_used_{phase}'], 2)} | "
                     + " | ".join(rate(summary[k][f"cores_used_{phase}"], 2) for k in kinds) + " | |")
        lines.append(f"| {phase}: CPU ms per token | {rate(llama[f'cpu_ms_per_token_{phase}'], 2)} | "
                     + " | ".join(rate(summary[k][f"cpu_ms_per_token_{phase}"], 2) for k in kinds) + " | |")
    for size in result["config"]["batch_sizes"]:
        cells = [f"{rate(summary[k]['batched'][str(size)], 1)} = "
                 f"{summary[k]['batched'][str(size)]['ratio_to_one_stream']:.2f}x" for k in kinds]
        lines.append(f"| batched decode, batch {size}: aggregate tok/s (ratio to batch 1) | - | "
                     + " | ".join(cells) + " | |")
    lines.append(f"| peak RSS after single-stream runs (MiB) | {llama['peak_rss_mb_single_stream']:.0f} | "
                 + " | ".join(f"{summary[k]['peak_rss_mb_single_stream']:.0f}" for k in kinds) + " | |")
    lines.append("| peak RSS after batch 32 (MiB) | - | "
                 + " | ".join(f"{summary[k]['peak_rss_mb_final']:.0f}" for k in kinds) + " | |")
    load = summary["load_average"]
    lines.append("")
    lines.append(f"1-minute load average during the runs: median {load['median']:.2f}, range {load['min']:.2f}-"
                 f"{load['max']:.2f} on {result['environment']['machine']['cpus']} CPUs.")
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def default_gguf() -> Path:
    from app.convert.sources import extract_sources
    from app.paths import default_model_dir
    from app.repository import ModelRepository

    spec = ModelRepository(default_model_dir()).spec(MODEL_NAME)
    if spec.source is None:
        raise SystemExit(f"{MODEL_NAME} has no pinned source")
    return extract_sources(spec.source)["model.gguf"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved prefill+decode repeats")
    parser.add_argument("--batch-repeats", type=int, default=3, help="repeats of each batched-decode size")
    parser.add_argument("--versions", type=parse_sizes, default=[1], help="Brook versions, e.g. 1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--batch-tokens", type=int, default=DECODE_TOKENS, help="decode steps of each batched run")
    parser.add_argument("--batch-sizes", type=parse_sizes, default=list(BATCH_SIZES))
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the pinned source)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the table of an earlier run's JSON and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render is not None:
        earlier = json.loads(args.render.read_text(encoding="utf-8"))
        kinds = ["llamacpp", *(k for k in earlier["workers"] if k.startswith("brook"))]
        earlier["summary"] = summarize_result(earlier, kinds)
        sys.stdout.write(format_table(earlier) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if args.gguf is None:
        args.gguf = default_gguf()
    if args.worker is not None:
        return run_worker(args.worker, args)
    if max(args.batch_sizes) > max(BATCH_SIZES):
        raise SystemExit(f"batch sizes above {max(BATCH_SIZES)} need more KV slots")
    result = run_benchmark(args)
    table = format_table(result)
    result["table_markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    sys.stdout.write(table + "\n")
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
