"""OpenAI request bodies → what Brook's text engine runs (pure): `POST /v1/chat/completions` and `/v1/completions`.

Every field is checked here, once: a wrong type or range, or a feature Brook does not have (tools, several
choices, image parts, …), raises an `OpenAIError` naming the field, with OpenAI's status and error body. Fields
that Brook honours only at their neutral value are accepted at that value and refused otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import JSONResponse

from app.errors import ProtocolError
from app.protocol import SamplingFields, parse_sampling
from app.text.sampling import MAX_TOP_LOGPROBS

MODEL_VERSION_SEPARATOR = "@"  # "smollm2-135m-instruct@1" pins version 1
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

Kind = Literal["chat", "completion"]
MAX_CHOICES = 8  # `n`: the most choices one request may ask for (each is one more request in the engine)


class OpenAIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, code=code, param=param)


# ---- request parsing (pure) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextRequest:
    """An OpenAI chat or completion request, reduced to what Brook's engine runs."""

    kind: Kind
    model: str
    version: int | None
    sampling: SamplingFields
    stream: bool
    include_usage: bool
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content)
    n: int = 1  # choices: each one is generated as its own request (with its own seed, seed + index, if seeded)
    prompt: str = ""  # completion
    echo: bool = False  # completion: prepend the prompt to the text


def parse_model(value: Any, default_model: str) -> tuple[str, int | None]:
    """`name` or `name@version` → (name, version); a missing model means the server's default chat model."""
    if value is None:
        return default_model, None
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"model must be a non-empty string such as {default_model!r} or '{default_model}@1', "
                           f"got {value!r}", "model")
    name, separator, version = value.strip().partition(MODEL_VERSION_SEPARATOR)
    if not separator:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise OpenAIError(404, f"model {value!r}: the version after '@' must be a positive integer",
                          code="model_not_found", param="model")
    return name, int(version)


def _require_default(body: Mapping[str, Any], name: str, allowed: Callable[[Any], bool], what: str) -> None:
    """Refuse a parameter Brook cannot honour unless it has its neutral value."""
    if name in body and body[name] is not None and not allowed(body[name]):
        raise bad_request(f"{name} is not supported by Brook ({what}); got {body[name]!r}", name,
                           "unsupported_parameter")


def _choices(body: Mapping[str, Any]) -> int:
    """`n`, the number of choices: 1 to MAX_CHOICES."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be an integer from 1 to {MAX_CHOICES} (choices per request), got {n!r}", "n")
    return n


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, got {options!r}", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request(f"stream_options.include_usage must be true or false, got {include_usage!r}",
                           "stream_options.include_usage")
    return stream, include_usage


def _sampling(body: Mapping[str, Any]) -> SamplingFields:
    fields = dict(body)
    if body.get("max_completion_tokens") is not None:
        fields["max_tokens"] = body["max_completion_tokens"]
    if fields.get("stop") is None:
        fields.pop("stop", None)
    fields["prediction"] = _prediction_text(body.get("prediction"))
    try:
        return parse_sampling(fields)
    except ProtocolError as exc:
        raise bad_request(exc.message) from None


def _content_text(content: Any, name: str) -> str:
    """A message's (or a prediction's) ``content``: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            param = f"{name}[{part_index}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{param}: only text content parts are supported, got {kind!r}", param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{name} must be a string or a list of text parts, got {content!r}", name)


def _prediction_text(raw: Any) -> str:
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": ...}``, the text the reply is expected to be."""
    if raw is None:
        return ""
    if not isinstance(raw, dict) or raw.get("type") != "content":
        raise bad_request(f'prediction must be {{"type": "content", "content": ...}}, got {raw!r}', "prediction")
    return _content_text(raw.get("content"), "prediction.content")


def _messages(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise bad_request(f"messages must be a non-empty array, got {raw!r}", "messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object, got {message!r}", f"messages[{index}]")
        role = message.get("role")
        if role not in ROLE_ALIASES:
            raise bad_request(f"messages[{index}].role must be one of {', '.join(ROLE_ALIASES)} (tool and function "
                               f"messages are not supported), got {role!r}", f"messages[{index}].role")
        if message.get("tool_calls") or message.get("function_call"):
            raise bad_request(f"messages[{index}]: tool calls are not supported", f"messages[{index}].tool_calls",
                               "unsupported_parameter")
        content = message.get("content")
        text = "" if content is None else _content_text(content, f"messages[{index}].content")
        messages.append((ROLE_ALIASES[role], text))
    return tuple(messages)


def parse_chat_request(body: Mapping[str, Any], *, default_model: str) -> TextRequest:
    """A `/v1/chat/completions` body → `TextRequest`; raises `OpenAIError` (400/404) naming the bad field."""
    n = _choices(body)
    _require_default(body, "tools", lambda v: v == [], "no tool calling")
    _require_default(body, "functions", lambda v: v == [], "no function calling")
    _require_default(body, "tool_choice", lambda v: v == "none", "only 'none'")
    _require_default(body, "function_call", lambda v: v == "none", "only 'none'")
    _require_default(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
                     "only {'type': 'text'}")
    _require_default(body, "modalities", lambda v: v == ["text"], "text only")
    _require_default(body, "audio", lambda v: False, "text only")
    model, version = parse_model(body.get("model"), default_model)
    stream, include_usage = _stream_flags(body)
    fields = dict(body)
    fields["logprobs"] = _chat_logprobs(body)
    fields.pop("top_logprobs", None)
    return TextRequest("chat", model, version, _sampling(fields), stream, include_usage,
                       messages=_messages(body.get("messages")), n=n)


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """OpenAI's `logprobs` (true/false) and `top_logprobs` (0-20, only with `logprobs`) as Brook's one number."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request(f"logprobs must be true or false, got {wanted!r}", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise bad_request(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}",
                           "top_logprobs")
    if not wanted:
        if top:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        raise bad_request(f"one prompt per request is supported, got {len(raw)}", "prompt", "unsupported_parameter")
    raise bad_request(f"prompt must be a string (token-id prompts are not supported), got {raw!r}", "prompt")


def parse_completion_request(body: Mapping[str, Any], *, default_model: str) -> TextRequest:
    """A `/v1/completions` body → `TextRequest`; raises `OpenAIError` (400/404) naming the bad field."""
    n = _choices(body)
    _require_default(body, "best_of", lambda v: v in (1, n), "only 1 or n: every choice generated is returned")
    _require_default(body, "suffix", lambda v: v == "", "no insertion")
    echo = body.get("echo", False)
    if not isinstance(echo, bool | None):
        raise bad_request(f"echo must be true or false, got {echo!r}", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise bad_request(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per token), "
                           f"got {logprobs!r}", "logprobs")
    if logprobs is not None and echo:
        raise bad_request("echo with logprobs asks for the prompt's log-probabilities, which Brook does not "
                           "compute; send echo or logprobs, not both", "echo", "unsupported_parameter")
    model, version = parse_model(body.get("model"), default_model)
    stream, include_usage = _stream_flags(body)
    return TextRequest("completion", model, version, _sampling(body), stream, include_usage,
                       prompt=_prompt(body.get("prompt")), echo=bool(echo), n=n)
