"""In-process use of a language model for the terminal: ``brook generate`` and ``brook chat`` without a server.

A ``TextEngine`` runs inside the CLI process on its own event loop, with one KV slot: a chat conversation keeps that
slot between turns, so each turn prefills only its new tokens (the per-turn timings show the cached and prefilled
counts). Output goes to text streams (stdout by default) as soon as the engine hands it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from app.engine.text_engine import TextEngine, TextEngineSettings
from app.engine.text_events import Generation, GenerationDone, TokenDelta
from app.errors import BrookError, ContextLengthError, ModelError
from app.repository import LoadedVersion, ModelRepository
from app.text.chat_template import ChatMessageError, ChatTemplateError
from app.text.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    SamplingParams,
    SamplingParamsError,
)

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "smollm2-135m-instruct"
TEXT_GENERATION_TASK = "text-generation"
LOCAL_SLOTS = 1  # one conversation at a time in the terminal; its KV slot stays resident between turns
LOCAL_MAX_SEQ_LEN = 2048  # tokens of prompt plus reply (the engine's context window)
RESET_COMMAND = "/reset"
QUIT_COMMANDS = frozenset({"/quit", "/exit"})


class GenerateRequestError(BrookError):
    """A generate or chat request was refused before it ran (bad sampling parameter, message or template)."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings as the command line gives them; ``None`` means the model's default."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def to_wire(self) -> dict[str, Any]:
        """The fields of a /v1/chat message (docs/protocol.md) for the options that were given."""
        defaults = SamplingOptions()
        fields: dict[str, Any] = {"max_tokens": self.max_tokens}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "max_tokens" and value is not None and value != getattr(defaults, field.name):
                fields[field.name] = list(value) if isinstance(value, tuple) else value
        return fields

    def to_params(self) -> SamplingParams:
        """The engine's parameters; raises ``GenerateRequestError`` for an out-of-range value (before any model
        loads, so a typo fails fast)."""
        params = SamplingParams(
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=DEFAULT_TOP_P if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=self.stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
        )
        try:
            params.validate(context_length=LOCAL_MAX_SEQ_LEN, prompt_tokens=1)
        except SamplingParamsError as error:
            raise GenerateRequestError(str(error)) from error
        return params


def load_text_model(model_dir: Path, name: str, version: int | None) -> LoadedVersion:
    """The fetched text-generation model version (default version when ``version`` is None)."""
    repository = ModelRepository(model_dir)
    loaded = repository.load(name, version, check_hashes=False)  # sizes are checked; hashing 150 MB costs a second
    if loaded.spec.task != TEXT_GENERATION_TASK:
        raise ModelError(f"model {name!r} is a {loaded.spec.task} model; expected a {TEXT_GENERATION_TASK} model")
    return loaded


@asynccontextmanager
async def local_engine(loaded: LoadedVersion, *, threads: int = 2) -> AsyncIterator[TextEngine]:
    """A started ``TextEngine`` over ``loaded`` with one KV slot, shut down on exit."""
    settings = TextEngineSettings(
        max_batch_size=LOCAL_SLOTS, max_seq_len=LOCAL_MAX_SEQ_LEN, intra_op_threads=threads, warmup=False
    )
    engine = TextEngine.from_directory(loaded.directory, loaded.manifest.config, settings)
    await engine.start()
    logger.debug("started %s v%d in-process (context %d tokens)", loaded.name, loaded.version, engine.context_length)
    try:
        yield engine
    finally:
        await engine.shutdown()


def _done_record(done: GenerationDone) -> dict[str, Any]:
    return {
        "type": "done",
        "finish_reason": done.finish_reason,
        "usage": dataclasses.asdict(done.usage),
        "timings": {key: round(value, 3) if isinstance(value, float) else value
                    for key, value in dataclasses.asdict(done.timings).items()},
    }


def describe_done(done: GenerationDone) -> str:
    """One line of usage and timings: finish reason, tokens, cached/prefilled prompt tokens, TTFT, decode speed."""
    usage, timings = done.usage, done.timings
    return (
        f"[{done.finish_reason}; {usage.completion_tokens} tokens; prompt {usage.prompt_tokens} tokens: "
        f"{usage.cached_tokens} cached, {timings.prefill_tokens} prefilled; ttft {timings.ttft_ms:.0f} ms; "
        f"{timings.tokens_per_s:.1f} tok/s]"
    )


