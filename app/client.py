"""Terminal clients for a running Brook server: `brook listen` (speech) and `brook chat --url` (tokens)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from app.audio import MODEL_SAMPLE_RATE_HZ, load_audio
from app.errors import AudioError, BrookError

CHUNK_SECONDS = 0.1


class ServerError(BrookError):
    """The server answered with an `error` message."""


def with_query(url: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


async def _file_chunks(path: Path, speed: float) -> AsyncIterator[bytes]:
    audio = load_audio(path)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    step = int(CHUNK_SECONDS * MODEL_SAMPLE_RATE_HZ)
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        if speed > 0:
            due = started + index * CHUNK_SECONDS / speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        yield pcm[offset : offset + step].tobytes()


async def _mic_chunks() -> AsyncIterator[bytes]:
    """Raw 16 kHz PCM16 from the default microphone through `arecord` (ALSA) or `sox`."""
    if shutil.which("arecord"):
        command = ["arecord", "-q", "-f", "S16_LE", "-r", str(MODEL_SAMPLE_RATE_HZ), "-c", "1", "-t", "raw"]
    elif shutil.which("sox"):
        command = ["sox", "-q", "-d", "-t", "raw", "-r", str(MODEL_SAMPLE_RATE_HZ), "-e", "signed", "-b", "16",
                   "-c", "1", "-"]
    else:
        raise AudioError("--mic needs `arecord` (alsa-utils) or `sox` on the PATH")
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        while chunk := await process.stdout.read(int(CHUNK_SECONDS * MODEL_SAMPLE_RATE_HZ) * 2):
            yield chunk
    finally:
        process.terminate()


async def _send_audio(ws: ClientConnection, chunks: AsyncIterator[bytes]) -> None:
    async for chunk in chunks:
        await ws.send(chunk)
    await ws.send(json.dumps({"type": "end"}))


def _print_event(event: dict[str, Any], out: TextIO, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event, ensure_ascii=False), file=out, flush=True)
        return
    kind = event.get("type")
    if kind == "partial":
        print(f"\r\033[K… {event['text']}", end="", file=out, flush=True)
    elif kind == "final":
        print(f"\r\033[K[{event['start']:7.2f} → {event['end']:7.2f}] {event['text']}", file=out, flush=True)


async def listen(url: str, source: Path | None, *, speed: float, token: str | None, as_json: bool,
                 out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Stream a file (or the microphone when `source` is None) and print transcripts. Returns the finals."""
    finals: list[dict[str, Any]] = []
    async with connect(with_query(url, token=token), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        if ready.get("type") == "error":
            raise ServerError(f"{ready['code']}: {ready['message']}")
        if as_json:  # every server message, the ready one (session, version, settings) included
            _print_event(ready, out, as_json)
        chunks = _file_chunks(source, speed) if source is not None else _mic_chunks()
        sender = asyncio.create_task(_send_audio(ws, chunks))
        try:
            async for raw in ws:
                event = json.loads(raw)
                if event.get("type") == "error":
                    raise ServerError(f"{event['code']}: {event['message']}")
                _print_event(event, out, as_json)
                if event.get("type") == "final":
                    finals.append(event)
                if event.get("type") == "end":
                    break
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return finals


async def chat_remote(url: str, *, token: str | None, sampling: Mapping[str, Any],
                      stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Interactive multi-turn chat with a server's /v1/chat; the server keeps the conversation. ``sampling`` holds
    the sampling fields sent with every turn (docs/protocol.md); the server checks their ranges."""
    async with connect(with_query(url, token=token)) as ws:
        ready = json.loads(await ws.recv())
        if ready.get("type") == "error":
            raise ServerError(f"{ready['code']}: {ready['message']}")
        print(f"connected to {ready['model']} v{ready['version']} (context {ready['context_length']} tokens); "
              "empty line or Ctrl-D quits, /reset clears the conversation", file=out)
        loop = asyncio.get_running_loop()
        while True:
            print("you> ", end="", file=out, flush=True)
            line = (await loop.run_in_executor(None, stdin.readline)).strip()
            if not line:
                return
            if line == "/reset":
                await ws.send(json.dumps({"type": "reset"}))
                continue
            request: dict[str, Any] = {"type": "chat", "messages": [{"role": "user", "content": line}], **sampling}
            await ws.send(json.dumps(request))
            print("bot> ", end="", file=out, flush=True)
            async for raw in ws:
                event = json.loads(raw)
                if event["type"] == "token":
                    print(event["text"], end="", file=out, flush=True)
                elif event["type"] == "done":
                    timings, usage = event["timings"], event["usage"]
                    print(f"\n  [{event['finish_reason']}; {usage['completion_tokens']} tokens, "
                          f"{usage['cached_tokens']} cached; ttft {timings['ttft_ms']:.0f} ms, "
                          f"{timings['tokens_per_s']:.1f} tok/s]", file=out)
                    break
                elif event["type"] == "error":
                    print(f"\n  error {event['code']}: {event['message']}", file=out)
                    break
