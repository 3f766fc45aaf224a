"""One generation as the text scheduler sees it: its tokens, how many of them are in its KV slot, and what its
speculative drafts have earned. Pure data, no model."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from app.engine.conversation import Conversation
from app.engine.prompt_lookup import TokenHistory, TokenIds


class RequestStatus(enum.IntEnum):
    """Ordered so that ``status > RUNNING`` means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING


@dataclass(eq=False)
class TextRequest:
    """Scheduling state of one generation. Tokens ``(prompt_ids + output_ids)[:num_computed]`` are in its slot."""

    request_id: str
    conversation: Conversation
    prompt_ids: list[int]
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of prompt + output whose KV is in the slot
    cached_tokens: int = 0  # prompt tokens reused from the conversation's slot at admission
    prefilled_tokens: int = 0  # prompt tokens run through the model
    max_output_tokens: int | None = None  # the request's token limit; drafts stay within it (None: no drafts)
    prediction_ids: TokenIds = ()  # the reply the client expects (Predicted Outputs), drafted from first
    drafted_tokens: int = 0  # draft tokens run through the model (speculative decoding)
    accepted_draft_tokens: int = 0  # of those, the ones the model confirmed
    # Moving average of the share of its draft tokens the model confirmed (probes count as one-token drafts): with
    # ``SchedulerConfig.busy_draft_min_acceptance`` set, busy steps draft only for requests at or above it.
    draft_acceptance: float = 0.0
    probe_token: int | None = None  # the first token of a draft held back this step, checked against the next token
    last_confirmed: int = 0  # draft tokens the last step confirmed (a stop among them takes them back off the count)
    _history: TokenHistory = field(default_factory=TokenHistory, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Known tokens not yet in the KV cache: the rest of the prompt, or the newest sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def token_range(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens ``start:stop`` of prompt + output, without building the concatenation."""
        n_prompt = len(self.prompt_ids)
        if stop <= n_prompt:
            return tuple(self.prompt_ids[start:stop])
        if start >= n_prompt:
            return tuple(self.output_ids[start - n_prompt : stop - n_prompt])
        return (*self.prompt_ids[start:], *self.output_ids[: stop - n_prompt])

    def computed_ids(self) -> list[int]:
        """The tokens in the slot."""
        return list(self.token_range(0, self.num_computed))

    def history(self) -> TokenHistory:
        """Prompt + output as an int64 array, grown by what was added since the last call (tokens are only ever
        appended, or cut off the end by ``finish``)."""
        kept = min(len(self._history), self.num_tokens)
        self._history.sync(kept, self.token_range(kept, self.num_tokens))
        return self._history

    def record_draft(self, confirmed: int, drafted: int) -> None:
        """Fold a draft's (or a probe's) outcome into ``draft_acceptance``: the latest outcome weighs half."""
        self.draft_acceptance = (self.draft_acceptance + confirmed / drafted) / 2

    def draft_room(self) -> int:
        """How many draft tokens the next decode row may carry: each confirmed one is an output token, and the row
        samples one more after them."""
        if self.max_output_tokens is None:
            return 0
        return max(0, self.max_output_tokens - len(self.output_ids) - 1)
