"""Sampling a step's rows with drafted tokens (app/text/draft_sampling.py): pure, hand-made logits."""

from __future__ import annotations

import numpy as np

from app.text.draft_sampling import sample_with_drafts
from app.text.penalties import TokenPenalties
from app.text.sampling import Sampler, SamplingParams, make_generator

GREEDY = SamplingParams(temperature=0.0)


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
        Sampler(), logits, [0, 1], [(), (2, 3, 5)], [GREEDY, GREEDY], [make_generator(0)] * 2, [None, None]
    )
    assert sampled == [[1], [2, 3, 4]]  # 2 and 3 confirmed, 4 sampled where the draft said 5; 6 never looked at
    everything = sample_with_drafts(Sampler(), logits_favouring(2, 3, 5, 6), [0], [(2, 3, 5)], [GREEDY],
                                    [make_generator(0)], [None])
    assert everything == [[2, 3, 5, 6]]  # the whole draft confirmed, and the position after it sampled


def test_penalties_count_the_confirmed_tokens_position_by_position() -> None:
    # Every position favours token 2 by 1.0 over the others (0.0); with a frequency penalty of 0.6, token 2 is at
    # 1.0, then 0.4 (still the best), then -0.2 (below token 0) as the reply uses it.
    logits = logits_favouring(2, 2, 2)
    params = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    penalties = TokenPenalties.for_request(params, prompt_ids=[])
    sampled = sample_with_drafts(Sampler(), logits, [0], [(2, 2)], [params], [make_generator(0)], [penalties])
    # position 0: 2 (count 0); position 1: 2 at 0.4 (count 1) confirms the draft's first token; position 2: 2 at
    # -0.2 loses to 0, so the draft's second token is rejected and 0 is sampled
    assert sampled == [[2, 2, 0]]
    assert penalties is not None and penalties.apply(np.zeros(8, dtype=np.float32))[2] == np.float32(-1.2)

    # One token per step with the same penalties gives the same tokens.
    one_by_one = TokenPenalties.for_request(params, prompt_ids=[])
    tokens = []
    for position in range(3):
        (ids,) = sample_with_drafts(Sampler(), logits[position : position + 1], [0], [()], [params],
                                    [make_generator(0)], [one_by_one])
        tokens += ids
    assert tokens == sampled[0]


def test_seeded_sampling_draws_the_same_numbers_with_a_draft() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=11)
    one_by_one, generator = [], make_generator(11)
    for position in range(6):
        one_by_one += sample_with_drafts(Sampler(), logits[position : position + 1], [0], [()], [params], [generator],
                                         [None])[0]
    # a draft equal to what one-by-one sampling picked is confirmed whole, with the same random numbers
    (drafted,) = sample_with_drafts(Sampler(), logits, [0], [tuple(one_by_one[:5])], [params], [make_generator(11)],
                                    [None])
    assert drafted == one_by_one
