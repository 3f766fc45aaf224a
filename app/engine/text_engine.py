"""The text-generation engine: one per language-model version, shared by every chat session.

One asyncio task runs the step loop: ask the scheduler for the next step's rows, run ``runner.step`` and the sampler
in the engine's own single-thread executor, then, back on the event loop, record the new tokens, detokenize them,
check stop conditions, and put text into each generation's mailbox. New requests join between steps and finished
ones leave, so prefill chunks and decode rows of different sessions share a step (continuous batching). The loop
sleeps on an ``asyncio.Event`` when there is nothing to do.

The event loop owns all mutable state (scheduler, conversations, mailboxes). Only ``runner.step`` and sampling run
in the executor, on inputs built for that step. Slot operations (allocate, truncate, free) happen on the loop and
only while no step is in flight: a cancel or close that arrives during a step is queued and applied right after it.

If the loop crashes, or the engine shuts down, every pending generation ends by raising ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.engine.conversation import Conversation
from app.engine.text_events import (
    FinishReason,
    Generation,
    GenerationDone,
    GenerationMailbox,
    TextEngineObserver,
    Timings,
    Usage,
)
from app.engine.text_request import RequestStatus, TextRequest
from app.engine.text_scheduler import SchedulerConfig, TextScheduler
from app.errors import EngineDeadError
from app.text.chat_template import ChatTemplate
from app.text.detokenizer import IncrementalDetokenizer
from app.text.draft_sampling import RequestSampling, SampledTokens, sample_with_drafts
from app.text.llama_runner import StepInput, logit_offsets
from app.text.sampling import Sampler, SamplingParams, SamplingParamsError, TokenLogprob
from app.text.stopping import StopChecker
from app.text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_FILE_NAME = "tokenizer.json"
WARMUP_PROMPT_TOKENS = 16  # a short prefill and one decode step at start-up, so the first request is not slow


class TextRunner(Protocol):
    """What the engine needs of a runner (``app.text.llama_runner.LlamaRunner``)."""

    def allocate_slot(self) -> int: ...

    def free_slot(self, slot: int) -> None: ...

    def truncate(self, slot: int, length: int) -> None: ...

    def copy_prefix(self, source: int, destination: int, length: int) -> None: ...

    def step(self, batch: Sequence[StepInput]) -> np.ndarray: ...


@dataclass(frozen=True)
class TextEngineSettings:
    max_batch_size: int = 16  # KV slots: conversations whose cache stays resident, and the most running generations
    max_seq_len: int = 2048  # tokens one slot holds (prompt + reply); caps the engine's context length
    prefill_chunk_tokens: int = 256  # token budget per step, so decodes never stall behind a long prompt
    intra_op_threads: int = 2  # onnxruntime threads of the runner (used by ``from_directory``)
    max_waiting_requests: int = 64  # generations that may queue while every KV slot is generating; then OverloadedError
    min_shared_prefix: int = 8  # a conversation's first turn copies another slot's cached prefix this long; 0: never
    # A finished one-off request's slot (kept as a prefix cache) unused this long is freed; 0: kept until needed.
    prefix_cache_idle_s: float = 300.0
    # Speculative decoding (prompt lookup, app.engine.prompt_lookup): draft tokens per decode row, 0 = off; the
    # most decoding requests a step may have for every row to carry its draft; and, in busier steps, the share of a
    # request's recent draft tokens the model must have confirmed for it to draft, 0 = none (each drafted token is
    # one more row of a batched call every request waits for: replies of new text decode slower, docs/benchmarks.md).
    max_draft_tokens: int = 10
    draft_max_decoding: int = 4
    busy_draft_min_acceptance: float = 0.0
    warmup: bool = True  # run one tiny prefill and decode at start()

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "prefill_chunk_tokens", "intra_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEngineSettings.{name} should be a positive integer, got {value!r}")
        for name in (
            "max_waiting_requests",
            "min_shared_prefix",
            "prefix_cache_idle_s",
            "max_draft_tokens",
            "draft_max_decoding",
            "busy_draft_min_acceptance",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TextEngineSettings.{name} should be >= 0, got {getattr(self, name)}")


@dataclass(eq=False)
class _Stream:
    """Engine-side output state of one generation: detokenizer, stop logic, emitted text and timings."""

    request: TextRequest
    generation: Generation
    mailbox: GenerationMailbox
    sampling: RequestSampling  # params, random generator and penalties; the last two used on the inference thread only
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    epoch: int
    submitted_at: float
    emitted: list[str] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)  # tokens whose text is still held back
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when the request asked for them
    first_step_at: float | None = None
    first_token_at: float | None = None


def _runner_capacity(runner: object) -> tuple[int, int] | None:
    """(slots, tokens per slot) of a ``LlamaRunner``'s KV cache; None for runners that do not say."""
    layout = getattr(getattr(runner, "cache", None), "layout", None)
    if layout is None:
        return None
    return int(layout.max_batch_size), int(layout.max_seq_len)


