"""The text engine in-process on the real SmolLM2-135M model: streaming, KV reuse, batching parity, stops, cancel,
slot accounting, shutdown and crash handling."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.engine.conversation import common_prefix_length
from app.engine.text_engine import TOKENIZER_FILE_NAME, TextEngine, TextEngineSettings
from app.engine.text_events import Generation, GenerationDone, TokenDelta
from app.errors import EngineDeadError, ModelError
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.text.chat_template import ChatTemplate
from app.text.llama_runner import LlamaRunner, StepInput
from app.text.sampling import ContextLengthError, SamplingParams, SamplingParamsError
from app.text.tokenizer import TextTokenizer
from tests.conftest import missing

MODEL_NAME = "smollm2-135m-instruct"
MODEL_DIR_ENV = "BROOK_LLM_MODEL_DIR"
DEFAULT_FALLBACK_DIR = "/tmp/brook-llm/1"
INT8_VERSION = 2  # the repository's version converted with int8 activations (accuracy_level 4)
TWO_LEVEL_VERSION = 4  # v3 plus a decode graph with two-level int8 activations (decode_graph_rows = 4)
RUNNER_SLOTS = 8
RUNNER_MAX_SEQ_LEN = 1024
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
PROMPTS = [
    "Name a fruit that is red.",
    "What is two plus two?",
    "Write a haiku about rain.",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "What colour is the sky on a clear day?",
    "Say hello in French.",
    "What is the boiling point of water in Celsius?",
]


def _fallback_model() -> tuple[Path, dict[str, Any]] | None:
    directory = Path(os.environ.get(MODEL_DIR_ENV, DEFAULT_FALLBACK_DIR))
    manifest, config_file = directory / "manifest.json", directory / "config.json"
    if manifest.is_file():
        return directory, dict(json.loads(manifest.read_text())["config"])
    if config_file.is_file():
        return directory, dict(json.loads(config_file.read_text()))
    return None


def load_llm(version: int | None = None, accuracy_level: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The converted SmolLM2 folder and its config: a version from the model repository (its default one unless
    ``version``), else ``$BROOK_LLM_MODEL_DIR`` if that folder was converted at ``accuracy_level`` (when given)."""
    try:
        loaded = ModelRepository(default_model_dir()).load(MODEL_NAME, version, check_hashes=False)
        return loaded.directory, dict(loaded.manifest.config)
    except ModelError as error:
        reason = str(error)
    fallback = _fallback_model()
    if (
        fallback is None
        or not (fallback[0] / TOKENIZER_FILE_NAME).is_file()
        or (accuracy_level is not None and fallback[1].get("accuracy_level") != accuracy_level)
    ):
        level = "" if accuracy_level is None else f" at accuracy_level {accuracy_level}"
        missing(
            f"{MODEL_NAME} (version {version or 'default'}) is not in the model repository ({reason}) and "
            f"${MODEL_DIR_ENV} ({os.environ.get(MODEL_DIR_ENV, DEFAULT_FALLBACK_DIR)}) has no model "
            f"converted{level}"
        )
        raise AssertionError("unreachable")
    return fallback


@dataclass(frozen=True)
class Model:
    runner: LlamaRunner
    tokenizer: TextTokenizer
    template: ChatTemplate
    config: dict[str, Any]


def _build_model(directory: Path, config: dict[str, Any]) -> Model:
    runner = LlamaRunner(
        directory, config, intra_op_threads=2, max_batch_size=RUNNER_SLOTS, max_seq_len=RUNNER_MAX_SEQ_LEN
    )
    tokenizer = TextTokenizer.from_files(directory / TOKENIZER_FILE_NAME, config)
    return Model(runner, tokenizer, ChatTemplate(config["chat_template"]), config)


@pytest.fixture(scope="module")
def model() -> Model:
    return _build_model(*load_llm())


@pytest.fixture(scope="module")
def int8_model() -> Model:
    """Version 2: int8 activations (accuracy_level 4), where float rounding differences between batch layouts would
    grow to whole logits, so batching must not change a row's numbers at all."""
    return _build_model(*load_llm(INT8_VERSION, accuracy_level=4))


