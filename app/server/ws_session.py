"""What every Brook WebSocket endpoint shares: admission (auth, origin, capacity), sending, receiving with limits,
and the one place where exceptions become error messages and close codes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.errors import (
    AudioError,
    ContextLengthError,
    EngineDeadError,
    ModelError,
    OverloadedError,
    ProtocolError,
    UnknownModelError,
)
from app.protocol import (
    WS_1000_NORMAL_CLOSURE,
    WS_1001_GOING_AWAY,
    WS_1007_INVALID_FRAME_PAYLOAD_DATA,
    WS_1008_POLICY_VIOLATION,
    WS_1009_MESSAGE_TOO_BIG,
    WS_1011_INTERNAL_ERROR,
    WS_1013_TRY_AGAIN_LATER,
    error_message,
)
from app.server.auth import is_authorized, is_origin_allowed
from app.server.state import ServerState

logger = logging.getLogger(__name__)


class ClientGone(Exception):  # noqa: N818 (an end-of-stream signal, like WebSocketDisconnect)
    """The client disconnected (or the transport failed). Normal end of a session: nothing more is sent."""


@dataclass(frozen=True)
class Frame:
    text: str | None
    data: bytes | None


class Connection:
    """One accepted WebSocket: serialised sends, receives with idle timeout and size limit."""

    def __init__(self, websocket: WebSocket, state: ServerState, endpoint: str) -> None:
        self.websocket = websocket
        self.state = state
        self.endpoint = endpoint
        self._send_lock = asyncio.Lock()
        self.on_shutdown: Callable[[], None] | None = None  # set by the session: how to flush and finish
        self.closed = asyncio.Event()

    def request_shutdown(self) -> None:
        """Graceful shutdown: ask the session to flush (speech finals, replies) and close with 1001."""
        if self.on_shutdown is not None:
            self.on_shutdown()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            if self.websocket.application_state is not WebSocketState.CONNECTED:
                raise ClientGone()
            try:
                await self.websocket.send_text(json.dumps(message, ensure_ascii=False))
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:
                raise ClientGone() from exc

    async def send_error(self, code: str, message: str) -> None:
        self.state.metrics.errors.labels(self.endpoint, code).inc()
        await self.send(error_message(code, message))

    async def close(self, code: int, reason: str = "") -> None:
        async with self._send_lock:
            if self.websocket.application_state is WebSocketState.CONNECTED:
                with suppress(OSError, RuntimeError):
                    await self.websocket.close(code, reason[:120])

    async def receive(self) -> Frame:
        """The next frame. Raises ClientGone on disconnect, ProtocolError on idle timeout or an oversized frame."""
        try:
            message = await asyncio.wait_for(self.websocket.receive(), timeout=self.state.settings.idle_timeout_s)
        except TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {self.state.settings.idle_timeout_s:g} s; send "
                                '{"type":"keepalive"} to keep an idle session open',
                                close_code=WS_1001_GOING_AWAY) from None
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            raise ClientGone() from exc
        if message["type"] == "websocket.disconnect":
            raise ClientGone()
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len((text or "").encode())
        limit = self.state.settings.max_frame_bytes
        if size > limit:
            raise ProtocolError("too_large", f"frames may hold at most {limit} bytes, got {size}",
                                close_code=WS_1009_MESSAGE_TOO_BIG)
        return Frame(text=text, data=data)


def _query(websocket: WebSocket) -> dict[str, str]:
    return dict(websocket.query_params)


async def _deny(websocket: WebSocket, status: int, code: str, message: str, retry_after: int | None = None) -> None:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    await websocket.send_denial_response(
        JSONResponse({"type": "error", "code": code, "message": message}, status_code=status, headers=headers)
    )


@asynccontextmanager
async def admitted(websocket: WebSocket, endpoint: str, limit: int) -> AsyncIterator[Connection | None]:
    """Admission control before `accept()`: origin, capacity (HTTP 503 + Retry-After). Yields None when refused.

    Auth failures are answered after accepting, with an `unauthorized` error and close 1008, so that browsers
    (which cannot read a refused handshake's status) can show the reason.
    """
    state: ServerState = websocket.app.state.brook
    settings = state.settings
    headers = {k.lower(): v for k, v in websocket.headers.items()}
    if state.shutting_down:
        state.metrics.rejected.labels(endpoint, "shutting_down").inc()
        await _deny(websocket, 503, "overloaded", "the server is shutting down", settings.retry_after_s)
        yield None
        return
    if not is_origin_allowed(settings.allowed_origins, headers):
        state.metrics.rejected.labels(endpoint, "origin").inc()
        await _deny(websocket, 403, "unauthorized", f"origin {headers.get('origin')!r} is not allowed")
        yield None
        return
    if state.open_sessions[endpoint] >= limit:
        state.metrics.rejected.labels(endpoint, "capacity").inc()
        await _deny(websocket, 503, "overloaded", f"{endpoint} is at its limit of {limit} concurrent sessions; "
                    f"retry in {settings.retry_after_s} s", settings.retry_after_s)
        yield None
        return
    state.open_sessions[endpoint] += 1
    connection = Connection(websocket, state, endpoint)
    try:
        await websocket.accept()
        if not is_authorized(settings.api_keys, headers, _query(websocket)):
            await connection.send_error("unauthorized", "a valid API key is required: send 'Authorization: Bearer "
                                        "<key>' or add ?token=<key> to the URL")
            await connection.close(WS_1008_POLICY_VIOLATION, "unauthorized")
            yield None
            return
        state.connections.add(connection)
        yield connection
    finally:
        state.connections.discard(connection)
        state.open_sessions[endpoint] -= 1
        connection.closed.set()


async def serve_websocket(websocket: WebSocket, endpoint: str, limit: int,
                          session: Callable[[Connection], Awaitable[None]]) -> None:
    """The whole life of one endpoint's socket: admission, then `session`, with errors translated once."""
    async with admitted(websocket, endpoint, limit) as connection:
        if connection is not None:
            await run_translating_errors(connection, lambda: session(connection))


async def run_translating_errors(connection: Connection, body: Callable[[], Awaitable[None]]) -> None:
    """Run a session body; translate every exception once into an error message and a close code."""
    try:
        await body()
    except ClientGone:
        return
    except ProtocolError as exc:
        await _fatal(connection, exc.code, exc.message, exc.close_code or WS_1008_POLICY_VIOLATION)
    except AudioError as exc:
        await _fatal(connection, "bad_audio", str(exc), WS_1007_INVALID_FRAME_PAYLOAD_DATA)
    except UnknownModelError as exc:
        await _fatal(connection, "unknown_model", str(exc), WS_1008_POLICY_VIOLATION)
    except ModelError as exc:
        await _fatal(connection, "unknown_model", str(exc), WS_1008_POLICY_VIOLATION)
    except ContextLengthError as exc:
        await _fatal(connection, "context_exceeded", str(exc), WS_1008_POLICY_VIOLATION)
    except OverloadedError as exc:
        await _fatal(connection, "overloaded", str(exc), WS_1013_TRY_AGAIN_LATER)
    except EngineDeadError as exc:
        code = WS_1001_GOING_AWAY if connection.state.shutting_down else WS_1011_INTERNAL_ERROR
        await _fatal(connection, "internal" if code == WS_1011_INTERNAL_ERROR else "overloaded", str(exc), code)
    except Exception:
        logger.exception("internal error in %s session", connection.endpoint)
        await _fatal(connection, "internal", "internal server error; the session was closed", WS_1011_INTERNAL_ERROR)
        raise


async def _fatal(connection: Connection, code: str, message: str, close_code: int) -> None:
    try:
        await connection.send_error(code, message)
    except ClientGone:
        return
    await connection.close(close_code, code)


async def close_normally(connection: Connection, reason: str = "done") -> None:
    """Close after the session's last message: 1000, or 1001 when the server is shutting down."""
    code = WS_1001_GOING_AWAY if connection.state.shutting_down else WS_1000_NORMAL_CLOSURE
    await connection.close(code, "server shutting down" if connection.state.shutting_down else reason)


async def drain_connections(state: ServerState, grace_s: float) -> None:
    """Stop admitting sessions, ask every open one to flush and close, and wait up to `grace_s` for them."""
    state.shutting_down = True
    connections = list(state.connections)
    for connection in connections:
        connection.request_shutdown()
    if connections:
        logger.info("waiting up to %.0f s for %d session(s) to flush", grace_s, len(connections))
        waits = [asyncio.ensure_future(c.closed.wait()) for c in connections]
        _, pending = await asyncio.wait(waits, timeout=grace_s)
        for wait in pending:
            wait.cancel()
        if pending:
            logger.warning("%d session(s) did not finish within %.0f s", len(pending), grace_s)


async def run_reader_writer(reader: Awaitable[None], writer: Awaitable[None]) -> None:
    """Run a session's reader and writer together. The writer ends the session; a reader that returns normally
    (the client said `end`) lets the writer finish. The first exception from either cancels the other and is
    re-raised as it is, so that `run_translating_errors` sees the real cause."""
    reader_task = asyncio.ensure_future(reader)
    writer_task = asyncio.ensure_future(writer)
    pending: set[asyncio.Future[None]] = {reader_task, writer_task}
    try:
        while not writer_task.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    finally:
        for task in (reader_task, writer_task):
            task.cancel()
        await asyncio.gather(reader_task, writer_task, return_exceptions=True)
