"""Beam search over Whisper's decoder, for windows whose prompt has already been fed.

The algorithm is openai-whisper's ``BeamSearchDecoder`` with its ``MaximumLikelihoodRanker`` (faster-whisper's
default decoding is a beam of 5 too):

- every window keeps ``beam_size`` live hypotheses, which all have the same length, so the rows of all windows
  share one decoder call per step (``beam_size`` rows per window);
- at each step every live hypothesis proposes its ``beam_size + 1`` best next tokens after the decoding rules
  (``mask_logits``: suppressed tokens, the timestamp rules); the candidates of a window are ranked by their summed
  log-probability; a candidate ending in EOT joins the window's finished hypotheses, the best others become the
  next live ones;
- a window is done once it has ``round(beam_size * patience)`` finished hypotheses; a hypothesis that reaches its
  token limit or the loop stop finishes too, without EOT;
- a window that runs out of steps adds its live hypotheses to the finished ones; the result is the finished
  hypothesis with the best summed log-probability per token.

Every live window keeps exactly ``beam_size`` rows (a window with fewer candidates fills up with rows that propose
nothing). The self-attention caches follow their hypotheses (``np.take`` of the chosen rows, a few MB per step for
Whisper tiny). A decoder converted with ``shared_cross_attention`` reads one row of audio keys and values per window
for all its hypotheses (18 MB per hypothesis of a 30 s window saved, and the attention's reads); otherwise the
cross-attention caches are repeated once per hypothesis. Either way they are only copied when windows finish.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np

from app.speech.decoding import MASKED_LOGIT, DecodingRules, mask_logits

_MASKED: Final = MASKED_LOGIT / 2  # a log-probability this low belongs to a masked token

# step(tokens [rows, 1], self_k, self_v, cross_k, cross_v) -> (logits [rows, 1, vocab], new self_k, new self_v)
DecoderStep = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]
]


class LoopCheck(Protocol):
    """What the search needs of ``whisper_runner.LoopStop``."""

    def ends_in_loop(self, tokens: Sequence[int]) -> bool: ...


@dataclass(frozen=True)
class Hypothesis:
    """One decoded continuation of a window's prompt."""

    tokens: list[int]  # sampled tokens, EOT excluded
    sum_logprob: float  # log-probabilities of the tokens, the EOT step included when reached
    reached_eot: bool

    @property
    def ranking_score(self) -> float:
        """openai-whisper's ranking without a length penalty: summed log-probability per token."""
        return self.sum_logprob / max(1, len(self.tokens))


@dataclass
class _Live:
    tokens: list[int]
    sum_logprob: float
    source: int  # the row of the step that proposed it: the cache it continues

    @property
    def is_filler(self) -> bool:
        """A row that only keeps its window's row count (see ``beam_search``): it proposes and finishes nothing."""
        return self.sum_logprob == -math.inf


