"""Sampling the tokens of a step's rows, drafted tokens included: pure, no model.

A row with a draft (speculative decoding) returns logits for its newest token and for each drafted token. Its
tokens are sampled position by position while the sampled token equals the next drafted one, each with the row's
own random generator and its penalties updated token by token (``app.text.penalties``), so the tokens, the random
numbers drawn and the penalty counts are exactly those of decoding one token per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from app.text.penalties import TokenPenalties
from app.text.sampling import Sampler, SamplingParams, TokenLogprob, make_generator


@dataclass(eq=False)
class RequestSampling:
    """How one request picks its tokens: its params, its random generator and its penalty state (None when its
    params change no logit). The generator and the penalties change with every token sampled, so they are used on
    the engine's inference thread only."""

    params: SamplingParams
    generator: np.random.Generator
    penalties: TokenPenalties | None = None

    @classmethod
    def for_request(cls, params: SamplingParams, prompt_ids: Sequence[int]) -> RequestSampling:
        """A request's fresh state: a generator seeded with ``params.seed``, penalties counting its prompt."""
        return cls(params, make_generator(params.seed), TokenPenalties.for_request(params, prompt_ids))


@dataclass
class SampledTokens:
    """A row's new tokens: confirmed drafted tokens, then one sampled token; with their log-probabilities when the
    request asked for them (``SamplingParams.logprobs``), else none."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def append(self, token_id: int, row: npt.NDArray[np.floating], params: SamplingParams) -> None:
        self.ids.append(token_id)
        if params.logprobs is not None:
            self.logprobs.append(TokenLogprob.from_logits(row, token_id, params.logprobs))


def sample_with_drafts(
    sampler: Sampler,
    logits: npt.NDArray[np.float32],
    firsts: Sequence[int],
    drafts: Sequence[tuple[int, ...]],
    requests: Sequence[RequestSampling],
) -> list[SampledTokens]:
    """The new tokens of each row: ``logits[firsts[k]]`` is row k's first position, followed by one position per
    drafted token; ``drafts[k]`` and ``requests[k]`` are row k's draft and sampling state."""
    first_rows = logits[np.asarray(firsts, dtype=np.intp)]  # a copy: penalties change it in place
    for k, request in enumerate(requests):
        if request.penalties is not None:
            first_rows[k] = request.penalties.apply(first_rows[k])
    first_ids = sampler.sample(first_rows, [r.params for r in requests], [r.generator for r in requests])
    sampled: list[SampledTokens] = []
    for k, (draft, request) in enumerate(zip(drafts, requests, strict=True)):
        tokens = SampledTokens()
        tokens.append(int(first_ids[k]), first_rows[k], request.params)
        penalties = request.penalties
        if penalties is not None:
            penalties.add(tokens.ids[0])
        while len(tokens.ids) <= len(draft) and tokens.ids[-1] == draft[len(tokens.ids) - 1]:
            row = logits[firsts[k] + len(tokens.ids)]
            if penalties is not None:
                row = penalties.apply(row)
            token_id = int(sampler.sample(row[None], [request.params], [request.generator])[0])
            tokens.append(token_id, row, request.params)
            if penalties is not None:
                penalties.add(token_id)
        sampled.append(tokens)
    return sampled
