"""Scheduler tests without a model: a fake step appends a deterministic token per caught-up
sequence, so batching, chunking, preemption and aborts are checked against plain bookkeeping."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4


def make_sequence(sequence_id: str, num_prompt_tokens: int, max_tokens: int,
                 first_token: int = 0) -> Sequence:
    prompt = [(first_token + i) % 50 for i in range(num_prompt_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Sequence(sequence_id, prompt, params, arrival_time=0.0, max_tokens=max_tokens)


def make_scheduler(num_blocks: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                   enable_prefix_caching: bool = True,
                   prefill_tokens_while_decoding: int | None = None,
                   break_even_context: float | None = None) -> Scheduler:
    manager = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK_SIZE,
                             enable_prefix_caching=enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             prefill_tokens_while_decoding=prefill_tokens_while_decoding)
    return Scheduler(config, manager, break_even_context)


def fake_step(scheduler: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    """Schedule, then 'sample' token (num_tokens % 50) for each sequence that caught up."""
    plan = scheduler.schedule()
    sampled = {r.sequence_id: [r.num_tokens % 50] for r in plan.scheduled_sequences
               if r.num_computed_tokens == r.num_tokens}
    return plan, scheduler.update_from_output(sampled)


def check_plan(scheduler: Scheduler, plan: SchedulerOutput) -> None:
    config = scheduler.config
    ids = [r.sequence_id for r in plan.scheduled_sequences]
    assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
    assert len(ids) <= config.max_num_seqs
    assert plan.total_num_scheduled_tokens <= config.max_num_batched_tokens
    for row in plan.rows:
        # the row's range ends where the sequence's computed tokens now stand
        assert 0 <= row.start < row.end == row.sequence.num_computed_tokens
        assert plan.row(row.sequence.sequence_id) is row
        # proposals only on decode rows: the last token, then each proposal
        assert not row.spec_token_ids or (row.start == row.sequence.num_tokens - 1
                                          and row.num_new_tokens == 1 + len(row.spec_token_ids))
    for sequence in plan.scheduled_sequences:
        assert plan.num_scheduled_tokens[sequence.sequence_id] > 0
        # while proposals are verified, the computed tokens count them too
        num_proposals = len(plan.row(sequence.sequence_id).spec_token_ids)
        assert sequence.num_computed_tokens <= sequence.num_tokens + num_proposals
        if sequence.is_finished:
            continue  # its blocks went back to the pool when it finished
        # every computed token has a slot in the sequence's blocks
        num_blocks = len(scheduler.kv_cache_manager.get_block_ids(sequence.sequence_id))
        num_slots = num_blocks * BLOCK_SIZE
        assert sequence.num_computed_tokens <= num_slots


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[Sequence]:
    finished: list[Sequence] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_sequences():
            return finished
        plan, done = fake_step(scheduler)
        check_plan(scheduler, plan)
        finished.extend(done)
    raise AssertionError("sequences did not finish")


def assert_pool_idle(scheduler: Scheduler) -> None:
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks
    assert scheduler.num_running == scheduler.num_waiting == 0


def test_prefill_then_decode_in_one_batch() -> None:
    scheduler = make_scheduler(num_blocks=64)
    first = make_sequence("a", 10, max_tokens=5)
    scheduler.add_sequence(first)
    fake_step(scheduler)
    second = make_sequence("b", 7, max_tokens=5, first_token=20)
    scheduler.add_sequence(second)
    plan, _ = fake_step(scheduler)
    # the running sequence decodes one token while the new one prefills in the same step
    assert plan.num_scheduled_tokens == {"a": 1, "b": 7}


def test_chunked_prefill_respects_budget_and_finishes() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    sequence = make_sequence("a", 30, max_tokens=3)
    scheduler.add_sequence(sequence)
    chunks, ranges = [], []
    while scheduler.has_unfinished_sequences():
        plan, _ = fake_step(scheduler)
        chunks.append(plan.num_scheduled_tokens["a"])
        ranges.append((plan.row("a").start, plan.row("a").end))
    assert chunks == [8, 8, 8, 6, 1, 1]
    # each chunk starts where the last one ended; decode rows are the last token alone
    assert ranges == [(0, 8), (8, 16), (16, 24), (24, 30), (30, 31), (31, 32)]
    assert sequence.num_output_tokens == 3
    assert sequence.status == SequenceStatus.FINISHED_LENGTH
    assert_pool_idle(scheduler)


def test_max_num_seqs_limits_running() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2)
    for i in range(4):
        scheduler.add_sequence(make_sequence(str(i), 5, max_tokens=4, first_token=i))
    plan, _ = fake_step(scheduler)
    assert len(plan.scheduled_sequences) == 2 and scheduler.num_waiting == 2
    assert len(run_to_completion(scheduler)) == 4
    assert_pool_idle(scheduler)


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 6 blocks of 4 tokens: three sequences of 8 prompt tokens each need 3+ blocks to grow
    scheduler = make_scheduler(num_blocks=7, enable_prefix_caching=False)
    sequences = [make_sequence(str(i), 8, max_tokens=8, first_token=10 * i) for i in range(3)]
    for sequence in sequences:
        scheduler.add_sequence(sequence)
    finished = run_to_completion(scheduler)
    assert scheduler.num_preemptions > 0
    assert {r.sequence_id for r in finished} == {"0", "1", "2"}
    # preemption must not change what is computed: same tokens as running alone
    for sequence in sequences:
        alone = make_scheduler(num_blocks=64)
        twin = make_sequence("x", 8, max_tokens=8, first_token=int(sequence.sequence_id) * 10)
        alone.add_sequence(twin)
        run_to_completion(alone)
        assert sequence.output_token_ids == twin.output_token_ids
    assert_pool_idle(scheduler)


def test_abort_frees_blocks_mid_prefill_and_mid_decode() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    prefilling = make_sequence("p", 30, max_tokens=5)
    decoding = make_sequence("d", 3, max_tokens=50, first_token=7)
    waiting = make_sequence("w", 3, max_tokens=5, first_token=9)
    for sequence in (decoding, prefilling):
        scheduler.add_sequence(sequence)
    for _ in range(3):
        fake_step(scheduler)
    scheduler.add_sequence(waiting)
    assert 0 < prefilling.num_computed_tokens < prefilling.num_prompt_tokens
    assert decoding.num_output_tokens > 0
    aborted = scheduler.finish_sequences(["p", "d", "w", "unknown"],
                                         SequenceStatus.FINISHED_ABORTED)
    assert {r.sequence_id for r in aborted} == {"p", "d", "w"}
    assert all(r.status == SequenceStatus.FINISHED_ABORTED for r in aborted)
    assert scheduler.finish_sequences(["p"], SequenceStatus.FINISHED_ABORTED) == []
    assert_pool_idle(scheduler)


def test_prefix_cache_hit_is_recorded_on_first_schedule() -> None:
    scheduler = make_scheduler(num_blocks=64)
    scheduler.add_sequence(make_sequence("a", 20, max_tokens=2))
    run_to_completion(scheduler)
    again = make_sequence("b", 20, max_tokens=2)
    scheduler.add_sequence(again)
    plan, _ = fake_step(scheduler)
    assert again.num_cached_tokens == 16  # capped below 20 at a block boundary
    assert plan.num_scheduled_tokens["b"] == 4
    assert (plan.row("b").start, plan.row("b").end) == (16, 20)  # the hit is not recomputed


def test_a_preempted_sequence_restarts_its_range_from_the_cache() -> None:
    scheduler = make_scheduler(num_blocks=64, enable_prefix_caching=False)
    sequence = make_sequence("a", 6, max_tokens=5)
    scheduler.add_sequence(sequence)
    fake_step(scheduler)
    scheduler.reschedule(sequence)  # as the core does after a pass it cannot trust
    plan, _ = fake_step(scheduler)
    # recomputed from position 0: its prompt and the token it had sampled
    assert (plan.row("a").start, plan.row("a").end) == (0, 7)


def test_rows_of_a_subset_keep_the_given_order() -> None:
    scheduler = make_scheduler(num_blocks=64)
    sequences = [make_sequence(str(i), 3 + i, max_tokens=2, first_token=i) for i in range(3)]
    for sequence in sequences:
        scheduler.add_sequence(sequence)
    plan = scheduler.schedule()
    rows = plan.rows_of([sequences[2], sequences[0]])  # a retried group
    assert [(r.sequence, r.start, r.end) for r in rows] == [(sequences[2], 0, 5),
                                                          (sequences[0], 0, 3)]
    assert plan.total_num_scheduled_tokens == 3 + 4 + 5


def test_stop_token_and_min_tokens() -> None:
    scheduler = make_scheduler(num_blocks=64)
    # the fake model samples num_tokens % 50: with a 5-token prompt the outputs are 5, 6, 7 ...
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(6, 9), min_tokens=3)
    sequence = Sequence("a", [1, 2, 3, 4, 5], params, arrival_time=0.0, max_tokens=20)
    scheduler.add_sequence(sequence)
    run_to_completion(scheduler)
    # 6 arrives as the 2nd token, below min_tokens, so it does not stop; 9 does
    assert sequence.output_token_ids == [5, 6, 7, 8, 9]
    assert sequence.status == SequenceStatus.FINISHED_STOPPED and sequence.stop_reason == 9


def check_queues(scheduler: Scheduler, live: set[str]) -> None:
    """Every live sequence sits in exactly one of waiting and running, and nothing else does."""
    waiting = [r.sequence_id for r in scheduler.waiting]
    running = [r.sequence_id for r in scheduler.running]
    assert len(waiting) + len(running) == len(set(waiting) | set(running)), "a duplicate"
    assert set(waiting) | set(running) == live
    assert set(scheduler.sequences) == live
    assert len(running) <= scheduler.config.max_num_seqs
    manager = scheduler.kv_cache_manager
    assert 0 <= manager.num_free_blocks <= manager.num_total_blocks


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 5)),
                      min_size=1, max_size=12),
    aborts=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 30)), max_size=8),
    num_blocks=st.integers(12, 40),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(4, 48),
    caching=st.booleans(),
    prefill_cap=st.one_of(st.none(), st.integers(1, 24)),
    break_even_context=st.one_of(st.none(), st.floats(2.0, 64.0)),
)
def test_random_workloads_lose_nothing(arrivals: list[tuple[int, int, int]],
                                       aborts: list[tuple[int, int]], num_blocks: int,
                                       max_num_seqs: int, budget: int, caching: bool,
                                       prefill_cap: int | None,
                                       break_even_context: float | None) -> None:
    """Random arrivals (prompt length, max_tokens, arrival step), aborts (several per step,
    repeated, or of finished sequences) and limits, with and without a prefill cap: every
    sequence ends exactly once, each live sequence is in exactly one queue, budgets hold every
    step, no block is leaked."""
    scheduler = make_scheduler(num_blocks, max_num_seqs, budget, caching, prefill_cap,
                               break_even_context)
    # the engine caps max_model_len to the pool, so any one sequence fits the pool alone
    pool_tokens = scheduler.kv_cache_manager.num_total_blocks * BLOCK_SIZE
    sequences = [make_sequence(str(i), n, min(m, pool_tokens - n), first_token=i % 3)
                for i, (n, m, _) in enumerate(arrivals)]
    abort_at: dict[int, list[str]] = {}
    for index, step in aborts:
        if index < len(sequences):
            abort_at.setdefault(step, []).append(str(index))
    finished: list[Sequence] = []
    live: set[str] = set()
    for step in range(3000):
        for sequence, (_, _, arrival_step) in zip(sequences, arrivals, strict=True):
            if arrival_step == step:
                scheduler.add_sequence(sequence)
                live.add(sequence.sequence_id)
        aborted = scheduler.finish_sequences(abort_at.get(step, []),
                                            SequenceStatus.FINISHED_ABORTED)
        finished += aborted
        live -= {r.sequence_id for r in aborted}
        check_queues(scheduler, live)
        if step > 5 and not scheduler.has_unfinished_sequences():
            break
        plan, done = fake_step(scheduler)
        check_plan(scheduler, plan)
        finished += done
        live -= {r.sequence_id for r in done}
        check_queues(scheduler, live)
    finished_ids = [r.sequence_id for r in finished]
    assert sorted(finished_ids) == sorted(r.sequence_id for r in sequences)
    for sequence in sequences:
        if sequence.status == SequenceStatus.FINISHED_LENGTH:
            assert sequence.num_output_tokens == sequence.max_tokens
    assert_pool_idle(scheduler)


# ---- long prompts beside decoding streams (prefill_tokens_while_decoding) --------------------




def test_a_long_prompt_beside_decoding_streams_is_chunked_to_the_cap() -> None:
    scheduler = make_scheduler(num_blocks=200, max_num_batched_tokens=64,
                               prefill_tokens_while_decoding=8)
    streams = [make_sequence(f"s{i}", 3, max_tokens=200, first_token=i) for i in range(3)]
    decoding(scheduler, *streams)
    long = make_sequence("long", 100, max_tokens=1, first_token=7)
    scheduler.add_sequence(long)
    chunks = []
    while not long.is_finished:
        plan, _ = fake_step(scheduler)
        check_plan(scheduler, plan)
        # every stream has its decode token in every step of the long prompt's prefill
        assert {"s0", "s1", "s2"} <= {r.sequence_id for r in plan.scheduled_sequences}
        chunks.append(plan.num_scheduled_tokens.get("long", 0))
    assert chunks[:-1] == [8] * 12 and chunks[-1] == 4  # 12 x 8 + 4: the budget (64) unused

    # with no stream decoding, the same prompt takes the whole budget
    alone = make_scheduler(num_blocks=200, max_num_batched_tokens=64,
                           prefill_tokens_while_decoding=8)
    alone.add_sequence(make_sequence("long", 100, max_tokens=1, first_token=7))
    plan, _ = fake_step(alone)
    assert plan.num_scheduled_tokens == {"long": 64}


def test_prompt_chunks_shrink_as_their_context_grows() -> None:
    """A token after c others costs 1 + c / break_even_context: with 32 as the break-even
    context, the chunk at context 0 is the cap and at context 32 half of it."""
    scheduler = make_scheduler(num_blocks=200, max_num_batched_tokens=64,
                               prefill_tokens_while_decoding=16, break_even_context=32.0)
    decoding(scheduler, make_sequence("stream", 3, max_tokens=300))
    long = make_sequence("long", 120, max_tokens=1, first_token=5)
    scheduler.add_sequence(long)
    starts_and_chunks = []
    while not long.is_finished:
        start = long.num_computed_tokens
        plan, _ = fake_step(scheduler)
        check_plan(scheduler, plan)
        starts_and_chunks.append((start, plan.num_scheduled_tokens.get("long", 0)))
    assert starts_and_chunks[0] == (0, 16)
    assert starts_and_chunks[1] == (16, 10)  # 16 / (1 + 16/32) = 10.7
    for start, chunk in starts_and_chunks[:-1]:
        assert chunk == max(1, int(16 / (1 + start / 32)))
    assert sum(chunk for _, chunk in starts_and_chunks) == 120


def test_even_a_very_long_context_advances_a_token_a_step() -> None:
    scheduler = make_scheduler(num_blocks=200, max_num_batched_tokens=64,
                               prefill_tokens_while_decoding=2, break_even_context=1.0)
    decoding(scheduler, make_sequence("stream", 3, max_tokens=300))
    long = make_sequence("long", 30, max_tokens=1, first_token=5)
    scheduler.add_sequence(long)
    steps = 0
    while not long.is_finished:
        fake_step(scheduler)
        steps += 1
    assert steps <= 30


def test_a_request_arriving_during_a_long_prompt_starts_next_step() -> None:
    """Without the cap a long prompt takes the whole budget each step and a newcomer waits
    for its last chunk; with it, running prompts leave half to waiting requests."""
    for cap, expected_wait in ((None, 6), (8, 1)):
        scheduler = make_scheduler(num_blocks=200, max_num_batched_tokens=16,
                                   prefill_tokens_while_decoding=cap)
        scheduler.add_sequence(make_sequence("long", 100, max_tokens=1, first_token=3))
        fake_step(scheduler)
        short = make_sequence("short", 5, max_tokens=4)
        scheduler.add_sequence(short)
        waited = 0
        while short.num_computed_tokens == 0:
            plan, _ = fake_step(scheduler)
            check_plan(scheduler, plan)
            waited += 1
        assert waited == expected_wait, cap


# ---- speculative decoding: proposals on decode rows --------------------------------------------


def decoding(scheduler: Scheduler, *sequences: Sequence) -> None:
    """Admit the sequences and run their prefill step: each is then decoding."""
    for sequence in sequences:
        scheduler.add_sequence(sequence)
    fake_step(scheduler)
    assert all(s.num_computed_tokens == s.num_tokens - 1 for s in sequences)


def test_proposals_are_cut_to_the_token_budget() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    first = make_sequence("a", 3, max_tokens=20)
    second = make_sequence("b", 4, max_tokens=20, first_token=10)
    decoding(scheduler, first, second)
    second.spec_token_ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    plan = scheduler.schedule()
    # a's decode token leaves 7 of the budget: b's token and 6 proposals
    assert plan.num_scheduled_tokens == {"a": 1, "b": 7}
    row = plan.row("b")
    assert row.spec_token_ids == (1, 2, 3, 4, 5, 6)
    assert (row.start, row.end) == (4, 11) and row.end == second.num_tokens + 6
    assert row.token_ids == second.all_token_ids[4:] + [1, 2, 3, 4, 5, 6]
    assert second.spec_token_ids == []  # a proposal is offered once
    check_plan(scheduler, plan)


def test_proposals_are_cut_to_max_tokens() -> None:
    scheduler = make_scheduler(num_blocks=64)
    sequence = make_sequence("a", 5, max_tokens=5)
    decoding(scheduler, sequence)
    sequence.spec_token_ids = [7, 8, 9, 10, 11]
    plan = scheduler.schedule()
    # 1 token out, 4 to go: 3 proposals and the token after them
    assert plan.row("a").spec_token_ids == (7, 8, 9)
    finished = scheduler.update_from_output({"a": [7, 8, 9, 12]})  # all accepted
    assert finished == [sequence] and sequence.status == SequenceStatus.FINISHED_LENGTH
    assert sequence.output_token_ids == [5, 7, 8, 9, 12]
    assert_pool_idle(scheduler)


def test_a_stop_token_among_the_new_tokens_drops_those_after_it() -> None:
    scheduler = make_scheduler(num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(8,))
    sequence = Sequence("a", [1, 2, 3, 4, 5], params, arrival_time=0.0, max_tokens=20)
    decoding(scheduler, sequence)
    sequence.spec_token_ids = [7, 8, 9]
    scheduler.schedule()
    new_tokens = {"a": [7, 8, 9, 10]}
    assert scheduler.update_from_output(new_tokens) == [sequence]
    assert new_tokens == {"a": [7, 8]}  # what the sequence kept, for the outputs
    assert sequence.output_token_ids == [5, 7, 8] and sequence.stop_reason == 8
    assert_pool_idle(scheduler)


def test_rejected_proposals_give_their_slots_and_blocks_back() -> None:
    scheduler = make_scheduler(num_blocks=64)
    sequence = make_sequence("a", 6, max_tokens=20)
    decoding(scheduler, sequence)  # 7 tokens, 6 computed, in 2 blocks
    manager = scheduler.kv_cache_manager
    sequence.spec_token_ids = [20, 21, 22, 23, 24]
    scheduler.schedule()
    assert len(manager.get_block_ids("a")) == 3  # slots for 7 + 5 tokens
    assert manager.num_free_blocks == manager.num_total_blocks - 3
    scheduler.update_from_output({"a": [30]})  # the first proposal rejected
    assert (sequence.num_tokens, sequence.num_computed_tokens) == (8, 7)
    assert len(manager.get_block_ids("a")) == 2
    assert manager.num_free_blocks == manager.num_total_blocks - 2
    assert all(manager.pool.blocks[i].block_hash is None for i in manager.get_block_ids("a")[1:])
    sequence.spec_token_ids = [40, 41, 42]
    scheduler.schedule()
    scheduler.update_from_output({"a": [40, 41, 42, 43]})  # all accepted
    assert (sequence.num_tokens, sequence.num_computed_tokens) == (12, 11)
    assert len(manager.get_block_ids("a")) == 3
    run_to_completion(scheduler)
    assert sequence.output_token_ids[:6] == [6, 30, 40, 41, 42, 43]
    assert_pool_idle(scheduler)


def test_proposals_on_a_prefill_chunk_are_ignored() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    sequence = make_sequence("a", 20, max_tokens=4)
    scheduler.add_sequence(sequence)
    fake_step(scheduler)  # the first chunk
    sequence.spec_token_ids = [1, 2, 3]
    plan = scheduler.schedule()
    assert plan.row("a").spec_token_ids == () and plan.num_scheduled_tokens == {"a": 8}
    assert sequence.spec_token_ids == []


def test_proposals_are_dropped_when_the_pool_is_short_not_preempting() -> None:
    # 3 usable blocks: a holds 2 (7 tokens), b 1 (4 tokens); a's proposals need a 4th
    scheduler = make_scheduler(num_blocks=4)
    older = make_sequence("a", 6, max_tokens=10)
    newer = make_sequence("b", 3, max_tokens=10, first_token=20)
    decoding(scheduler, older, newer)
    older.spec_token_ids = [1, 2, 3]
    plan = scheduler.schedule()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert plan.row("a").spec_token_ids == ()
    assert scheduler.num_preemptions == 0 and plan.preempted_sequence_ids == []
    assert older.status == newer.status == SequenceStatus.RUNNING


def test_a_preempted_sequence_loses_its_proposals() -> None:
    # 4 usable blocks, 2 each: a's next token needs a third, so the newest (b) goes
    scheduler = make_scheduler(num_blocks=5, enable_prefix_caching=False)
    older = make_sequence("a", 8, max_tokens=10)
    newer = make_sequence("b", 8, max_tokens=10, first_token=20)
    decoding(scheduler, older, newer)
    newer.spec_token_ids = [1, 2]
    plan = scheduler.schedule()
    assert plan.preempted_sequence_ids == ["b"]
    assert newer.status == SequenceStatus.PREEMPTED and newer.spec_token_ids == []
    assert list(plan.num_scheduled_tokens) == ["a"]


def test_proposals_never_cost_another_sequence_its_place() -> None:
    # 5 usable blocks: a holds 2 (7 tokens, its next fits), b 2 (9 tokens: its next needs a
    # third); one block is free, enough for b, unless a's proposals take it
    scheduler = make_scheduler(num_blocks=6, enable_prefix_caching=False)
    older = make_sequence("a", 6, max_tokens=10)
    newer = make_sequence("b", 8, max_tokens=10, first_token=20)
    decoding(scheduler, older, newer)
    older.spec_token_ids = [1, 2, 3]
    plan = scheduler.schedule()
    assert scheduler.num_preemptions == 0 and plan.preempted_sequence_ids == []
    assert newer.status == SequenceStatus.RUNNING
    # the free block went to b's own token; a's proposals found no block and were dropped
    assert [row.spec_token_ids for row in plan.rows] == [(), ()]


def speculative_step(scheduler: Scheduler, rng: random.Random
                     ) -> tuple[SchedulerOutput, list[Sequence]]:
    """fake_step with speculation: every decoding sequence proposes its next tokens, some
    of them wrong; the 'model' samples (num_tokens % 50) at each position, so the accepted
    run and the tokens kept are what fake_step would have produced one by one."""
    for sequence in scheduler.running:
        if sequence.is_decoding and rng.random() < 0.7:
            proposals = [(sequence.num_tokens + i) % 50 for i in range(rng.randrange(1, 6))]
            if rng.random() < 0.5:
                proposals[rng.randrange(len(proposals))] = 99  # never sampled: rejected
            sequence.spec_token_ids = proposals
    plan = scheduler.schedule()
    check_plan(scheduler, plan)
    sampled = {}
    for row in plan.rows:
        sequence = row.sequence
        if row.end != sequence.num_tokens + len(row.spec_token_ids):
            continue  # a prefill chunk short of the end
        tokens = []
        for proposal in [*row.spec_token_ids, None]:
            tokens.append((sequence.num_tokens + len(tokens)) % 50)
            if tokens[-1] != proposal:
                break
        sampled[sequence.sequence_id] = tokens
    return plan, scheduler.update_from_output(sampled)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 16)), min_size=1,
                      max_size=8),
    num_blocks=st.integers(10, 30),
    budget=st.integers(2, 32),
    caching=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_workloads_with_proposals_match_plain_decoding(
        arrivals: list[tuple[int, int]], num_blocks: int, budget: int, caching: bool,
        seed: int) -> None:
    """Under speculation (proposals cut by budget and max_tokens, dropped when the pool is
    short, cleared by preemption, rejected slots trimmed) every sequence generates exactly
    what it generates without, budgets hold, and no block leaks."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks, 4, budget, caching)
    pool_tokens = scheduler.kv_cache_manager.num_total_blocks * BLOCK_SIZE
    sequences = [make_sequence(str(i), n, min(m, pool_tokens - n), first_token=i % 3)
                 for i, (n, m) in enumerate(arrivals) if n < pool_tokens]
    for sequence in sequences:
        scheduler.add_sequence(sequence)
    for _ in range(2000):
        if not scheduler.has_unfinished_sequences():
            break
        speculative_step(scheduler, rng)  # checks each plan
        manager = scheduler.kv_cache_manager
        for sequence in scheduler.running:
            # between steps a sequence holds blocks for its tokens, never for rejected ones
            num_blocks_held = len(manager.get_block_ids(sequence.sequence_id))
            assert num_blocks_held <= manager.num_blocks_needed(sequence.num_tokens)
    else:
        raise AssertionError("sequences did not finish")
    for sequence in sequences:
        assert sequence.status == SequenceStatus.FINISHED_LENGTH
        plain = make_sequence("x", sequence.num_prompt_tokens, sequence.max_tokens,
                              first_token=int(sequence.sequence_id) % 3)
        alone = make_scheduler(num_blocks=64)
        alone.add_sequence(plain)
        run_to_completion(alone)
        assert sequence.output_token_ids == plain.output_token_ids
    assert_pool_idle(scheduler)