class TextEngine:
    """Continuous-batching chat and completion over one ``LlamaRunner``. Create and use it on one event loop."""

    def __init__(
        self,
        runner: TextRunner,
        tokenizer: TextTokenizer,
        chat_template: ChatTemplate | None,
        model_config: Mapping[str, Any],
        settings: TextEngineSettings | None = None,
        observer: TextEngineObserver | None = None,
    ) -> None:
        self.settings = settings or TextEngineSettings()
        self._runner = runner
        self._tokenizer = tokenizer
        self._template = chat_template
        self._observer = observer
        num_slots, max_seq_len = self.settings.max_batch_size, self.settings.max_seq_len
        capacity = _runner_capacity(runner)
        if capacity is not None:
            if capacity[0] < num_slots:
                logger.warning("runner has %d KV slots, fewer than max_batch_size %d", capacity[0], num_slots)
            num_slots, max_seq_len = min(num_slots, capacity[0]), min(max_seq_len, capacity[1])
        self.context_length: int = min(int(model_config["context_length"]), max_seq_len)
        max_draft_tokens = self.settings.max_draft_tokens
        if max_draft_tokens and not getattr(runner, "verifies_drafts_exactly", True):
            logger.info("speculative drafts off: this model's int8 activations would change replies verified in rows")
            max_draft_tokens = 0
        self._scheduler = TextScheduler(
            runner,
            SchedulerConfig(
                num_slots=num_slots,
                token_budget=max(self.settings.prefill_chunk_tokens, num_slots),
                max_waiting=self.settings.max_waiting_requests,
                min_shared_prefix=self.settings.min_shared_prefix,
                cache_idle_s=self.settings.prefix_cache_idle_s,
                max_draft_tokens=max_draft_tokens,
                draft_max_decoding=self.settings.draft_max_decoding,
                busy_draft_min_acceptance=self.settings.busy_draft_min_acceptance,
            ),
        )
        self._sampler = Sampler()
        self._bos_text = self._special_text(tokenizer.bos_token_id)
        self._eos_text = self._special_text(tokenizer.eos_token_id)
        self._streams: dict[str, _Stream] = {}
        self._request_numbers = itertools.count(1)
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._dead = False
        self._step_in_flight = False

    @classmethod
    def from_directory(
        cls,
        model_dir: Path,
        model_config: Mapping[str, Any],
        settings: TextEngineSettings | None = None,
        observer: TextEngineObserver | None = None,
    ) -> TextEngine:
        """Build the runner, tokenizer and chat template of a converted model folder and an engine over them."""
        from app.text.llama_runner import LlamaRunner

        settings = settings or TextEngineSettings()
        runner = LlamaRunner(
            model_dir,
            model_config,
            intra_op_threads=settings.intra_op_threads,
            max_batch_size=settings.max_batch_size,
            max_seq_len=min(settings.max_seq_len, int(model_config["context_length"])),
        )
        tokenizer = TextTokenizer.from_files(model_dir / TOKENIZER_FILE_NAME, model_config)
        source = model_config.get("chat_template")
        template = ChatTemplate(source) if isinstance(source, str) and source.strip() else None
        return cls(runner, tokenizer, template, model_config, settings, observer)

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokenizer.token_text(token_id)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the executor and the step loop (after an optional warm-up step)."""
        if self._loop_task is not None or self._dead:
            raise RuntimeError("TextEngine.start called twice (or after shutdown)")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort-llm")
        if self.settings.warmup:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._warmup)
        self._loop_task = asyncio.create_task(self._run_loop(), name="text-engine-step-loop")

    def _warmup(self) -> None:
        started = time.perf_counter()
        slot = self._runner.allocate_slot()
        try:
            self._runner.step([StepInput(slot, [0] * WARMUP_PROMPT_TOKENS)])
            self._runner.step([StepInput(slot, [0])])
        finally:
            self._runner.free_slot(slot)
        logger.info("text engine warmed up in %.2f s", time.perf_counter() - started)

    async def shutdown(self) -> None:
        """Stop the loop after its current step; pending generations raise ``EngineDeadError``. Idempotent."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._die(EngineDeadError("the text engine was shut down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # nothing runs there any more: the loop task has ended
            self._executor = None
        self._scheduler.drop_all()

    @property
    def active_requests(self) -> int:
        """Generations running or waiting."""
        return self._scheduler.num_running + self._scheduler.num_waiting

    @property
    def waiting_requests(self) -> int:
        """Generations admitted but not yet running (the queue behind the KV slots)."""
        return self._scheduler.num_waiting

    @property
    def slots_in_use(self) -> int:
        """KV slots held by conversations (running or idle) and one-off completions."""
        return self._scheduler.slots_in_use

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    # -- conversations ---------------------------------------------------------------------------------------------

    def open_conversation(self) -> Conversation:
        """A new, empty conversation. It holds no KV slot until its first turn runs."""
        self._check_alive()
        return Conversation()

    def close_conversation(self, conversation: Conversation) -> None:
        """Cancel the conversation's generation and free its KV slot. Idempotent."""
        if conversation.closed:
            return
        conversation.closed = True
        self._cancel_active(conversation)
        self._scheduler.release(conversation)
        self._apply_pending_between_steps()

    def reset(self, conversation: Conversation) -> None:
        """Forget the history and free the KV slot; a running generation is cancelled and its reply discarded.

        While a step is in flight the slot is freed right after it, unless the next turn arrives first: then the
        conversation keeps its slot and the new prompt reuses the cached prefix they share (the chat template's
        system prompt); the cache truncates to it and gives back the rest."""
        if conversation.closed:
            raise RuntimeError(f"conversation {conversation.id} is closed")
        self._cancel_active(conversation)
        conversation.messages = []
        conversation.epoch += 1
        self._scheduler.release(conversation)
        self._apply_pending_between_steps()

    def _cancel_active(self, conversation: Conversation) -> None:
        if conversation.active_request_id is not None:
            stream = self._streams.get(conversation.active_request_id)
            if stream is not None:
                stream.generation.cancel()

    # -- requests --------------------------------------------------------------------------------------------------

    def chat(
        self, conversation: Conversation, messages: Sequence[tuple[str, str]], params: SamplingParams
    ) -> Generation:
        """Append ``messages`` (role, content) and start the assistant's reply.

        The prompt is the chat template over the whole history; the KV cache of the longest common prefix with the
        conversation's previous turn is reused. Raises ``ContextLengthError``/``SamplingParamsError`` (and template
        errors) before the conversation changes, ``RuntimeError`` if a generation is already running on it,
        ``OverloadedError`` if too many requests wait, ``EngineDeadError`` after shutdown.
        """
        self._check_alive()
        if conversation.closed:
            raise RuntimeError(f"conversation {conversation.id} is closed")
        if conversation.active_request_id is not None:
            raise RuntimeError(
                f"a generation ({conversation.active_request_id}) is already running on conversation "
                f"{conversation.id}; wait for its GenerationDone before the next turn"
            )
        history = [*conversation.messages, *((str(role), str(content)) for role, content in messages)]
        generation = self._submit(conversation, self._chat_prompt_ids(history), params)
        conversation.messages = history
        return generation

    def chat_once(self, messages: Sequence[tuple[str, str]], params: SamplingParams) -> Generation:
        """A reply to a whole message list with no conversation kept (the OpenAI routes). Its KV cache stays behind
        as a prefix cache once it ends, until its slot is needed or ``prefix_cache_idle_s`` passes unused: a next
        request whose messages start the same way (the same conversation one turn later, or the same system prompt)
        takes it over instead of prefilling."""
        self._check_alive()
        history = [(str(role), str(content)) for role, content in messages]
        return self._submit(Conversation(ephemeral=True), self._chat_prompt_ids(history), params)

    def _chat_prompt_ids(self, history: Sequence[tuple[str, str]]) -> list[int]:
        if self._template is None:
            raise RuntimeError("this model has no chat template; use complete()")
        text = self._template.render(
            [{"role": role, "content": content} for role, content in history],
            add_generation_prompt=True,
            bos_token=self._bos_text,
            eos_token=self._eos_text,
        )
        return self._tokenizer.encode(text, allow_special=True, add_special=False)

    def complete(self, prompt: str, params: SamplingParams, *, add_special: bool = False) -> Generation:
        """Continue raw text: no chat template, no history. Control-token text in ``prompt`` is parsed."""
        self._check_alive()
        prompt_ids = self._tokenizer.encode(prompt, allow_special=True, add_special=add_special)
        return self._submit(Conversation(ephemeral=True), prompt_ids, params)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token of this model stands for (log-probabilities name their tokens with them)."""
        return self._tokenizer.token_bytes(token_id)

    def _submit(self, conversation: Conversation, prompt_ids: list[int], params: SamplingParams) -> Generation:
        params.validate(self.context_length, len(prompt_ids))
        outside = [token for token, _ in params.logit_bias if token >= self._tokenizer.vocab_size]
        if outside:
            raise SamplingParamsError(
                f"logit_bias token id {outside[0]} is outside the vocabulary ({self._tokenizer.vocab_size} tokens)"
            )
        max_tokens = params.effective_max_tokens(self.context_length, len(prompt_ids))
        request_id = f"gen-{next(self._request_numbers)}"
        prediction = self._tokenizer.encode(params.prediction, allow_special=False) if params.prediction else []
        request = TextRequest(
            request_id,
            conversation,
            prompt_ids,
            max_output_tokens=max_tokens,
            prediction_ids=np.asarray(prediction, dtype=np.int64),
        )
        mailbox = GenerationMailbox()
        generation = Generation(request_id, mailbox, lambda: self._cancel(request_id))
        stream = _Stream(
            request=request,
            generation=generation,
            mailbox=mailbox,
            sampling=RequestSampling.for_request(params, prompt_ids),
            detokenizer=IncrementalDetokenizer(self._tokenizer, skip_special=True),
            stop=StopChecker.for_request(
                params, model_stop_token_ids=self._tokenizer.stop_token_ids, max_tokens=max_tokens
            ),
            epoch=conversation.epoch,
            submitted_at=time.perf_counter(),
        )
        self._scheduler.add(request)  # raises OverloadedError before anything is recorded
        self._streams[request_id] = stream
        self._wake.set()
        return generation

    def _cancel(self, request_id: str) -> None:
        if request_id not in self._streams:
            return
        self._scheduler.abort(request_id)
        self._apply_pending_between_steps()

    def _apply_pending_between_steps(self) -> None:
        """Apply queued aborts and releases now if no step is running; otherwise the loop applies them next."""
        if self._step_in_flight or self._dead:
            self._wake.set()
            return
        self._end_aborted(self._scheduler.apply_pending())
        self._wake.set()

    def _check_alive(self) -> None:
        if self._dead or self._stopping:
            raise EngineDeadError("the text engine is not running (shut down or crashed)")

    # -- the step loop ---------------------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        try:
            await self._step_loop()
        except asyncio.CancelledError:
            self._die(EngineDeadError("the text engine's step loop was cancelled"))
            raise
        except Exception as error:
            logger.exception("text engine step loop crashed")
            self._die(EngineDeadError(f"the text engine crashed: {type(error).__name__}: {error}"), cause=error)
            self._scheduler.drop_all()  # no step is in flight: the failed one has returned

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            output = self._scheduler.schedule()
            self._end_aborted(output.aborted)
            if not output.rows:
                await self._wait_for_work()
                continue
            inputs = [StepInput(row.slot, row.token_ids, max(1, row.logits_needed)) for row in output.rows]
            sample_rows = [position for position, row in enumerate(output.rows) if row.samples]
            streams = [self._streams[output.rows[position].request.request_id] for position in sample_rows]
            started = time.perf_counter()
            for row in output.rows:
                stream = self._streams[row.request.request_id]
                if stream.first_step_at is None:
                    stream.first_step_at = started
            self._step_in_flight = True
            try:
                sampled_rows = await loop.run_in_executor(
                    self._executor,
                    self._execute_step,
                    inputs,
                    sample_rows,
                    [output.rows[position].draft for position in sample_rows],
                    [stream.sampling for stream in streams],
                )
            finally:
                self._step_in_flight = False
            finished = time.perf_counter()
            sampled = {stream.request.request_id: row for stream, row in zip(streams, sampled_rows, strict=True)}
            accepted = -sum(stream.request.accepted_draft_tokens for stream in streams)
            grown = self._scheduler.update(output, {request_id: row.ids for request_id, row in sampled.items()})
            for request, _ in grown:
                new = sampled[request.request_id]
                self._on_tokens(self._streams[request.request_id], new.ids, new.logprobs, finished)
            accepted += sum(stream.request.accepted_draft_tokens for stream in streams)  # after stops took theirs
            self._notify_observer(
                "on_step", len(output.rows), output.prefill_tokens, output.decode_tokens, finished - started
            )
            if output.draft_tokens:
                self._notify_observer("on_draft", output.draft_tokens, accepted)

    async def _wait_for_work(self) -> None:
        """Sleep until a request, abort or release arrives, or until the next one-off cache expires (the next
        ``schedule`` frees it)."""
        expiry = self._scheduler.next_cache_expiry()
        if expiry is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, expiry - time.monotonic()))

    def _notify_observer(self, hook: str, *args: float) -> None:
        """Call a metrics hook; a failing hook is logged, never allowed to stop the engine."""
        if self._observer is None:
            return
        try:
            getattr(self._observer, hook)(*args)
        except Exception:
            logger.exception("TextEngineObserver.%s failed", hook)

    def _execute_step(
        self,
        inputs: list[StepInput],
        sample_rows: list[int],
        drafts: list[tuple[int, ...]],
        requests: list[RequestSampling],
    ) -> list[SampledTokens]:
        """Runs in the executor: one ``runner.step`` over all the step's rows (the runner splits it into session
        calls if padding would be wasteful), then the new tokens of every row that samples (``sample_rows`` index
        ``inputs``; ``drafts`` and ``requests`` are per sampling row).

        A row with a draft samples position after position while the token sampled equals the drafted one
        (``app.text.draft_sampling``): the tokens are those of decoding one token per step.
        """
        logits = self._runner.step(inputs)
        if not sample_rows:
            return []
        firsts = logit_offsets(inputs)[sample_rows]
        return sample_with_drafts(self._sampler, logits, firsts.tolist(), drafts, requests)

    def _on_tokens(
        self, stream: _Stream, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], now: float
    ) -> None:
        """Detokenize and check the stop conditions of a step's new tokens (``logprobs``: theirs, or empty); a stop
        drops the tokens after it."""
        request = stream.request
        if stream.first_token_at is None:
            stream.first_token_at = now
            self._notify_observer("on_ttft", now - stream.submitted_at)
        for position, token in enumerate(token_ids):
            text, reason = stream.stop.update(token, stream.detokenizer.push(token))
            stream.unsent_ids.append(token)
            if logprobs:
                stream.unsent_logprobs.append(logprobs[position])
            if text:
                stream.mailbox.put_delta(text, tuple(stream.unsent_ids), tuple(stream.unsent_logprobs))
                stream.emitted.append(text)
                stream.unsent_ids.clear()
                stream.unsent_logprobs.clear()
            if reason is not None:
                status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
                unused = len(token_ids) - 1 - position
                self._scheduler.finish(request, status, output_length=len(request.output_ids) - unused)
                self._end_stream(stream, reason, now)
                return

    def _end_aborted(self, requests: Sequence[TextRequest]) -> None:
        now = time.perf_counter()
        for request in requests:
            stream = self._streams.get(request.request_id)
            if stream is not None:
                self._end_stream(stream, "cancelled", now)

    def _end_stream(self, stream: _Stream, reason: FinishReason, now: float) -> None:
        """Hand out the final event and add the reply to the conversation's history."""
        request = stream.request
        del self._streams[request.request_id]
        conversation = request.conversation
        if not conversation.ephemeral and not conversation.closed and conversation.epoch == stream.epoch:
            conversation.messages.append(("assistant", "".join(stream.emitted)))
        first_token_at = stream.first_token_at
        completion = len(request.output_ids)
        decode_s = now - first_token_at if first_token_at is not None else 0.0
        prefill_s = (
            first_token_at - stream.first_step_at
            if first_token_at is not None and stream.first_step_at is not None
            else 0.0
        )
        timings = Timings(
            ttft_ms=(first_token_at - stream.submitted_at) * 1000.0 if first_token_at is not None else 0.0,
            tokens_per_s=(completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0,
            prefill_tokens=request.prefilled_tokens,
            prefill_ms=prefill_s * 1000.0,
            decode_ms=decode_s * 1000.0,
            draft_tokens=request.drafted_tokens,
            accepted_draft_tokens=request.accepted_draft_tokens,
        )
        usage = Usage(len(request.prompt_ids), completion, request.cached_tokens)
        stream.mailbox.put_done(GenerationDone(reason, usage, timings))
        logger.debug("%s finished (%s): %s, %s", request.request_id, reason, usage, timings)

    def _die(self, error: EngineDeadError, cause: BaseException | None = None) -> None:
        """Mark the engine dead and end every pending generation with its own copy of ``error``."""
        self._dead = True
        for stream in self._streams.values():
            copy = EngineDeadError(str(error))
            copy.__cause__ = cause
            stream.mailbox.put_error(copy)
        self._streams.clear()
