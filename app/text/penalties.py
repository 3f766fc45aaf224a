"""Repetition penalties and logit bias: what a request's tokens so far (and its fixed biases) do to the logits of
its next token.

- ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, as vLLM applies them): every token the reply has
  generated loses ``presence`` once and ``frequency`` per occurrence from its logit. Negative values encourage
  repetition. Only generated tokens count, not the prompt.
- ``repetition_penalty`` (Hugging Face's and vLLM's; llama.cpp's ``repeat_penalty`` over the whole context): every
  token of the prompt or the reply has its logit divided by the penalty when positive, multiplied when negative.
  Above 1 discourages repetition.
- ``logit_bias`` (OpenAI's): a fixed amount added to the logits of the listed token ids (-100 bans a token, 100
  all but forces it).

They apply before temperature, top-k and top-p, so greedy decoding sees them too. The state lives with the
request, on the engine's inference thread: ``TokenPenalties.add`` after every token, including the drafted tokens
a step confirms, so speculative decoding picks the same tokens as one token per step.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from app.text.sampling import SamplingParams


class TokenPenalties:
    """The penalty state of one request: which tokens its prompt and reply hold, how often the reply used each, and
    its logit bias."""

    def __init__(self, params: SamplingParams, prompt_ids: Iterable[int]) -> None:
        self.presence = float(params.presence_penalty)
        self.frequency = float(params.frequency_penalty)
        self.repetition = float(params.repetition_penalty)
        self._counts: dict[int, int] = {}  # generated tokens
        self._seen = set(prompt_ids)  # prompt and generated tokens
        self._seen_ids: npt.NDArray[np.int64] | None = None  # ``_seen`` as an array, rebuilt after it grows
        self._bias_ids = np.array([token for token, _ in params.logit_bias], dtype=np.int64)
        self._bias = np.array([bias for _, bias in params.logit_bias], dtype=np.float32)

    @classmethod
    def for_request(cls, params: SamplingParams, prompt_ids: Iterable[int]) -> TokenPenalties | None:
        """The state for a request whose params change any logit, else None (nothing to do per token)."""
        return cls(params, prompt_ids) if params.adjusts_logits else None

    def add(self, token_id: int) -> None:
        """Count a token the request generated."""
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        if token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids = None

    def apply(self, row: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """A penalized copy of one logits row (token ids outside the row are ignored)."""
        penalized = np.array(row, dtype=np.float32)
        if self.repetition != 1.0:
            if self._seen_ids is None:
                self._seen_ids = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            ids = self._seen_ids[(self._seen_ids >= 0) & (self._seen_ids < penalized.size)]
            values = penalized[ids]
            penalized[ids] = np.where(values > 0, values / self.repetition, values * self.repetition)
        if (self.presence or self.frequency) and self._counts:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            inside = (ids >= 0) & (ids < penalized.size)
            penalized[ids[inside]] -= self.presence + self.frequency * counts[inside]
        if self._bias.size:
            inside = self._bias_ids < penalized.size
            penalized[self._bias_ids[inside]] += self._bias[inside]
        return penalized
