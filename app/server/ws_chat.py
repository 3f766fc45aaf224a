"""`WS /v1/chat`: token streaming. JSON `chat`/`generate`/`cancel`/`reset` in; `token` and `done` out.

The session keeps one conversation (and so its KV cache) for its lifetime; each `chat` sends only new messages.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

from app.engine.text_engine import TextEngine
from app.engine.text_events import Generation, GenerationDone, TokenDelta
from app.errors import ContextLengthError, ProtocolError
from app.protocol import (
    WS_1003_UNSUPPORTED_DATA,
    ChatControl,
    ChatTurn,
    RawGenerate,
    parse_chat_message,
    parse_chat_params,
)
from app.server.pinned_versions import acquire_served
from app.server.state import ServerState
from app.server.text_requests import logprob_entries, record_generation, sampling_params
from app.server.ws_session import (
    Connection,
    close_normally,
    run_reader_writer,
    serve_websocket,
)
from app.text.sampling import SamplingParamsError

logger = logging.getLogger(__name__)
ENDPOINT = "chat"


@dataclass
class ChatSessionState:
    """What the reader and writer of one chat socket share."""

    current: Generation | None = None  # the reply streaming now (set by the reader, cleared by the writer)
    replies: asyncio.Queue[Generation] = field(default_factory=asyncio.Queue)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)  # graceful shutdown


async def chat_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.brook
    await serve_websocket(websocket, ENDPOINT, state.settings.max_chat_sessions, _session)


async def _session(connection: Connection) -> None:
    state = connection.state
    params = parse_chat_params(dict(connection.websocket.query_params), default_model=state.settings.chat_model)
    served = await acquire_served(state.registry, params.model, params.version, task="text-generation",
                                  connection=connection)
    engine: TextEngine = served.engine
    conversation = engine.open_conversation()
    labels = (ENDPOINT, served.name, str(served.version))
    state.metrics.sessions.labels(*labels).inc()
    state.metrics.sessions_total.labels(*labels).inc()
    session = ChatSessionState()

    def on_shutdown() -> None:
        if session.current is not None:
            session.current.cancel()
        session.stop_requested.set()

    connection.on_shutdown = on_shutdown
    try:
        await connection.send({
            "type": "ready", "session_id": uuid.uuid4().hex, "model": served.name, "version": served.version,
            "context_length": engine.context_length,
        })
        await run_reader_writer(_read(connection, engine, conversation, session),
                                _write(connection, session, served.name, served.version, engine.token_bytes))
    finally:
        engine.close_conversation(conversation)
        state.metrics.sessions.labels(*labels).dec()


async def _read(connection: Connection, engine: TextEngine, conversation: Any, session: ChatSessionState) -> None:
    while True:
        frame = await connection.receive()
        if frame.data is not None:
            raise ProtocolError("bad_message", "/v1/chat takes JSON text frames; got a binary frame",
                                close_code=WS_1003_UNSUPPORTED_DATA)
        try:
            message = parse_chat_message(frame.text or "")
            if isinstance(message, ChatControl):
                _control(message, engine, conversation, session)
                continue
            if session.current is not None:
                raise ProtocolError("bad_message", "a reply is still streaming; wait for done or send cancel first")
            generation = _start(message, engine, conversation)
        except ProtocolError as exc:
            await connection.send_error(exc.code, exc.message)
            continue
        except ContextLengthError as exc:
            await connection.send_error("context_exceeded", str(exc))
            continue
        except (SamplingParamsError, ValueError) as exc:
            await connection.send_error("bad_message", str(exc))
            continue
        session.current = generation
        session.replies.put_nowait(generation)


def _start(message: ChatTurn | RawGenerate, engine: TextEngine, conversation: Any) -> Generation:
    params = sampling_params(message.sampling)
    if isinstance(message, ChatTurn):
        return engine.chat(conversation, [(m.role, m.content) for m in message.messages], params)
    return engine.complete(message.prompt, params)


def _control(message: ChatControl, engine: TextEngine, conversation: Any, session: ChatSessionState) -> None:
    if message.type == "cancel":
        if session.current is not None:
            session.current.cancel()
    elif message.type == "reset":
        if session.current is not None:
            session.current.cancel()
        engine.reset(conversation)


async def _write(
    connection: Connection, session: ChatSessionState, model: str, version: int, token_bytes: Callable[[int], bytes]
) -> None:
    metrics = connection.state.metrics
    while True:
        generation = await _next_reply_unless_stopped(session)
        if generation is None:
            await close_normally(connection, "shutdown")
            return
        try:
            async for item in generation:
                if isinstance(item, TokenDelta):
                    if item.text:
                        event: dict[str, Any] = {"type": "token", "text": item.text}
                        if item.logprobs:
                            event["logprobs"] = logprob_entries(item.logprobs, token_bytes, openai=False)
                        await connection.send(event)
                elif isinstance(item, GenerationDone):
                    record_generation(metrics, model, version, item)
                    await connection.send(done_message(item))
        finally:
            session.current = None


async def _next_reply_unless_stopped(session: ChatSessionState) -> Generation | None:
    """The next reply to stream, or None once a shutdown asked the session to stop. Both waits are cancelled and
    awaited however this returns (a cancelled writer used to leave them pending: "Task was destroyed but it is
    pending!" in the server log)."""
    next_reply = asyncio.ensure_future(session.replies.get())
    stop = asyncio.ensure_future(session.stop_requested.wait())
    try:
        done, _ = await asyncio.wait({next_reply, stop}, return_when=asyncio.FIRST_COMPLETED)
        return next_reply.result() if next_reply in done else None
    finally:
        for waiter in (next_reply, stop):
            waiter.cancel()
        await asyncio.gather(next_reply, stop, return_exceptions=True)


def done_message(done: GenerationDone) -> dict[str, Any]:
    timings = done.timings
    return {
        "type": "done",
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens,
                  "cached_tokens": done.usage.cached_tokens},
        "timings": {"ttft_ms": round(timings.ttft_ms, 1), "tokens_per_s": round(timings.tokens_per_s, 1),
                    "prefill_tokens": timings.prefill_tokens, "prefill_ms": round(timings.prefill_ms, 1),
                    "decode_ms": round(timings.decode_ms, 1), "draft_tokens": timings.draft_tokens,
                    "accepted_draft_tokens": timings.accepted_draft_tokens},
    }
