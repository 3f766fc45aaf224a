"""OpenAI-compatible text routes: `POST /v1/chat/completions` and `POST /v1/completions`, as JSON or as Server-Sent
Events (`stream: true`), on the same text engines as `WS /v1/chat`.

Each request is stateless: a chat request renders its whole `messages` list into a temporary conversation that is
closed when the request ends. A client that disconnects (mid-stream or while waiting for a JSON answer) cancels its
generation at the engine's next step. Errors are OpenAI error bodies, `{"error":{"message","type","code","param"}}`,
with the status the `openai` SDK maps to its exception types (400, 401, 403, 404, 413, 429, 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    UnknownModelError,
)
from app.server.auth import is_authorized, is_origin_allowed
from app.server.openai_requests import (
    MODEL_VERSION_SEPARATOR,
    Kind,
    OpenAIError,
    TextRequest,
    bad_request,
    parse_chat_request,
    parse_completion_request,
)
from app.server.pinned_versions import acquire_served
from app.server.registry import ServedVersion
from app.server.state import ServerState
from app.server.text_requests import CompletionLogprobs, logprob_entries, record_generation, sampling_params
from app.text.sampling import SamplingParamsError, TokenLogprob

logger = logging.getLogger(__name__)

TEXT_TASK = "text-generation"
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused with 413
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# ---- response bodies (pure) -----------------------------------------------------------------------------------

def usage_body(dones: Sequence[GenerationDone]) -> dict[str, Any]:
    """OpenAI's usage object of a reply's choices: the prompt counted once (every choice has the same one; its
    cached tokens are the first choice's), the completion tokens of all. The prediction counts are Brook's
    speculative drafts (from the request's ``prediction`` or from the conversation itself): confirmed tokens, and
    drafted tokens the model did not confirm (unlike OpenAI's, those are not billed as completion tokens)."""
    prompt = dones[0].usage
    completion = sum(done.usage.completion_tokens for done in dones)
    accepted = sum(done.timings.accepted_draft_tokens for done in dones)
    drafted = sum(done.timings.draft_tokens for done in dones)
    return {"prompt_tokens": prompt.prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": prompt.cached_tokens},
            "completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": drafted - accepted}}


Choice = tuple[str, GenerationDone, Sequence[TokenLogprob]]  # a whole choice: its text, its end, its log-probs


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
    # a completion choice's legacy `logprobs` object, piece by piece (its text offsets run across the chunks); set
    # by ``for_choice``
    completion_logprobs: CompletionLogprobs | None = None
    index: int = 0  # the choice this shape builds (`n` > 1: one shape per choice, ``for_choice``)

    def for_choice(self, index: int) -> ReplyShape:
        """The shape of choice ``index`` of the same reply (a completion's with its own legacy log-probabilities)."""
        legacy = None
        if self.kind == "completion" and self.wants_logprobs and self.token_bytes is not None:
            legacy = CompletionLogprobs(self.token_bytes)
        return dataclasses.replace(self, index=index, completion_logprobs=legacy)

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
            return {"index": self.index, "text": text or "", "logprobs": legacy, "finish_reason": finish_reason}
        if streaming:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            chunk_logprobs = self.logprobs(logprobs if text else None)
            return {"index": self.index, "delta": delta, "logprobs": chunk_logprobs, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": self.index, "message": message, "logprobs": self.logprobs(logprobs),
                "finish_reason": finish_reason}

    def choice(self, text: str, done: GenerationDone, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        """This choice of a whole (not streamed) reply."""
        return self._choice(text, finish_reason(done), streaming=False, logprobs=logprobs)

    def chunk(self, text: str | None, *, finish: str | None = None, role: bool = False,
              include_usage: bool = False, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice = self._choice(text, finish, streaming=True, role=role, logprobs=logprobs)
        body = {**self._envelope(True), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, dones: Sequence[GenerationDone]) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": usage_body(dones)}


def full_body(shapes: Sequence[ReplyShape], choices: Sequence[Choice]) -> dict[str, Any]:
    """The JSON body of a whole reply: one ``(text, done, logprobs)`` per choice, with its shape."""
    body = [shape.choice(*choice) for shape, choice in zip(shapes, choices, strict=True)]
    return {**shapes[0]._envelope(False), "choices": body, "usage": usage_body([done for _, done, _ in choices])}


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
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
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


def start_choices(state: ServerState, engine: TextEngine, parsed: TextRequest) -> list[Generation]:
    """Submit one engine request per choice, translating the engine's refusals into OpenAI errors (a refused choice
    cancels the ones already started). A seeded request's choice ``i`` uses seed + i, so the choices differ and the
    same request gives the same choices. Requests are stateless: no conversation is kept, but each one's KV cache
    stays behind as a prefix cache for the next (docs/protocol.md)."""
    generations: list[Generation] = []
    try:
        params = sampling_params(parsed.sampling)
        for index in range(parsed.n):
            seed = None if params.seed is None else (params.seed + index) % 2**64
            choice_params = dataclasses.replace(params, seed=seed)
            if parsed.kind == "chat":
                generations.append(engine.chat_once(parsed.messages, choice_params))
            else:
                generations.append(engine.complete(parsed.prompt, choice_params))
        return generations
    except BaseException as exc:
        for generation in generations:
            generation.cancel()
        raise _engine_refusal(state, parsed, exc) from None


def _engine_refusal(state: ServerState, parsed: TextRequest, exc: BaseException) -> BaseException:
    """The OpenAI error for an engine's refusal of a request (others unchanged)."""
    if isinstance(exc, ContextLengthError):
        return bad_request(str(exc), "messages" if parsed.kind == "chat" else "prompt", "context_length_exceeded")
    if isinstance(exc, SamplingParamsError | ValueError):
        return bad_request(str(exc))
    if isinstance(exc, OverloadedError):
        return OpenAIError(429, str(exc), type_="server_overloaded", code="overloaded",
                           headers={"Retry-After": str(state.settings.retry_after_s)})
    if isinstance(exc, EngineDeadError):
        return _unavailable(state, str(exc), "engine_unavailable")
    if isinstance(exc, RuntimeError):  # e.g. a model without a chat template
        return bad_request(str(exc), code="unsupported_model")
    return exc


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
        generations = start_choices(state, engine, parsed)
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
        for generation in generations:
            generation.cancel()  # a no-op once it has finished

    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    shape = ReplyShape(kind, prefix + uuid.uuid4().hex, int(time.time()), served.name,
                       f"{served.name}{MODEL_VERSION_SEPARATOR}{served.version}", engine.token_bytes,
                       wants_logprobs=parsed.sampling.logprobs is not None)
    headers = {"x-request-id": shape.id}
    shapes = [shape.for_choice(index) for index in range(len(generations))]
    echo = parsed.prompt if parsed.echo else ""
    if parsed.stream:
        events = _stream(generations, shapes, parsed.include_usage, echo, state, served)
        return EventStreamResponse(events, cleanup, headers={**SSE_HEADERS, **headers})
    try:
        return await _answer(request, generations, shapes, echo, state, served, headers)
    finally:
        cleanup()


async def _answer(request: Request, generations: Sequence[Generation], shapes: Sequence[ReplyShape], echo: str,
                  state: ServerState, served: ServedVersion, headers: dict[str, str]) -> Response:
    """Collect every choice whole; if the client disconnects first, cancel the generations."""
    shape = shapes[0]
    collector = asyncio.ensure_future(_collect_all(generations))
    gone = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({collector, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            logger.debug("%s: the client disconnected; cancelling its generation", shape.id)
            return Response(status_code=499)  # nobody reads it
        try:
            choices = collector.result()
        except EngineDeadError as exc:
            error = _unavailable(state, str(exc), "engine_unavailable")
            state.metrics.errors.labels(_endpoint(shape.kind), "engine_unavailable").inc()
            return error.response()
        for _, done, _ in choices:
            record_generation(state.metrics, served.name, served.version, done)
        body = full_body(shapes, [(echo + text, done, logprobs) for text, done, logprobs in choices])
        return JSONResponse(body, headers=headers)
    finally:
        for task in (collector, gone):
            task.cancel()
        await asyncio.gather(collector, gone, return_exceptions=True)


async def _collect_all(generations: Sequence[Generation]) -> list[tuple[str, GenerationDone, list[TokenLogprob]]]:
    return list(await asyncio.gather(*(_collect(generation) for generation in generations)))


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


async def _merged(generations: Sequence[Generation]) -> AsyncGenerator[tuple[int, TokenDelta | GenerationDone], None]:
    """The events of every choice's generation as they come, each with its choice's index, until each one is done;
    a failing generation raises here."""
    queue: asyncio.Queue[tuple[int, TokenDelta | GenerationDone | Exception | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for item in generation:
                queue.put_nowait((index, item))
                if isinstance(item, GenerationDone):
                    return
            queue.put_nowait((index, None))  # ended without its final event
        except Exception as exc:
            queue.put_nowait((index, exc))

    pumps = [asyncio.create_task(pump(index, generation)) for index, generation in enumerate(generations)]
    try:
        remaining = len(pumps)
        while remaining:
            index, item = await queue.get()
            if item is None:
                raise EngineDeadError("the generation ended without a final event")
            if isinstance(item, Exception):
                raise item
            remaining -= isinstance(item, GenerationDone)
            yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _stream(generations: Sequence[Generation], shapes: Sequence[ReplyShape], include_usage: bool, echo: str,
                  state: ServerState, served: ServedVersion) -> AsyncGenerator[bytes, None]:
    """The SSE body: a first chunk per choice (the assistant role, or the echoed prompt), one chunk per text delta
    of any choice as it comes, a chunk with each choice's finish reason, the usage chunk when asked for (after the
    last choice ended), then `data: [DONE]`."""
    shape = shapes[0]
    for choice in shapes:
        yield sse(choice.chunk(echo, role=True, include_usage=include_usage))
    dones: dict[int, GenerationDone] = {}
    try:
        async with contextlib.aclosing(_merged(generations)) as events:  # closed with this stream, not later
            async for index, item in events:
                if isinstance(item, TokenDelta):
                    if item.text:
                        yield sse(shapes[index].chunk(item.text, include_usage=include_usage, logprobs=item.logprobs))
                else:
                    record_generation(state.metrics, served.name, served.version, item)
                    dones[index] = item
                    final_text = None if shape.kind == "chat" else ""
                    yield sse(shapes[index].chunk(final_text, finish=finish_reason(item),
                                                  include_usage=include_usage))
        if include_usage:
            yield sse(shape.usage_chunk([dones[index] for index in range(len(generations))]))
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
