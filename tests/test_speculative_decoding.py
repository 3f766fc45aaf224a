"""Speculative decoding with prompt-lookup drafts, in the text engine on the real SmolLM2-135M model.

A draft only changes how many tokens one model call verifies, never which tokens come out: greedy and seeded
replies are the same with and without drafts, stops and length limits inside a verified draft cut the reply where
they would have, and the conversation's cached tokens stay exact for the next turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.engine.text_engine import TextEngine
from app.text.sampling import SamplingParams
from tests.test_text_engine import (
    INT8_VERSION,
    TWO_LEVEL_VERSION,
    Model,
    Reply,
    StepRecorder,
    _build_model,
    collect,
    load_llm,
    running_engine,
)

DRAFTS = {"max_draft_tokens": 6, "draft_max_decoding": 2}
# Replies that repeat what the prompt says, or what they said themselves: where prompt lookup finds drafts.
REPEATING_PROMPTS = (
    "Repeat this sentence three times: The old lighthouse keeper lit the lamp every evening at seven.",
    "Write the word 'hello' ten times, separated by commas.",
    "Copy this list exactly: apples, pears, plums, cherries, grapes, melons, lemons.",
)


@pytest.fixture(scope="module")
def model() -> Model:
    return _build_model(*load_llm())


@pytest.fixture(scope="module")
def two_level_model() -> Model:
    return _build_model(*load_llm(TWO_LEVEL_VERSION))


@pytest.fixture(params=["model", "two_level_model"])
def any_model(request: pytest.FixtureRequest) -> Model:
    loaded: Model = request.getfixturevalue(request.param)
    return loaded


def token_ids(reply: Reply) -> list[int]:
    return [token for delta in reply.deltas for token in delta.token_ids]


async def _chat(engine: TextEngine, messages: list[tuple[str, str]], params: SamplingParams) -> Reply:
    conversation = engine.open_conversation()
    try:
        return await collect(engine.chat(conversation, messages, params))
    finally:
        engine.close_conversation(conversation)


async def replies(model: Model, params: SamplingParams, prompts: tuple[str, ...], **settings: Any) -> list[Reply]:
    async with running_engine(model, **settings) as engine:
        return [await _chat(engine, [("user", prompt)], params) for prompt in prompts]


def test_greedy_replies_are_the_same_with_drafts_and_most_of_them_come_from_drafts(any_model: Model) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=60)

    async def scenario() -> None:
        plain = await replies(any_model, params, REPEATING_PROMPTS, max_draft_tokens=0)
        recorder = StepRecorder()
        drafted = await replies(any_model, params, REPEATING_PROMPTS, observer=recorder, **DRAFTS)
        for prompt, without, with_drafts in zip(REPEATING_PROMPTS, plain, drafted, strict=True):
            assert token_ids(with_drafts) == token_ids(without), prompt
            assert with_drafts.done.finish_reason == without.done.finish_reason
            assert with_drafts.done.usage == without.done.usage
            assert without.done.timings.draft_tokens == 0
        accepted = sum(reply.done.timings.accepted_draft_tokens for reply in drafted)
        completion = sum(reply.done.usage.completion_tokens for reply in drafted)
        assert accepted >= completion // 3, (accepted, completion)  # a third of the tokens came from drafts
        assert sum(a for _, a in recorder.drafts) == accepted
        assert sum(d for d, _ in recorder.drafts) == sum(r.done.timings.draft_tokens for r in drafted) >= accepted
        # fewer model steps than tokens: drafted tokens were verified several per step
        decode_steps = sum(1 for step in recorder.steps if step[2] > 0)
        assert decode_steps < completion - len(REPEATING_PROMPTS) - accepted // 2

    asyncio.run(scenario())


def test_seeded_sampling_draws_the_same_tokens_with_drafts(model: Model) -> None:
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=1234, max_tokens=60)

    async def scenario() -> None:
        plain = await replies(model, params, REPEATING_PROMPTS, max_draft_tokens=0)
        drafted = await replies(model, params, REPEATING_PROMPTS, **DRAFTS)
        assert [token_ids(reply) for reply in drafted] == [token_ids(reply) for reply in plain]
        assert sum(reply.done.timings.accepted_draft_tokens for reply in drafted) > 0

    asyncio.run(scenario())


def test_a_stop_or_limit_inside_a_verified_draft_ends_the_reply_there_and_the_next_turn_is_unchanged(
    model: Model,
) -> None:
    prompt = REPEATING_PROMPTS[0]

    async def two_turns(params: SamplingParams, **settings: Any) -> tuple[Reply, Reply, int, int]:
        recorder = StepRecorder()
        async with running_engine(model, observer=recorder, **settings) as engine:
            conversation = engine.open_conversation()
            first = await collect(engine.chat(conversation, [("user", prompt)], params))
            assert conversation.slot is not None
            cached = model.runner.slot_length(conversation.slot)
            known = len(conversation.token_ids)
            second = await collect(engine.chat(conversation, [("user", "Now say it once more.")], params))
            engine.close_conversation(conversation)
        # the metrics count what the replies kept: confirmed draft tokens that a stop cut off are not accepted
        accepted = first.done.timings.accepted_draft_tokens + second.done.timings.accepted_draft_tokens
        assert sum(a for _, a in recorder.drafts) == accepted
        assert first.done.timings.accepted_draft_tokens < first.done.usage.completion_tokens
        return first, second, cached, known

    async def scenario() -> None:
        full = (await replies(model, SamplingParams(temperature=0.0, max_tokens=60), (prompt,)))[0]
        stop = "lamp every"
        assert stop in full.text, full.text  # the reply copies the prompt's sentence: drafts from the prompt
        for params in (
            SamplingParams(temperature=0.0, max_tokens=60, stop=(stop,)),
            SamplingParams(temperature=0.0, max_tokens=len(token_ids(full)) // 2 + 1),
        ):
            plain = await two_turns(params, max_draft_tokens=0)
            drafted = await two_turns(params, **DRAFTS)
            assert drafted[0].done.timings.accepted_draft_tokens > 0
            for without, with_drafts in zip(plain[:2], drafted[:2], strict=True):
                assert with_drafts.text == without.text
                assert with_drafts.done.finish_reason == without.done.finish_reason
                assert with_drafts.done.usage == without.done.usage
            cached, known = drafted[2], drafted[3]
            assert cached == known == plain[2]  # the slot holds exactly the conversation's tokens

    asyncio.run(scenario())


def test_drafts_are_on_by_default_and_in_busy_steps_only_on_request_for_replies_whose_drafts_hold(model: Model) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40)

    async def together(**settings: Any) -> tuple[list[Reply], StepRecorder]:
        recorder = StepRecorder()
        async with running_engine(model, observer=recorder, **settings) as engine:
            gathered = await asyncio.gather(*(_chat(engine, [("user", p)], params) for p in REPEATING_PROMPTS))
        return list(gathered), recorder

    def busy_steps_with_drafts(recorder: StepRecorder) -> int:
        # two or three replies decoding (decode rows, no prompt) and more tokens than rows: drafts
        return sum(1 for step in recorder.steps if step[1] == 0 and step[0] >= 2 and step[2] > step[0])

    async def scenario() -> None:
        default = await replies(model, params, REPEATING_PROMPTS[:1])
        assert default[0].done.timings.accepted_draft_tokens > 0  # TextEngineSettings (and the server) default on
        off = await replies(model, params, REPEATING_PROMPTS[:1], max_draft_tokens=0)
        assert off[0].done.timings.draft_tokens == 0 and token_ids(off[0]) == token_ids(default[0])
        plain, _ = await together(max_draft_tokens=0)
        # Every reply drafts while one decodes; with more, by default none, and with a minimum acceptance the
        # replies whose drafts (or free probes) have held.
        busy = {"max_draft_tokens": 6, "draft_max_decoding": 1}
        never, never_recorder = await together(**busy)
        assert busy_steps_with_drafts(never_recorder) == 0
        held, held_recorder = await together(busy_draft_min_acceptance=0.5, **busy)
        assert busy_steps_with_drafts(held_recorder) > 0
        for without, *with_drafts in zip(plain, never, held, strict=True):
            assert all(token_ids(reply) == token_ids(without) for reply in with_drafts)
        assert token_ids(plain[0]) == token_ids(default[0])

    asyncio.run(scenario())


def test_a_predicted_reply_is_drafted_from_and_never_changes_the_reply(model: Model) -> None:
    """Predicted Outputs: a client that knows most of the reply (an edited file, a form letter) sends it along; the
    reply lines up with it and is verified from it, several tokens per step. A wrong prediction changes nothing."""
    prompt = ("Name three red fruits and say one thing about each.",)
    params = SamplingParams(temperature=0.0, max_tokens=48)

    async def scenario() -> None:
        plain = (await replies(model, params, prompt, max_draft_tokens=0))[0]
        lookup_only = (await replies(model, params, prompt, **DRAFTS))[0]
        predicted_params = SamplingParams(temperature=0.0, max_tokens=48, prediction=plain.text)
        predicted = (await replies(model, predicted_params, prompt, **DRAFTS))[0]
        wrong_params = SamplingParams(temperature=0.0, max_tokens=48, prediction="Bananas are yellow. " * 20)
        wrong = (await replies(model, wrong_params, prompt, **DRAFTS))[0]
        for reply in (lookup_only, predicted, wrong):
            assert token_ids(reply) == token_ids(plain)
        accepted = predicted.done.timings.accepted_draft_tokens
        assert accepted >= plain.done.usage.completion_tokens // 2, predicted.done.timings
        assert accepted > lookup_only.done.timings.accepted_draft_tokens  # the prediction found what lookup could not

    asyncio.run(scenario())


def test_a_model_with_int8_activations_takes_no_drafts() -> None:
    """Version 2 quantizes activations to int8: a row of several tokens rounds differently from one token at a time,
    and int8 turns that into different replies, so its engine switches drafts off."""
    int8 = _build_model(*load_llm(INT8_VERSION, accuracy_level=4))
    assert not int8.runner.verifies_drafts_exactly
    reply = asyncio.run(replies(int8, SamplingParams(temperature=0.0, max_tokens=40), REPEATING_PROMPTS[:1], **DRAFTS))
    assert reply[0].done.timings.draft_tokens == 0


def test_repetition_penalties_change_a_repetitive_reply_and_drafts_keep_it_the_same(model: Model) -> None:
    """Penalties count every token sampled, confirmed drafts included, so drafts on and off give one reply."""
    prompts = ("Count from 1 to 30, separated by commas.", "List the days of the week, twice.")  # replies repeat

    async def scenario() -> None:
        plain = await replies(model, SamplingParams(temperature=0.0, max_tokens=60), prompts, max_draft_tokens=0)
        drafted = 0
        for params in (
            SamplingParams(temperature=0.0, max_tokens=60, frequency_penalty=0.3, presence_penalty=0.2),
            SamplingParams(temperature=0.0, max_tokens=60, repetition_penalty=1.1),
            SamplingParams(temperature=0.7, top_p=0.95, seed=7, max_tokens=60, repetition_penalty=1.05),
        ):
            without = await replies(model, params, prompts, max_draft_tokens=0)
            with_drafts = await replies(model, params, prompts, **DRAFTS)
            assert [token_ids(r) for r in with_drafts] == [token_ids(r) for r in without], params
            drafted += sum(r.done.timings.draft_tokens for r in with_drafts)
            if params.is_greedy:
                # the penalized replies differ from the plain ones and repeat their most used token less
                assert [token_ids(r) for r in without] != [token_ids(r) for r in plain], params
                for penalized, reference in zip(without, plain, strict=True):
                    ids, reference_ids = token_ids(penalized), token_ids(reference)
                    top = max(set(reference_ids), key=reference_ids.count)
                    assert ids.count(top) < reference_ids.count(top), (params, penalized.text, reference.text)
        assert drafted > 0  # drafts were verified under penalties (penalized replies repeat less, so fewer drafts)

    asyncio.run(scenario())


def test_log_probabilities_are_the_same_with_drafts(model: Model) -> None:
    """A drafted token's log-probability comes from its own position of the verifying row: the same numbers as
    decoding it alone, to float rounding."""
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=2)

    async def scenario() -> None:
        plain = await replies(model, params, REPEATING_PROMPTS[:1], max_draft_tokens=0)
        drafted = await replies(model, params, REPEATING_PROMPTS[:1], **DRAFTS)
        assert drafted[0].done.timings.accepted_draft_tokens > 0
        without = [item for delta in plain[0].deltas for item in delta.logprobs]
        with_drafts = [item for delta in drafted[0].deltas for item in delta.logprobs]
        assert [item.token_id for item in with_drafts] == [item.token_id for item in without] == token_ids(plain[0])
        for a, b in zip(with_drafts, without, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-3 and [i for i, _ in a.top] == [i for i, _ in b.top]

    asyncio.run(scenario())
