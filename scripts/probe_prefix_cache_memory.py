"""What stateless chat traffic leaves behind in memory, and whether ``BROOK_CHAT_PREFIX_CACHE_IDLE_S`` gives it back.

Starts ``brook serve`` (default models) with the given idle time, prints its RSS and KV slots in use at idle, then
runs ``--clients`` OpenAI-route clients (``POST /v1/chat/completions``, streaming, the whole history resent every
turn) of ``--turns`` turns with 64-token greedy replies, and prints RSS and slots right after the load and every
``--every`` seconds for ``--watch`` seconds.

    .venv/bin/python -m scripts.probe_prefix_cache_memory --idle-s 30 [--clients 16] [--turns 4] [--watch 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request

from scripts.bench_common import brook_server, rss_bytes
from scripts.chat_load_clients import OpenAIStreamClient, Sampling

MODEL = "smollm2-135m-instruct"


def slots_in_use(http: str) -> float:
    metrics = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("brook_engine_kv_slots_in_use"))


async def one_client(http: str, session: int, turns: int) -> None:
    client = OpenAIStreamClient(http, MODEL, Sampling(64))
    await client.open()
    for turn in range(turns):
        prompt = f"Session {session}, turn {turn}: tell me about the number {session * 7 + turn} in a few sentences."
        result = await client.turn(session, turn, [{"role": "user", "content": prompt}], 300.0)
        if result.error:
            raise RuntimeError(f"session {session} turn {turn}: {result.error}")


async def load(http: str, clients: int, turns: int) -> None:
    await asyncio.gather(*(one_client(http, session, turns) for session in range(clients)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-s", default="30", help="BROOK_CHAT_PREFIX_CACHE_IDLE_S of the server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--watch", type=float, default=50.0, help="seconds to watch after the load")
    parser.add_argument("--every", type=float, default=10.0)
    args = parser.parse_args()
    with brook_server("prefix-cache-memory", chat_prefix_cache_idle_s=args.idle_s) as server:
        pid = server.process.pid

        def report(when: str) -> None:
            print(f"{when:>12}: RSS {rss_bytes(pid) / 2**20:7.0f} MB, KV slots in use {slots_in_use(server.http):.0f}",
                  flush=True)

        time.sleep(3)
        report("idle")
        asyncio.run(load(server.http, args.clients, args.turns))
        report("after load")
        started = time.monotonic()
        while time.monotonic() - started < args.watch:
            time.sleep(args.every)
            report(f"+{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