@pytest.fixture(scope="module")
def two_level_model() -> Model:
    """Version 4: v3 plus the two-level int8 graph for calls of up to 4 decode rows, so a row's calls switch between
    two graphs as the batch grows and shrinks."""
    return _build_model(*load_llm(TWO_LEVEL_VERSION))


@pytest.fixture(params=["model", "int8_model", "two_level_model"])
def any_model(request: pytest.FixtureRequest) -> Model:
    """Each model version the batching tests run on."""
    loaded: Model = request.getfixturevalue(request.param)
    return loaded


def assert_same_logits(model: Model, actual: np.ndarray, expected: np.ndarray) -> None:
    """Logits of one row computed in different batch layouts agree: to 1e-3 where the model is fp32 (everything in
    v1; with ``output_rescore_tokens = k``, the best tokens, recomputed exactly). The int8-accurate tail of a rescored
    output projection may move by a quantization step (measured up to 0.016) when float rounding upstream moves an
    activation across an int8 rounding boundary. With a two-level decode graph (v4) a row's small calls run on that
    graph and its big ones on the fp32 graph, which agree to about 2^-14 of the activations: the best logits to 0.05
    (measured up to 0.023 over 631 positions, tests/test_llamacpp_agreement.py)."""
    rescored = int(model.config.get("output_rescore_tokens", 0))
    best_tolerance = 0.05 if model.config.get("decode_graph_rows") else 1e-3
    if not rescored:
        np.testing.assert_allclose(actual, expected, atol=best_tolerance, rtol=0)
        return
    best = np.argsort(expected, axis=-1)[..., -(rescored // 2) :]  # surely inside both layouts' rescored sets
    np.testing.assert_allclose(
        np.take_along_axis(actual, best, -1), np.take_along_axis(expected, best, -1), atol=best_tolerance, rtol=0
    )
    np.testing.assert_allclose(actual, expected, atol=0.1, rtol=0)


class StepRecorder:
    """A TextEngineObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int, float]] = []
        self.ttfts: list[float] = []
        self.drafts: list[tuple[int, int]] = []

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        self.steps.append((batch_size, prefill_tokens, decode_tokens, seconds))

    def on_ttft(self, seconds: float) -> None:
        self.ttfts.append(seconds)

    def on_draft(self, drafted: int, accepted: int) -> None:
        self.drafts.append((drafted, accepted))


@asynccontextmanager
async def running_engine(
    model: Model, runner: Any = None, observer: StepRecorder | None = None, **settings: Any
) -> AsyncIterator[TextEngine]:
    engine = TextEngine(
        runner or model.runner, model.tokenizer, model.template, model.config, TextEngineSettings(**settings), observer
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


@dataclass
class Reply:
    deltas: list[TokenDelta]
    done: GenerationDone

    @property
    def text(self) -> str:
        return "".join(delta.text for delta in self.deltas)


async def collect(generation: Generation) -> Reply:
    deltas: list[TokenDelta] = []
    dones: list[GenerationDone] = []
    async for event in generation:
        assert not dones, "an event arrived after GenerationDone"
        if isinstance(event, TokenDelta):
            assert event.text, "a TokenDelta without text"
            assert "\ufffd" not in event.text, f"broken character in {event.text!r}"
            deltas.append(event)
        else:
            dones.append(event)
    assert len(dones) == 1
    return Reply(deltas, dones[0])


async def chat_once(engine: TextEngine, prompt: str, params: SamplingParams = GREEDY) -> Reply:
    conversation = engine.open_conversation()
    try:
        return await collect(engine.chat(conversation, [("user", prompt)], params))
    finally:
        engine.close_conversation(conversation)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- streaming and conversation turns ------------------------------------------------------------------------------


def test_reply_streams_as_deltas_then_one_done(model: Model) -> None:
    async def scenario() -> None:
        recorder = StepRecorder()
        async with running_engine(model, observer=recorder) as engine:
            conversation = engine.open_conversation()
            reply = await collect(engine.chat(conversation, [("user", PROMPTS[2])], GREEDY))
            assert len(reply.deltas) >= 3
            done = reply.done
            assert done.finish_reason in ("stop", "length")
            assert done.usage.prompt_tokens > 10 and 0 < done.usage.completion_tokens <= 16
            assert done.usage.cached_tokens == 0 and done.timings.prefill_tokens == done.usage.prompt_tokens
            assert done.timings.ttft_ms > 0 and done.timings.decode_ms > 0
            assert conversation.messages == [("user", PROMPTS[2]), ("assistant", reply.text)]
            # every token after the first came from a decode step; drafts the model did not confirm ran too
            rejected = done.timings.draft_tokens - done.timings.accepted_draft_tokens
            decode_tokens = sum(step[2] for step in recorder.steps)
            assert recorder.ttfts and decode_tokens == done.usage.completion_tokens - 1 + rejected
            assert engine.active_requests == 0 and engine.slots_in_use == 1

    run(scenario())


def test_follow_up_turn_reuses_the_cache_and_prefills_only_new_tokens(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            conversation = engine.open_conversation()
            first = await collect(engine.chat(conversation, [("user", "Name three colours.")], GREEDY))
            cached_before = list(conversation.token_ids)
            second = await collect(engine.chat(conversation, [("user", "And three animals?")], GREEDY))
            usage, timings = second.done.usage, second.done.timings
            prompt_ids = conversation.token_ids[: usage.prompt_tokens]
            assert usage.cached_tokens == common_prefix_length(cached_before, prompt_ids)
            assert usage.cached_tokens >= first.done.usage.prompt_tokens  # at least the whole first prompt
            assert timings.prefill_tokens == usage.prompt_tokens - usage.cached_tokens
            new_message_tokens = len(model.tokenizer.encode("And three animals?", allow_special=False))
            assert timings.prefill_tokens <= new_message_tokens + 12  # the message plus the template's markers
            assert [role for role, _ in conversation.messages] == ["user", "assistant", "user", "assistant"]

    run(scenario())


def test_reset_forgets_history_and_frees_the_slot(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            conversation = engine.open_conversation()
            await collect(engine.chat(conversation, [("user", PROMPTS[0])], GREEDY))
            assert engine.slots_in_use == 1
            engine.reset(conversation)
            assert conversation.messages == [] and engine.slots_in_use == 0
            reply = await collect(engine.chat(conversation, [("user", PROMPTS[0])], GREEDY))
            assert reply.done.usage.cached_tokens == 0 and len(conversation.messages) == 2

    run(scenario())


# -- batching ------------------------------------------------------------------------------------------------------


def test_concurrent_greedy_requests_equal_the_same_requests_alone(any_model: Model) -> None:
    model = any_model

    async def scenario() -> None:
        recorder = StepRecorder()
        # Drafts off: alone, a reply verifies drafted tokens in rows of several tokens; here only batching changes.
        settings = {"max_batch_size": 8, "prefill_chunk_tokens": 64, "max_draft_tokens": 0}
        async with running_engine(model, observer=recorder, **settings) as engine:
            alone = [await chat_once(engine, prompt) for prompt in PROMPTS]
            recorder.steps.clear()
            together = await asyncio.gather(*(chat_once(engine, prompt) for prompt in PROMPTS))
            assert max(step[0] for step in recorder.steps) == len(PROMPTS)  # all eight ran in one step
            assert any(step[1] > 0 and step[2] > 0 for step in recorder.steps)  # prefill chunks mixed with decodes
            assert all(step[1] + step[2] <= 64 for step in recorder.steps)
            for prompt, single, batched in zip(PROMPTS, alone, together, strict=True):
                assert batched.text == single.text, prompt
                alone_usage, batched_usage = single.done.usage, batched.done.usage
                assert (batched_usage.prompt_tokens, batched_usage.completion_tokens) == (
                    alone_usage.prompt_tokens,
                    alone_usage.completion_tokens,
                )
                # Alone, each conversation closes before the next: nothing to share. Together, those admitted after
                # the first step copy the chat template's default system prompt from a slot that computed it.
                assert alone_usage.cached_tokens == 0 and batched_usage.cached_tokens < batched_usage.prompt_tokens

    run(scenario())


class RecordingRunner:
    """Delegates to the real runner, counts ``step`` calls and keeps the logits each slot's rows got."""

    def __init__(self, runner: LlamaRunner) -> None:
        self.runner = runner
        self.steps = 0
        self.logits: dict[int, list[np.ndarray]] = {}
        self.first_slot: int | None = None  # the slot of the first row since the last ``clear``

    def clear(self) -> None:
        self.steps = 0
        self.logits = {}
        self.first_slot = None

    def allocate_slot(self) -> int:
        return self.runner.allocate_slot()

    def free_slot(self, slot: int) -> None:
        self.runner.free_slot(slot)

    def truncate(self, slot: int, length: int) -> None:
        self.runner.truncate(slot, length)

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        self.runner.copy_prefix(source, destination, length)

    def step(self, batch: Sequence[StepInput]) -> np.ndarray:
        self.steps += 1
        logits = self.runner.step(batch)
        if self.first_slot is None:
            self.first_slot = batch[0].slot
        for row, item in enumerate(batch):
            self.logits.setdefault(item.slot, []).append(logits[row].copy())
        return logits


def test_a_long_reply_is_unchanged_by_prompts_arriving_while_it_decodes(any_model: Model) -> None:
    """New chats' prompt chunks share steps with the reply's decode rows (padded to the chunk, with a cached past);
    the reply's every logit equals that of the reply alone, and each engine step is one runner call."""
    model = any_model
    story = SamplingParams(temperature=0.0, max_tokens=48)
    prompt = "The history of the Roman Empire"

    async def scenario() -> None:
        recorder = StepRecorder()
        runner = RecordingRunner(model.runner)
        # Drafts off: they would change the reply's rows (tokens per call), not only what shares its calls.
        settings = {"prefill_chunk_tokens": 64, "max_draft_tokens": 0}
        async with running_engine(model, runner=runner, observer=recorder, **settings) as engine:
            runner.clear()
            alone = await collect(engine.complete(prompt, story))
            assert runner.first_slot is not None
            alone_logits = runner.logits[runner.first_slot]
            recorder.steps.clear()
            runner.clear()
            texts: list[str] = []
            dones: list[GenerationDone] = []
            arrivals: list[asyncio.Task[Reply]] = []
            async for event in engine.complete(prompt, story):
                if isinstance(event, TokenDelta):
                    texts.append(event.text)
                    if len(texts) in (2, 5, 9) and len(arrivals) < 3:  # each arrival prefills next to the reply
                        arrivals.append(asyncio.create_task(chat_once(engine, PROMPTS[len(arrivals)])))
                else:
                    dones.append(event)
            await asyncio.gather(*arrivals)
            assert len(arrivals) == 3
            assert sum(1 for step in recorder.steps if step[1] > 0 and step[2] > 0) >= 3  # mixed steps
            assert runner.steps == len(recorder.steps)  # one runner.step per engine step
            assert runner.first_slot is not None
            mixed_logits = runner.logits[runner.first_slot]
            assert len(mixed_logits) == len(alone_logits)
            assert_same_logits(model, np.stack(mixed_logits), np.stack(alone_logits))
            assert "".join(texts) == alone.text
            assert dones[0].usage == alone.done.usage

    run(scenario())


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(model: Model) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16)

    async def scenario() -> None:
        async with running_engine(model) as engine:
            first = await chat_once(engine, PROMPTS[2], params)
            second, *_ = await asyncio.gather(
                chat_once(engine, PROMPTS[2], params),
                chat_once(engine, PROMPTS[3], SamplingParams(temperature=0.9, max_tokens=16)),
                chat_once(engine, PROMPTS[4], GREEDY),
            )
            assert first.text == second.text

    run(scenario())


def test_slow_consumer_gets_merged_deltas(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            generation = engine.complete("The alphabet: A, B, C, D,", SamplingParams(temperature=0.0, max_tokens=12))
            while not generation.finished:
                await asyncio.sleep(0.02)  # the reader is late: the engine does not wait for it
            reply = await collect(generation)
            assert len(reply.deltas) == 1 and reply.done.usage.completion_tokens == 12
            assert len(reply.deltas[0].token_ids) == 12

    run(scenario())


def test_characters_split_over_tokens_arrive_whole(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            generation = engine.complete("中文：你好，世界。我喜欢", SamplingParams(temperature=0.0, max_tokens=16))
            reply = await collect(generation)
            split = [delta for delta in reply.deltas if len(delta.token_ids) > 1]
            assert split, "expected CJK characters spanning several byte-level tokens"
            for delta in split:
                assert model.tokenizer.decode(delta.token_ids) == delta.text  # collect() also checked for U+FFFD
            all_ids = [token for delta in reply.deltas for token in delta.token_ids]
            assert reply.text == model.tokenizer.decode(all_ids, skip_special=True)

    run(scenario())


# -- finishing -----------------------------------------------------------------------------------------------------


def test_max_tokens_gives_length(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            reply = await chat_once(
                engine, "Count from one to one hundred in words.", SamplingParams(temperature=0.0, max_tokens=5)
            )
            assert reply.done.finish_reason == "length" and reply.done.usage.completion_tokens == 5

    run(scenario())


def test_stop_string_cuts_the_text_before_it(model: Model) -> None:
    prompt = "Count from one to twenty in words, separated by commas."
    params = SamplingParams(temperature=0.0, max_tokens=24)

    async def scenario() -> None:
        async with running_engine(model) as engine:
            full = await chat_once(engine, prompt, params)
            assert len(full.text) > 20, full.text
            stop = full.text[12:17]  # a piece in the middle, which may start or end inside a token
            expected = full.text[: full.text.index(stop)]
            cut = await chat_once(engine, prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,)))
            assert cut.done.finish_reason == "stop"
            assert cut.text == expected and stop not in cut.text

    run(scenario())


def test_cancel_mid_reply(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            conversation = engine.open_conversation()
            generation = engine.chat(
                conversation,
                [("user", "Tell me a long story about a dragon.")],
                SamplingParams(temperature=0.0, max_tokens=200),
            )
            received: list[str] = []
            done: GenerationDone | None = None
            async for event in generation:
                if isinstance(event, TokenDelta):
                    received.append(event.text)
                    if len(received) == 3:
                        generation.cancel()
                else:
                    done = event
            assert done is not None and done.finish_reason == "cancelled"
            assert done.usage.completion_tokens < 200
            assert engine.active_requests == 0
            assert conversation.messages[-1] == ("assistant", "".join(received))
            assert engine.slots_in_use == 1  # the conversation keeps its cache for the next turn
            with pytest.raises(RuntimeError, match="iterated only once"):
                generation.__aiter__()
            follow_up = await collect(
                engine.chat(conversation, [("user", "Shorter, please.")], SamplingParams(temperature=0.0, max_tokens=4))
            )
            assert follow_up.done.usage.cached_tokens > done.usage.prompt_tokens

    run(scenario())


def test_leaving_the_loop_early_cancels_the_generation(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            generation = engine.complete("Once upon a time", SamplingParams(temperature=0.0, max_tokens=200))
            iterator = generation.__aiter__()
            await iterator.__anext__()
            await iterator.aclose()  # what `break` or a cancelled reader task does
            while engine.active_requests:
                await asyncio.sleep(0.01)
            assert generation.finished
            assert engine.slots_in_use == 1  # what it computed stays as a prefix cache for later requests

    run(scenario())


# -- slots ---------------------------------------------------------------------------------------------------------


def test_an_unused_one_off_cache_frees_its_slot_on_its_own_after_prefix_cache_idle_s(model: Model) -> None:
    """No request arrives after the stateless reply: the engine wakes itself to free the cache it left behind,
    while an open conversation keeps its slot."""
    params = SamplingParams(temperature=0.0, max_tokens=4)

    async def scenario() -> None:
        async with running_engine(model, prefix_cache_idle_s=0.5) as engine:
            conversation = engine.open_conversation()
            await collect(engine.chat(conversation, [("user", PROMPTS[0])], params))
            await collect(engine.chat_once([("user", PROMPTS[1])], params))
            assert engine.slots_in_use == 2
            for _ in range(300):
                if engine.slots_in_use == 1:
                    break
                await asyncio.sleep(0.01)
            assert engine.slots_in_use == 1 and conversation.slot is not None
            again = await collect(engine.chat_once([("user", PROMPTS[1])], params))  # the engine still serves
            assert again.done.finish_reason in ("stop", "length")

    run(scenario())



def test_a_new_conversation_reuses_the_system_prompt_another_one_cached(model: Model) -> None:
    """Sessions with the same system prompt prefill it once: the next session's first turn copies it from the
    first one's slot, and its greedy reply is the one it gets with sharing off."""
    system = ("system", "You are a concise assistant for a hardware store. Answer in one sentence.")

    async def replies(min_shared_prefix: int) -> list[Reply]:
        async with running_engine(model, min_shared_prefix=min_shared_prefix) as engine:
            first, second = engine.open_conversation(), engine.open_conversation()
            one = await collect(engine.chat(first, [system, ("user", PROMPTS[0])], GREEDY))
            two = await collect(engine.chat(second, [system, ("user", PROMPTS[1])], GREEDY))
            return [one, two]

    shared = run(replies(8))
    alone = run(replies(0))
    assert shared[0].done.usage.cached_tokens == alone[0].done.usage.cached_tokens == 0
    assert alone[1].done.usage.cached_tokens == 0
    system_tokens = len(model.tokenizer.encode(system[1], allow_special=False))
    cached = shared[1].done.usage.cached_tokens
    assert system_tokens <= cached < shared[1].done.usage.prompt_tokens
    assert shared[1].done.timings.prefill_tokens == shared[1].done.usage.prompt_tokens - cached
    assert [reply.text for reply in shared] == [reply.text for reply in alone]


def test_close_conversation_frees_the_slot(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model) as engine:
            idle = engine.open_conversation()
            await collect(engine.chat(idle, [("user", PROMPTS[0])], GREEDY))
            busy = engine.open_conversation()
            generation = engine.chat(busy, [("user", PROMPTS[1])], SamplingParams(temperature=0.0, max_tokens=100))
            assert engine.slots_in_use == 1  # busy is not admitted before the loop's next step
            engine.close_conversation(idle)
            engine.close_conversation(idle)  # idempotent
            assert engine.slots_in_use == 0
            first = await generation.__aiter__().__anext__()
            assert isinstance(first, TokenDelta) and engine.slots_in_use == 1
            engine.close_conversation(busy)
            while not generation.finished:
                await asyncio.sleep(0.01)
            assert engine.slots_in_use == 0 and engine.active_requests == 0
            with pytest.raises(RuntimeError, match="closed"):
                engine.chat(busy, [("user", "hi")], GREEDY)

    run(scenario())


def test_idle_conversations_are_evicted_least_recently_used_first(model: Model) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4)

    async def scenario() -> None:
        async with running_engine(model, max_batch_size=2) as engine:
            a, b, c = (engine.open_conversation() for _ in range(3))
            await collect(engine.chat(a, [("user", PROMPTS[0])], params))
            await collect(engine.chat(b, [("user", PROMPTS[1])], params))
            await collect(engine.chat(c, [("user", PROMPTS[2])], params))  # evicts a, the least recently used
            assert a.slot is None and b.slot is not None and c.slot is not None
            assert engine.slots_in_use == 2
            history_of_a, tokens_of_c = len(a.token_ids), list(c.token_ids)
            again = await collect(engine.chat(a, [("user", "Thanks.")], params))  # evicts b
            # a's own cache is gone: only the chat template's start, shared with c's slot, is copied (not prefilled)
            usage = again.done.usage
            shared = common_prefix_length(tokens_of_c, a.token_ids[: usage.prompt_tokens])
            assert usage.cached_tokens == shared < history_of_a
            assert again.done.timings.prefill_tokens == usage.prompt_tokens - shared
            assert b.slot is None
            follow_up = await collect(engine.chat(c, [("user", "Thanks.")], params))
            assert follow_up.done.usage.cached_tokens > 0

    run(scenario())


# -- validation ----------------------------------------------------------------------------------------------------


def test_bad_requests_raise_before_the_conversation_changes(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model, max_seq_len=256) as engine:
            conversation = engine.open_conversation()
            with pytest.raises(SamplingParamsError):
                engine.chat(conversation, [("user", "hi")], SamplingParams(temperature=-1.0))
            with pytest.raises(ContextLengthError):
                engine.chat(conversation, [("user", "word " * 400)], GREEDY)
            assert conversation.messages == [] and engine.active_requests == 0
            generation = engine.chat(conversation, [("user", "hi")], GREEDY)
            with pytest.raises(RuntimeError, match="already running"):
                engine.chat(conversation, [("user", "again")], GREEDY)
            await collect(generation)
            assert len(conversation.messages) == 2

    run(scenario())


def test_reply_is_cut_to_the_context_window(model: Model) -> None:
    async def scenario() -> None:
        async with running_engine(model, max_seq_len=64) as engine:
            reply = await chat_once(engine, "Tell me about whales.", SamplingParams(temperature=0.0, max_tokens=500))
            usage = reply.done.usage
            assert reply.done.finish_reason in ("length", "stop")
            assert usage.prompt_tokens + usage.completion_tokens <= 64

    run(scenario())


# -- shutdown and crashes ------------------------------------------------------------------------------------------


def test_shutdown_makes_pending_iteration_raise_engine_dead(model: Model) -> None:
    async def scenario() -> None:
        engine = TextEngine(model.runner, model.tokenizer, model.template, model.config, TextEngineSettings())
        await engine.start()
        running = engine.complete("Once upon a time", SamplingParams(temperature=0.0, max_tokens=200))
        iterator = running.__aiter__()
        assert isinstance(await iterator.__anext__(), TokenDelta)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            while True:
                await iterator.__anext__()
        with pytest.raises(EngineDeadError):
            engine.complete("more", GREEDY)
        with pytest.raises(EngineDeadError):
            engine.open_conversation()
        assert engine.slots_in_use == 0 and engine.active_requests == 0
        await engine.shutdown()  # idempotent

    run(scenario())


class ExplodingRunner:
    """Delegates to the real runner until ``explode`` is set, then every step raises."""

    def __init__(self, runner: LlamaRunner) -> None:
        self.runner = runner
        self.explode = False

    def allocate_slot(self) -> int:
        return self.runner.allocate_slot()

    def free_slot(self, slot: int) -> None:
        self.runner.free_slot(slot)

    def truncate(self, slot: int, length: int) -> None:
        self.runner.truncate(slot, length)

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        self.runner.copy_prefix(source, destination, length)

    def step(self, batch: Sequence[StepInput]) -> np.ndarray:
        if self.explode:
            raise RuntimeError("simulated onnxruntime failure")
        return self.runner.step(batch)


def test_a_crashed_step_loop_fails_every_pending_generation(model: Model) -> None:
    async def scenario() -> None:
        runner = ExplodingRunner(model.runner)
        async with running_engine(model, runner=runner) as engine:
            generations = [
                engine.complete(prompt, SamplingParams(temperature=0.0, max_tokens=100))
                for prompt in ("Once upon a time", "The history of Rome", "My favourite recipe is")
            ]
            first = await generations[0].__aiter__().__anext__()
            assert isinstance(first, TokenDelta)
            runner.explode = True
            for generation in generations[1:]:
                with pytest.raises(EngineDeadError, match="simulated onnxruntime failure"):
                    await collect(generation)
            with pytest.raises(EngineDeadError):
                engine.complete("more", GREEDY)
            assert engine.slots_in_use == 0

    run(scenario())
