"""Brook's WebSocket wire format (docs/protocol.md): parse client messages, build server messages.

Pure code: no I/O and no asyncio. Every parse error is a `ProtocolError` that names what was expected and what
arrived; the WebSocket layer turns it into an `error` message and, when fatal, a close code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from app.audio import PCM_ENCODINGS
from app.engine.speech_events import MAX_FINAL_BEAM_SIZE
from app.errors import ProtocolError

# Close codes (RFC 6455 §7.4.1), named as in starlette.status.
WS_1000_NORMAL_CLOSURE = 1000
WS_1001_GOING_AWAY = 1001
WS_1003_UNSUPPORTED_DATA = 1003
WS_1007_INVALID_FRAME_PAYLOAD_DATA = 1007
WS_1008_POLICY_VIOLATION = 1008
WS_1009_MESSAGE_TOO_BIG = 1009
WS_1011_INTERNAL_ERROR = 1011
WS_1013_TRY_AGAIN_LATER = 1013

ERROR_CODES = (
    "bad_message", "bad_audio", "unknown_model", "unauthorized", "overloaded", "too_large", "context_exceeded",
    "internal", "idle_timeout",
)
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
MAX_VAD_SILENCE_MS = 10_000
MIN_VAD_SILENCE_MS = 100


def _bool_param(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ProtocolError("bad_message", f"query parameter {name} must be true or false, got {raw!r}",
                        close_code=WS_1008_POLICY_VIOLATION)


def _int_param(query: Mapping[str, str], name: str, default: int | None, low: int, high: int, code: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ProtocolError(code, f"query parameter {name} must be an integer, got {raw!r}",
                            close_code=WS_1008_POLICY_VIOLATION) from None
    if not low <= value <= high:
        raise ProtocolError(code, f"query parameter {name} must be between {low} and {high}, got {value}",
                            close_code=WS_1008_POLICY_VIOLATION)
    return value


@dataclass(frozen=True)
class ListenParams:
    """The query parameters of `WS /v1/listen`."""

    model: str
    version: int | None
    sample_rate: int
    encoding: str
    interim_results: bool
    vad_silence_ms: int
    beam_size: int | None = None  # the beam of this stream's finals (None: the server's setting)


def parse_listen_params(query: Mapping[str, str], *, default_model: str) -> ListenParams:
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in PCM_ENCODINGS:
        raise ProtocolError("bad_audio", f"encoding must be one of {', '.join(PCM_ENCODINGS)}, got {encoding!r}",
                            close_code=WS_1008_POLICY_VIOLATION)
    sample_rate = _int_param(query, "sample_rate", 16000, MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ, "bad_audio")
    silence = _int_param(query, "vad_silence_ms", 500, MIN_VAD_SILENCE_MS, MAX_VAD_SILENCE_MS, "bad_message")
    assert sample_rate is not None and silence is not None
    return ListenParams(
        model=query.get("model") or default_model,
        version=_int_param(query, "version", None, 1, 1_000_000, "unknown_model"),
        sample_rate=sample_rate,
        encoding=encoding,
        interim_results=_bool_param(query, "interim_results", True),
        vad_silence_ms=silence,
        beam_size=_int_param(query, "beam_size", None, 1, MAX_FINAL_BEAM_SIZE, "bad_message"),
    )


@dataclass(frozen=True)
class ChatParams:
    """The query parameters of `WS /v1/chat`."""

    model: str
    version: int | None


def parse_chat_params(query: Mapping[str, str], *, default_model: str) -> ChatParams:
    return ChatParams(
        model=query.get("model") or default_model,
        version=_int_param(query, "version", None, 1, 1_000_000, "unknown_model"),
    )


def _load_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_message", f"expected a JSON object, got malformed JSON ({exc.msg} at "
                            f"position {exc.pos})") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", 'expected a "type" string field in the message')
    return data


# ---- /v1/listen client messages -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ListenControl:
    type: Literal["finalize", "end", "keepalive"]


LISTEN_CONTROL_TYPES = ("finalize", "end", "keepalive")


def parse_listen_message(text: str) -> ListenControl:
    data = _load_object(text)
    kind = data["type"]
    if kind not in LISTEN_CONTROL_TYPES:
        raise ProtocolError("bad_message", f"unknown message type {kind!r} on /v1/listen; expected one of "
                            f"{', '.join(LISTEN_CONTROL_TYPES)} (audio goes in binary frames)")
    return ListenControl(type=kind)


# ---- /v1/chat client messages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingFields:
    """Sampling options as sent on the wire; ranges are checked by the engine against the model's limits."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    prediction: str = ""  # the reply the client expects; speeds up decoding where the reply matches it
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); the wire sends {"token id": bias}
    logprobs: int | None = None  # each token's log-probability with this many alternatives; None: none


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatTurn:
    """`{"type":"chat"}`: append messages to the conversation and stream the assistant's reply."""

    messages: tuple[ChatMessage, ...]
    sampling: SamplingFields = field(default_factory=SamplingFields)
    type: Literal["chat"] = "chat"


