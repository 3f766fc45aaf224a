"""OpenAI-compatible text routes: `POST /v1/chat/completions` and `POST /v1/completions`, as JSON or as Server-Sent
Events (`stream: true`), on the same text engines as `WS /v1/chat`.

Each request is stateless: a chat request renders its whole `messages` list into a temporary conversation that is
closed when the request ends. A client that disconnects (mid-stream or while waiting for a JSON answer) cancels its
generation at the engine's next step. Errors are OpenAI error bodies, `{"error":{"message","type","code","param"}}`,
with the status the `openai` SDK maps to its exception types (400, 401, 403, 404, 413, 429, 503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.engine.text_engine import TextEngine
from app.engine.text_events import Generation, GenerationDone, TokenDelta
from app.errors import (
    ContextLengthError,
    EngineDeadError,
    ModelError,
    OverloadedError,
    ProtocolError,
    UnknownModelError,
)
from app.protocol import SamplingFields, parse_sampling
from app.server.auth import is_authorized, is_origin_allowed
from app.server.pinned_versions import acquire_served
from app.server.registry import ServedVersion
from app.server.state import ServerState
from app.server.text_requests import CompletionLogprobs, logprob_entries, record_generation, sampling_params
from app.text.sampling import MAX_TOP_LOGPROBS, SamplingParamsError, TokenLogprob

logger = logging.getLogger(__name__)

TEXT_TASK = "text-generation"
MODEL_VERSION_SEPARATOR = "@"  # "smollm2-135m-instruct@1" pins version 1
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused with 413
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Kind = Literal["chat", "completion"]


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


def _bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
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
    prompt: str = ""  # completion
    echo: bool = False  # completion: prepend the prompt to the text


def parse_model(value: Any, default_model: str) -> tuple[str, int | None]:
    """`name` or `name@version` → (name, version); a missing model means the server's default chat model."""
    if value is None:
        return default_model, None
    if not isinstance(value, str) or not value.strip():
        raise _bad_request(f"model must be a non-empty string such as {default_model!r} or '{default_model}@1', "
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
        raise _bad_request(f"{name} is not supported by Brook ({what}); got {body[name]!r}", name,
                           "unsupported_parameter")


def _check_common(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad_request(f"only n=1 is supported (one choice per request); got n={n!r}. Send several requests "
                           "for several choices", "n", "unsupported_parameter")


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad_request(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad_request(f"stream_options must be an object, got {options!r}", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad_request(f"stream_options.include_usage must be true or false, got {include_usage!r}",
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
        raise _bad_request(exc.message) from None


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
                raise _bad_request(f"{param}: only text content parts are supported, got {kind!r}", param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad_request(f"{name} must be a string or a list of text parts, got {content!r}", name)


def _prediction_text(raw: Any) -> str:
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": ...}``, the text the reply is expected to be."""
    if raw is None:
        return ""
    if not isinstance(raw, dict) or raw.get("type") != "content":
        raise _bad_request(f'prediction must be {{"type": "content", "content": ...}}, got {raw!r}', "prediction")
    return _content_text(raw.get("content"), "prediction.content")


def _messages(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise _bad_request(f"messages must be a non-empty array, got {raw!r}", "messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad_request(f"messages[{index}] must be an object, got {message!r}", f"messages[{index}]")
        role = message.get("role")
        if role not in ROLE_ALIASES:
            raise _bad_request(f"messages[{index}].role must be one of {', '.join(ROLE_ALIASES)} (tool and function "
                               f"messages are not supported), got {role!r}", f"messages[{index}].role")
        if message.get("tool_calls") or message.get("function_call"):
            raise _bad_request(f"messages[{index}]: tool calls are not supported", f"messages[{index}].tool_calls",
                               "unsupported_parameter")
        content = message.get("content")
        text = "" if content is None else _content_text(content, f"messages[{index}].content")
        messages.append((ROLE_ALIASES[role], text))
    return tuple(messages)


def parse_chat_request(body: Mapping[str, Any], *, default_model: str) -> TextRequest:
    """A `/v1/chat/completions` body → `TextRequest`; raises `OpenAIError` (400/404) naming the bad field."""
    _check_common(body)
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
                       messages=_messages(body.get("messages")))


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """OpenAI's `logprobs` (true/false) and `top_logprobs` (0-20, only with `logprobs`) as Brook's one number."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad_request(f"logprobs must be true or false, got {wanted!r}", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise _bad_request(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}",
                           "top_logprobs")
    if not wanted:
        if top:
            raise _bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        raise _bad_request(f"one prompt per request is supported, got {len(raw)}", "prompt", "unsupported_parameter")
    raise _bad_request(f"prompt must be a string (token-id prompts are not supported), got {raw!r}", "prompt")


def parse_completion_request(body: Mapping[str, Any], *, default_model: str) -> TextRequest:
    """A `/v1/completions` body → `TextRequest`; raises `OpenAIError` (400/404) naming the bad field."""
    _check_common(body)
    _require_default(body, "best_of", lambda v: v == 1, "only 1")
    _require_default(body, "suffix", lambda v: v == "", "no insertion")
    echo = body.get("echo", False)
    if not isinstance(echo, bool | None):
        raise _bad_request(f"echo must be true or false, got {echo!r}", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise _bad_request(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per token), "
                           f"got {logprobs!r}", "logprobs")
    if logprobs is not None and echo:
        raise _bad_request("echo with logprobs asks for the prompt's log-probabilities, which Brook does not "
                           "compute; send echo or logprobs, not both", "echo", "unsupported_parameter")
    model, version = parse_model(body.get("model"), default_model)
    stream, include_usage = _stream_flags(body)
    return TextRequest("completion", model, version, _sampling(body), stream, include_usage,
                       prompt=_prompt(body.get("prompt")), echo=bool(echo))


# ---- response bodies (pure) -----------------------------------------------------------------------------------

def usage_body(done: GenerationDone) -> dict[str, Any]:
    """OpenAI's usage object. The prediction counts are Brook's speculative drafts (from the request's
    ``prediction`` or from the conversation itself): confirmed tokens, and drafted tokens the model did not confirm
    (unlike OpenAI's, those are not billed as completion tokens)."""
    usage, timings = done.usage, done.timings
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {
                "accepted_prediction_tokens": timings.accepted_draft_tokens,
                "rejected_prediction_tokens": timings.draft_tokens - timings.accepted_draft_tokens}}


@dataclass(frozen=True)
class ReplyShape:
    """Builds the OpenAI objects of one reply (JSON body or SSE chunks)."""

    kind: Kind
    id: str
    created: int
    model: str
    fingerprint: str  # "name@version" of the model version that served the request
    token_bytes: Callable[[int], bytes] | None = None  # names the tokens of log-probabilities
    wants_logprobs: bool = False  # the request asked for log-probabilities (chat `logprobs: true`, completion 0-20)
    # a completion's legacy `logprobs` object, piece by piece (its text offsets run across the chunks)
    completion_logprobs: CompletionLogprobs | None = None

    def logprobs(self, items: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        """A chat choice's `logprobs`: null unless the request asked for them (and, streaming, for the chunks
        without text: ``items`` None)."""
        if not self.wants_logprobs or self.token_bytes is None or items is None:
            return None
        return {"content": logprob_entries(items, self.token_bytes, openai=True), "refusal": None}

    def _envelope(self, streaming: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if streaming else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _choice(self, text: str | None, finish_reason: str | None, *, streaming: bool,
                role: bool = False, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        if self.kind == "completion":
            legacy = None
            if self.completion_logprobs is not None and (text or not streaming):  # none on chunks without text
                legacy = self.completion_logprobs.take(text or "", logprobs)
            return {"index": 0, "text": text or "", "logprobs": legacy, "finish_reason": finish_reason}
        if streaming:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            chunk_logprobs = self.logprobs(logprobs if text else None)
            return {"index": 0, "delta": delta, "logprobs": chunk_logprobs, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": self.logprobs(logprobs), "finish_reason": finish_reason}

    def full(self, text: str, done: GenerationDone, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice = self._choice(text, finish_reason(done), streaming=False, logprobs=logprobs)
        return {**self._envelope(False), "choices": [choice], "usage": usage_body(done)}

    def chunk(self, text: str | None, *, finish: str | None = None, role: bool = False,
              include_usage: bool = False, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice = self._choice(text, finish, streaming=True, role=role, logprobs=logprobs)
        body = {**self._envelope(True), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, done: GenerationDone) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": usage_body(done)}


def finish_reason(done: GenerationDone) -> str:
    """OpenAI's finish reasons are "stop" and "length"; a cancelled generation (the client left) reports "stop"."""
    return "length" if done.finish_reason == "length" else "stop"


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# ---- the routes -----------------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    return await _serve(request, "chat")


async def completions(request: Request) -> Response:
    return await _serve(request, "completion")


def _endpoint(kind: Kind) -> str:
    return "openai_chat" if kind == "chat" else "openai_completions"


def _admit(request: Request, state: ServerState) -> None:
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not is_origin_allowed(state.settings.allowed_origins, headers):
        raise OpenAIError(403, f"origin {headers.get('origin')!r} is not allowed", type_="permission_error",
                          code="origin_not_allowed")
    if not is_authorized(state.settings.api_keys, headers, dict(request.query_params)):
        raise OpenAIError(401, "a valid API key is required: send 'Authorization: Bearer <key>' (the SDK's api_key)",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if state.shutting_down:
        raise _unavailable(state, "the server is shutting down", "server_shutting_down")


def _internal_error() -> OpenAIError:
    return OpenAIError(500, "internal server error; the server logged it", type_="server_error", code="internal")


def _unavailable(state: ServerState, message: str, code: str) -> OpenAIError:
    return OpenAIError(503, message, type_="server_error", code=code,
                       headers={"Retry-After": str(state.settings.retry_after_s)})


async def _read_json(request: Request) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise OpenAIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad_request(f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


async def _assign(state: ServerState, parsed: TextRequest) -> ServedVersion:
    """The version serving `parsed`; a pinned version that is not loaded yet is loaded first (bounded wait)."""
    try:
        served = await acquire_served(state.registry, parsed.model, parsed.version, task=TEXT_TASK)
    except UnknownModelError as exc:
        raise OpenAIError(404, f"the model {parsed.model!r} is not available here: {exc}",
                          code="model_not_found", param="model") from None
    except ModelError as exc:
        raise _unavailable(state, str(exc), "model_not_ready") from None
    return served


def _start(state: ServerState, engine: TextEngine, parsed: TextRequest) -> Generation:
    """Submit the request to the engine, translating its refusals into OpenAI errors. Requests are stateless: no
    conversation is kept, but each one's KV cache stays behind as a prefix cache for the next (docs/protocol.md)."""
    try:
        params = sampling_params(parsed.sampling)
        if parsed.kind == "chat":
            return engine.chat_once(parsed.messages, params)
        return engine.complete(parsed.prompt, params)
    except ContextLengthError as exc:
        raise _bad_request(str(exc), "messages" if parsed.kind == "chat" else "prompt",
                           "context_length_exceeded") from None
    except (SamplingParamsError, ValueError) as exc:
        raise _bad_request(str(exc)) from None
    except OverloadedError as exc:
        raise OpenAIError(429, str(exc), type_="server_overloaded", code="overloaded",
                          headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except EngineDeadError as exc:
        raise _unavailable(state, str(exc), "engine_unavailable") from None
    except RuntimeError as exc:  # e.g. a model without a chat template
        raise _bad_request(str(exc), code="unsupported_model") from None


async def _prepare(request: Request, state: ServerState, kind: Kind) -> tuple[TextRequest, ServedVersion]:
    _admit(request, state)
    body = await _read_json(request)
    parse = parse_chat_request if kind == "chat" else parse_completion_request
    parsed = parse(body, default_model=state.settings.chat_model)
    return parsed, await _assign(state, parsed)


async def _serve(request: Request, kind: Kind) -> Response:
    state: ServerState = request.app.state.brook
    try:
        parsed, served = await _prepare(request, state, kind)
        engine: TextEngine = served.engine
        generation = _start(state, engine, parsed)
    except OpenAIError as exc:
        state.metrics.errors.labels(_endpoint(kind), exc.code or exc.type).inc()
        return exc.response()
    except EngineDeadError as exc:  # open_conversation on an engine that is shutting down
        state.metrics.errors.labels(_endpoint(kind), "engine_unavailable").inc()
        return _unavailable(state, str(exc), "engine_unavailable").response()
    except Exception:
        logger.exception("internal error in %s", _endpoint(kind))
        state.metrics.errors.labels(_endpoint(kind), "internal").inc()
        return _internal_error().response()

    def cleanup() -> None:
        generation.cancel()  # a no-op once it has finished

    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    wants_logprobs = parsed.sampling.logprobs is not None
    shape = ReplyShape(kind, prefix + uuid.uuid4().hex, int(time.time()), served.name,
                       f"{served.name}{MODEL_VERSION_SEPARATOR}{served.version}", engine.token_bytes,
                       wants_logprobs=wants_logprobs,
                       completion_logprobs=CompletionLogprobs(engine.token_bytes)
                       if kind == "completion" and wants_logprobs else None)
    headers = {"x-request-id": shape.id}
    echo = parsed.prompt if parsed.echo else ""
    if parsed.stream:
        events = _stream(generation, shape, parsed.include_usage, echo, state, served)
        return EventStreamResponse(events, cleanup, headers={**SSE_HEADERS, **headers})
    try:
        return await _answer(request, generation, shape, echo, state, served, headers)
    finally:
        cleanup()


async def _answer(request: Request, generation: Generation, shape: ReplyShape, echo: str, state: ServerState,
                  served: ServedVersion, headers: dict[str, str]) -> Response:
    """Collect the whole reply; if the client disconnects first, cancel the generation."""
    collector = asyncio.ensure_future(_collect(generation))
    gone = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({collector, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            logger.debug("%s: the client disconnected; cancelling its generation", shape.id)
            return Response(status_code=499)  # nobody reads it
        try:
            text, done, logprobs = collector.result()
        except EngineDeadError as exc:
            error = _unavailable(state, str(exc), "engine_unavailable")
            state.metrics.errors.labels(_endpoint(shape.kind), "engine_unavailable").inc()
            return error.response()
        record_generation(state.metrics, served.name, served.version, done)
        return JSONResponse(shape.full(echo + text, done, logprobs), headers=headers)
    finally:
        for task in (collector, gone):
            task.cancel()
        await asyncio.gather(collector, gone, return_exceptions=True)


async def _collect(generation: Generation) -> tuple[str, GenerationDone, list[TokenLogprob]]:
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for item in generation:
        if isinstance(item, TokenDelta):
            texts.append(item.text)
            logprobs.extend(item.logprobs)
        elif isinstance(item, GenerationDone):
            return "".join(texts), item, logprobs
    raise EngineDeadError("the generation ended without a final event")


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(generation: Generation, shape: ReplyShape, include_usage: bool, echo: str, state: ServerState,
                  served: ServedVersion) -> AsyncGenerator[bytes, None]:
    """The SSE body: a first chunk (the assistant role, or the echoed prompt), one chunk per text delta, a chunk
    with the finish reason, the usage chunk when asked for, then `data: [DONE]`."""
    yield sse(shape.chunk(echo, role=True, include_usage=include_usage))
    try:
        async for item in generation:
            if isinstance(item, TokenDelta):
                if item.text:
                    yield sse(shape.chunk(item.text, include_usage=include_usage, logprobs=item.logprobs))
            elif isinstance(item, GenerationDone):
                record_generation(state.metrics, served.name, served.version, item)
                final_text = None if shape.kind == "chat" else ""
                yield sse(shape.chunk(final_text, finish=finish_reason(item), include_usage=include_usage))
                if include_usage:
                    yield sse(shape.usage_chunk(item))
    except EngineDeadError as exc:
        state.metrics.errors.labels(_endpoint(shape.kind), "engine_unavailable").inc()
        yield sse(_unavailable(state, str(exc), "engine_unavailable").body())
    except Exception:
        logger.exception("internal error while streaming %s", shape.id)
        state.metrics.errors.labels(_endpoint(shape.kind), "internal").inc()
        yield sse(_internal_error().body())
    yield sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` whose `on_close` always runs when the response ends, including when the client
    disconnects mid-stream (Starlette then cancels the body iterator)."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None],
                 headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()
