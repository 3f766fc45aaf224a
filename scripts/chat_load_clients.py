"""Streaming chat clients for ``scripts/bench_chat_load.py``: one multi-turn conversation each, timed per turn.

- ``BrookChatSocket``: Brook's native ``WS /v1/chat``; the conversation lives in the server's session, so each turn
  sends only the new messages, and ``done.usage`` reports ``prompt_tokens``/``cached_tokens``/``completion_tokens``.
- ``OpenAIStreamClient``: ``POST /v1/chat/completions`` with ``"stream": true`` (Server-Sent Events), the whole
  history every turn, as any OpenAI client does. It is a small asyncio HTTP/1.1 client (chunked or close-delimited
  bodies), so the benchmark's own CPU cost per token stays low and needs no extra dependency. It reads what each
  server adds to its chunks: ``usage`` (with ``stream_options.include_usage``) and llama-server's ``timings``
  (``cache_n``, ``prompt_n``, ``predicted_n``).

Every turn returns a ``TurnResult``; failures are recorded in it (``error``), never raised.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect

Message = dict[str, str]


@dataclass
class TurnResult:
    """One assistant reply as the client saw it (times are ``time.monotonic()`` seconds)."""

    session: int
    turn: int
    sent_at: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    done_at: float | None = None
    content_chunks: int = 0  # messages/chunks with non-empty text
    completion_tokens: int | None = None  # as the server reports it
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count, else the number of non-empty chunks (one token each)."""
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time after the first (one stream's decode rate)."""
        if self.first_token_at is None or self.last_token_at is None or self.tokens < 2:
            return None
        span = self.last_token_at - self.first_token_at
        return (self.tokens - 1) / span if span > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "turn": self.turn,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            "decode_tok_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 2),
            "tokens": self.tokens,
            "chunks": self.content_chunks,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "error": self.error,
        }


@dataclass
class Sampling:
    """What every system is asked for: greedy, ``max_tokens``, plus per-system fields (e.g. ``ignore_eos``)."""

    max_tokens: int
    extra: Mapping[str, Any] = field(default_factory=dict)


class ChatClient(Protocol):
    async def open(self) -> None: ...

    async def turn(self, session: int, index: int, new_messages: list[Message], timeout_s: float) -> TurnResult: ...

    async def close(self) -> None: ...


class BrookChatSocket:
    """One conversation on Brook's ``WS /v1/chat``: each turn sends only the messages it adds."""

    def __init__(self, ws_url: str, model: str, sampling: Sampling, *, version: int | None = None) -> None:
        self._url = f"{ws_url}/v1/chat?model={model}" + ("" if version is None else f"&version={version}")
        self._sampling = sampling
        self._socket: ClientConnection | None = None

    async def open(self) -> None:
        self._socket = await connect(self._url, max_size=None, open_timeout=60)
        ready = json.loads(await self._socket.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected a ready message, got {ready}")

    async def turn(self, session: int, index: int, new_messages: list[Message], timeout_s: float) -> TurnResult:
        assert self._socket is not None, "open() first"
        request = {
            "type": "chat",
            "messages": new_messages,
            "max_tokens": self._sampling.max_tokens,
            "temperature": 0,
            "seed": 0,
            **self._sampling.extra,
        }
        result = TurnResult(session, index, time.monotonic())
        try:
            await asyncio.wait_for(self._stream(json.dumps(request), result), timeout_s)
        except (TimeoutError, OSError, RuntimeError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.done_at = time.monotonic()
        return result

    async def _stream(self, request: str, result: TurnResult) -> None:
        assert self._socket is not None
        await self._socket.send(request)
        result.sent_at = time.monotonic()
        async for raw in self._socket:
            now = time.monotonic()
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "token" and message.get("text"):
                _note_text(result, str(message["text"]), now)
            elif kind == "done":
                usage = message.get("usage") or {}
                result.completion_tokens = usage.get("completion_tokens")
                result.prompt_tokens = usage.get("prompt_tokens")
                result.cached_tokens = usage.get("cached_tokens")
                result.finish_reason = message.get("finish_reason")
                return
            elif kind == "error":
                raise RuntimeError(f"{message.get('code')}: {message.get('message')}")
        raise RuntimeError("the socket closed before done")

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()


class OpenAIStreamClient:
    """One conversation over ``POST /v1/chat/completions`` streaming: every turn sends the whole history."""

    def __init__(self, http_url: str, model: str, sampling: Sampling) -> None:
        parts = urlsplit(http_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._model = model
        self._sampling = sampling
        self._history: list[Message] = []

    async def open(self) -> None:
        self._history = []

    async def turn(self, session: int, index: int, new_messages: list[Message], timeout_s: float) -> TurnResult:
        self._history.extend(new_messages)
        body = {
            "model": self._model,
            "messages": self._history,
            "max_tokens": self._sampling.max_tokens,
            "temperature": 0,
            "seed": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling.extra,
        }
        result = TurnResult(session, index, time.monotonic())
        try:
            await asyncio.wait_for(self._stream(body, result), timeout_s)
        except (TimeoutError, OSError, RuntimeError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.done_at = time.monotonic()
        self._history.append({"role": "assistant", "content": result.text})
        return result

    async def _stream(self, body: Mapping[str, Any], result: TurnResult) -> None:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        try:
            payload = json.dumps(body).encode()
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
            result.sent_at = time.monotonic()
            async for data in _sse_data(reader):
                if data == "[DONE]":
                    return
                _note_chunk(result, json.loads(data), time.monotonic())
            raise RuntimeError("the stream ended before [DONE]")
        finally:
            writer.close()

    async def close(self) -> None:
        self._history = []


def _note_text(result: TurnResult, text: str, now: float) -> None:
    if result.first_token_at is None:
        result.first_token_at = now
    result.last_token_at = now
    result.content_chunks += 1
    result.text += text


def _note_chunk(result: TurnResult, chunk: Mapping[str, Any], now: float) -> None:
    if "error" in chunk:
        raise RuntimeError(f"stream error: {chunk['error']}")
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            _note_text(result, str(content), now)
        if choice.get("finish_reason"):
            result.finish_reason = str(choice["finish_reason"])
    usage = chunk.get("usage")
    if usage:
        result.completion_tokens = usage.get("completion_tokens")
        result.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            result.cached_tokens = details["cached_tokens"]
    timings = chunk.get("timings")
    if timings and "cache_n" in timings:  # llama-server: cache_n reused + prompt_n computed = the whole prompt
        result.cached_tokens = int(timings["cache_n"])
        result.prompt_tokens = int(timings["cache_n"]) + int(timings.get("prompt_n", 0))
        if "predicted_n" in timings and result.completion_tokens is None:
            result.completion_tokens = int(timings["predicted_n"])


async def _sse_data(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """The ``data:`` payloads of an HTTP/1.1 Server-Sent-Events response (after checking its status)."""
    status_line = (await reader.readline()).decode("latin-1").strip()
    headers: dict[str, str] = {}
    while line := (await reader.readline()).decode("latin-1").strip():
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status_line.split(" ")[1:2] != ["200"]:
        body = await reader.read(4000)
        raise RuntimeError(f"{status_line}: {body.decode(errors='replace')[:500]}")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    async for piece in _body_pieces(reader, chunked):
        buffer += decoder.decode(piece)
        while "\n\n" in buffer or "\r\n\r\n" in buffer:
            buffer = buffer.replace("\r\n", "\n")
            event, _, buffer = buffer.partition("\n\n")
            for line in event.split("\n"):
                if line.startswith("data:"):
                    yield line[5:].strip()


async def _body_pieces(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readline()  # the CRLF after each chunk
