"""One chat session's state in the text engine: its message history and the KV-cache slot that holds its tokens.

A conversation holds a KV slot between turns so the next turn only prefills what changed (the new messages and the
generation prompt). The slot is a cache, not a reservation: when every slot is taken, the engine may evict an idle
conversation's slot; its token ids stay here and its next turn prefills everything again.

Plain synchronous state; the engine's event loop and the scheduler are the only writers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

_conversation_numbers = itertools.count(1)


def new_conversation_id() -> str:
    return f"conv-{next(_conversation_numbers)}"


def common_prefix_length(left: Sequence[int], right: Sequence[int]) -> int:
    """How many leading token ids the two sequences share (compared in numpy: the scheduler matches every new
    prompt against every cached slot on the event loop, and long shared prefixes are the common case)."""
    n = min(len(left), len(right))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(left[:n], dtype=np.int64) != np.asarray(right[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n


@dataclass(eq=False)
class Conversation:
    """A chat session: the messages so far, the tokens last run through the model, and the slot caching them."""

    id: str = field(default_factory=new_conversation_id)
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, content), the assistant's replies included
    # The tokens of the last prompt plus reply. While ``slot`` is set, the slot's KV cache holds exactly these.
    token_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # KV-cache slot, or None when it was never given one or was evicted
    # A one-off request (completion, stateless chat): no further turns. Once its generation ends its slot stays as a
    # prefix cache (evicted first when a slot is needed) that a later request starting the same way takes over.
    ephemeral: bool = False
    closed: bool = False
    active_request_id: str | None = None  # the generation waiting or running on this conversation
    epoch: int = 0  # bumped by reset, so a reply that ends after a reset does not join the new history

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV cache is resident in the slot (0 without a slot)."""
        return len(self.token_ids) if self.slot is not None else 0

    def reusable_prefix(self, prompt_ids: Sequence[int]) -> int:
        """Leading prompt tokens whose KV cache the slot already holds; at least one prompt token is always left
        to run, because the model must see a prompt token to produce the first reply token."""
        if self.slot is None or not prompt_ids:
            return 0
        return min(common_prefix_length(self.token_ids, prompt_ids), len(prompt_ids) - 1)

    def __repr__(self) -> str:
        return (
            f"Conversation(id={self.id!r}, messages={len(self.messages)}, tokens={len(self.token_ids)}, "
            f"slot={self.slot}, active={self.active_request_id!r})"
        )
