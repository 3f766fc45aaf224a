"""Pure scheduling for the text engine: which tokens of which requests run in the next model step.

One step is one ``runner.step`` call. Every step mixes rows freely (continuous batching):

1. every running request that is decoding contributes its newest token (decode rows are never skipped);
2. running requests still prefilling get the next chunk of their prompt, oldest first, from what is left of the
   per-step token budget;
3. waiting requests are admitted, oldest first, while budget and KV slots last.

The token budget (``token_budget``, at least one token per slot) bounds the work of one step, so a long prompt is
prefilled over several steps while the other streams keep decoding.

KV slots are a cache of conversations. A conversation keeps its slot between turns; on admission the request reuses
the longest common prefix of the slot's tokens and its prompt (the slot is truncated to it) and prefills only the
rest. A request that gets a new slot (a conversation's first turn, or one whose slot was evicted) starts from
the longest prefix it shares with any other slot's cached tokens, copied over (``SlotPool.copy_prefix``), when
that is at least ``min_shared_prefix`` tokens: sessions that share a system prompt prefill it once. A finished
one-off request (``Conversation.ephemeral``: completions, stateless chat requests) leaves its slot behind as such a
prefix cache; a request whose best match is one takes the slot over (truncated to the shared prefix) instead of
copying from it, so a stateless client that resends a growing history prefills only what is new. When a request
needs a slot and none is free, the least recently used *idle* conversation (holding a slot but no request; the
caches of one-off requests first) loses its slot. Only when every slot is held by a request does a request wait.
A one-off request's cache that no request has taken over for ``cache_idle_s`` is freed at the next ``schedule``
(the engine wakes itself for it: ``next_cache_expiry``), so memory returns to idle once stateless traffic stops.

Speculative decoding (``max_draft_tokens`` > 0): a decode row can carry a draft after its newest token, the
continuation of the latest earlier occurrence of the sequence's last few tokens (``app.engine.prompt_lookup``). The
caller computes logits at every position of such a row, samples position by position while the sampled token
equals the next drafted one, and reports all the tokens it sampled; ``update`` keeps the drafted tokens that were
confirmed and cuts the rest out of the slot again. The caller's sampling consumes its random numbers exactly as
without a draft, so the tokens are the same either way. A request's drafts never run past its
``max_output_tokens``. While at most ``draft_max_decoding`` requests decode, every decode row with a draft carries
it. In busier steps each drafted token is one more row of a big batched call that every request waits for, so by
default nothing is drafted there; with ``busy_draft_min_acceptance`` > 0 the requests whose recent drafts were
confirmed at least that often carry theirs, the others' drafts are checked for free against the token the model
picks next (a *probe*, so a request that starts repeating text drafts again), and a busy step carries at most as
many draft tokens as a step at the limit could (``max_draft_tokens`` × ``draft_max_decoding``).

Aborts and slot releases are queued and applied at the start of the next ``schedule`` (or by ``apply_pending``
when the caller knows no step is in flight), never in the middle of a step. No asyncio, no onnxruntime: the
caller runs the model, samples, and reports back with ``update`` and ``finish``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.engine.conversation import Conversation, common_prefix_length
from app.engine.prompt_lookup import DEFAULT_MAX_NGRAM, DEFAULT_MIN_NGRAM, draft_from_prediction, propose_draft
from app.engine.text_request import RequestStatus, TextRequest
from app.errors import OverloadedError

logger = logging.getLogger(__name__)


class SlotPool(Protocol):
    """The KV-cache slots of a runner (``LlamaRunner`` is one). Called only between steps."""

    def allocate_slot(self) -> int:
        """A free slot holding no tokens."""
        ...

    def free_slot(self, slot: int) -> None:
        """Give the slot back."""
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first ``length`` cached tokens of the slot."""
        ...

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Start the empty slot ``destination`` with the first ``length`` cached tokens of slot ``source``."""
        ...


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # KV-cache slots of the runner
    token_budget: int  # most tokens (prefill + decode) in one step; at least num_slots so prefill always advances
    max_waiting: int  # requests that may wait beyond the slots that can take them; more raise OverloadedError
    min_shared_prefix: int = 8  # a new slot copies another slot's cached prefix of at least this many tokens; 0: never
    cache_idle_s: float = 0.0  # a one-off request's cache unused this long is freed; 0: kept until its slot is needed
    max_draft_tokens: int = 0  # draft tokens per decode row (speculative decoding, prompt lookup); 0: off
    draft_max_decoding: int = 4  # every request drafts in steps with at most this many decoding requests
    # In busier steps, only requests whose ``draft_acceptance`` is at least this draft; 0: none (the default).
    busy_draft_min_acceptance: float = 0.0
    draft_min_ngram: int = DEFAULT_MIN_NGRAM  # runs of last tokens looked up (app.engine.prompt_lookup)
    draft_max_ngram: int = DEFAULT_MAX_NGRAM

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots should be >= 1, got {self.num_slots}")
        if self.token_budget < self.num_slots:
            raise ValueError(
                f"token_budget ({self.token_budget}) should be at least num_slots ({self.num_slots}), so that "
                "a step with every other slot decoding still has room for prefill"
            )
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting should be >= 0, got {self.max_waiting}")
        if self.min_shared_prefix < 0:
            raise ValueError(f"min_shared_prefix should be >= 0, got {self.min_shared_prefix}")
        if not self.cache_idle_s >= 0:  # rejects NaN too
            raise ValueError(f"cache_idle_s should be >= 0, got {self.cache_idle_s}")
        if self.max_draft_tokens < 0 or self.draft_max_decoding < 0:
            raise ValueError("max_draft_tokens and draft_max_decoding should be >= 0")
        if not 0 <= self.busy_draft_min_acceptance <= 1:  # rejects NaN too
            raise ValueError(f"busy_draft_min_acceptance should be within 0..1, got {self.busy_draft_min_acceptance}")
        if not 1 <= self.draft_min_ngram <= self.draft_max_ngram:
            raise ValueError(
                f"draft n-gram sizes should satisfy 1 <= min <= max, got {self.draft_min_ngram}, {self.draft_max_ngram}"
            )


@dataclass(frozen=True)
class ScheduledRow:
    """New tokens for one request's slot in this step."""

    request: TextRequest
    slot: int
    start: int  # position of the first of these tokens: how many tokens the slot holds before the step
    token_ids: tuple[int, ...]
    samples: bool  # the row reaches the end of the known tokens: sample the request's next token from its logits
    is_prefill: bool  # the tokens come from the prompt
    draft: tuple[int, ...] = ()  # guessed next tokens, the end of ``token_ids`` (speculative decoding)

    @property
    def logits_needed(self) -> int:
        """Positions whose logits the caller needs: the last, and one before each draft token."""
        return len(self.draft) + 1 if self.samples else 0


