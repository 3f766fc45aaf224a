"""Every documented error code and close code, against a real `brook serve`."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.repository import ModelRepository
from tests.conftest import ARTIFACT_DIR, require_models
from tests.server_process import RunningServer, run_server


async def exchange(url: str, *frames: str | bytes, max_size: int | None = None) -> tuple[list[dict[str, Any]],
                                                                                       int | None]:
    """Send frames after `ready`; collect messages until the server closes (or 3 s of quiet)."""
    messages: list[dict[str, Any]] = []
    async with connect(url, max_size=max_size) as ws:
        messages.append(json.loads(await ws.recv()))
        for frame in frames:
            await ws.send(frame)
        try:
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=3)))
        except (ConnectionClosed, TimeoutError):
            pass
        return messages, ws.close_code


def errors_of(messages: list[dict[str, Any]]) -> list[str]:
    return [m["code"] for m in messages if m["type"] == "error"]


def test_malformed_json_is_recoverable_on_both_endpoints(brook_server: RunningServer) -> None:
    for path in ("/v1/listen", "/v1/chat"):
        messages, code = asyncio.run(exchange(f"{brook_server.ws}{path}", "{oops", '{"type": "nonsense"}',
                                              '{"type": "keepalive"}'))
        assert errors_of(messages) == ["bad_message", "bad_message"]
        assert code is None, "the socket stays open after a recoverable error"


def test_binary_frame_on_chat_closes_1003(brook_server: RunningServer) -> None:
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/chat", b"\x00\x01\x02"))
    assert errors_of(messages) == ["bad_message"] and code == 1003


def test_odd_byte_count_for_pcm16_closes_1007(brook_server: RunningServer) -> None:
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/listen", b"\x00\x01\x02"))
    assert errors_of(messages) == ["bad_audio"] and code == 1007
    assert "whole 2-byte samples; got 3 bytes" in messages[-1]["message"]


def test_nan_in_f32le_closes_1007(brook_server: RunningServer) -> None:
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/listen?encoding=f32le", b"\x00\x00\xc0\x7f"))
    assert errors_of(messages) == ["bad_audio"] and code == 1007


def test_bad_query_parameters_close_1008(brook_server: RunningServer) -> None:
    for query, expected in (("sample_rate=96000", "bad_audio"), ("encoding=opus", "bad_audio"),
                            ("interim_results=perhaps", "bad_message")):
        messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/listen?{query}"))
        assert errors_of(messages) == [expected] and code == 1008, query


def test_oversized_frame_closes_1009(brook_server: RunningServer) -> None:
    frame = b"\x00" * (1024 * 1024 + 2)  # one byte pair over the default 1 MiB limit
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/listen", frame))
    assert errors_of(messages) == ["too_large"] and code == 1009


def test_unknown_model_and_version_close_1008(brook_server: RunningServer) -> None:
    for path in ("/v1/listen?model=whisper-huge", "/v1/listen?version=9", "/v1/chat?model=whisper-tiny-en",
                 "/v1/chat?model=gpt-5"):
        messages, code = asyncio.run(exchange(f"{brook_server.ws}{path}"))
        assert errors_of(messages) == ["unknown_model"] and code == 1008, path


def test_pinned_version_is_reported_in_ready(brook_server: RunningServer) -> None:
    # v2 (A/B weight 0) may not be loaded yet: the session waits for its load, then is ready on it.
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/listen?version=2", '{"type": "end"}'))
    assert messages[0]["type"] == "ready" and messages[0]["version"] == 2, messages
    assert messages[-1]["type"] == "end" and errors_of(messages) == [] and code == 1000


def test_context_exceeded_is_recoverable(brook_server: RunningServer) -> None:
    huge = "word " * 5000
    turn = json.dumps({"type": "chat", "messages": [{"role": "user", "content": huge}]})
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/chat", turn, '{"type": "keepalive"}'))
    assert errors_of(messages) == ["context_exceeded"] and code is None


def test_bad_sampling_parameters_are_recoverable(brook_server: RunningServer) -> None:
    bad = [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}]
    frames = [json.dumps({"type": "chat", "messages": [{"role": "user", "content": "hi"}], **b}) for b in bad]
    messages, code = asyncio.run(exchange(f"{brook_server.ws}/v1/chat", *frames))
    assert errors_of(messages) == ["bad_message"] * 4 and code is None


@pytest.fixture(scope="module")
def guarded_server(model_repository: ModelRepository) -> Iterator[RunningServer]:
    """A server with API keys, an Origin allow-list, one session per endpoint and a short idle timeout."""
    require_models(model_repository, "whisper-tiny-en", "silero-vad")
    with run_server(ARTIFACT_DIR / "logs", models="whisper-tiny-en,silero-vad", api_keys="k1,k2",
                    allowed_origins="https://app.example", max_listen_sessions="1", idle_timeout_s="2",
                    retry_after_s="7") as server:
        yield server


def open_sessions(server: RunningServer) -> float:
    with urllib.request.urlopen(f"{server.http}/metrics") as response:
        text = response.read().decode()
    return sum(float(value) for value in re.findall(r"^brook_open_sessions\{[^}]*\} ([0-9.e+]+)$", text, re.M))


@pytest.fixture
def guarded(guarded_server: RunningServer) -> RunningServer:
    """The guarded server once the previous test's sessions are gone (it admits one listen session at a time)."""
    deadline = time.monotonic() + 10
    while open_sessions(guarded_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    return guarded_server


def test_wrong_or_missing_token_closes_1008(guarded: RunningServer) -> None:
    for query in ("", "?token=nope"):
        messages, code = asyncio.run(exchange(f"{guarded.ws}/v1/listen{query}"))
        assert errors_of(messages) == ["unauthorized"] and code == 1008


def test_token_or_bearer_header_is_accepted(guarded: RunningServer) -> None:
    messages, _ = asyncio.run(exchange(f"{guarded.ws}/v1/listen?token=k2", '{"type": "end"}'))
    assert messages[0]["type"] == "ready"

    async def with_header() -> str:
        async with connect(f"{guarded.ws}/v1/listen",
                           additional_headers={"Authorization": "Bearer k1"}) as ws:
            return str(json.loads(await ws.recv())["type"])

    assert asyncio.run(with_header()) == "ready"


def test_http_api_requires_the_key(guarded: RunningServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{guarded.http}/v1/models")
    assert info.value.code == 401
    request = urllib.request.Request(f"{guarded.http}/v1/models", headers={"Authorization": "Bearer k1"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{guarded.http}/healthz") as response:
        assert response.status == 200, "health stays open for probes"


def test_foreign_origin_is_refused_with_403(guarded: RunningServer) -> None:
    async def attempt(origin: str) -> int:
        try:
            async with connect(f"{guarded.ws}/v1/listen?token=k1", origin=origin) as ws:  # type: ignore[arg-type]
                await ws.recv()
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(attempt("https://evil.example")) == 403
    assert asyncio.run(attempt("https://app.example")) == 101


def test_over_capacity_handshake_gets_503_with_retry_after(guarded: RunningServer) -> None:
    async def scenario() -> tuple[int, str | None, dict[str, Any]]:
        async with connect(f"{guarded.ws}/v1/listen?token=k1") as first:
            await first.recv()
            try:
                async with connect(f"{guarded.ws}/v1/listen?token=k1"):
                    raise AssertionError("a second session must be refused")
            except InvalidStatus as exc:
                body = json.loads(exc.response.body or b"{}")
                return exc.response.status_code, exc.response.headers.get("Retry-After"), body

    status, retry_after, body = asyncio.run(scenario())
    assert status == 503 and retry_after == "7" and body["code"] == "overloaded"


def test_idle_session_closes_with_idle_timeout(guarded: RunningServer) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        async with connect(f"{guarded.ws}/v1/listen?token=k1") as ws:
            messages = [json.loads(await ws.recv())]
            try:
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=10)))
            except ConnectionClosed:
                pass
            return messages, ws.close_code

    messages, code = asyncio.run(scenario())
    assert errors_of(messages) == ["idle_timeout"] and code == 1001


