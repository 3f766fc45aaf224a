"""Choose the next token from logits: per-request sampling parameters and a batched sampler.

Order of operations per row, as in llama.cpp and Hugging Face: temperature, then top-k, then top-p over the
renormalized top-k distribution, then one uniform draw from that row's own ``np.random.Generator``. Temperature 0
is greedy (argmax, no random draw). Ties are broken towards the lower token id, so ``top_k=1`` and a tiny
``top_p`` always agree with ``np.argmax``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.errors import ContextLengthError as BrookContextLengthError

logger = logging.getLogger(__name__)

# Defaults recommended by the SmolLM2 model card (temperature 0.2, top_p 0.9).
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
# Top-p first looks at this many most likely tokens; only if they hold less than top_p of the probability mass
# does it sort the whole vocabulary. Either way the result is exact.
NUCLEUS_PRESELECT_TOKENS = 256
# Tokens whose logit is more than this below the best one get weight exactly 0: exp(-80) is far below any sampling
# precision, and the subnormal float32 values that exp would return below about -87 are slow to compute.
LOG_WEIGHT_FLOOR = 80.0
# The draw sums weights in blocks of this many tokens, then inside one block.
DRAW_BLOCK_TOKENS = 1024
# Temperatures below this are treated as 0 (greedy): the limit of sampling as the temperature goes to 0.
GREEDY_BELOW_TEMPERATURE = 1e-5
# OpenAI's range for presence_penalty and frequency_penalty; repetition_penalty's is (0, MAX_REPETITION_PENALTY].
MAX_ADDITIVE_PENALTY = 2.0
MAX_REPETITION_PENALTY = 10.0
# OpenAI's logit_bias: a bias in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] per token id, for at most this many tokens.
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
# Most alternatives a token's log-probability can come with (OpenAI's top_logprobs).
MAX_TOP_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter is out of its range."""


