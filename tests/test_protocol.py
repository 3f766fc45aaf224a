"""The wire format, without a server: query parameters, client messages, and server message shapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import ProtocolError
from app.protocol import (
    WS_1008_POLICY_VIOLATION,
    ChatControl,
    ChatTurn,
    RawGenerate,
    parse_chat_message,
    parse_chat_params,
    parse_listen_message,
    parse_listen_params,
    speech_started_message,
    transcript_message,
)


def test_listen_params_defaults() -> None:
    params = parse_listen_params({}, default_model="whisper-tiny-en")
    assert (params.model, params.version, params.sample_rate, params.encoding) == ("whisper-tiny-en", None, 16000,
                                                                                   "pcm_s16le")
    assert params.interim_results is True and params.vad_silence_ms == 500
    assert params.beam_size is None  # the server's setting


def test_listen_params_parse_values() -> None:
    params = parse_listen_params({"model": "m", "version": "2", "sample_rate": "48000", "encoding": "f32le",
                                  "interim_results": "false", "vad_silence_ms": "800", "beam_size": "5"},
                                 default_model="x")
    assert (params.model, params.version, params.sample_rate, params.encoding) == ("m", 2, 48000, "f32le")
    assert params.interim_results is False and params.vad_silence_ms == 800 and params.beam_size == 5


@pytest.mark.parametrize(("query", "code", "fragment"), [
    ({"sample_rate": "4000"}, "bad_audio", "between 8000 and 48000, got 4000"),
    ({"sample_rate": "fast"}, "bad_audio", "must be an integer, got 'fast'"),
    ({"encoding": "mp3"}, "bad_audio", "encoding must be one of pcm_s16le, f32le, got 'mp3'"),
    ({"interim_results": "maybe"}, "bad_message", "must be true or false"),
    ({"vad_silence_ms": "5"}, "bad_message", "between 100 and 10000"),
    ({"beam_size": "0"}, "bad_message", "beam_size must be between 1 and 8, got 0"),
    ({"beam_size": "64"}, "bad_message", "beam_size must be between 1 and 8, got 64"),
    ({"version": "zero"}, "unknown_model", "must be an integer"),
])
def test_listen_params_errors_are_fatal_and_explain(query: dict[str, str], code: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_listen_params(query, default_model="m")
    assert info.value.code == code and fragment in info.value.message
    assert info.value.close_code == WS_1008_POLICY_VIOLATION


@pytest.mark.parametrize("kind", ["finalize", "end", "keepalive"])
def test_listen_controls(kind: str) -> None:
    assert parse_listen_message(json.dumps({"type": kind})).type == kind


@pytest.mark.parametrize(("text", "fragment"), [
    ("{nope", "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"kind": "end"}', '"type" string'),
    ('{"type": "pause"}', "unknown message type 'pause' on /v1/listen"),
])
def test_listen_bad_messages_are_recoverable(text: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_listen_message(text)
    assert info.value.code == "bad_message" and fragment in info.value.message
    assert info.value.close_code is None


def test_chat_turn_with_sampling() -> None:
    message = parse_chat_message(json.dumps({
        "type": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 20, "temperature": 0, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["\n\n"],
    }))
    assert isinstance(message, ChatTurn)
    assert [m.role for m in message.messages] == ["system", "user"]
    sampling = message.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        20, 0.0, 0.9, 40, 7)
    assert sampling.stop == ("\n\n",) and sampling.prediction == ""
    predicted = parse_chat_message(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Fix it"}],
                                               "prediction": "def f():\n    return 1\n"}))
    assert isinstance(predicted, ChatTurn) and predicted.sampling.prediction == "def f():\n    return 1\n"
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (None, None, None)
    penalized = parse_chat_message(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Hi"}],
                                               "presence_penalty": 0.5, "frequency_penalty": 1,
                                               "repetition_penalty": 1.2}))
    assert isinstance(penalized, ChatTurn)
    assert (penalized.sampling.presence_penalty, penalized.sampling.frequency_penalty,
            penalized.sampling.repetition_penalty) == (0.5, 1.0, 1.2)
    biased = parse_chat_message(json.dumps({"type": "generate", "prompt": "x", "logit_bias": {"42": -100, "7": 1.5}}))
    assert biased.sampling.logit_bias == ((42, -100.0), (7, 1.5)) and penalized.sampling.logit_bias == ()
    with_logprobs = parse_chat_message(json.dumps({"type": "generate", "prompt": "x", "logprobs": 3}))
    assert with_logprobs.sampling.logprobs == 3 and biased.sampling.logprobs is None


def test_generate_and_controls() -> None:
    message = parse_chat_message('{"type": "generate", "prompt": "Once upon", "stop": "."}')
    assert isinstance(message, RawGenerate) and message.prompt == "Once upon" and message.sampling.stop == (".",)
    assert not message.sampling.ignore_eos
    forced = parse_chat_message('{"type": "generate", "prompt": "Once upon", "ignore_eos": true}')
    assert isinstance(forced, RawGenerate) and forced.sampling.ignore_eos
    for kind in ("cancel", "reset", "keepalive"):
        control = parse_chat_message(json.dumps({"type": kind}))
        assert isinstance(control, ChatControl) and control.type == kind


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"type": "chat"}, "messages must be a non-empty list"),
    ({"type": "chat", "messages": []}, "messages must be a non-empty list"),
    ({"type": "chat", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"type": "chat", "messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"type": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens must be"),
    ({"type": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}, "an integer"),
    ({"type": "chat", "messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature must be"),
    ({"type": "chat", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop must be a list"),
    ({"type": "generate", "prompt": ""}, "prompt must be a non-empty string"),
    ({"type": "generate", "prompt": "x", "ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ({"type": "generate", "prompt": "x", "prediction": ["x"]}, "prediction must be a string"),
    ({"type": "generate", "prompt": "x", "prediction": 0}, "prediction must be a string"),
    ({"type": "generate", "prompt": "x", "repetition_penalty": "strong"}, "repetition_penalty must be a number"),
    ({"type": "generate", "prompt": "x", "presence_penalty": True}, "presence_penalty must be a number"),
    ({"type": "generate", "prompt": "x", "logit_bias": [1, 2]}, "logit_bias must be an object"),
    ({"type": "generate", "prompt": "x", "logprobs": True}, "logprobs must be an integer"),
    ({"type": "generate", "prompt": "x", "logit_bias": {"hello": 1}}, "logit_bias must map token ids"),
    ({"type": "generate", "prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias must map token ids"),
    ({"type": "generate", "prompt": "x", "prediction": "x" * 65537}, "prediction has 65537 characters"),
    ({"type": "dance"}, "unknown message type 'dance' on /v1/chat"),
])
def test_chat_bad_messages(payload: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_chat_message(json.dumps(payload))
    assert info.value.code == "bad_message" and fragment in info.value.message


def test_chat_params() -> None:
    assert parse_chat_params({"version": "1"}, default_model="llm").version == 1
    assert parse_chat_params({}, default_model="llm").model == "llm"


def test_server_messages_round_times() -> None:
    assert speech_started_message(0, 1.23456) == {"type": "speech_started", "utterance": 0, "start": 1.235}
    final = transcript_message("final", 3, "Hello.", 1.0, 2.5)
    assert final == {"type": "final", "utterance": 3, "text": "Hello.", "start": 1.0, "end": 2.5}


@given(st.text(max_size=200))
def test_any_text_either_parses_or_raises_protocol_error(text: str) -> None:
    for parse in (parse_listen_message, parse_chat_message):
        try:
            parse(text)
        except ProtocolError as exc:
            assert exc.code == "bad_message"