@dataclass(frozen=True)
class RawGenerate:
    """`{"type":"generate"}`: a raw completion of `prompt`, with no template and no history."""

    prompt: str
    sampling: SamplingFields = field(default_factory=SamplingFields)
    type: Literal["generate"] = "generate"


@dataclass(frozen=True)
class ChatControl:
    type: Literal["cancel", "reset", "keepalive"]


ChatClientMessage = ChatTurn | RawGenerate | ChatControl
CHAT_ROLES = ("system", "user", "assistant")
MAX_PREDICTION_CHARS = 65536  # a predicted reply longer than this is refused (its tokens are searched every step)
CHAT_TYPES = ("chat", "generate", "cancel", "reset", "keepalive")


def _optional_number(data: Mapping[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is None:
        return None
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        valid = valid and float(value).is_integer()
    if not valid:
        raise ProtocolError("bad_message", f"field {name} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {value!r}")
    return kind(value)


def parse_sampling(data: Mapping[str, Any]) -> SamplingFields:
    stop = data.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ProtocolError("bad_message", f"field stop must be a list of non-empty strings, got {stop!r}")
    ignore_eos = data.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ProtocolError("bad_message", f"field ignore_eos must be true or false, got {ignore_eos!r}")
    prediction = data.get("prediction")
    if prediction is None:
        prediction = ""
    if not isinstance(prediction, str):
        raise ProtocolError("bad_message", f"field prediction must be a string, got {prediction!r}")
    if len(prediction) > MAX_PREDICTION_CHARS:
        raise ProtocolError("bad_message", f"field prediction has {len(prediction)} characters; at most "
                            f"{MAX_PREDICTION_CHARS}")
    return SamplingFields(
        max_tokens=_optional_number(data, "max_tokens", int),
        temperature=_optional_number(data, "temperature", float),
        top_p=_optional_number(data, "top_p", float),
        top_k=_optional_number(data, "top_k", int),
        seed=_optional_number(data, "seed", int),
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        prediction=prediction,
        presence_penalty=_optional_number(data, "presence_penalty", float),
        frequency_penalty=_optional_number(data, "frequency_penalty", float),
        repetition_penalty=_optional_number(data, "repetition_penalty", float),
        logit_bias=_logit_bias(data.get("logit_bias")),
        logprobs=_optional_number(data, "logprobs", int),
    )


def _logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` (JSON object keys are strings) as (id, bias) pairs; ranges are the engine's to check."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", f"field logit_bias must be an object of token id to number, got {raw!r}")
    pairs = []
    for key, value in raw.items():
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (isinstance(key, str) and key.isdigit() and is_number):
            raise ProtocolError("bad_message", f"field logit_bias must map token ids (digits) to numbers, got "
                                f"{key!r}: {value!r}")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def parse_messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("bad_message", f"field messages must be a non-empty list, got {raw!r}")
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ProtocolError("bad_message", f"messages[{index}] must be an object, got {item!r}")
        role, content = item.get("role"), item.get("content")
        if role not in CHAT_ROLES:
            raise ProtocolError("bad_message", f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, "
                                f"got {role!r}")
        if not isinstance(content, str):
            raise ProtocolError("bad_message", f"messages[{index}].content must be a string, got {content!r}")
        messages.append(ChatMessage(role=role, content=content))
    return tuple(messages)


def parse_chat_message(text: str) -> ChatClientMessage:
    data = _load_object(text)
    kind = data["type"]
    if kind == "chat":
        return ChatTurn(messages=parse_messages(data.get("messages")), sampling=parse_sampling(data))
    if kind == "generate":
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolError("bad_message", f"field prompt must be a non-empty string, got {prompt!r}")
        return RawGenerate(prompt=prompt, sampling=parse_sampling(data))
    if kind in ("cancel", "reset", "keepalive"):
        return ChatControl(type=kind)
    raise ProtocolError("bad_message", f"unknown message type {kind!r} on /v1/chat; expected one of "
                        f"{', '.join(CHAT_TYPES)}")


# ---- server messages ------------------------------------------------------------------------------------------

def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def _seconds(value: float) -> float:
    return round(value, 3)


def speech_started_message(utterance: int, start: float) -> dict[str, Any]:
    return {"type": "speech_started", "utterance": utterance, "start": _seconds(start)}


def transcript_message(kind: Literal["partial", "final"], utterance: int, text: str, start: float,
                       end: float) -> dict[str, Any]:
    return {"type": kind, "utterance": utterance, "text": text, "start": _seconds(start), "end": _seconds(end)}
