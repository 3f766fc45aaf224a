"""Chat load benchmark: N concurrent multi-turn conversations against Brook and two llama.cpp anchors.

    .venv/bin/python -m scripts.bench_chat_load [--systems brook-ws,brook-openai,llama-server,llama-cpp-python]
        [--levels 1,2,4,8,16] [--turns 3] [--max-tokens 64] [--json docs/bench/chat_load.json]
        [--stagger-ms 25] [--think-ms 0] [--brook-env KEY=VALUE ...] [--brook-version N]
        [--llama-server-args "--poll 0"]
        [--anchor-env OMP_WAIT_POLICY=passive] [--system-prompt short|long]
        [--resume] [--render]

    smoke test:  .venv/bin/python -m scripts.bench_chat_load --levels 1,2 --turns 2 --max-tokens 16 \\
                     --json test-artifacts/chat_load_smoke.json

Setup of the anchors (once; both live under .bench/, never committed):
``bash scripts/build_llama_server.sh`` (llama.cpp's ``llama-server`` from the llama-cpp-python 0.3.36 sdist) and
``bash scripts/setup_llamacpp_server.sh`` (llama-cpp-python 0.3.36's server in its own venv).

Systems, all on the same SmolLM2-135M-Instruct Q4_1 GGUF (Brook converts it to ONNX) and ``--threads`` (2):

- ``brook-ws``: ``brook serve`` (only the chat model loaded), driven through its native ``WS /v1/chat``: the
  conversation's KV cache stays in the session, each turn sends only the new user message;
- ``brook-openai``: the same server through ``POST /v1/chat/completions`` streaming (the whole history each turn,
  as the anchors get it; Brook's HTTP route is stateless, so it re-prefills the history);
- ``llama-server``: llama.cpp's server with ``-np N -cb`` (N parallel slots = the level, continuous batching),
  ``-t/-tb threads``, ``-c N x per-slot context``; it keeps each slot's KV cache (``cache_prompt``);
- ``llama-cpp-python``: ``python -m llama_cpp.server`` (one request at a time), ``n_threads = n_threads_batch``,
  ``--interrupt_requests false`` (its default, True, aborts the running stream whenever another request arrives:
  concurrent sessions would get empty replies instead of waiting their turn).

Every (level, system) pair runs on a freshly started server (llama-server needs ``-np N`` anyway), after one short
warm-up reply. Levels run in order and the systems interleave inside each level; the JSON is rewritten after every
pair, and ``--resume`` skips the pairs already in it.

Workload per level N: N sessions start ``--stagger-ms`` apart (default 25); each holds a ``--turns``-turn
conversation, pausing ``--think-ms`` (default 0: a closed loop, the most load) between a reply and its next turn.
Turn 1 is a system message plus a ~100-token user message (a distinct topic per session; ~125 prompt tokens with
the chat template) asking for a long essay; later turns are short follow-ups ("continue…"). Every reply is
greedy (temperature 0) and asks for ``--max-tokens``. Every system is told to ignore end-of-sequence (Brook and
llama-server ``ignore_eos``, llama-cpp-python a -100 logit bias on SmolLM2's end tokens) so each reply has exactly
``--max-tokens`` tokens (``--no-ignore-eos`` turns that off; the table shows the tokens per reply).

Measured per level and system:

- TTFT (request sent -> first non-empty text) p50/p95, for first turns and for later turns (with history);
- per-stream decode tokens/s: (tokens - 1) / (last text - first text) of each reply, median over replies;
- aggregate tokens/s: all completion tokens / wall time of the level (first session start to last reply end);
- cached-token reuse of later turns: cached / prompt tokens, as each server reports it (Brook's WebSocket
  ``usage.cached_tokens``; llama-server's ``timings.cache_n``; Brook's HTTP route and llama-cpp-python report none);
- errors (failed turns and turns never run), the server's CPU seconds and CPU ms per token (less sensitive to other
  load than tokens/s), and the 1-minute load average before and after.

The arrival pattern decides TTFT at high N: N first turns that arrive together queue behind each other's prefill
(16 x ~125 tokens is ~2000 tokens of prefill, seconds on 2 cores for any of these systems), so a TTFT target needs
a stated ``--stagger-ms``/``--think-ms``; throughput is measured best with the defaults (closed loop).

Summary against issue 8's chat targets: Brook's one-stream decode >= 1.3x llama-server's (level 1), aggregate
tokens/s at the highest level >= 1.7x llama-server's, and TTFT p95 <= 300 ms at 16 sessions. The JSON keeps
machine facts, the exact commands, per-level rows and every raw TTFT (for CDF plots).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from scripts.bench_common import (
    BENCH_DIR,
    DOCS_BENCH_DIR,
    ServerProcess,
    brook_server,
    cpu_seconds,
    free_port,
    load_average,
    machine_facts,
    percentile,
    process_server,
    write_json,
)
from scripts.chat_load_clients import (
    BrookChatSocket,
    ChatClient,
    Message,
    OpenAIStreamClient,
    Sampling,
    TurnResult,
)

logger = logging.getLogger("bench_chat_load")

MODEL_NAME: Final = "smollm2-135m-instruct"
SYSTEMS: Final = ("brook-ws", "brook-openai", "llama-server", "llama-cpp-python")
DEFAULT_JSON: Final = DOCS_BENCH_DIR / "chat_load.json"
LLAMA_SERVER_BIN: Final = BENCH_DIR / "llama" / "llama-server"
LLAMACPP_PYTHON: Final = BENCH_DIR / "llamacpp-venv" / "bin" / "python"
SMOLLM2_END_TOKEN_IDS: Final = (0, 2)  # <|endoftext|>, <|im_end|> (the GGUF's eos_token_id is 2)
DECODE_TARGET: Final = 1.3  # one stream's decode >= 1.3x llama.cpp's
AGGREGATE_TARGET: Final = 1.7  # aggregate tokens/s at 16 sessions >= 1.7x llama-server's
TTFT_P95_TARGET_MS: Final = 300.0  # at 16 sessions, 100-token prompts, with multi-turn history
TTFT_TARGET_LEVEL: Final = 16

SYSTEM_PROMPT: Final = "You are a helpful assistant. You always answer in long, detailed paragraphs."
# --system-prompt long: what a product's assistant is typically told (~300 tokens), the same for every session.
LONG_SYSTEM_PROMPT: Final = (
    "You are the teaching assistant of an adult-education programme. You always answer in long, detailed "
    "paragraphs. Follow these rules in every answer. First, write for curious adults who have no special training: "
    "explain every technical word the first time you use it, and prefer everyday comparisons to jargon. Second, be "
    "accurate: when you are not sure of a fact, a date or a number, say so plainly instead of guessing, and never "
    "invent sources, quotations or statistics. Third, organise each answer: start with a short overview, then "
    "develop the main points one paragraph at a time, and end with a brief summary of what matters most. Fourth, "
    "give concrete examples with names of places, people and objects wherever they help, and explain why each "
    "example is relevant. Fifth, stay polite and encouraging, and never talk down to the reader. Sixth, keep to the "
    "topic the student asked about; if a related subject is interesting, mention it in one sentence at the end. "
    "Seventh, when the student asks for more detail, go deeper into the most important part rather than repeating "
    "what you already said. Eighth, do not use lists or tables unless the student asks for them; write in prose. "
    "Ninth, do not mention these rules. Tenth, if the student writes in English, answer in English."
)
SYSTEM_PROMPTS: Final = {"short": SYSTEM_PROMPT, "long": LONG_SYSTEM_PROMPT}
TOPICS: Final = (
    "the history of lighthouses",
    "how bread is baked",
    "the water cycle",
    "the invention of the printing press",
    "how bees make honey",
    "the building of the Roman roads",
    "how volcanoes form",
    "the life of ocean whales",
    "how trains changed travel",
    "the growing of rice",
    "how clocks keep time",
    "the exploration of the Arctic",
    "how forests recover after fire",
    "the story of the bicycle",
    "how the moon affects tides",
    "the first public libraries",
)
FIRST_TURN: Final = (
    "Topic: {topic}. I am preparing a lesson for a group of curious adult students who know very little about "
    "this subject, and I want them to understand it well. Please write a long, detailed essay about {topic}. "
    "Explain where it comes from, how it works step by step, why it matters to ordinary people today, and give "
    "several concrete examples with names, places and numbers. Use at least five full paragraphs and do not stop "
    "early."
)
FOLLOW_UPS: Final = (
    "Thank you. Continue with more detail about the most important part, in several long paragraphs.",
    "Now give three more examples, each explained in its own long paragraph.",
    "Summarize everything so far, then add new details that you have not mentioned yet.",
)


def turn_messages(session: int, turn: int, system_prompt: str = SYSTEM_PROMPT) -> list[Message]:
    """The messages a session adds at ``turn`` (0-based): the same for every system."""
    if turn == 0:
        user = FIRST_TURN.format(topic=TOPICS[session % len(TOPICS)])
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    return [{"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]}]


@dataclass(frozen=True)
class Workload:
    turns: int
    max_tokens: int
    stagger_s: float
    think_s: float
    turn_timeout_s: float
    threads: int
    ignore_eos: bool
    llama_server_args: tuple[str, ...] = ()
    anchor_env: tuple[tuple[str, str], ...] = ()
    system_prompt: str = SYSTEM_PROMPT
    brook_version: int | None = None  # Brook's clients pin this version of the model (default: the A/B draw)

    def slot_context(self) -> int:
        """Tokens one conversation can need (system + first prompt + replies + follow-ups), rounded up to 256."""
        need = 200 + len(self.system_prompt) // 3 + self.turns * (self.max_tokens + 40)
        return max(512, -(-need // 256) * 256)


@dataclass
class LevelRun:
    results: list[TurnResult]
    never_run: int
    wall_s: float
    cpu_s: float


def _process_tree_cpu(pid: int) -> float:
    total = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        total += cpu_seconds(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError):
                for child in (task / "children").read_text().split():
                    total += _process_tree_cpu(int(child))
    return total


async def _conversation(
    make_client: Callable[[], ChatClient], session: int, workload: Workload, delay_s: float
) -> tuple[list[TurnResult], int]:
    await asyncio.sleep(delay_s)
    client = make_client()
    results: list[TurnResult] = []
    try:
        await asyncio.wait_for(client.open(), workload.turn_timeout_s)
    except (TimeoutError, OSError, RuntimeError, ValueError) as exc:
        failed = TurnResult(session, 0, time.monotonic(), error=f"open: {type(exc).__name__}: {exc}")
        return [failed], workload.turns - 1
    try:
        for turn in range(workload.turns):
            messages = turn_messages(session, turn, workload.system_prompt)
            result = await client.turn(session, turn, messages, workload.turn_timeout_s)
            results.append(result)
            if result.error is not None:
                return results, workload.turns - turn - 1
            if turn + 1 < workload.turns:
                await asyncio.sleep(workload.think_s)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return results, 0


async def _run_level(
    make_client: Callable[[], ChatClient], sessions: int, workload: Workload
) -> tuple[list[TurnResult], int, float]:
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(_conversation(make_client, s, workload, s * workload.stagger_s) for s in range(sessions))
    )
    wall = time.monotonic() - started
    results = [result for turn_results, _ in outcomes for result in turn_results]
    return results, sum(skipped for _, skipped in outcomes), wall


async def _warm_up(make_client: Callable[[], ChatClient]) -> None:
    client = make_client()
    await client.open()
    result = await client.turn(-1, 0, [{"role": "user", "content": "Say hello."}], 120.0)
    await client.close()
    if result.error is not None:
        raise RuntimeError(f"warm-up failed: {result.error}")


def measure_level(
    server: ServerProcess, make_client: Callable[[], ChatClient], sessions: int, workload: Workload
) -> LevelRun:
    asyncio.run(_warm_up(make_client))
    cpu_before = _process_tree_cpu(server.pid)
    results, never_run, wall = asyncio.run(_run_level(make_client, sessions, workload))
    cpu = _process_tree_cpu(server.pid) - cpu_before
    return LevelRun(results, never_run, wall, cpu)


@contextlib.contextmanager
def start_system(
    system: str, sessions: int, workload: Workload, brook_env: dict[str, str], gguf: Path
) -> Iterator[tuple[ServerProcess, Callable[[], ChatClient], list[str]]]:
    """The system's server for one level, a client factory, and the command (for the record)."""
    if system in ("brook-ws", "brook-openai"):
        settings = {"models": MODEL_NAME, "chat_threads": str(workload.threads), **brook_env}
        with brook_server(system, **settings) as server:
            sampling = Sampling(workload.max_tokens, {"ignore_eos": True} if workload.ignore_eos else {})
            command = [f"BROOK_{k.upper()}={v}" for k, v in settings.items()] + ["brook", "serve", "--no-fetch"]
            version = workload.brook_version
            if system == "brook-ws":
                yield server, lambda: BrookChatSocket(server.ws, MODEL_NAME, sampling, version=version), command
            else:
                pinned = MODEL_NAME if version is None else f"{MODEL_NAME}@{version}"
                yield server, lambda: OpenAIStreamClient(server.http, pinned, sampling), command
        return
    port = free_port()
    threads = str(workload.threads)
    if system == "llama-server":
        command = [str(LLAMA_SERVER_BIN), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        command += ["-np", str(sessions), "-cb", "-t", threads, "-tb", threads]
        command += ["-c", str(sessions * workload.slot_context()), *workload.llama_server_args]
        extra: dict[str, Any] = {"ignore_eos": True} if workload.ignore_eos else {}
        ready = "/health"
    elif system == "llama-cpp-python":
        command = [str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--n_threads", threads, "--n_threads_batch", threads]
        command += ["--n_ctx", str(max(2048, workload.slot_context())), "--interrupt_requests", "false"]
        bias = {str(token): -100.0 for token in SMOLLM2_END_TOKEN_IDS}
        extra = {"logit_bias": bias} if workload.ignore_eos else {}
        ready = "/v1/models"
    else:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    env = dict(workload.anchor_env)
    with process_server(system, command, port, ready_path=ready, env=env) as server:
        sampling = Sampling(workload.max_tokens, extra)
        recorded = [f"{key}={value}" for key, value in env.items()] + command
        yield server, lambda: OpenAIStreamClient(server.http, MODEL_NAME, sampling), recorded


def _ms(values: Sequence[float], fraction: float) -> float | None:
    return round(percentile(values, fraction) * 1000, 1) if values else None


def summarize_level(system: str, sessions: int, run: LevelRun, load_before: float) -> dict[str, Any]:
    ok = [r for r in run.results if r.error is None]
    first = [r.ttft_s for r in ok if r.turn == 0 and r.ttft_s is not None]
    later = [r.ttft_s for r in ok if r.turn > 0 and r.ttft_s is not None]
    decode = [rate for r in ok if (rate := r.decode_tokens_per_s) is not None]
    # First turns write new text; later turns ("continue", "summarize") repeat some of it, which speculative
    # decoding (Brook's BROOK_CHAT_DRAFT_TOKENS, llama-server's --spec-type) turns into speed: shown apart.
    decode_first = [rate for r in ok if r.turn == 0 and (rate := r.decode_tokens_per_s) is not None]
    decode_later = [rate for r in ok if r.turn > 0 and (rate := r.decode_tokens_per_s) is not None]
    tokens = sum(r.tokens for r in run.results)
    later_ok = [r for r in ok if r.turn > 0]
    reuse = None
    if later_ok and all(r.cached_tokens is not None and r.prompt_tokens for r in later_ok):
        reuse = sum(r.cached_tokens or 0 for r in later_ok) / sum(r.prompt_tokens or 0 for r in later_ok)
    first_prompts = [r.prompt_tokens for r in ok if r.turn == 0 and r.prompt_tokens is not None]
    return {
        "system": system,
        "sessions": sessions,
        "replies": len(ok),
        "errors": len(run.results) - len(ok) + run.never_run,
        "error_samples": sorted({r.error for r in run.results if r.error is not None})[:3],
        "ttft_first_p50_ms": _ms(first, 0.5),
        "ttft_first_p95_ms": _ms(first, 0.95),
        "ttft_later_p50_ms": _ms(later, 0.5),
        "ttft_later_p95_ms": _ms(later, 0.95),
        "ttft_all_p95_ms": _ms(first + later, 0.95),
        "decode_tok_s_p50": round(statistics.median(decode), 2) if decode else None,
        "decode_tok_s_min": round(min(decode), 2) if decode else None,
        "decode_tok_s_first_p50": round(statistics.median(decode_first), 2) if decode_first else None,
        "decode_tok_s_later_p50": round(statistics.median(decode_later), 2) if decode_later else None,
        "aggregate_tok_s": round(tokens / run.wall_s, 2) if run.wall_s > 0 else None,
        "tokens": tokens,
        "tokens_per_reply": round(tokens / len(run.results), 1) if run.results else None,
        "first_prompt_tokens": round(statistics.mean(first_prompts), 1) if first_prompts else None,
        "later_cached_fraction": None if reuse is None else round(reuse, 3),
        "wall_s": round(run.wall_s, 2),
        "server_cpu_s": round(run.cpu_s, 2),
        "cpu_ms_per_token": round(run.cpu_s * 1000 / tokens, 2) if tokens else None,
        "load_before": round(load_before, 2),
        "load_after": round(load_average(), 2),
        "ttft_ms": {
            "first": [round(v * 1000, 2) for v in first],
            "later": [round(v * 1000, 2) for v in later],
        },
        "turns": [r.to_json() for r in run.results],
    }


def _row(rows: Sequence[dict[str, Any]], system: str, sessions: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["system"] == system and r["sessions"] == sessions), None)


def _field(row: dict[str, Any] | None, key: str) -> float | None:
    value = None if row is None else row.get(key)
    return None if value is None else float(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def summarize_targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 8's chat targets, for each Brook route, against llama-server from the same run."""
    levels = sorted({r["sessions"] for r in rows})
    top = levels[-1] if levels else None
    summary: dict[str, Any] = {"top_level": top}
    for brook in ("brook-ws", "brook-openai"):
        one, anchor_one = _row(rows, brook, 1), _row(rows, "llama-server", 1)
        many = _row(rows, brook, top) if top is not None else None
        anchor_many = _row(rows, "llama-server", top) if top is not None else None
        at16 = _row(rows, brook, TTFT_TARGET_LEVEL)
        decode = _ratio(_field(one, "decode_tok_s_p50"), _field(anchor_one, "decode_tok_s_p50"))
        aggregate = _ratio(_field(many, "aggregate_tok_s"), _field(anchor_many, "aggregate_tok_s"))
        ttft = at16["ttft_all_p95_ms"] if at16 else None
        summary[brook] = {
            "decode_ratio_1_session": decode,
            "decode_target_met": None if decode is None else decode >= DECODE_TARGET,
            "aggregate_ratio_top_level": aggregate,
            "aggregate_target_met": None if aggregate is None or top != 16 else aggregate >= AGGREGATE_TARGET,
            "ttft_p95_ms_16_sessions": ttft,
            "ttft_target_met": None if ttft is None else ttft <= TTFT_P95_TARGET_MS,
        }
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


TABLE_COLUMNS: Final = (
    ("system", "system"),
    ("sessions", "N"),
    ("ttft_first_p50_ms", "TTFT1 p50"),
    ("ttft_first_p95_ms", "TTFT1 p95"),
    ("ttft_later_p50_ms", "TTFTn p50"),
    ("ttft_later_p95_ms", "TTFTn p95"),
    ("decode_tok_s_p50", "stream tok/s"),
    ("decode_tok_s_first_p50", "turn1 tok/s"),
    ("decode_tok_s_later_p50", "turnN tok/s"),
    ("aggregate_tok_s", "aggr tok/s"),
    ("tokens_per_reply", "tok/reply"),
    ("later_cached_fraction", "cached"),
    ("cpu_ms_per_token", "CPU ms/tok"),
    ("errors", "err"),
    ("load_before", "load"),
)


def render_table(payload: dict[str, Any]) -> str:
    rows = sorted(payload["rows"], key=lambda r: (r["sessions"], SYSTEMS.index(r["system"])))
    cells = [[title for _, title in TABLE_COLUMNS]] + [[_fmt(r.get(k)) for k, _ in TABLE_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append("TTFT1 = first turns (system + ~100-token prompt), TTFTn = later turns (with history), in ms;")
    lines.append("cached = cached / prompt tokens of later turns as the server reports it (- = not reported).")
    for brook in ("brook-ws", "brook-openai"):
        target = payload.get("summary", {}).get(brook)
        if target and any(r["system"] == brook for r in rows):
            lines.append(
                f"{brook}: decode {_fmt(target['decode_ratio_1_session'])}x llama-server at N=1 (target >= "
                f"{DECODE_TARGET}), aggregate {_fmt(target['aggregate_ratio_top_level'])}x at N="
                f"{payload['summary']['top_level']} (target >= {AGGREGATE_TARGET} at 16), TTFT p95 at 16: "
                f"{_fmt(target['ttft_p95_ms_16_sessions'])} ms (target <= {TTFT_P95_TARGET_MS:.0f})"
            )
    return "\n".join(lines)


def _parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option} wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _brook_settings(pairs: Sequence[str]) -> dict[str, str]:
    """``--brook-env`` pairs as ``brook_server`` keywords (``BROOK_`` prefix optional, any case)."""
    return {k.removeprefix("BROOK_").lower(): v for k, v in _parse_pairs(pairs, "--brook-env").items()}


def _check_anchors(systems: Sequence[str]) -> None:
    if "llama-server" in systems and not LLAMA_SERVER_BIN.exists():
        raise SystemExit(f"{LLAMA_SERVER_BIN} is missing: run `bash scripts/build_llama_server.sh` first")
    if "llama-cpp-python" in systems and not LLAMACPP_PYTHON.exists():
        raise SystemExit(f"{LLAMACPP_PYTHON} is missing: run `bash scripts/setup_llamacpp_server.sh` first")


RESUME_KEYS: Final = ("turns", "max_tokens", "threads", "stagger_ms", "think_ms", "brook_version")


def _check_same_workload(previous: dict[str, Any], args: argparse.Namespace) -> None:
    """``--resume`` only adds rows measured with the same workload."""
    for key in RESUME_KEYS:
        if key in previous and previous[key] != getattr(args, key):
            raise SystemExit(f"--resume: {args.json} was run with {key}={previous[key]}, not {getattr(args, key)}")


def _smollm2_gguf() -> Path:
    from tests.model_paths import smollm2_gguf  # the cache `brook models fetch` fills; skips/fails loudly

    return smollm2_gguf()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ", ".join(SYSTEMS))
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent sessions per level")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens asked for per reply")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every system")
    parser.add_argument("--stagger-ms", type=float, default=25.0, help="delay between session starts")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause between a reply and the next turn")
    parser.add_argument("--turn-timeout", type=float, default=300.0, help="seconds before a turn counts as failed")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let every system stop at end-of-sequence")
    parser.add_argument("--llama-server-args", default="", help='extra llama-server flags, e.g. "--poll 0"')
    parser.add_argument(
        "--anchor-env", action="append", default=[], help="environment of both anchors: K=V (OMP_WAIT_POLICY=passive)"
    )
    parser.add_argument("--brook-env", action="append", default=[], help="BROOK_* setting for brook serve: K=V")
    parser.add_argument(
        "--brook-version", type=int, default=None, help="Brook's clients pin this model version (default: A/B draw)"
    )
    parser.add_argument("--system-prompt", choices=sorted(SYSTEM_PROMPTS), default="short",
                        help="every session's system prompt: short (~20 tokens) or long (~300, a product's rules)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output JSON")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    parser.add_argument("--render", action="store_true", help="only print the table of --json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.render:
        print(render_table(json.loads(args.json.read_text())))
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    levels = [int(level) for level in args.levels.split(",")]
    _check_anchors(systems)
    workload = Workload(
        args.turns,
        args.max_tokens,
        args.stagger_ms / 1000,
        args.think_ms / 1000,
        args.turn_timeout,
        args.threads,
        not args.no_ignore_eos,
        tuple(shlex.split(args.llama_server_args)),
        tuple(_parse_pairs(args.anchor_env, "--anchor-env").items()),
        SYSTEM_PROMPTS[args.system_prompt],
        args.brook_version,
    )
    brook_env = _brook_settings(args.brook_env)
    gguf = _smollm2_gguf()
    rows: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    if args.resume and args.json.exists():
        previous = json.loads(args.json.read_text())
        _check_same_workload(previous.get("workload", {}), args)
        rows, commands = list(previous["rows"]), dict(previous.get("commands", {}))
    payload: dict[str, Any] = {
        "benchmark": "chat_load",
        "command": " ".join([Path(sys.executable).name, "-m", "scripts.bench_chat_load", *(argv or sys.argv[1:])]),
        "machine": machine_facts(),
        "workload": {
            "systems": systems,
            "levels": levels,
            "turns": args.turns,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "stagger_ms": args.stagger_ms,
            "think_ms": args.think_ms,
            "anchors_ignore_eos": workload.ignore_eos,
            "llama_server_args": list(workload.llama_server_args),
            "anchor_env": dict(workload.anchor_env),
            "brook_env": brook_env,
            "brook_version": args.brook_version,
            "gguf": gguf.name,
            "system_prompt": workload.system_prompt,
            "first_turn_template": FIRST_TURN,
            "follow_ups": list(FOLLOW_UPS),
        },
        "commands": commands,
        "rows": rows,
    }
    for sessions in levels:
        for system in systems:
            if _row(rows, system, sessions) is not None:
                logger.info("%s at %d sessions: already in %s, skipped", system, sessions, args.json)
                continue
            logger.info("%s at %d sessions ...", system, sessions)
            load_before = load_average()
            with start_system(system, sessions, workload, brook_env, gguf) as (server, make_client, command):
                run = measure_level(server, make_client, sessions, workload)
            payload["commands"][system] = " ".join(command)
            row = summarize_level(system, sessions, run, load_before)
            rows.append(row)
            logger.info(
                "%s N=%d: TTFT p95 %s ms, stream %s tok/s, aggregate %s tok/s, errors %d",
                system,
                sessions,
                row["ttft_all_p95_ms"],
                row["decode_tok_s_p50"],
                row["aggregate_tok_s"],
                row["errors"],
            )
            payload["summary"] = summarize_targets(rows)
            write_json(args.json, payload)
    payload["summary"] = summarize_targets(rows)
    payload["machine"]["load_average_1m_end"] = load_average()
    write_json(args.json, payload)
    print(render_table(payload))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
