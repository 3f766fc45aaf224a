"""Draft tokens for speculative decoding, looked up in the sequence itself (prompt lookup, n-gram speculation).

A reply often repeats what came before it: a name or a phrase of the question, a quoted passage, code being
edited, and with small models whole sentences of an earlier answer. If the last ``n`` tokens of a sequence
occurred earlier in it, the tokens that followed them then are a cheap guess of the tokens that come next. The
engine appends the guess (the *draft*) to the newest token of the row, runs all of them through the model in one
call, and keeps the drafted tokens as far as they equal what the model picks itself (``TextScheduler.update``).
Verifying a few tokens costs much less than running them one by one when a call is small, so accepted drafts are
nearly free tokens; a wrong draft costs only its share of the call.

This is the lookup of vLLM's and TGI's n-gram speculation and llama.cpp's ``lookup`` decoding: the longest
``n`` first (from ``max_ngram`` down to ``min_ngram``), the most recent earlier occurrence. A client can also say
what it expects the reply to be (OpenAI's Predicted Outputs, for example a file with a small edit):
``draft_from_prediction`` lines the reply so far up with that text. Pure and model-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

# The shortest run of last tokens whose earlier occurrence proposes a draft, and the longest, tried first. Longer
# runs find the right place in repetitive text (editing a function: 4.0x against 2.0-2.7x decode speed with runs of
# at most 3), and runs of 2 drafted wrongly more often in new text (scripts/bench_drafts.py, docs/benchmarks.md).
DEFAULT_MIN_NGRAM: Final = 3
DEFAULT_MAX_NGRAM: Final = 5

TokenIds = Sequence[int] | npt.NDArray[np.int64]


class TokenHistory:
    """A sequence's tokens as a growing int64 array, for lookups on every decode step: ``sync`` converts only the
    tokens added since the last call (turning a whole 2,000-token history into an array again takes ~44 µs, on the
    event loop, per stream and step; docs/benchmarks.md has the command)."""

    def __init__(self) -> None:
        self._ids = np.empty(64, dtype=np.int64)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        return self._ids[: self._length]

    def sync(self, length: int, tail: Sequence[int]) -> npt.NDArray[np.int64]:
        """Make the history the first ``length`` tokens it holds followed by ``tail``, and return it; ``length``
        is at most ``len(self)``."""
        if not 0 <= length <= self._length:
            raise ValueError(f"length should be within 0..{self._length}, got {length}")
        size = length + len(tail)
        if size > self._ids.size:
            grown = np.empty(max(size, 2 * self._ids.size), dtype=np.int64)
            grown[:length] = self._ids[:length]
            self._ids = grown
        self._ids[length:size] = tail
        self._length = size
        return self.ids


def propose_draft(
    tokens: TokenIds, *, max_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM
) -> tuple[int, ...]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the sequence's last ``n`` tokens.

    ``n`` runs from ``max_ngram`` down to ``min_ngram``; the first ``n`` with a match wins. Empty when nothing
    matches, when ``max_tokens`` < 1, or when the sequence is too short.
    """
    if max_tokens < 1 or min_ngram < 1 or max_ngram < min_ngram or len(tokens) <= min_ngram:
        return ()
    ids = np.asarray(tokens, dtype=np.int64)
    size = ids.size
    # Candidate ends: earlier positions holding the last token (never the last position itself).
    ends = np.flatnonzero(ids[: size - 1] == ids[-1])
    if ends.size == 0:
        return ()
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        matching = ends[ends >= n - 1]
        for back in range(1, n):  # compare the n-gram's earlier tokens, position by position
            if matching.size == 0:
                break
            matching = matching[ids[matching - back] == ids[size - 1 - back]]
        if matching.size:
            start = int(matching[-1]) + 1  # the latest occurrence: its continuation is the freshest guess
            return tuple(int(token) for token in ids[start : start + max_tokens])
    return ()


def draft_from_prediction(
    output: Sequence[int], prediction: TokenIds, *, max_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM
) -> tuple[int, ...]:
    """Up to ``max_tokens`` tokens of ``prediction`` (the reply a client expects) that follow where the reply so far
    lines up with it: the last ``n`` output tokens (longest first, down to one) found in the prediction, at the
    occurrence whose continuation starts nearest the reply's own length (an edited text mostly keeps its places).
    Empty when the reply's tail is nowhere in the prediction, or when nothing of the prediction follows it."""
    if max_tokens < 1 or not len(output) or not len(prediction):
        return ()
    expected = np.asarray(prediction, dtype=np.int64)
    for n in range(min(max_ngram, len(output)), 0, -1):
        starts = np.flatnonzero(expected[: expected.size - n] == output[-n])  # a continuation must follow
        for offset in range(1, n):
            if starts.size == 0:
                break
            starts = starts[expected[starts + offset] == output[-n + offset]]
        if starts.size:
            ends = starts + n
            end = int(ends[np.argmin(np.abs(ends - len(output)))])
            return tuple(int(token) for token in expected[end : end + max_tokens])
    return ()
