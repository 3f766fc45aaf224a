"""Decide when a generation stops and which text may be emitted so far.

Stop sequences can span tokens (``"\\n\\nUser:"`` may arrive as ``"\\n"``, ``"\\nUser"``, ``":"``), so text that could
be the beginning of a stop sequence is held back until it either completes the stop sequence (then it is dropped
together with everything after it) or turns out not to (then it is released). The caller feeds each generated
token with the text its detokenizer produced for it.

When stop sequences overlap, the one that completes first wins (the longest if several complete on the same
character), so the result does not depend on how the text was split into tokens: it is what reading the text one
character at a time would give.

Finish reasons: ``"stop"`` (a stop token or stop sequence) and ``"length"`` (max_tokens reached). A stop found on
the same token that reaches max_tokens is reported as ``"stop"``. The server adds ``"cancelled"`` on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Literal

from app.text.sampling import SamplingParams

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class StopChecker:
    """Per-request stop logic: stop token ids, stop sequences and the token budget."""

    def __init__(self, *, stop: Iterable[str] = (), stop_token_ids: Collection[int] = (), max_tokens: int) -> None:
        self._stop = tuple(stop)
        if any(not sequence for sequence in self._stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {self._stop!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens should be >= 1, got {max_tokens}")
        self._stop_token_ids = frozenset(stop_token_ids)
        self._max_tokens = max_tokens
        # Every proper prefix of a stop sequence: held-back text is always the longest tail of the output that is
        # one of these.
        self._prefixes = frozenset(sequence[:length] for sequence in self._stop for length in range(1, len(sequence)))
        self._longest_prefix = max((len(sequence) - 1 for sequence in self._stop), default=0)
        self._held = ""
        self._num_tokens = 0
        self._finish_reason: FinishReason | None = None

    @classmethod
    def for_request(
        cls, params: SamplingParams, *, model_stop_token_ids: Collection[int], max_tokens: int | None = None
    ) -> StopChecker:
        """A checker for a request: its stop sequences, its stop ids plus the model's (unless ``ignore_eos``), and its
        token budget."""
        model_ids = frozenset() if params.ignore_eos else frozenset(model_stop_token_ids)
        return cls(
            stop=params.stop,
            stop_token_ids=model_ids | frozenset(params.stop_token_ids),
            max_tokens=params.max_tokens if max_tokens is None else max_tokens,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far, including a final stop token."""
        return self._num_tokens

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._finish_reason

    @property
    def held_text(self) -> str:
        """Text held back because it may be the start of a stop sequence."""
        return self._held

    def update(self, token_id: int, text: str) -> tuple[str, FinishReason | None]:
        """Take one generated token and the text it completed; return the text to emit and the finish reason.

        Once a finish reason is returned the request is over and further calls raise RuntimeError.
        """
        if self._finish_reason is not None:
            raise RuntimeError(f"StopChecker.update called after the request finished ({self._finish_reason})")
        self._num_tokens += 1
        if token_id in self._stop_token_ids:
            # The stop token itself is never shown; what was held back was not a stop sequence after all.
            return self._finish(self._take_held(), "stop")

        pending = self._held + text
        stop_at = self._find_stop(pending)
        if stop_at is not None:
            self._held = ""
            return self._finish(pending[:stop_at], "stop")

        hold = self._held_suffix_length(pending)
        self._held = pending[len(pending) - hold :]
        emit = pending[: len(pending) - hold]
        if self._num_tokens >= self._max_tokens:
            return self._finish(emit + self._take_held(), "length")
        return emit, None

    def release_held(self) -> str:
        """Give up on the held text (the caller ends generation for its own reason) and return it."""
        return self._take_held()

    def _take_held(self) -> str:
        held, self._held = self._held, ""
        return held

    def _finish(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        self._finish_reason = reason
        logger.debug("generation finished after %d tokens: %s", self._num_tokens, reason)
        return text, reason

    def _find_stop(self, pending: str) -> int | None:
        """Start of the stop sequence that completes first in ``pending`` (the longest if several end there)."""
        best: tuple[int, int] | None = None  # (end, start) of the best match so far
        for sequence in self._stop:
            start = pending.find(sequence)
            if start >= 0:
                match = (start + len(sequence), start)
                if best is None or match < best:
                    best = match
        return None if best is None else best[1]

    def _held_suffix_length(self, pending: str) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop sequence."""
        for length in range(min(self._longest_prefix, len(pending)), 0, -1):
            if pending[len(pending) - length :] in self._prefixes:
                return length
        return 0
