"""The text scheduler without a model: hand-made sampled tokens, a fake slot pool that checks every slot operation."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.conversation import Conversation, common_prefix_length
from app.engine.text_request import RequestStatus, TextRequest
from app.engine.text_scheduler import SchedulerConfig, SchedulerOutput, TextScheduler
from app.errors import OverloadedError

SAMPLED_TOKEN = 7


class FakeSlots:
    """A KV slot pool that tracks each slot's length and refuses impossible operations, like LlamaRunner's."""

    def __init__(self, num_slots: int, max_seq_len: int = 10_000) -> None:
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.contents: dict[int, list[int]] = {}  # the tokens each allocated slot holds
        self.truncations: list[tuple[int, int]] = []
        self.copies: list[tuple[int, int, int]] = []

    def allocate_slot(self) -> int:
        free = sorted(set(range(self.num_slots)) - set(self.contents))
        assert free, "allocate_slot called with every slot in use"
        self.contents[free[0]] = []
        return free[0]

    @property
    def lengths(self) -> dict[int, int]:
        return {slot: len(tokens) for slot, tokens in self.contents.items()}

    def free_slot(self, slot: int) -> None:
        assert slot in self.contents, f"free_slot({slot}) of a slot that is not allocated"
        del self.contents[slot]

    def truncate(self, slot: int, length: int) -> None:
        assert 0 <= length <= len(self.contents[slot]), f"truncate({slot}, {length}) beyond its length"
        del self.contents[slot][length:]
        self.truncations.append((slot, length))

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        assert source != destination and self.contents[destination] == [], f"copy_prefix into busy slot {destination}"
        assert 0 <= length <= len(self.contents[source]), f"copy_prefix({source}, {destination}, {length})"
        self.contents[destination] = self.contents[source][:length]
        self.copies.append((source, destination, length))

    def run(self, output: SchedulerOutput) -> None:
        slots = [row.slot for row in output.rows]
        assert len(set(slots)) == len(slots), f"a step names a slot twice: {slots}"
        for row in output.rows:
            assert row.slot in self.contents and row.token_ids
            self.contents[row.slot].extend(row.token_ids)
            assert len(self.contents[row.slot]) <= self.max_seq_len


_ids = itertools.count()


def make_request(
    prompt_len: int,
    conversation: Conversation | None = None,
    prompt: list[int] | None = None,
    max_output_tokens: int | None = None,
) -> TextRequest:
    """A request with ``prompt`` (default: ids 1..prompt_len) on ``conversation`` (default: a new one)."""
    ids = prompt if prompt is not None else list(range(1, prompt_len + 1))
    return TextRequest(f"r{next(_ids)}", conversation or Conversation(), ids, max_output_tokens=max_output_tokens)


def make_scheduler(
    num_slots: int = 4,
    budget: int = 64,
    max_waiting: int = 16,
    min_shared_prefix: int = 0,
    max_draft_tokens: int = 0,
    draft_max_decoding: int = 4,
    busy_draft_min_acceptance: float = 0.0,
) -> tuple[TextScheduler, FakeSlots]:
    """A scheduler over a fake pool; prefix sharing between slots is off unless ``min_shared_prefix`` is set (the
    default prompts 1..n all share their starts)."""
    slots = FakeSlots(num_slots)
    config = SchedulerConfig(
        num_slots,
        budget,
        max_waiting,
        min_shared_prefix,
        max_draft_tokens=max_draft_tokens,
        draft_max_decoding=draft_max_decoding,
        busy_draft_min_acceptance=busy_draft_min_acceptance,
    )
    return TextScheduler(slots, config), slots


def step(
    scheduler: TextScheduler,
    slots: FakeSlots,
    token: Callable[[TextRequest], int] = lambda r: SAMPLED_TOKEN,
    truth: Callable[[TextRequest, int], int] | None = None,
) -> tuple[SchedulerOutput, list[TextRequest]]:
    """Schedule, 'run' the rows on the fake pool, and report the sampled tokens of every sampling row: ``token``,
    then for a row with a draft, while the last token equals the drafted one, ``truth(request, output position)``
    (what a model would pick there)."""
    output = scheduler.schedule()
    slots.run(output)
    sampled: dict[str, list[int]] = {}
    for row in output.rows:
        if row.samples:
            ids = [token(row.request)]
            while truth is not None and len(ids) <= len(row.draft) and ids[-1] == row.draft[len(ids) - 1]:
                ids.append(truth(row.request, len(row.request.output_ids) + len(ids)))
            sampled[row.request.request_id] = ids
    return output, [request for request, _ in scheduler.update(output, sampled)]


def check_slot_mirror(scheduler: TextScheduler, slots: FakeSlots) -> None:
    """Every slot holds exactly what the scheduler believes: running requests' computed tokens, idle conversations'
    token ids."""
    for request in scheduler.running():
        assert request.conversation.slot is not None
        assert slots.contents[request.conversation.slot] == request.computed_ids()
        assert request.conversation.token_ids == request.computed_ids()[: len(request.conversation.token_ids)]
    for conversation in scheduler.idle_conversations():
        assert conversation.slot is not None
        assert slots.contents[conversation.slot] == conversation.token_ids
    assert scheduler.slots_in_use == len(slots.contents) <= slots.num_slots


def test_config_needs_a_budget_of_at_least_one_token_per_slot() -> None:
    with pytest.raises(ValueError, match="token_budget"):
        SchedulerConfig(num_slots=8, token_budget=4, max_waiting=1)


def test_chunked_prefill_progresses_and_only_the_last_chunk_samples() -> None:
    scheduler, slots = make_scheduler(budget=64)
    request = make_request(200)
    scheduler.add(request)
    chunks = []
    while request.is_prefilling:
        output, grown = step(scheduler, slots)
        (row,) = output.rows
        chunks.append(len(row.token_ids))
        assert row.is_prefill
        assert row.samples == (not request.is_prefilling)
        assert grown == ([request] if row.samples else [])
    assert chunks == [64, 64, 64, 8]
    assert request.prefilled_tokens == 200 and request.output_ids == [SAMPLED_TOKEN]
    output, _ = step(scheduler, slots)
    assert [(row.token_ids, row.is_prefill, row.samples) for row in output.rows] == [((SAMPLED_TOKEN,), False, True)]
    check_slot_mirror(scheduler, slots)


def test_budget_is_respected_and_decode_rows_are_never_skipped() -> None:
    scheduler, slots = make_scheduler(num_slots=4, budget=32)
    decoders = [make_request(3) for _ in range(3)]
    for request in decoders:
        scheduler.add(request)
    step(scheduler, slots)  # the three short prompts are prefilled together
    assert all(not r.is_prefilling for r in decoders)
    long_prompt = make_request(500)
    scheduler.add(long_prompt)
    steps = 0
    while long_prompt.is_prefilling:
        output, _ = step(scheduler, slots)
        steps += 1
        assert output.num_tokens <= 32
        decode_rows = [row for row in output.rows if row.request in decoders]
        assert len(decode_rows) == 3 and all(len(row.token_ids) == 1 for row in decode_rows)
        assert (output.decode_tokens == 3 and output.prefill_tokens == 29) or not long_prompt.is_prefilling
        check_slot_mirror(scheduler, slots)
    assert steps == -(-500 // 29)


def test_requests_join_between_steps_and_finished_ones_leave() -> None:
    scheduler, slots = make_scheduler()
    first, second = make_request(5), make_request(5)
    scheduler.add(first)
    step(scheduler, slots)
    scheduler.add(second)
    output, _ = step(scheduler, slots)
    assert {row.request for row in output.rows} == {first, second}
    scheduler.finish(first, RequestStatus.FINISHED_STOPPED)
    output, _ = step(scheduler, slots)
    assert [row.request for row in output.rows] == [second]
    assert first.status is RequestStatus.FINISHED_STOPPED and scheduler.num_running == 1


def test_abort_takes_effect_at_the_next_step_and_frees_the_slot() -> None:
    scheduler, slots = make_scheduler(num_slots=2)
    one_off = make_request(5, Conversation(ephemeral=True))
    chat = make_request(5)
    scheduler.add(one_off)
    scheduler.add(chat)
    step(scheduler, slots)
    scheduler.abort(one_off.request_id)
    scheduler.abort(chat.request_id)
    assert scheduler.num_running == 2  # nothing changes until the next step
    output, _ = step(scheduler, slots)
    assert set(output.aborted) == {one_off, chat} and not output.rows
    assert one_off.status is RequestStatus.FINISHED_ABORTED and scheduler.num_running == 0
    assert one_off.conversation.slot is None  # a one-off frees its slot
    assert chat.conversation.slot is not None  # a conversation keeps its cache, now idle and evictable
    assert chat.conversation.token_ids == [1, 2, 3, 4, 5]  # the sampled token never ran
    assert scheduler.idle_conversations() == (chat.conversation,)
    check_slot_mirror(scheduler, slots)


def test_abort_of_a_waiting_request_and_of_an_unknown_id() -> None:
    scheduler, slots = make_scheduler(num_slots=1)
    running, waiting = make_request(4), make_request(4)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler, slots)
    assert waiting.status is RequestStatus.WAITING
    scheduler.abort(waiting.request_id)
    scheduler.abort("no-such-request")
    assert scheduler.apply_pending() == [waiting]
    assert scheduler.num_waiting == 0 and waiting.conversation.active_request_id is None


def test_eviction_takes_the_least_recently_used_idle_conversation() -> None:
    scheduler, slots = make_scheduler(num_slots=2)
    a, b = make_request(10), make_request(10)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler, slots)
    scheduler.finish(b, RequestStatus.FINISHED_STOPPED)  # b becomes idle first ...
    scheduler.finish(a, RequestStatus.FINISHED_STOPPED)  # ... then a: b is the least recently used
    c = make_request(10)
    scheduler.add(c)
    output, _ = step(scheduler, slots)
    assert output.evicted == (b.conversation,)
    assert b.conversation.slot is None and len(b.conversation.token_ids) == 10  # its tokens stay in Python
    assert a.conversation.slot is not None
    # b's next turn has to prefill everything again.
    b2 = make_request(0, b.conversation, prompt=[*b.conversation.token_ids, 99])
    scheduler.finish(c, RequestStatus.FINISHED_STOPPED)
    scheduler.add(b2)
    output, _ = step(scheduler, slots)
    assert output.evicted == (a.conversation,)
    assert b2.cached_tokens == 0 and len(output.rows[0].token_ids) == 11
    check_slot_mirror(scheduler, slots)


def test_a_burst_fills_the_free_slots_and_then_the_bounded_queue() -> None:
    scheduler, _ = make_scheduler(num_slots=3, max_waiting=2)
    for _ in range(5):  # three will take the free slots at the next step, two wait
        scheduler.add(make_request(3))
    with pytest.raises(OverloadedError):
        scheduler.add(make_request(3))


def test_requests_wait_only_while_every_slot_runs_and_the_queue_is_bounded() -> None:
    scheduler, slots = make_scheduler(num_slots=2, max_waiting=2)
    running = [make_request(3) for _ in range(2)]
    for request in running:
        scheduler.add(request)
    step(scheduler, slots)
    waiting = [make_request(3) for _ in range(2)]
    for request in waiting:
        scheduler.add(request)
    with pytest.raises(OverloadedError):
        scheduler.add(make_request(3))
    output, _ = step(scheduler, slots)
    assert {row.request for row in output.rows} == set(running)
    scheduler.finish(running[0], RequestStatus.FINISHED_LENGTH)
    output, _ = step(scheduler, slots)  # the idle slot is evicted for the first waiting request
    assert waiting[0].status is RequestStatus.RUNNING and waiting[1].status is RequestStatus.WAITING
    assert output.evicted == (running[0].conversation,)


def test_a_second_request_on_a_busy_conversation_is_refused() -> None:
    scheduler, _ = make_scheduler()
    conversation = Conversation()
    scheduler.add(make_request(3, conversation))
    with pytest.raises(RuntimeError, match="already has request"):
        scheduler.add(make_request(3, conversation))


def test_next_turn_reuses_the_longest_common_prefix() -> None:
    scheduler, slots = make_scheduler(budget=256)
    conversation = Conversation()
    first = make_request(0, conversation, prompt=list(range(100, 130)))
    scheduler.add(first)
    for _ in range(4):
        step(scheduler, slots, token=lambda r: 500 + len(r.output_ids))
    scheduler.finish(first, RequestStatus.FINISHED_STOPPED)
    # The slot holds the prompt and all but the last sampled token.
    assert conversation.token_ids == [*range(100, 130), 500, 501, 502]
    # The next prompt re-tokenizes the reply differently after two tokens, then continues.
    second_prompt = [*range(100, 130), 500, 501, 777, 778, 779]
    second = make_request(0, conversation, prompt=second_prompt)
    scheduler.add(second)
    output, _ = step(scheduler, slots)
    assert second.cached_tokens == 32 and slots.truncations[-1] == (conversation.slot, 32)
    assert output.rows[0].token_ids == (777, 778, 779) and second.prefilled_tokens == 3
    check_slot_mirror(scheduler, slots)


def test_identical_prompt_still_runs_its_last_token() -> None:
    scheduler, slots = make_scheduler()
    conversation = Conversation()
    first = make_request(0, conversation, prompt=[1, 2, 3])
    scheduler.add(first)
    step(scheduler, slots)
    step(scheduler, slots)
    scheduler.finish(first, RequestStatus.FINISHED_STOPPED)
    again = make_request(0, conversation, prompt=[1, 2, 3])
    scheduler.add(again)
    output, _ = step(scheduler, slots)
    assert again.cached_tokens == 2 and output.rows[0].token_ids == (3,) and output.rows[0].samples


def test_release_frees_an_idle_slot_and_waits_for_a_running_one() -> None:
    scheduler, slots = make_scheduler()
    idle, busy = make_request(4), make_request(4)
    scheduler.add(idle)
    scheduler.add(busy)
    step(scheduler, slots)
    scheduler.finish(idle, RequestStatus.FINISHED_STOPPED)
    scheduler.release(idle.conversation)
    scheduler.release(busy.conversation)
    scheduler.apply_pending()
    assert idle.conversation.slot is None and idle.conversation.token_ids == []
    assert busy.conversation.slot is not None
    scheduler.finish(busy, RequestStatus.FINISHED_STOPPED)
    assert scheduler.idle_conversations() == ()
    scheduler.schedule()
    assert busy.conversation.slot is None and scheduler.slots_in_use == 0


def test_closed_conversation_frees_its_slot_when_its_request_is_aborted() -> None:
    scheduler, slots = make_scheduler()
    request = make_request(4)
    scheduler.add(request)
    step(scheduler, slots)
    request.conversation.closed = True
    scheduler.abort(request.request_id)
    scheduler.release(request.conversation)
    scheduler.apply_pending()
    assert scheduler.slots_in_use == 0 and slots.lengths == {}


def test_drop_all_frees_every_slot() -> None:
    scheduler, slots = make_scheduler(num_slots=2)
    requests = [make_request(4) for _ in range(3)]
    for request in requests:
        scheduler.add(request)
    step(scheduler, slots)
    scheduler.finish(requests[0], RequestStatus.FINISHED_STOPPED)
    scheduler.drop_all()
    assert slots.lengths == {} and scheduler.slots_in_use == 0
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert all(r.conversation.active_request_id is None for r in requests)


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


# -- property test: random traffic keeps every invariant and always drains -----------------------------------------

_operation = st.one_of(
    st.tuples(st.just("chat"), st.integers(0, 3), st.integers(1, 90)),  # conversation index, new prompt tokens
    st.tuples(st.just("chat"), st.integers(0, 3), st.integers(1, 9)),
    st.tuples(st.just("complete"), st.integers(0, 0), st.integers(1, 90)),
    st.tuples(st.just("abort"), st.integers(0, 5), st.integers(0, 0)),
    st.tuples(st.just("release"), st.integers(0, 9), st.integers(0, 0)),  # indices past 3 release nothing
    st.tuples(st.just("step"), st.integers(0, 0), st.integers(0, 3)),  # how many requests finish after it
    st.tuples(st.just("step"), st.integers(0, 0), st.integers(1, 4)),  # (twice: steps are most of the traffic)
)


@settings(max_examples=150, deadline=None)
@given(
    num_slots=st.integers(1, 4),
    budget_extra=st.integers(0, 40),
    min_shared_prefix=st.sampled_from([0, 2]),
    max_draft_tokens=st.sampled_from([0, 3]),
    draft_max_decoding=st.sampled_from([1, 4]),
    busy_draft_min_acceptance=st.sampled_from([0.0, 0.5]),
    operations=st.lists(_operation, min_size=10, max_size=80),
)
def test_random_traffic_keeps_invariants(
    num_slots: int,
    budget_extra: int,
    min_shared_prefix: int,
    max_draft_tokens: int,
    draft_max_decoding: int,
    busy_draft_min_acceptance: float,
    operations: list[tuple[str, int, int]],
) -> None:
    budget = num_slots + budget_extra
    scheduler, slots = make_scheduler(
        num_slots=num_slots,
        budget=budget,
        max_waiting=8,
        min_shared_prefix=min_shared_prefix,
        max_draft_tokens=max_draft_tokens,
        draft_max_decoding=draft_max_decoding,
        busy_draft_min_acceptance=busy_draft_min_acceptance,
    )
    max_output = 40 if max_draft_tokens else None
    min_output = 12 if max_draft_tokens else 1  # tokens a request generates before it may finish

    def truth(request: TextRequest, position: int) -> int:  # repeats itself, so drafts are proposed and most hold
        return 1005 if position % 7 == 6 else 1000 + position % 3

    conversations = [Conversation() for _ in range(4)]
    last_request: dict[int, TextRequest] = {}
    ended: set[str] = set()

    def check_step(
        output: SchedulerOutput, running_before: list[TextRequest], acceptance_before: dict[str, float]
    ) -> None:
        assert output.num_tokens <= budget
        requests = [row.request for row in output.rows]
        assert len(set(requests)) == len(requests)
        for request in running_before:
            if request.status is RequestStatus.RUNNING and request.request_id not in ended:
                assert request in requests, "a running request got no row"
        decoding = sum(not row.is_prefill for row in output.rows)
        for row in output.rows:
            assert row.request.status is RequestStatus.RUNNING
            if not row.is_prefill:
                assert len(row.token_ids) == 1 + len(row.draft)
                assert row.token_ids[1:] == row.draft
            if row.draft:
                assert not row.is_prefill
                assert len(row.request.output_ids) + len(row.draft) < (max_output or 0)
                if decoding > scheduler.config.draft_max_decoding:  # a busy step: only drafts that have held
                    assert scheduler.config.busy_draft_min_acceptance > 0
                    assert acceptance_before[row.request.request_id] >= scheduler.config.busy_draft_min_acceptance
        if decoding > scheduler.config.draft_max_decoding:
            assert output.draft_tokens <= scheduler.config.max_draft_tokens * scheduler.config.draft_max_decoding
        ended.update(r.request_id for r in output.aborted)

    def do_step(finishing: int) -> None:
        running_before = [r for r in scheduler.running() if r.request_id not in scheduler._pending_aborts]
        acceptance_before = {r.request_id: r.draft_acceptance for r in scheduler.running()}
        output, grown = step(scheduler, slots, token=lambda r: truth(r, len(r.output_ids)), truth=truth)
        check_step(output, running_before, acceptance_before)
        check_slot_mirror(scheduler, slots)
        long_enough = [request for request in grown if len(request.output_ids) >= min_output]  # drafts need history
        for request in long_enough[:finishing]:
            # a stop inside the step's tokens keeps only the tokens up to it (a draft may have added more)
            keep = max(1, len(request.output_ids) - finishing % 2)
            scheduler.finish(request, RequestStatus.FINISHED_STOPPED, output_length=keep)
            assert len(request.output_ids) == keep
            ended.add(request.request_id)
        check_slot_mirror(scheduler, slots)

    for kind, index, amount in operations:
        conversation = conversations[min(index, len(conversations) - 1)]
        if kind == "chat" and conversation.active_request_id is None:
            prompt = [*conversation.token_ids[: len(conversation.token_ids) // 2], *range(2000, 2000 + amount)]
            request = make_request(0, conversation, prompt=prompt, max_output_tokens=max_output)
        elif kind == "complete":
            request = make_request(amount, Conversation(ephemeral=True), max_output_tokens=max_output)
        elif kind == "abort" and index in last_request:
            scheduler.abort(last_request[index].request_id)
            continue
        elif kind == "release":
            if index < len(conversations):
                scheduler.release(conversations[index])
            continue
        elif kind == "step":
            do_step(amount)
            continue
        else:
            continue
        try:
            scheduler.add(request)
        except OverloadedError:
            assert scheduler.num_waiting == 8 + num_slots - scheduler.num_running
            continue
        last_request[index] = request

    # Liveness: finishing every request that produces a token drains all queues within a bounded number of steps.
    for _ in range(2000):  # at one token per step, eight 90-token prompts still drain
        if scheduler.num_running == scheduler.num_waiting == 0:
            break
        do_step(num_slots)
    assert scheduler.num_running == scheduler.num_waiting == 0
    scheduler.apply_pending()
    check_slot_mirror(scheduler, slots)


# -- prefixes shared between slots ----------------------------------------------------------------------------------


def finish_all(scheduler: TextScheduler, slots: FakeSlots) -> None:
    """Run until every running request has its first token, then finish them all (their conversations go idle)."""
    while any(request.is_prefilling for request in scheduler.running()) or scheduler.num_waiting:
        step(scheduler, slots)
    for request in scheduler.running():
        scheduler.finish(request, RequestStatus.FINISHED_STOPPED)


def test_a_first_turn_starts_from_the_prefix_an_idle_slot_holds() -> None:
    scheduler, slots = make_scheduler(min_shared_prefix=8)
    system_prompt = list(range(100, 130))
    first = make_request(0, prompt=[*system_prompt, 1, 2, 3])
    scheduler.add(first)
    finish_all(scheduler, slots)
    second = make_request(0, prompt=[*system_prompt, 4, 5])
    scheduler.add(second)
    output, _ = step(scheduler, slots)
    (row,) = output.rows
    assert slots.copies == [(first.conversation.slot, second.conversation.slot, 30)]
    assert second.cached_tokens == 30 and row.start == 30 and row.token_ids == (4, 5)
    assert second.prefilled_tokens == 2
    check_slot_mirror(scheduler, slots)


def test_a_running_request_shares_only_the_tokens_it_has_computed() -> None:
    scheduler, slots = make_scheduler(budget=64, min_shared_prefix=8)
    shared = list(range(1, 101))
    first = make_request(0, prompt=shared)
    scheduler.add(first)
    step(scheduler, slots)  # 64 of its 100 tokens are cached
    second = make_request(0, prompt=[*shared, 555])
    scheduler.add(second)
    output, _ = step(scheduler, slots)
    assert slots.copies == [(first.conversation.slot, second.conversation.slot, 64)]
    rows = {row.request.request_id: row for row in output.rows}
    assert rows[first.request_id].start == 64 and rows[second.request_id].start == 64
    assert second.cached_tokens == 64
    check_slot_mirror(scheduler, slots)


def test_short_or_disabled_sharing_copies_nothing_and_a_whole_prompt_leaves_one_token() -> None:
    for minimum, prefix_length, expected in ((8, 7, 0), (0, 30, 0), (8, 30, 30)):
        scheduler, slots = make_scheduler(min_shared_prefix=minimum)
        prefix = list(range(100, 100 + prefix_length))
        scheduler.add(make_request(0, prompt=[*prefix, 1]))
        finish_all(scheduler, slots)
        request = make_request(0, prompt=[*prefix, 2])
        scheduler.add(request)
        step(scheduler, slots)
        assert request.cached_tokens == expected, (minimum, prefix_length)
        assert len(slots.copies) == (1 if expected else 0)
    scheduler, slots = make_scheduler(min_shared_prefix=8)
    prompt = list(range(100, 120))
    scheduler.add(make_request(0, prompt=prompt))
    finish_all(scheduler, slots)
    same = make_request(0, prompt=prompt)
    scheduler.add(same)
    output, _ = step(scheduler, slots)
    assert same.cached_tokens == 19 and output.rows[0].token_ids == (119,)  # the model must see one prompt token


def test_a_one_off_request_leaves_its_slot_as_a_cache_the_next_request_takes_over() -> None:
    scheduler, slots = make_scheduler(num_slots=2, min_shared_prefix=8)
    history = list(range(100, 140))
    first = make_request(0, Conversation(ephemeral=True), prompt=history)
    scheduler.add(first)
    finish_all(scheduler, slots)
    cache = first.conversation
    assert cache.slot is not None and scheduler.idle_conversations() == (cache,)  # kept, not freed
    # The same client one turn later: the whole history again, its reply and a new message.
    second = make_request(0, Conversation(ephemeral=True), prompt=[*history, SAMPLED_TOKEN, 7, 8, 9])
    scheduler.add(second)
    output, _ = step(scheduler, slots)
    (row,) = output.rows
    assert second.conversation.slot == row.slot and cache.slot is None  # taken over: no copy, no new slot
    assert slots.copies == [] and scheduler.slots_in_use == 1
    assert second.cached_tokens == 40 and row.token_ids == (SAMPLED_TOKEN, 7, 8, 9)
    check_slot_mirror(scheduler, slots)


def test_one_off_caches_are_evicted_before_conversations() -> None:
    scheduler, slots = make_scheduler(num_slots=2, min_shared_prefix=8)
    live = make_request(0, prompt=list(range(300, 320)))
    scheduler.add(live)
    finish_all(scheduler, slots)
    one_off = make_request(0, Conversation(ephemeral=True), prompt=list(range(400, 420)))
    scheduler.add(one_off)
    finish_all(scheduler, slots)  # both idle now; the live conversation is the least recently used
    newcomer = make_request(0, prompt=list(range(500, 520)))
    scheduler.add(newcomer)
    output, _ = step(scheduler, slots)
    assert output.evicted == (one_off.conversation,) and live.conversation.slot is not None
    check_slot_mirror(scheduler, slots)


def test_without_sharing_a_one_off_request_frees_its_slot() -> None:
    scheduler, slots = make_scheduler(min_shared_prefix=0)
    request = make_request(0, Conversation(ephemeral=True), prompt=list(range(100, 140)))
    scheduler.add(request)
    finish_all(scheduler, slots)
    assert scheduler.slots_in_use == 0 and request.conversation.slot is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_unused_one_off_cache_is_freed_after_cache_idle_s_and_conversations_keep_their_slots() -> None:
    clock = FakeClock()
    slots = FakeSlots(4)
    scheduler = TextScheduler(slots, SchedulerConfig(4, 64, 16, min_shared_prefix=8, cache_idle_s=300.0), clock)
    live = make_request(0, prompt=list(range(300, 320)))
    one_off = make_request(0, Conversation(ephemeral=True), prompt=list(range(400, 420)))
    scheduler.add(live)
    scheduler.add(one_off)
    assert scheduler.next_cache_expiry() is None  # nothing is an idle one-off cache yet
    finish_all(scheduler, slots)
    assert scheduler.next_cache_expiry() == 1300.0
    clock.now = 1299.0
    step(scheduler, slots)
    assert one_off.conversation.slot is not None and scheduler.slots_in_use == 2
    clock.now = 1300.0
    output, _ = step(scheduler, slots)
    assert not output.rows and not output.evicted  # freed for age, not evicted for a request
    assert one_off.conversation.slot is None and live.conversation.slot is not None
    assert scheduler.idle_conversations() == (live.conversation,) and scheduler.next_cache_expiry() is None
    check_slot_mirror(scheduler, slots)
    clock.now = 10_000.0
    step(scheduler, slots)
    assert live.conversation.slot is not None  # a conversation's cache never expires


def test_a_cache_used_again_restarts_its_idle_time_and_a_taken_over_one_is_forgotten() -> None:
    clock = FakeClock()
    slots = FakeSlots(2)
    scheduler = TextScheduler(slots, SchedulerConfig(2, 64, 16, min_shared_prefix=8, cache_idle_s=60.0), clock)
    history = list(range(100, 140))
    first = make_request(0, Conversation(ephemeral=True), prompt=history)
    scheduler.add(first)
    finish_all(scheduler, slots)
    clock.now += 50.0
    second = make_request(0, Conversation(ephemeral=True), prompt=[*history, SAMPLED_TOKEN, 7, 8])
    scheduler.add(second)
    assert scheduler.next_cache_expiry() == 1060.0
    step(scheduler, slots)  # takes the first request's slot over
    assert first.conversation.slot is None and scheduler.next_cache_expiry() is None
    finish_all(scheduler, slots)
    assert scheduler.next_cache_expiry() == 1110.0  # the idle time starts again when the second request ends
    clock.now = 1100.0
    step(scheduler, slots)
    assert second.conversation.slot is not None
    clock.now = 1110.0
    step(scheduler, slots)
    assert second.conversation.slot is None and scheduler.slots_in_use == 0
    check_slot_mirror(scheduler, slots)


def test_cache_idle_s_zero_keeps_one_off_caches_until_their_slot_is_needed() -> None:
    clock = FakeClock()
    slots = FakeSlots(2)
    scheduler = TextScheduler(slots, SchedulerConfig(2, 64, 16, min_shared_prefix=8, cache_idle_s=0.0), clock)
    one_off = make_request(0, Conversation(ephemeral=True), prompt=list(range(400, 420)))
    scheduler.add(one_off)
    finish_all(scheduler, slots)
    clock.now += 1e9
    step(scheduler, slots)
    assert one_off.conversation.slot is not None and scheduler.next_cache_expiry() is None
    with pytest.raises(ValueError, match="cache_idle_s"):
        SchedulerConfig(2, 64, 16, cache_idle_s=-1.0)


# -- speculative decoding: drafts from prompt lookup ----------------------------------------------------------------


def _periodic(request: TextRequest, position: int) -> int:
    """A 'model' that repeats three tokens, so prompt lookup finds drafts once it has said them twice."""
    return 1000 + position % 3


def _decode_until_drafting(scheduler: TextScheduler, slots: FakeSlots) -> SchedulerOutput:
    for _ in range(20):
        output, _ = step(scheduler, slots, token=lambda r: _periodic(r, len(r.output_ids)), truth=_periodic)
        if any(row.draft for row in output.rows):
            return output
    raise AssertionError("no draft was proposed")


def test_confirmed_draft_tokens_are_kept_and_the_rest_are_cut_out_of_the_slot() -> None:
    scheduler, slots = make_scheduler(num_slots=2, max_draft_tokens=3)
    request = make_request(4, max_output_tokens=100)
    scheduler.add(request)
    output = _decode_until_drafting(scheduler, slots)
    # output so far 1000 1001 1002 1000 1001 1002: its last three tokens occurred before, followed by 1000 1001 1002
    assert output.rows[0].token_ids == (1002, 1000, 1001, 1002) and output.rows[0].draft == (1000, 1001, 1002)
    assert request.output_ids[-4:] == [1000, 1001, 1002, 1000]  # three confirmed drafts and the model's next token
    assert request.drafted_tokens == request.accepted_draft_tokens == 3
    check_slot_mirror(scheduler, slots)

    # The model now disagrees with the second draft token: one confirmed, the other two are cut out again.
    before = len(request.output_ids)
    output, grown = step(scheduler, slots, token=lambda r: _periodic(r, len(r.output_ids)), truth=lambda r, p: 7)
    assert grown == [request] and len(output.rows[0].draft) == 3
    assert request.output_ids[before:] == [output.rows[0].draft[0], 7]
    assert request.accepted_draft_tokens == 4 and request.drafted_tokens == 6
    assert slots.truncations[-1] == (request.conversation.slot, request.num_computed)
    check_slot_mirror(scheduler, slots)


def test_drafts_stay_within_the_request_limit_the_budget_and_few_decoding_requests() -> None:
    scheduler, slots = make_scheduler(num_slots=4, max_draft_tokens=8)
    request = make_request(4, max_output_tokens=9)
    scheduler.add(request)
    for _ in range(9):  # the engine ends the request at its limit, so step only until then
        if len(request.output_ids) == 9:
            break
        step(scheduler, slots, token=lambda r: _periodic(r, len(r.output_ids)), truth=_periodic)
        assert len(request.output_ids) <= 9  # a draft never lets the output pass max_output_tokens
    assert len(request.output_ids) == 9 and request.drafted_tokens > 0
    assert scheduler.schedule().rows[0].draft == ()  # at the limit: no room for a draft

    crowded, crowded_slots = make_scheduler(num_slots=4, max_draft_tokens=8, draft_max_decoding=2)
    requests = [make_request(4, max_output_tokens=100) for _ in range(3)]
    for r in requests:
        crowded.add(r)
    for _ in range(15):
        output, _ = step(crowded, crowded_slots, token=lambda r: _periodic(r, len(r.output_ids)), truth=_periodic)
        assert not any(row.draft for row in output.rows)  # three requests decode: by default busy steps never draft

    tight, tight_slots = make_scheduler(num_slots=2, budget=3, max_draft_tokens=8)
    tight.add(make_request(4, max_output_tokens=100))
    output = _decode_until_drafting(tight, tight_slots)
    assert len(output.rows[0].draft) == 2  # a step's budget of 3 tokens: the newest token and two drafted


def _diverging(request: TextRequest, position: int) -> int:
    """A 'model' whose text looks repetitive but never continues as it did before: 1000 1001 1002 comes back every
    six tokens, each time followed by new tokens, so every draft prompt lookup proposes is wrong from its first
    token."""
    return 1000 + position % 3 if (position // 3) % 2 == 0 else 2000 + position


def test_busy_steps_can_draft_for_requests_whose_drafts_have_held_and_probe_the_others() -> None:
    for model, drafts_expected in ((_periodic, True), (_diverging, False)):
        scheduler, slots = make_scheduler(
            num_slots=4, max_draft_tokens=4, draft_max_decoding=2, busy_draft_min_acceptance=0.5
        )
        requests = [make_request(4, max_output_tokens=200) for _ in range(3)]
        for r in requests:
            scheduler.add(r)
        first_draft_at: int | None = None
        most_drafted = 0
        for number in range(40):
            acceptance = {r.request_id: r.draft_acceptance for r in requests}
            output, _ = step(scheduler, slots, token=lambda r, m=model: m(r, len(r.output_ids)), truth=model)
            # at most what a step at the limit carries (2 requests x 4 tokens), though three could draft 4 each
            assert output.draft_tokens <= 8
            most_drafted = max(most_drafted, output.draft_tokens)
            for row in output.rows:
                if row.draft:  # three requests decode: a busy step, so only requests whose drafts held draft
                    assert acceptance[row.request.request_id] >= 0.5
                    first_draft_at = number if first_draft_at is None else first_draft_at
            check_slot_mirror(scheduler, slots)
        if drafts_expected:
            # The first lookups were probes (a new request has no record), whose first tokens were right.
            assert first_draft_at is not None and first_draft_at > 1 and most_drafted == 8
            assert all(r.accepted_draft_tokens > 0 and r.draft_acceptance > 0.5 for r in requests)
        else:
            # Every probe failed, so no draft ever ran, and the requests decoded one token per step.
            assert first_draft_at is None and all(r.drafted_tokens == 0 for r in requests)
            assert all(r.draft_acceptance == 0.0 and len(r.output_ids) == 40 for r in requests)

    # In a quiet step every request drafts, whatever its record; its outcome still counts.
    scheduler, slots = make_scheduler(
        num_slots=4, max_draft_tokens=4, draft_max_decoding=2, busy_draft_min_acceptance=0.5
    )
    request = make_request(4, max_output_tokens=200)
    scheduler.add(request)
    for _ in range(20):
        step(scheduler, slots, token=lambda r: _diverging(r, len(r.output_ids)), truth=_diverging)
    assert request.drafted_tokens > 0 and request.accepted_draft_tokens == 0 and request.draft_acceptance < 0.5
    for wrong in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match="busy_draft_min_acceptance"):
            SchedulerConfig(2, 64, 16, busy_draft_min_acceptance=wrong)


def test_a_stop_inside_confirmed_drafts_keeps_the_output_up_to_it() -> None:
    scheduler, slots = make_scheduler(num_slots=2, max_draft_tokens=3)
    request = make_request(4, max_output_tokens=100)
    scheduler.add(request)
    _decode_until_drafting(scheduler, slots)  # its last step confirmed 3 drafted tokens and sampled one more
    length, accepted = len(request.output_ids), request.accepted_draft_tokens
    assert request.last_confirmed == 3
    scheduler.finish(request, RequestStatus.FINISHED_STOPPED, output_length=length - 2)  # stopped two tokens back
    assert len(request.output_ids) == length - 2
    assert request.accepted_draft_tokens == accepted - 1  # the sampled token and one confirmed draft token are cut
    assert request.num_computed == request.num_tokens - 1  # as after a plain step: the last token is not cached
    assert request.conversation.token_ids == request.computed_ids()
    check_slot_mirror(scheduler, slots)


def test_sampled_tokens_must_continue_the_draft() -> None:
    scheduler, slots = make_scheduler(num_slots=2, max_draft_tokens=3)
    request = make_request(4, max_output_tokens=100)
    scheduler.add(request)
    _decode_until_drafting(scheduler, slots)
    output = scheduler.schedule()
    draft = output.rows[0].draft
    assert draft
    slots.run(output)
    with pytest.raises(ValueError, match="do not continue the draft"):
        scheduler.update(output, {request.request_id: [draft[0] + 1, 5]})


def test_a_request_with_a_prediction_drafts_from_it_before_looking_in_its_own_tokens() -> None:
    scheduler, slots = make_scheduler(num_slots=2, max_draft_tokens=4)
    request = make_request(4, max_output_tokens=100)
    request.prediction_ids = (1000, 2000, 2001, 2002, 2003, 2004)
    scheduler.add(request)
    step(scheduler, slots, token=lambda r: 1000)  # prefill: the reply starts like the prediction
    output = scheduler.schedule()
    assert output.rows[0].draft == (2000, 2001, 2002, 2003)  # from the prediction; the prompt has no 1000
    slots.run(output)
    scheduler.update(output, {request.request_id: [2000, 2001, 7]})  # two confirmed, then the model went elsewhere
    assert request.output_ids == [1000, 2000, 2001, 7] and request.accepted_draft_tokens == 2
    check_slot_mirror(scheduler, slots)