@dataclass(frozen=True)
class SchedulerOutput:
    rows: tuple[ScheduledRow, ...]
    aborted: tuple[TextRequest, ...]  # requests removed by aborts applied before this step
    evicted: tuple[Conversation, ...]  # idle conversations that lost their slot to admit a request

    @property
    def prefill_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows if row.is_prefill)

    @property
    def decode_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows if not row.is_prefill)

    @property
    def draft_tokens(self) -> int:
        return sum(len(row.draft) for row in self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)


class TextScheduler:
    """Waiting and running queues, the per-step token budget, and the conversations' KV slots."""

    def __init__(self, slots: SlotPool, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._slots = slots
        self._clock = clock
        self._waiting: deque[TextRequest] = deque()
        self._running: list[TextRequest] = []
        self._requests: dict[str, TextRequest] = {}  # waiting + running, by id
        self._idle: OrderedDict[str, Conversation] = OrderedDict()  # slot holders without a request, LRU first
        self._cache_since: dict[str, float] = {}  # idle one-off caches: when their request ended (clock seconds)
        self._slots_in_use = 0
        self._pending_aborts: list[str] = []
        self._pending_releases: dict[str, Conversation] = {}

    # -- queries ---------------------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def slots_in_use(self) -> int:
        return self._slots_in_use

    @property
    def has_pending(self) -> bool:
        """Aborts or releases wait to be applied."""
        return bool(self._pending_aborts or self._pending_releases)

    def request(self, request_id: str) -> TextRequest | None:
        return self._requests.get(request_id)

    def running(self) -> tuple[TextRequest, ...]:
        return tuple(self._running)

    def waiting(self) -> tuple[TextRequest, ...]:
        return tuple(self._waiting)

    def idle_conversations(self) -> tuple[Conversation, ...]:
        """Conversations holding a slot without a request, least recently used first."""
        return tuple(self._idle.values())

    def next_cache_expiry(self) -> float | None:
        """When (clock seconds) the oldest idle one-off cache expires; None if none will."""
        if self.config.cache_idle_s <= 0 or not self._cache_since:
            return None
        return min(self._cache_since.values()) + self.config.cache_idle_s

    # -- commands from the engine ----------------------------------------------------------------------------------

    def add(self, request: TextRequest) -> None:
        """Queue a new request; raises ``OverloadedError`` when the waiting queue is full."""
        conversation = request.conversation
        if conversation.active_request_id is not None:
            raise RuntimeError(
                f"conversation {conversation.id} already has request {conversation.active_request_id} running"
            )
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id} is already in use")
        # Requests that a slot will take at the next step (free or idle slots) do not count as waiting.
        admissible = self.config.num_slots - len(self._running)
        if len(self._waiting) >= admissible + self.config.max_waiting:
            raise OverloadedError(
                f"all {self.config.num_slots} KV slots are generating and {self.config.max_waiting} requests "
                "already wait; try again later"
            )
        conversation.active_request_id = request.request_id
        self._leave_idle(conversation.id)
        # A release still queued (a reset while a step was in flight) must not drop the new turn's cache; the slot's
        # tokens stay exact, so reusing their common prefix with the new prompt is still correct.
        self._pending_releases.pop(conversation.id, None)
        request.status = RequestStatus.WAITING
        self._waiting.append(request)
        self._requests[request.request_id] = request

    def abort(self, request_id: str) -> None:
        """Queue an abort; it takes effect at the next ``schedule`` or ``apply_pending``. Unknown ids are ignored."""
        if request_id in self._requests and request_id not in self._pending_aborts:
            self._pending_aborts.append(request_id)

    def release(self, conversation: Conversation) -> None:
        """Queue freeing the conversation's slot (and forgetting its tokens) once it has no request."""
        self._pending_releases[conversation.id] = conversation

    def apply_pending(self) -> list[TextRequest]:
        """Apply queued aborts and releases now (only while no step is in flight); return the aborted requests."""
        aborted: list[TextRequest] = []
        for request_id in self._pending_aborts:
            request = self._requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.WAITING:
                self._waiting.remove(request)
            else:
                self._running.remove(request)
            self._end(request, RequestStatus.FINISHED_ABORTED)
            aborted.append(request)
        self._pending_aborts.clear()
        for conversation_id, conversation in list(self._pending_releases.items()):
            if conversation.active_request_id is None:
                del self._pending_releases[conversation_id]
                self._drop_slot(conversation)
                conversation.token_ids = []
        return aborted

    def finish(self, request: TextRequest, status: RequestStatus, output_length: int | None = None) -> None:
        """End a running request after ``update`` (stop or length). Its conversation keeps the slot, now idle.

        ``output_length`` keeps only that many output tokens (a step that confirmed draft tokens can add tokens
        after the one that stopped the request); the slot forgets what it cached after them."""
        if not status.is_finished or status is RequestStatus.FINISHED_ABORTED:
            raise ValueError(f"finish takes FINISHED_STOPPED or FINISHED_LENGTH, got {status.name}")
        if request.status is not RequestStatus.RUNNING:
            raise RuntimeError(f"request {request.request_id} is {request.status.name}, not RUNNING")
        if output_length is not None and output_length < len(request.output_ids):
            if output_length < 1:
                raise ValueError(f"output_length should be >= 1, got {output_length}")
            # The tokens cut are the end of the last step's: its own sampled token, then confirmed draft tokens.
            cut = len(request.output_ids) - output_length
            request.accepted_draft_tokens -= min(request.last_confirmed, cut - 1)
            del request.output_ids[output_length:]
            # As after a plain step: every output token but the last is cached.
            request.num_computed = min(request.num_computed, request.num_tokens - 1)
            self._truncate_slot(request)
        self._running.remove(request)
        self._end(request, status)

    def schedule(self) -> SchedulerOutput:
        """Apply pending aborts and releases, free expired one-off caches, then choose this step's rows."""
        aborted = self.apply_pending()
        self._free_expired_caches()
        rows: list[ScheduledRow] = []
        budget = self.config.token_budget
        # Decode rows first: a stream in progress never waits behind a prompt.
        decoding = [request for request in self._running if not request.is_prefilling]
        busy = len(decoding) > self.config.draft_max_decoding
        spare = budget - len(self._running)  # what drafts may take: every running request keeps a token
        if busy:  # no more draft tokens than a step at the limit can carry: the others' step stays bounded
            spare = min(spare, self.config.max_draft_tokens * self.config.draft_max_decoding)
        for request in decoding:
            draft = self._draft(request, spare, busy)
            rows.append(self._row(request, 1, draft))
            budget -= 1 + len(draft)
            spare -= len(draft)
        for request in self._running:
            if request.is_prefilling and budget > 0:
                row = self._row(request, min(request.num_pending, budget))
                rows.append(row)
                budget -= len(row.token_ids)
        evicted: list[Conversation] = []
        for request in list(self._waiting):
            if budget <= 0:
                break
            if not self._admit(request, evicted):
                continue
            row = self._row(request, min(request.num_pending, budget))
            rows.append(row)
            budget -= len(row.token_ids)
        return SchedulerOutput(tuple(rows), tuple(aborted), tuple(evicted))

    def update(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]]) -> list[tuple[TextRequest, int]]:
        """Record a finished step: the rows' tokens are now cached; ``sampled`` has the new tokens of every row with
        ``samples``: one, or for a row with a draft the draft tokens the model confirmed and then its own next token.
        Unconfirmed draft tokens are cut out of the slot. Returns each request that got tokens with their number, in
        row order."""
        grown: list[tuple[TextRequest, int]] = []
        for row in output.rows:
            request = row.request
            if request.status is not RequestStatus.RUNNING:
                raise RuntimeError(f"request {request.request_id} is {request.status.name} after its step")
            request.num_computed += len(row.token_ids)
            if row.is_prefill:
                request.prefilled_tokens += len(row.token_ids)
            if not row.samples:
                continue
            new_ids = list(sampled[request.request_id])
            confirmed = len(new_ids) - 1
            if not 0 <= confirmed <= len(row.draft) or tuple(new_ids[:confirmed]) != row.draft[:confirmed]:
                raise ValueError(f"{request.request_id}: sampled {new_ids} do not continue the draft {row.draft}")
            if confirmed < len(row.draft):
                request.num_computed -= len(row.draft) - confirmed
                self._truncate_slot(request)
            request.last_confirmed = confirmed
            if row.draft:
                request.drafted_tokens += len(row.draft)
                request.accepted_draft_tokens += confirmed
                request.record_draft(confirmed, len(row.draft))
            elif request.probe_token is not None:
                request.record_draft(int(new_ids[0] == request.probe_token), 1)
            request.probe_token = None
            request.output_ids += new_ids
            grown.append((request, len(new_ids)))
        return grown

    def drop_all(self) -> None:
        """Forget every request and free every slot (engine shutdown or crash); conversations keep their tokens."""
        for request in [*self._running, *self._waiting]:
            request.status = RequestStatus.FINISHED_ABORTED
            request.conversation.active_request_id = None
            self._drop_slot(request.conversation)
        for conversation in list(self._idle.values()):
            self._drop_slot(conversation)
        for conversation in self._pending_releases.values():
            self._drop_slot(conversation)
        self._running.clear()
        self._waiting.clear()
        self._requests.clear()
        self._pending_aborts.clear()
        self._pending_releases.clear()

    # -- internals -------------------------------------------------------------------------------------------------

    def _row(self, request: TextRequest, n_tokens: int, draft: tuple[int, ...] = ()) -> ScheduledRow:
        start = request.num_computed
        slot = request.conversation.slot
        assert slot is not None, f"running request {request.request_id} has no slot"
        return ScheduledRow(
            request=request,
            slot=slot,
            start=start,
            token_ids=request.token_range(start, start + n_tokens) + draft,
            samples=start + n_tokens == request.num_tokens,
            is_prefill=start < len(request.prompt_ids),
            draft=draft,
        )

    def _draft(self, request: TextRequest, budget: int, busy: bool) -> tuple[int, ...]:
        """The draft of a decoding request's next row, at most ``budget`` tokens: from the client's prediction of
        the reply if it has one that lines up, else by prompt lookup over its prompt and output. In a busy step a
        request below ``busy_draft_min_acceptance`` keeps its draft's first token as a probe and drafts nothing."""
        request.probe_token = None
        room = min(self.config.max_draft_tokens, request.draft_room(), budget)
        if room < 1 or (busy and not self.config.busy_draft_min_acceptance):
            return ()
        draft: tuple[int, ...] = ()
        if len(request.prediction_ids):
            draft = draft_from_prediction(
                request.output_ids, request.prediction_ids, max_tokens=room, max_ngram=self.config.draft_max_ngram
            )
        if not draft:
            draft = propose_draft(
                request.history().ids,
                max_tokens=room,
                max_ngram=self.config.draft_max_ngram,
                min_ngram=self.config.draft_min_ngram,
            )
        if draft and busy and request.draft_acceptance < self.config.busy_draft_min_acceptance:
            request.probe_token = draft[0]
            return ()
        return draft

    def _truncate_slot(self, request: TextRequest) -> None:
        """Make the slot hold exactly the request's computed tokens again (after unconfirmed or unused drafts)."""
        slot = request.conversation.slot
        assert slot is not None, f"running request {request.request_id} has no slot"
        self._slots.truncate(slot, request.num_computed)

    def _admit(self, request: TextRequest, evicted: list[Conversation]) -> bool:
        """Give the request its conversation's slot (reusing the cached prefix), a free slot, or an evicted one."""
        conversation = request.conversation
        if conversation.slot is not None:
            reuse = conversation.reusable_prefix(request.prompt_ids)
            if reuse < len(conversation.token_ids):
                self._slots.truncate(conversation.slot, reuse)
                del conversation.token_ids[reuse:]
        elif (taken := self._take_over_cache(request)) is not None:
            reuse = taken
        else:
            if self._slots_in_use >= self.config.num_slots:
                if not self._idle:
                    return False
                victim = self._eviction_victim()
                logger.debug("evicting idle %s to admit %s", victim.id, request.request_id)
                self._drop_slot(victim)
                evicted.append(victim)
            conversation.slot = self._slots.allocate_slot()
            conversation.token_ids = []
            self._slots_in_use += 1
            reuse = self._copy_shared_prefix(conversation.slot, request)
        request.cached_tokens = reuse
        request.num_computed = reuse
        request.status = RequestStatus.RUNNING
        self._waiting.remove(request)
        self._running.append(request)
        return True

    def _eviction_victim(self) -> Conversation:
        """The idle conversation to lose its slot: the least recently used prefix cache of a one-off request, else
        the least recently used conversation."""
        victim = next((c for c in self._idle.values() if c.ephemeral), None)
        if victim is None:
            victim = next(iter(self._idle.values()))
        return victim

    def _take_over_cache(self, request: TextRequest) -> int | None:
        """Give the request the slot of the one-off request's cache that shares the longest prefix with its prompt,
        if that is at least ``min_shared_prefix`` tokens and no other slot shares more; return the tokens kept."""
        if self.config.min_shared_prefix == 0:
            return None
        prompt = request.prompt_ids
        best, best_cache = 0, None
        for holder in self._idle.values():  # the longest match; on a tie, a one-off request's cache
            shared = min(common_prefix_length(holder.token_ids, prompt), len(prompt) - 1)
            if shared > best or (shared == best and holder.ephemeral and best_cache is not None):
                best, best_cache = shared, holder
        if best_cache is None or not best_cache.ephemeral or best < max(1, self.config.min_shared_prefix):
            return None
        if any(min(common_prefix_length(r.computed_ids(), prompt), len(prompt) - 1) > best for r in self._running):
            return None  # a running request holds more of it: copy from there instead
        conversation = request.conversation
        self._leave_idle(best_cache.id)
        conversation.slot, best_cache.slot = best_cache.slot, None
        assert conversation.slot is not None
        if best < len(best_cache.token_ids):
            self._slots.truncate(conversation.slot, best)
        conversation.token_ids = list(prompt[:best])
        logger.debug("%s takes over the cached slot %d (%d tokens)", request.request_id, conversation.slot, best)
        return best

    def _copy_shared_prefix(self, slot: int, request: TextRequest) -> int:
        """Copy into the new ``slot`` the longest prefix of the request's prompt that another slot holds (idle
        conversations' tokens, running requests' computed tokens), if it is at least ``min_shared_prefix`` tokens;
        return how many tokens the slot now holds. At least one prompt token is left to run."""
        if self.config.min_shared_prefix == 0:
            return 0
        prompt = request.prompt_ids
        best_slot, best = -1, 0
        holders = [(c.slot, c.token_ids) for c in self._idle.values()]
        holders += [(r.conversation.slot, r.computed_ids()) for r in self._running if r is not request]
        for holder_slot, tokens in holders:
            if holder_slot is not None and holder_slot != slot:
                shared = min(common_prefix_length(tokens, prompt), len(prompt) - 1)
                if shared > best:
                    best_slot, best = holder_slot, shared
        if best < max(1, self.config.min_shared_prefix):
            return 0
        self._slots.copy_prefix(best_slot, slot, best)
        request.conversation.token_ids = list(prompt[:best])
        logger.debug("%s starts from %d tokens shared with slot %d", request.request_id, best, best_slot)
        return best

    def _end(self, request: TextRequest, status: RequestStatus) -> None:
        conversation = request.conversation
        was_running = request.status is RequestStatus.RUNNING
        request.status = status
        del self._requests[request.request_id]
        conversation.active_request_id = None
        if was_running:
            conversation.token_ids = request.computed_ids()
        if conversation.slot is None:
            return
        if conversation.closed or (conversation.ephemeral and self.config.min_shared_prefix == 0):
            self._drop_slot(conversation)
        elif conversation.id not in self._pending_releases:
            self._idle[conversation.id] = conversation
            self._idle.move_to_end(conversation.id)
            if conversation.ephemeral:
                self._cache_since[conversation.id] = self._clock()

    def _leave_idle(self, conversation_id: str) -> None:
        self._idle.pop(conversation_id, None)
        self._cache_since.pop(conversation_id, None)

    def _free_expired_caches(self) -> None:
        if self.config.cache_idle_s <= 0 or not self._cache_since:
            return
        expired_before = self._clock() - self.config.cache_idle_s
        for conversation_id, since in list(self._cache_since.items()):
            if since <= expired_before:
                conversation = self._idle[conversation_id]
                logger.debug(
                    "freeing slot %s: one-off cache %s unused for %.0f s",
                    conversation.slot,
                    conversation_id,
                    self.config.cache_idle_s,
                )
                self._drop_slot(conversation)

    def _drop_slot(self, conversation: Conversation) -> None:
        """Free the conversation's slot; its token ids stay (they describe its last turn)."""
        self._leave_idle(conversation.id)
        if conversation.slot is None:
            return
        self._slots.free_slot(conversation.slot)
        conversation.slot = None
        self._slots_in_use -= 1
