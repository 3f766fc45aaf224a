"""The chat socket's writer waits for the next reply or a shutdown, and leaves no task behind when cancelled."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from app.engine.text_events import Generation
from app.server.ws_chat import ChatSessionState, _next_reply_unless_stopped


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)  # no wait_for: it would add a task of its own (pytest-timeout guards hangs)


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {cast(asyncio.Task[Any], asyncio.current_task())}


def test_the_next_reply_is_returned_and_both_waits_are_gone() -> None:
    async def body() -> None:
        session = ChatSessionState()
        reply = cast(Generation, object())
        session.replies.put_nowait(reply)
        assert await _next_reply_unless_stopped(session) is reply
        assert not other_tasks()

    run(body())


def test_a_shutdown_request_returns_none() -> None:
    async def body() -> None:
        session = ChatSessionState()
        session.stop_requested.set()
        assert await _next_reply_unless_stopped(session) is None
        assert not other_tasks()
        assert session.replies.empty()

    run(body())


def test_a_cancelled_writer_leaves_no_pending_wait_behind() -> None:
    """A writer cancelled while it waits (the client went away) used to leave its Queue.get() and Event.wait()
    tasks pending until garbage collection ("Task was destroyed but it is pending!" in the server log)."""

    async def body() -> None:
        session = ChatSessionState()
        waiting = asyncio.create_task(_next_reply_unless_stopped(session))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not other_tasks()

    run(body())
