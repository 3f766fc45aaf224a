"""What a text generation hands back: streamed ``TokenDelta``s, one final ``GenerationDone``, and the ``Generation``
handle the caller iterates. Also the ``TextEngineObserver`` metrics hooks.

Each generation has a one-slot mailbox (the idea of vLLM's ``RequestOutputCollector``): the engine never waits for
a consumer. If the consumer lags, the deltas that piled up are merged into one, so a slow reader costs memory for
its unread text only and never slows the step loop. The mailbox lives on the event loop, like all engine state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from app.text.sampling import TokenLogprob

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TokenDelta:
    """Newly decoded text and the token ids that produced it (never a broken character, never a stop string)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when the request asked for them


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # tokens of the rendered prompt
    completion_tokens: int  # tokens generated, including a final stop token
    cached_tokens: int  # prompt tokens whose KV cache was reused from the conversation's previous turn


@dataclass(frozen=True)
class Timings:
    ttft_ms: float  # submission to the first generated token (queueing + prefill)
    tokens_per_s: float  # decode speed after the first token; 0 when fewer than two tokens were generated
    prefill_tokens: int  # prompt tokens actually run through the model (prompt_tokens - cached_tokens)
    prefill_ms: float  # first prefill step start to the first generated token
    decode_ms: float  # first generated token to the end
    draft_tokens: int = 0  # tokens guessed by prompt lookup and verified by the model (speculative decoding)
    accepted_draft_tokens: int = 0  # of those, the ones the model confirmed (each saved a decode step)


@dataclass(frozen=True)
class GenerationDone:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


GenerationEvent = TokenDelta | GenerationDone


class TextEngineObserver(Protocol):
    """Metrics hooks, called on the event loop. Keep them cheap: they run between engine steps."""

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        """After every model step: rows in the batch, prompt tokens and decode tokens it ran, wall time."""

    def on_ttft(self, seconds: float) -> None:
        """When a generation produces its first token: seconds since it was submitted."""

    def on_draft(self, drafted: int, accepted: int) -> None:
        """After a step whose rows carried drafts: tokens drafted, and of those confirmed by the model."""


class GenerationMailbox:
    """Single-consumer hand-off from the step loop to one generation's reader; merges deltas the reader missed."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._done: GenerationDone | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    @property
    def closed(self) -> bool:
        """True once a ``GenerationDone`` or an error was put."""
        return self._done is not None or self._error is not None

    def put_delta(self, text: str, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        if self.closed:
            raise RuntimeError("a delta was put after the generation ended")
        self._texts.append(text)
        self._token_ids.extend(token_ids)
        self._logprobs.extend(logprobs)
        self._ready.set()

    def put_done(self, done: GenerationDone) -> None:
        if self.closed:
            raise RuntimeError(f"the generation already ended; cannot end it again with {done.finish_reason!r}")
        self._done = done
        self._ready.set()

    def put_error(self, error: BaseException) -> None:
        """End the stream with an error (the engine died); a no-op when it already ended."""
        if self.closed:
            return
        self._error = error
        self._ready.set()

    def take_nowait(self) -> GenerationEvent | None:
        """The merged pending delta, else the final event, else None. Raises the stream's error once drained."""
        if self._texts or self._token_ids:
            delta = TokenDelta("".join(self._texts), tuple(self._token_ids), tuple(self._logprobs))
            self._texts.clear()
            self._token_ids.clear()
            self._logprobs.clear()
            return delta
        if self._error is not None:
            raise self._error
        return self._done

    async def take(self) -> GenerationEvent:
        while True:
            event = self.take_nowait()
            if event is not None:
                return event
            self._ready.clear()
            await self._ready.wait()


class Generation:
    """One request's output stream: iterate it for ``TokenDelta``s and then exactly one ``GenerationDone``.

    It can be iterated once. ``cancel`` takes effect at the engine's next step; iteration then ends with
    ``GenerationDone("cancelled")``. Leaving the ``async for`` early (break, or the reading task being cancelled)
    cancels the generation too. If the engine stops, iteration raises ``app.errors.EngineDeadError``.
    """

    def __init__(self, request_id: str, mailbox: GenerationMailbox, on_cancel: Callable[[], None]) -> None:
        self.id = request_id
        self._mailbox = mailbox
        self._on_cancel = on_cancel
        self._cancel_requested = False
        self._iterated = False
        self._finished = False

    @property
    def finished(self) -> bool:
        """True once the engine ended this generation (done, cancelled, or failed)."""
        return self._mailbox.closed

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Ask the engine to stop this generation; a no-op once it has ended or was already cancelled."""
        if self._cancel_requested or self._mailbox.closed:
            return
        self._cancel_requested = True
        self._on_cancel()

    def __aiter__(self) -> AsyncGenerator[GenerationEvent, None]:
        """The events; an async generator, so ``aclose()`` ends the reading (and cancels) deterministically."""
        if self._iterated:
            raise RuntimeError(f"generation {self.id} can be iterated only once")
        self._iterated = True
        return self._events()

    async def _events(self) -> AsyncGenerator[GenerationEvent, None]:
        try:
            while True:
                event = await self._mailbox.take()
                yield event
                if isinstance(event, GenerationDone):
                    self._finished = True
                    return
        finally:
            if not self._finished and not self._mailbox.closed:
                logger.debug("generation %s: reader left before the end; cancelling", self.id)
                self.cancel()

    def __repr__(self) -> str:
        return f"Generation(id={self.id!r}, finished={self.finished})"