def beam_search(
    step: DecoderStep,
    logits: np.ndarray,
    caches: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    limits: Sequence[int],
    rules: DecodingRules,
    beam_size: int,
    patience: float = 1.0,
    loop_stop: LoopCheck | None = None,
    share_cross: bool = False,
) -> list[Hypothesis]:
    """The best hypothesis of each window.

    ``logits`` [windows, vocab] are those after each window's prompt and ``caches`` (self_k, self_v, cross_k,
    cross_v) the caches after it, one row per window; ``limits[i]`` caps window ``i``'s sampled tokens (EOT
    included), as in greedy decoding. ``share_cross``: the decoder takes one row of cross caches per window for its
    consecutive hypotheses (a Whisper decoder converted with ``shared_cross_attention``); otherwise the cross caches
    are repeated per hypothesis.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if patience <= 0:
        raise ValueError(f"patience must be positive, got {patience}")
    windows = logits.shape[0]
    if len(limits) != windows:
        raise ValueError(f"expected {windows} token limits (one per window), got {len(limits)}")
    wanted = max(1, round(beam_size * patience))
    self_k, self_v, cross_k, cross_v = caches
    # Start from one hypothesis per window; its rows are the window's row (beam_size copies are made after the
    # first step, when there are beam_size different hypotheses to follow).
    live: dict[int, list[_Live]] = {window: [_Live([], 0.0, window)] for window in range(windows)}
    finished: dict[int, list[Hypothesis]] = {window: [] for window in range(windows)}
    cross_row = {window: window for window in range(windows)}  # each window's (first) row of the cross caches
    for _ in range(max(limits)):
        histories = [hypothesis.tokens for window in live for hypothesis in live[window]]  # one per batch row
        log_probs = _log_probs(mask_logits(logits, histories, rules))
        candidates_per_row = min(beam_size + 1, log_probs.shape[1])
        best = np.argpartition(-log_probs, candidates_per_row - 1, axis=1)[:, :candidates_per_row]
        next_live: dict[int, list[_Live]] = {}
        position = 0
        for window, hypotheses in live.items():
            candidates: list[tuple[float, int, int]] = []
            for hypothesis in hypotheses:
                if hypothesis.is_filler:
                    position += 1
                    continue
                for token in best[position]:
                    log_prob = float(log_probs[position, token])
                    if log_prob > _MASKED:  # fewer tokens allowed than candidates wanted
                        candidates.append((hypothesis.sum_logprob + log_prob, position, int(token)))
                position += 1
            candidates.sort(key=lambda candidate: -candidate[0])
            chosen: list[_Live] = []
            for score, source, token in candidates:
                tokens = histories[source]
                if token == rules.eot:
                    if len(finished[window]) < wanted:
                        finished[window].append(Hypothesis(list(tokens), score, True))
                    continue
                extended = [*tokens, token]
                if len(extended) >= limits[window] or (loop_stop is not None and loop_stop.ends_in_loop(extended)):
                    if len(finished[window]) < wanted:
                        finished[window].append(Hypothesis(extended, score, False))
                    continue
                chosen.append(_Live(extended, score, source))
                if len(chosen) == beam_size:
                    break
            if chosen and len(finished[window]) < wanted:
                # Every window keeps exactly beam_size rows (shared cross-attention needs equal groups): fillers
                # repeat a hypothesis with a log-probability of -inf and propose nothing.
                fillers = [_Live(chosen[0].tokens, -math.inf, chosen[0].source)] * (beam_size - len(chosen))
                next_live[window] = chosen + fillers
        if not next_live:
            live = {}
            break
        # Keep the rows of the windows still searching: the self caches per source, the cross caches per window
        # (shared) or per hypothesis, copied only when the windows or their row counts change.
        sources = np.asarray([hypothesis.source for window in next_live for hypothesis in next_live[window]])
        self_k, self_v = np.take(self_k, sources, axis=1), np.take(self_v, sources, axis=1)
        layout = [(window, 1 if share_cross else len(hypotheses)) for window, hypotheses in next_live.items()]
        if layout != [(window, 1 if share_cross else len(hypotheses)) for window, hypotheses in live.items()]:
            cross_rows = np.asarray([cross_row[window] for window, count in layout for _ in range(count)])
            cross_k, cross_v = np.take(cross_k, cross_rows, axis=1), np.take(cross_v, cross_rows, axis=1)
            cross_row, row = {}, 0
            for window, count in layout:
                cross_row[window] = row
                row += count
        live = next_live
        next_tokens = np.asarray([[h.tokens[-1]] for window in live for h in live[window]], dtype=np.int64)
        step_logits, self_k, self_v = step(next_tokens, self_k, self_v, cross_k, cross_v)
        logits = step_logits[:, -1]
    for window, hypotheses in live.items():  # out of steps: the live hypotheses count as finished
        finished[window] += [Hypothesis(h.tokens, h.sum_logprob, False) for h in hypotheses if not h.is_filler]
    nothing = Hypothesis([], 0.0, False)  # every token masked at the first step (no rules do that)
    return [max(finished[window] or [nothing], key=lambda h: h.ranking_score) for window in range(windows)]


def _log_probs(masked_logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of masked float32 logits: exponentials in float32 (all shifted values are <= 0), sums in
    float64, as ``decoding.pick_tokens`` does for the argmax alone."""
    values = np.asarray(masked_logits, dtype=np.float32)
    peaks = values.max(axis=-1, keepdims=True)
    totals = np.exp(values - peaks).sum(axis=-1, keepdims=True, dtype=np.float64)
    result: np.ndarray = (values - peaks) - np.log(totals)
    return result