def _start(engine: TextEngine, start: Any) -> Generation:
    """Submit a request, turning a refusal (template, messages, context length) into ``GenerateRequestError``."""
    try:
        generation: Generation = start()
    except (ChatTemplateError, ChatMessageError, SamplingParamsError) as error:
        raise GenerateRequestError(str(error)) from error
    return generation


async def stream_generation(generation: Generation, out: TextIO, *, as_json: bool) -> GenerationDone:
    """Write the generation's text to ``out`` as it arrives (or one JSON record per delta) and return its end.

    A JSON delta record is ``{"type": "token", "text", "token_ids"}``; ``token_ids`` usually holds one id, more when
    text was held back (a character split across tokens, or a possible stop sequence). The final record is
    ``{"type": "done", "finish_reason", "usage", "timings"}``.
    """
    async for event in generation:
        if isinstance(event, TokenDelta):
            if as_json:
                record = {"type": "token", "text": event.text, "token_ids": list(event.token_ids)}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                out.write(event.text)
            out.flush()
        else:
            if as_json:
                out.write(json.dumps(_done_record(event)) + "\n")
                out.flush()
            return event
    raise RuntimeError(f"generation {generation.id} ended without a GenerationDone")


async def generate(
    engine: TextEngine,
    prompt: str,
    params: SamplingParams,
    *,
    use_template: bool,
    as_json: bool,
    out: TextIO,
    system: str | None = None,
) -> GenerationDone:
    """One reply to ``prompt``: as the user's message through the chat template (with the model's default system
    prompt unless ``system`` is given), or with ``use_template=False`` as raw text to continue."""
    if use_template:
        messages = [("user", prompt)] if system is None else [("system", system), ("user", prompt)]
        conversation = engine.open_conversation()
        generation = _start(engine, lambda: engine.chat(conversation, messages, params))
    elif system is not None:
        raise GenerateRequestError("a system prompt needs the chat template; drop --system or --no-template")
    else:
        generation = _start(engine, lambda: engine.complete(prompt, params))
    done = await stream_generation(generation, out, as_json=as_json)
    if not as_json:
        out.write("\n")
        out.flush()
    return done


def _read_lines_in_background(stdin: TextIO) -> asyncio.Queue[str | None]:
    """Lines of ``stdin`` (None at end of input) from a daemon thread, so a pending read never blocks shutdown."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        # RuntimeError: the loop closed (the chat ended) while this thread waited for input; nobody reads any more.
        with contextlib.suppress(RuntimeError):
            try:
                for line in iter(stdin.readline, ""):
                    loop.call_soon_threadsafe(lines.put_nowait, line)
            except (OSError, ValueError) as error:  # stdin closed under us
                logger.debug("stdin reader stopped: %s", error)
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="brook-chat-stdin", daemon=True).start()
    return lines


async def chat(
    engine: TextEngine,
    params: SamplingParams,
    *,
    stdin: TextIO,
    out: TextIO,
    system: str | None = None,
    banner: str = "",
) -> int:
    """Interactive multi-turn chat: read a line, stream the reply, print the turn's timings. Returns turns run.

    An empty line, end of input, ``/quit`` or ``/exit`` ends the chat; ``/reset`` starts a new conversation. A turn
    the model refuses (for example once the conversation outgrows the context window) prints the error and the chat
    goes on; ``/reset`` makes room again.
    """
    conversation = engine.open_conversation()
    pending_system = system
    lines = _read_lines_in_background(stdin)
    if banner:
        out.write(banner + "\n")
    out.write(f"empty line or Ctrl-D quits, {RESET_COMMAND} clears the conversation\n")
    turns = 0
    while True:
        out.write("you> ")
        out.flush()
        line = await lines.get()
        text = (line or "").strip()
        if not text or text in QUIT_COMMANDS:
            out.write("\n" if line is None else "")
            return turns
        if text == RESET_COMMAND:
            engine.reset(conversation)
            pending_system = system
            out.write("  [conversation cleared]\n")
            continue
        messages = [("user", text)] if pending_system is None else [("system", pending_system), ("user", text)]
        try:
            generation = _start(engine, lambda: engine.chat(conversation, messages, params))  # noqa: B023 - runs now
        except (GenerateRequestError, ContextLengthError) as error:
            out.write(f"  error: {error}\n")
            continue
        pending_system = None
        out.write("bot> ")
        done = await stream_generation(generation, out, as_json=False)
        out.write(f"\n  {describe_done(done)}\n")
        out.flush()
        turns += 1
