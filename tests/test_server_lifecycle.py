"""Isolation under concurrency, cleanup after disconnects, and graceful shutdown, against a real `brook serve`."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.audio import load_audio
from app.repository import ModelRepository
from app.speech.wer import word_error_rate
from tests.conftest import ALL_MODELS, ARTIFACT_DIR, require_models
from tests.server_process import RunningServer, run_server
from tests.ws_clients import chat_once, pcm16, stream_audio

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 2 plus 2?", "Who wrote Hamlet?",
    "What is the largest planet?", "Name a fruit that is yellow.", "What is H2O?", "How many legs has a spider?",
]
SPEECH = ["telephone", "meeting_dev00", "meeting_tst00", "telephone", "meeting_dev00", "meeting_tst00",
          "telephone", "meeting_dev00"]
GREEDY = {"temperature": 0, "max_tokens": 32}


def engine_active(server: RunningServer) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.http}/metrics") as response:
        text = response.read().decode()
    pattern = re.compile(r'^brook_engine_active\{model="([^"]+)",version="(\d+)"\} ([0-9.e+]+)$', re.MULTILINE)
    return {f"{m}@{v}": float(value) for m, v, value in pattern.findall(text)}


def test_eight_speech_and_eight_chat_sessions_stay_isolated(
    brook_server: RunningServer, speech_clips: dict[str, Path]
) -> None:
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    clips = {name: load_audio(speech_clips[name])[: 16000 * 15] for name in set(SPEECH)}

    async def alone() -> list[str]:
        return [(await chat_once(f"{brook_server.ws}/v1/chat", m, **GREEDY)).text for m in messages]

    async def together() -> tuple[list[Any], list[Any]]:
        speech = [stream_audio(f"{brook_server.ws}/v1/listen", clips[name], speed=2.0) for name in SPEECH]
        chats = [chat_once(f"{brook_server.ws}/v1/chat", m, **GREEDY) for m in messages]
        results = await asyncio.gather(*speech, *chats)
        return list(results[: len(SPEECH)]), list(results[len(SPEECH):])

    expected_chat = asyncio.run(alone())
    speech_results, chat_results = asyncio.run(together())
    assert [r.text for r in chat_results] == expected_chat, "greedy replies in a batch equal the same run alone"
    by_clip: dict[str, list[str]] = {}
    for name, result in zip(SPEECH, speech_results, strict=True):
        assert result.of("final"), (name, result.events)
        by_clip.setdefault(name, []).append(result.final_text)
    for name, texts in by_clip.items():
        for text in texts[1:]:
            assert word_error_rate(texts[0], text) <= 0.1, (name, texts)
    for a in by_clip:
        for b in by_clip:
            if a != b:
                assert word_error_rate(by_clip[a][0], by_clip[b][0]) > 0.5, "transcripts must not cross sessions"


def test_disconnects_free_engine_state_and_memory(brook_server: RunningServer, speech_clips: dict[str, Path]) -> None:
    speech = pcm16(load_audio(speech_clips["telephone"])[: 16000 * 6])

    async def drop_mid_reply() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Tell a long story."}],
                                      "max_tokens": 300, "temperature": 0}))
            while json.loads(await ws.recv())["type"] != "token":
                pass
        # leaving the block closes the socket mid-reply

    async def drop_mid_speech() -> None:
        async with connect(f"{brook_server.ws}/v1/listen") as ws:
            await ws.recv()
            for offset in range(0, len(speech), 6400):
                await ws.send(speech[offset : offset + 6400])

    async def cycles(count: int) -> None:
        for _ in range(count):
            await asyncio.gather(drop_mid_reply(), drop_mid_speech())

    asyncio.run(cycles(5))  # warm up allocators and caches
    asyncio.run(asyncio.sleep(2))
    baseline = brook_server.rss_bytes()
    asyncio.run(cycles(25))
    asyncio.run(asyncio.sleep(3))
    assert all(v == 0 for v in engine_active(brook_server).values()), engine_active(brook_server)
    growth = brook_server.rss_bytes() - baseline
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB over 25 connect/disconnect cycles"


def test_sigterm_flushes_finals_and_closes_1001(model_repository: ModelRepository,
                                                speech_clips: dict[str, Path]) -> None:
    require_models(model_repository, "whisper-tiny-en", "silero-vad", "smollm2-135m-instruct")
    audio = load_audio(speech_clips["telephone"])[: 16000 * 8]
    with run_server(ARTIFACT_DIR / "logs", models=ALL_MODELS) as server:
        async def scenario() -> tuple[list[dict[str, Any]], int | None, list[dict[str, Any]], int | None]:
            listen = await connect(f"{server.ws}/v1/listen")
            chat = await connect(f"{server.ws}/v1/chat")
            await listen.recv()
            await chat.recv()
            await chat.send(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Tell a story."}],
                                        "max_tokens": 500, "temperature": 0}))
            await listen.send(pcm16(audio))
            await asyncio.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)

            async def drain(ws: Any) -> list[dict[str, Any]]:
                out = []
                try:
                    async for raw in ws:
                        out.append(json.loads(raw))
                except ConnectionClosed:
                    pass
                return out

            listen_messages, chat_messages = await asyncio.gather(drain(listen), drain(chat))
            return listen_messages, listen.close_code, chat_messages, chat.close_code

        listen_messages, listen_code, chat_messages, chat_code = asyncio.run(scenario())
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the exit status says SIGTERM.
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    kinds = [m["type"] for m in listen_messages]
    assert "final" in kinds and kinds[-1] == "end", kinds
    assert listen_code == 1001
    done = [m for m in chat_messages if m["type"] == "done"]
    assert done and done[-1]["finish_reason"] in ("cancelled", "stop", "length")
    assert chat_code == 1001
    assert np.all([m["type"] in ("token", "done") for m in chat_messages])