class ContextLengthError(BrookContextLengthError):
    """The prompt does not fit in the model's context window."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops. Call ``validate`` before use."""

    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy; higher = flatter distribution
    top_k: int = 0  # keep the k most likely tokens; 0 = no limit
    top_p: float = DEFAULT_TOP_P  # keep the smallest set of tokens holding this much probability; 1 = no limit
    seed: int | None = None  # seed of the request's random generator; None = fresh entropy
    max_tokens: int = DEFAULT_MAX_TOKENS  # most tokens to generate
    stop: tuple[str, ...] = ()  # stop sequences; the text stops before the first one and never shows it
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation (the model's own too, unless ignore_eos)
    ignore_eos: bool = False  # keep generating past the model's end-of-turn tokens (benchmarks; as vLLM/llama.cpp)
    prediction: str = ""  # the reply the client expects (Predicted Outputs): drafts for speculative decoding only
    presence_penalty: float = 0.0  # subtracted once from the logit of every token the reply has generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the reply
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and reply tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's logit_bias
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives; None: off

    def __post_init__(self) -> None:
        # Accept lists from callers (JSON arrays) but store tuples, so the params stay immutable and hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((token, value) for token, value in bias))

    @property
    def adjusts_logits(self) -> bool:
        """Whether the repetition penalties or the logit bias change any logit (``app.text.penalties``)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 (or below GREEDY_BELOW_TEMPERATURE, where 1/temperature would overflow) is argmax."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, context_length: int, prompt_tokens: int) -> None:
        """Raise ``SamplingParamsError`` or ``ContextLengthError`` with a message naming the bad value."""
        _check_real("temperature", self.temperature)
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise SamplingParamsError(f"temperature should be a finite number >= 0, got {self.temperature!r}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k should be >= 0 (0 disables it), got {self.top_k}")
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p should be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed < 2**64:
                raise SamplingParamsError(f"seed should be in [0, 2**64), got {self.seed}")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens should be >= 1, got {self.max_tokens}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise SamplingParamsError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        for index, sequence in enumerate(self.stop):
            if not isinstance(sequence, str) or not sequence:
                raise SamplingParamsError(f"stop[{index}] should be a non-empty string, got {sequence!r}")
            if len(sequence) > MAX_STOP_SEQUENCE_CHARS:
                raise SamplingParamsError(
                    f"stop[{index}] has {len(sequence)} characters; at most {MAX_STOP_SEQUENCE_CHARS}"
                )
        for index, token_id in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{index}]", token_id)
            if token_id < 0:
                raise SamplingParamsError(f"stop_token_ids[{index}] should be >= 0, got {token_id}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_real(name, value)
            if not -MAX_ADDITIVE_PENALTY <= value <= MAX_ADDITIVE_PENALTY:  # rejects NaN too
                raise SamplingParamsError(
                    f"{name} should be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}] (0 disables it), "
                    f"got {value!r}"
                )
        _check_real("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise SamplingParamsError(
                f"repetition_penalty should be in (0, {MAX_REPETITION_PENALTY:g}] (1 disables it), "
                f"got {self.repetition_penalty!r}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise SamplingParamsError(f"logit_bias has {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS_TOKENS}")
        for token_id, bias in self.logit_bias:
            _check_int("logit_bias token id", token_id)
            if token_id < 0:
                raise SamplingParamsError(f"logit_bias token ids should be >= 0, got {token_id}")
            _check_real(f"logit_bias[{token_id}]", bias)
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # rejects NaN too
                raise SamplingParamsError(
                    f"logit_bias[{token_id}] should be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}"
                )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise SamplingParamsError(
                    f"the number of top log-probabilities should be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}"
                )
        if not isinstance(self.prediction, str):
            raise SamplingParamsError(f"prediction should be a string, got {self.prediction!r}")
        if prompt_tokens < 1:
            raise ContextLengthError(f"the prompt has {prompt_tokens} tokens; at least 1 is needed")
        if prompt_tokens >= context_length:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens but the context window holds {context_length}, "
                "leaving no room to generate; shorten the conversation"
            )

    def effective_max_tokens(self, context_length: int, prompt_tokens: int) -> int:
        """``max_tokens``, cut down so that prompt plus output fit in the context window."""
        return max(0, min(self.max_tokens, context_length - prompt_tokens))


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its position (``SamplingParams.logprobs``).

    Log-probabilities of the model's distribution after repetition penalties and logit bias, before temperature,
    top-k and top-p (what the model said, not how the sampler then narrowed it)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first (ties: lower id)

    @classmethod
    def from_logits(cls, row: npt.NDArray[np.floating], token_id: int, top: int) -> TokenLogprob:
        """The log-softmax of ``row`` at ``token_id``, and its ``top`` most likely tokens."""
        values = np.asarray(row, dtype=np.float32)
        peak = float(values.max())
        log_total = peak + math.log(float(np.exp(values - np.float32(peak)).sum(dtype=np.float64)))
        best: tuple[tuple[int, float], ...] = ()
        if top > 0:
            count = min(top, values.size)
            ids = np.argpartition(values, values.size - count)[values.size - count :]
            ids = ids[np.lexsort((ids, -values[ids]))]  # most likely first, ties by lower id
            best = tuple((int(i), float(values[i]) - log_total) for i in ids)
        return cls(int(token_id), float(values[token_id]) - log_total, best)


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingParamsError(f"{name} should be a number, got {type(value).__name__}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{name} should be an integer, got {type(value).__name__}")


def make_generator(seed: int | None) -> np.random.Generator:
    """The random generator of one request; the same seed gives the same draws."""
    return np.random.default_rng(seed)


def _relative_weights(values: npt.NDArray[np.float32], peak: np.float32) -> npt.NDArray[np.float32]:
    """exp(values - peak) in float32; values more than LOG_WEIGHT_FLOOR below the peak get 0."""
    shifted = values - peak
    negligible = shifted < -LOG_WEIGHT_FLOOR
    np.maximum(shifted, -LOG_WEIGHT_FLOOR, out=shifted)
    np.exp(shifted, out=shifted)
    shifted[negligible] = 0.0
    return shifted


def _ids_from_cutoff(values: npt.NDArray[np.float32], cutoff: np.float32, count: int) -> npt.NDArray[np.intp]:
    """Positions (ascending) of the ``count`` highest ``values``, given the value of the last one kept.

    Everything above the cut-off is kept, then the lowest positions that sit exactly on it: ties go to the lower id.
    """
    keep = values > cutoff
    on_cutoff = np.flatnonzero(values == cutoff)[: count - int(np.count_nonzero(keep))]
    keep[on_cutoff] = True
    return np.flatnonzero(keep)


def _top_count(values: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.intp]:
    """Positions (ascending) of the ``count`` highest values, ties going to the lower position."""
    if count >= values.size:
        return np.arange(values.size)
    cutoff = np.partition(values, values.size - count)[values.size - count]
    return _ids_from_cutoff(values, cutoff, count)


def _draw(weights: npt.NDArray[np.float32], generator: np.random.Generator) -> int:
    """Position drawn with probability proportional to ``weights``, from one uniform number.

    Two levels (block sums, then one block) keep the float64 prefix sums short on a whole vocabulary.
    """
    starts = np.arange(0, weights.size, DRAW_BLOCK_TOKENS)
    block_cumulative = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = generator.random() * block_cumulative[-1]
    block = min(int(np.searchsorted(block_cumulative, target, side="right")), starts.size - 1)
    offset = target - (block_cumulative[block - 1] if block > 0 else 0.0)
    inside = np.cumsum(weights[starts[block] : starts[block] + DRAW_BLOCK_TOKENS], dtype=np.float64)
    choice = min(int(np.searchsorted(inside, offset, side="right")), inside.size - 1)
    position = int(starts[block]) + choice
    # Rounding can land on a zero weight at a block edge; step back to the nearest token that has weight.
    while weights[position] == 0.0 and position > 0:
        position -= 1
    return position


class Sampler:
    """Picks the next token of every row of a logits batch. Stateless; the randomness lives in the generators.

    The kept tokens (top-k, then top-p) are found with selections rather than a sort of the vocabulary, and the
    draw walks them in ascending id order: the distribution is the same as walking them by probability.
    """

    def sample(
        self,
        logits: npt.NDArray[np.floating],
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator],
    ) -> npt.NDArray[np.int64]:
        """Next token ids, shape [n], for logits of shape [n, vocab] and one params/generator per row."""
        if logits.ndim != 2:
            raise ValueError(f"logits should have shape [batch, vocab], got shape {logits.shape}")
        rows, vocab = logits.shape
        if len(params) != rows or len(generators) != rows:
            raise ValueError(f"{rows} logits rows but {len(params)} params and {len(generators)} generators")
        if vocab == 0:
            raise ValueError("logits have an empty vocabulary axis")
        if np.isnan(logits).any():
            bad_rows = np.flatnonzero(np.isnan(logits).any(axis=1)).tolist()
            raise ValueError(f"logits rows {bad_rows} contain NaN")
        if (logits == -np.inf).all(axis=1).any():
            raise ValueError("a logits row is -inf everywhere; no token can be chosen")

        next_ids = np.empty(rows, dtype=np.int64)
        greedy = np.array([p.is_greedy for p in params], dtype=bool)
        if greedy.any():
            next_ids[greedy] = np.argmax(logits[greedy], axis=1)
        sampled_rows: list[int] = np.flatnonzero(~greedy).tolist()
        if sampled_rows:
            inverse_temperatures = np.array([1.0 / params[i].temperature for i in sampled_rows], dtype=np.float32)
            scaled = logits[sampled_rows].astype(np.float32) * inverse_temperatures[:, None]
            for position, row_index in enumerate(sampled_rows):
                next_ids[row_index] = self._sample_row(scaled[position], params[row_index], generators[row_index])
        return next_ids

    @staticmethod
    def kept_token_ids(row: npt.NDArray[np.float32], params: SamplingParams) -> npt.NDArray[np.intp]:
        """Ids (ascending) that top-k then top-p keep for this temperature-scaled logits row."""
        if params.top_k == 1:
            return np.array([int(np.argmax(row))], dtype=np.intp)
        pool = np.arange(row.size)
        if 0 < params.top_k < row.size:
            pool = _top_count(row, params.top_k)
        if params.top_p >= 1.0:
            return pool
        values = row if pool.size == row.size else row[pool]
        peak = values.max()
        target = params.top_p * float(_relative_weights(values, peak).sum(dtype=np.float64))
        # Look for the nucleus among the most likely tokens first; sort all values only if it is not there.
        # (Selecting on the logits, not on the weights: most weights are 0, and ties make selection slow.)
        for size in (NUCLEUS_PRESELECT_TOKENS, values.size):
            count = min(size, values.size)
            top_values = np.sort(np.partition(values, values.size - count)[values.size - count :])[::-1]
            cumulative = np.cumsum(_relative_weights(top_values, peak), dtype=np.float64)
            if cumulative[-1] >= target or count == values.size:
                keep = min(int(np.searchsorted(cumulative, target, side="left")) + 1, count)
                return pool[_ids_from_cutoff(values, top_values[keep - 1], keep)]
        raise AssertionError("unreachable: the last pass covers the whole pool")

    @classmethod
    def _sample_row(cls, row: npt.NDArray[np.float32], params: SamplingParams, generator: np.random.Generator) -> int:
        kept = cls.kept_token_ids(row, params)
        if kept.size == 1:
            return int(kept[0])
        values = row if kept.size == row.size else row[kept]
        return int(kept[_draw(_relative_weights(values, values.max()), generator)])
