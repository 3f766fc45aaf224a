"""Sampling the tokens of a step's rows, drafted tokens included: pure, no model.

A row with a draft (speculative decoding) returns logits for its newest token and for each drafted token. Its
tokens are sampled position by position while the sampled token equals the next drafted one, each with the row's
own random generator and its penalties updated token by token (``app.text.penalties``), so the tokens, the random
numbers drawn and the penalty counts are exactly those of decoding one token per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from app.text.penalties import TokenPenalties
from app.text.sampling import Sampler, SamplingParams


def sample_with_drafts(
    sampler: Sampler,
    logits: npt.NDArray[np.float32],
    firsts: Sequence[int],
    drafts: Sequence[tuple[int, ...]],
    params: Sequence[SamplingParams],
    generators: Sequence[np.random.Generator],
    penalties: Sequence[TokenPenalties | None],
) -> list[list[int]]:
    """The new tokens of each row: ``logits[firsts[k]]`` is row k's first position, followed by one position per
    drafted token; the result holds the confirmed drafted tokens and then one sampled token."""
    first_rows = logits[np.asarray(firsts, dtype=np.intp)]  # a copy: penalties change it in place
    for k, penalty in enumerate(penalties):
        if penalty is not None:
            first_rows[k] = penalty.apply(first_rows[k])
    first_ids = sampler.sample(first_rows, params, generators)
    sampled: list[list[int]] = []
    for k, draft in enumerate(drafts):
        ids = [int(first_ids[k])]
        penalty = penalties[k]
        if penalty is not None:
            penalty.add(ids[0])
        while len(ids) <= len(draft) and ids[-1] == draft[len(ids) - 1]:
            row = logits[firsts[k] + len(ids)]
            if penalty is not None:
                row = penalty.apply(row)
            ids.append(int(sampler.sample(row[None], params[k : k + 1], generators[k : k + 1])[0]))
            if penalty is not None:
                penalty.add(ids[-1])
        sampled.append(ids)
    return sampled
