"""Sampling a step's rows with drafted tokens (app/text/draft_sampling.py): pure, hand-made logits."""

from __future__ import annotations

import numpy as np

from app.text.draft_sampling import RequestSampling, sample_with_drafts
from app.text.penalties import TokenPenalties
from app.text.sampling import Sampler, SamplingParams, make_generator

GREEDY = SamplingParams(temperature=0.0)


def state(params: SamplingParams, penalties: TokenPenalties | None = None, seed: int = 0) -> RequestSampling:
    return RequestSampling(params, make_generator(seed), penalties)


def logits_favouring(*tokens: int, vocab: int = 8, margin: float = 1.0) -> np.ndarray:
    """One logits position per token, each with that token ahead of the others by ``margin``."""
    rows = np.zeros((len(tokens), vocab), dtype=np.float32)
    for position, token in enumerate(tokens):
        rows[position, token] = margin
    return rows


def test_drafted_tokens_are_kept_while_the_samples_agree_then_one_more_is_sampled() -> None:
    # row 0: no draft, one position; row 1: draft (2, 3, 5), positions favour 2, 3, 4, 6
    logits = np.concatenate([logits_favouring(1), logits_favouring(2, 3, 4, 6)])
    sampled = sample_with_drafts(
        Sampler(), logits, [0, 1], [(), (2, 3, 5)], [state(GREEDY), state(GREEDY)]
    )
    # 2 and 3 confirmed, 4 sampled where the draft said 5; the last position is never looked at
    assert [row.ids for row in sampled] == [[1], [2, 3, 4]]
    everything = sample_with_drafts(Sampler(), logits_favouring(2, 3, 5, 6), [0], [(2, 3, 5)], [state(GREEDY)])
    assert [row.ids for row in everything] == [[2, 3, 5, 6]]  # the whole draft confirmed, then one more sampled


def test_penalties_count_the_confirmed_tokens_position_by_position() -> None:
    # Every position favours token 2 by 1.0 over the others (0.0); with a frequency penalty of 0.6, token 2 is at
    # 1.0, then 0.4 (still the best), then -0.2 (below token 0) as the reply uses it.
    logits = logits_favouring(2, 2, 2)
    params = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    penalties = TokenPenalties.for_request(params, prompt_ids=[])
    sampled = sample_with_drafts(Sampler(), logits, [0], [(2, 2)], [state(params, penalties)])
    # position 0: 2 (count 0); position 1: 2 at 0.4 (count 1) confirms the draft's first token; position 2: 2 at
    # -0.2 loses to 0, so the draft's second token is rejected and 0 is sampled
    assert [row.ids for row in sampled] == [[2, 2, 0]]
    assert penalties is not None and penalties.apply(np.zeros(8, dtype=np.float32))[2] == np.float32(-1.2)

    # One token per step with the same penalties gives the same tokens.
    one_by_one = TokenPenalties.for_request(params, prompt_ids=[])
    tokens = []
    for position in range(3):
        (ids,) = sample_with_drafts(Sampler(), logits[position : position + 1], [0], [()], [state(params, one_by_one)])
        tokens += ids.ids
    assert tokens == sampled[0].ids


def test_seeded_sampling_draws_the_same_numbers_with_a_draft() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=11)
    one_by_one, request = [], RequestSampling.for_request(params, [])
    for position in range(6):
        one_by_one += sample_with_drafts(Sampler(), logits[position : position + 1], [0], [()], [request])[0].ids
    # a draft equal to what one-by-one sampling picked is confirmed whole, with the same random numbers
    (drafted,) = sample_with_drafts(Sampler(), logits, [0], [tuple(one_by_one[:5])], [state(params, seed=11)])
    assert drafted.ids == one_by_one


def test_log_probabilities_are_the_log_softmax_of_the_adjusted_row_with_the_best_alternatives() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 40)).astype(np.float32)
    biased_first = logits[0].copy()
    biased_first[7] += 3.0
    draft = (int(np.argmax(biased_first)),)  # greedy confirms it, then samples the second position
    params = SamplingParams(temperature=0.0, logprobs=4, logit_bias={7: 3.0})
    penalties = TokenPenalties.for_request(params, [])
    (tokens,) = sample_with_drafts(Sampler(), logits, [0], [draft], [state(params, penalties)])
    assert len(tokens.ids) == len(tokens.logprobs) == 2
    for position, (token_id, item) in enumerate(zip(tokens.ids, tokens.logprobs, strict=True)):
        adjusted = logits[position].astype(np.float64)
        adjusted[7] += 3.0
        expected = adjusted - np.log(np.exp(adjusted - adjusted.max()).sum()) - adjusted.max()
        assert item.token_id == token_id and abs(item.logprob - expected[token_id]) < 1e-6
        assert [i for i, _ in item.top] == np.argsort(-expected)[:4].tolist()
        assert item.top[0][0] == token_id  # greedy picks the most likely token
    without = sample_with_drafts(Sampler(), logits, [0], [draft], [state(GREEDY)])
    assert without[0].logprobs == []
