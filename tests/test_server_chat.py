"""`WS /v1/chat` against a real `brook serve`: streaming, KV reuse across turns, cancel, reset, raw generate."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from tests.server_process import RunningServer
from tests.ws_clients import read_reply

GREEDY = {"temperature": 0, "max_tokens": 48}


def test_reply_streams_and_follow_up_reuses_the_cache(brook_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready" and ready["model"] == "smollm2-135m-instruct"
            assert ready["context_length"] >= 2048
            # A question no other test asks: the server is shared, and a request's cache stays behind as a prefix
            # cache that a later session with the same prompt would start from.
            await ws.send(json.dumps({"type": "chat", "messages": [
                {"role": "user", "content": "Which city is the capital of France?"}], **GREEDY}))
            first = await read_reply(ws)
            assert len(first.tokens) >= 3, "the reply streams as several token messages"
            assert "Paris" in first.text
            assert first.done["finish_reason"] == "stop"
            # Only what other sessions of this server cached can be reused: the chat template's start (its default
            # system prompt); the question itself (7 words and the turn's markers) is always computed.
            first_usage, first_timings = first.done["usage"], first.done["timings"]
            assert first_timings["prefill_tokens"] == first_usage["prompt_tokens"] - first_usage["cached_tokens"]
            assert first_timings["prefill_tokens"] >= 8
            assert first.done["usage"]["completion_tokens"] >= len(first.tokens)
            assert first.done["timings"]["ttft_ms"] > 0

            await ws.send(json.dumps({"type": "chat", "messages": [
                {"role": "user", "content": "And what is the capital of Italy?"}], **GREEDY}))
            second = await read_reply(ws)
            usage, timings = second.done["usage"], second.done["timings"]
            assert usage["cached_tokens"] > first.done["usage"]["prompt_tokens"] // 2
            assert timings["prefill_tokens"] == usage["prompt_tokens"] - usage["cached_tokens"]
            assert timings["prefill_tokens"] < 40, "a follow-up turn prefills only its new tokens"
            assert "Rome" in second.text

    asyncio.run(scenario())


def test_cancel_mid_reply_keeps_the_socket_open(brook_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "chat", "messages": [
                {"role": "user", "content": "Write a long story about a dragon."}], "temperature": 0,
                "max_tokens": 400}))
            tokens = 0
            while tokens < 3:
                message = json.loads(await ws.recv())
                tokens += message["type"] == "token"
            await ws.send(json.dumps({"type": "cancel"}))
            while (message := json.loads(await ws.recv()))["type"] == "token":
                tokens += 1
            assert message["type"] == "done" and message["finish_reason"] == "cancelled"
            assert message["usage"]["completion_tokens"] < 400
            # The socket stays usable after a cancel.
            await ws.send(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Say hi."}],
                                      **GREEDY}))
            assert (await read_reply(ws)).done["finish_reason"] in ("stop", "length")

    asyncio.run(scenario())


def test_second_chat_while_streaming_is_refused_and_reset_clears(brook_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            turn = {"type": "chat", "messages": [{"role": "user", "content": "Count to twenty."}], "temperature": 0,
                    "max_tokens": 60}
            await ws.send(json.dumps(turn))
            await ws.send(json.dumps(turn))
            errors, done = [], None
            while done is None:
                message = json.loads(await ws.recv())
                if message["type"] == "error":
                    errors.append(message)
                elif message["type"] == "done":
                    done = message
            assert [e["code"] for e in errors] == ["bad_message"] and "still streaming" in errors[0]["message"]
            await ws.send(json.dumps({"type": "reset"}))
            await ws.send(json.dumps(turn))
            after_reset = await read_reply(ws)
            assert after_reset.done["usage"]["cached_tokens"] == 0
            assert after_reset.done["usage"]["prompt_tokens"] == done["usage"]["prompt_tokens"]

    asyncio.run(scenario())


def test_raw_generate_and_stop_sequence(brook_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "generate", "prompt": "1, 2, 3, 4, 5,", "temperature": 0,
                                      "max_tokens": 30, "stop": ["9"]}))
            reply = await read_reply(ws)
            assert reply.done["finish_reason"] == "stop"
            assert "9" not in reply.text and "6" in reply.text
            await ws.send(json.dumps({"type": "generate", "prompt": "Once upon a time", "temperature": 0,
                                      "max_tokens": 5}))
            limited = await read_reply(ws)
            assert limited.done["finish_reason"] == "length" and limited.done["usage"]["completion_tokens"] == 5

    asyncio.run(scenario())


def test_ignore_eos_generates_exactly_max_tokens(brook_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            turn = {"type": "chat", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0}
            await ws.send(json.dumps({**turn, "max_tokens": 60}))
            natural = await read_reply(ws)
            assert natural.done["finish_reason"] == "stop" and natural.done["usage"]["completion_tokens"] < 60
            await ws.send(json.dumps({"type": "reset"}))
            await ws.send(json.dumps({**turn, "max_tokens": 60, "ignore_eos": True}))
            forced = await read_reply(ws)
            assert forced.done["finish_reason"] == "length"
            assert forced.done["usage"]["completion_tokens"] == 60

    asyncio.run(scenario())


def test_repetition_penalties_over_the_socket(brook_server: RunningServer) -> None:
    """A penalty changes a repetitive reply; one out of range is a bad_message naming it, and the socket stays."""

    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            count = {"type": "generate", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 24}
            await ws.send(json.dumps(count))
            plain = await read_reply(ws)
            await ws.send(json.dumps({**count, "frequency_penalty": 2.0}))
            penalized = await read_reply(ws)
            assert penalized.text != plain.text and penalized.text.count(",") < plain.text.count(","), (
                plain.text, penalized.text)
            await ws.send(json.dumps({**count, "repetition_penalty": 0}))
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["code"] == "bad_message"
            assert "repetition_penalty should be in (0, 10]" in error["message"]
            await ws.send(json.dumps(count))
            assert (await read_reply(ws)).text == plain.text

    asyncio.run(scenario())


def test_token_events_carry_log_probabilities_when_asked(brook_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(f"{brook_server.ws}/v1/chat") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "generate", "prompt": "The capital of France is", "temperature": 0,
                                      "max_tokens": 8, "logprobs": 2}))
            events = []
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "done":
                    break
                events.append(message)
            entries = [entry for event in events for entry in event["logprobs"]]
            assert "".join(event["text"] for event in events) == "".join(entry["token"] for entry in entries)
            assert 0 < len(entries) <= message["usage"]["completion_tokens"]  # an end-of-turn token shows no text
            for entry in entries:
                assert set(entry) == {"id", "token", "logprob", "top"} and entry["logprob"] <= 0
                assert len(entry["top"]) == 2 and entry["top"][0]["id"] == entry["id"]  # greedy: the best one
            await ws.send(json.dumps({"type": "generate", "prompt": "The capital of France is", "temperature": 0,
                                      "max_tokens": 8}))
            plain = await read_reply(ws)
            assert plain.text == "".join(event["text"] for event in events)

    asyncio.run(scenario())
