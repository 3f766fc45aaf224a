"""Small real-`websockets` clients used by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

CHUNK_S = 0.1


@dataclass
class ListenResult:
    ready: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    sent_until: list[float] = field(default_factory=list)  # wall time when each chunk was sent

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    @property
    def final_text(self) -> str:
        return " ".join(e["text"] for e in self.of("final")).strip()


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


async def stream_audio(url: str, audio: np.ndarray, *, speed: float, rate: int = 16000,
                       chunk_s: float = CHUNK_S, send_end: bool = True) -> ListenResult:
    """Send `audio` (already at `rate`) as PCM16 chunks, paced at `speed` × real time (0 = no pacing)."""
    async with connect(url, max_size=None) as ws:
        result = ListenResult(ready=json.loads(await ws.recv()))
        if result.ready.get("type") != "ready":
            result.events.append(result.ready)
            return result

        async def send() -> None:
            step = int(chunk_s * rate)
            started = time.monotonic()
            for index, offset in enumerate(range(0, len(audio), step)):
                if speed > 0:
                    await asyncio.sleep(max(0.0, started + index * chunk_s / speed - time.monotonic()))
                await ws.send(pcm16(audio[offset : offset + step]))
                result.sent_until.append(time.monotonic())
            if send_end:
                await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        try:
            async for raw in ws:
                event = json.loads(raw)
                event["_received"] = time.monotonic()
                result.events.append(event)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        result.close_code = ws.close_code
        return result


@dataclass
class Reply:
    tokens: list[str]
    done: dict[str, Any]

    @property
    def text(self) -> str:
        return "".join(self.tokens)


async def read_reply(ws: Any) -> Reply:
    tokens: list[str] = []
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "token":
            tokens.append(message["text"])
        elif message["type"] == "done":
            return Reply(tokens, message)
        else:
            raise AssertionError(f"unexpected message while reading a reply: {message}")


async def chat_once(url: str, messages: list[dict[str, str]], **sampling: Any) -> Reply:
    async with connect(url) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        await ws.send(json.dumps({"type": "chat", "messages": messages, **sampling}))
        return await read_reply(ws)
