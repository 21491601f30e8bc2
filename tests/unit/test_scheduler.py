"""Scheduler tests without a model: a fake step appends a deterministic token per caught-up
request, so batching, chunking, preemption and aborts are checked against plain bookkeeping."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

BLOCK_SIZE = 4


def make_request(request_id: str, num_prompt_tokens: int, max_tokens: int,
                 first_token: int = 0) -> Request:
    prompt = [(first_token + i) % 50 for i in range(num_prompt_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id, prompt, params, arrival_time=0.0, max_tokens=max_tokens)


def make_scheduler(num_blocks: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                   enable_prefix_caching: bool = True) -> Scheduler:
    manager = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK_SIZE,
                             enable_prefix_caching=enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(config, manager)


def fake_step(scheduler: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    """Schedule, then 'sample' token (num_tokens % 50) for each request that caught up."""
    plan = scheduler.schedule()
    sampled = {r.request_id: r.num_tokens % 50 for r in plan.scheduled_requests
               if r.num_computed_tokens == r.num_tokens}
    return plan, scheduler.update_from_output(sampled)


def check_plan(scheduler: Scheduler, plan: SchedulerOutput) -> None:
    config = scheduler.config
    ids = [r.request_id for r in plan.scheduled_requests]
    assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
    assert len(ids) <= config.max_num_seqs
    assert plan.total_num_scheduled_tokens <= config.max_num_batched_tokens
    for row in plan.rows:
        # the row's range ends where the request's computed tokens now stand
        assert 0 <= row.start < row.end == row.request.num_computed_tokens
        assert plan.row(row.request.request_id) is row
    for request in plan.scheduled_requests:
        assert plan.num_scheduled_tokens[request.request_id] > 0
        assert request.num_computed_tokens <= request.num_tokens
        if request.is_finished:
            continue  # its blocks went back to the pool when it finished
        # every computed token has a slot in the request's blocks
        num_blocks = len(scheduler.kv_cache_manager.get_block_ids(request.request_id))
        num_slots = num_blocks * BLOCK_SIZE
        assert request.num_computed_tokens <= num_slots


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[Request]:
    finished: list[Request] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return finished
        plan, done = fake_step(scheduler)
        check_plan(scheduler, plan)
        finished.extend(done)
    raise AssertionError("requests did not finish")


def assert_pool_idle(scheduler: Scheduler) -> None:
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks
    assert scheduler.num_running == scheduler.num_waiting == 0


def test_prefill_then_decode_in_one_batch() -> None:
    scheduler = make_scheduler(num_blocks=64)
    first = make_request("a", 10, max_tokens=5)
    scheduler.add_request(first)
    fake_step(scheduler)
    second = make_request("b", 7, max_tokens=5, first_token=20)
    scheduler.add_request(second)
    plan, _ = fake_step(scheduler)
    # the running request decodes one token while the new one prefills in the same step
    assert plan.num_scheduled_tokens == {"a": 1, "b": 7}


def test_chunked_prefill_respects_budget_and_finishes() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    request = make_request("a", 30, max_tokens=3)
    scheduler.add_request(request)
    chunks, ranges = [], []
    while scheduler.has_unfinished_requests():
        plan, _ = fake_step(scheduler)
        chunks.append(plan.num_scheduled_tokens["a"])
        ranges.append((plan.row("a").start, plan.row("a").end))
    assert chunks == [8, 8, 8, 6, 1, 1]
    # each chunk starts where the last one ended; decode rows are the last token alone
    assert ranges == [(0, 8), (8, 16), (16, 24), (24, 30), (30, 31), (31, 32)]
    assert request.num_output_tokens == 3
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert_pool_idle(scheduler)


def test_max_num_seqs_limits_running() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(str(i), 5, max_tokens=4, first_token=i))
    plan, _ = fake_step(scheduler)
    assert len(plan.scheduled_requests) == 2 and scheduler.num_waiting == 2
    assert len(run_to_completion(scheduler)) == 4
    assert_pool_idle(scheduler)


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 6 blocks of 4 tokens: three requests of 8 prompt tokens each need 3+ blocks to grow
    scheduler = make_scheduler(num_blocks=7, enable_prefix_caching=False)
    requests = [make_request(str(i), 8, max_tokens=8, first_token=10 * i) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    finished = run_to_completion(scheduler)
    assert scheduler.num_preemptions > 0
    assert {r.request_id for r in finished} == {"0", "1", "2"}
    # preemption must not change what is computed: same tokens as running alone
    for request in requests:
        alone = make_scheduler(num_blocks=64)
        twin = make_request("x", 8, max_tokens=8, first_token=int(request.request_id) * 10)
        alone.add_request(twin)
        run_to_completion(alone)
        assert request.output_token_ids == twin.output_token_ids
    assert_pool_idle(scheduler)


def test_abort_frees_blocks_mid_prefill_and_mid_decode() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    prefilling = make_request("p", 30, max_tokens=5)
    decoding = make_request("d", 3, max_tokens=50, first_token=7)
    waiting = make_request("w", 3, max_tokens=5, first_token=9)
    for request in (decoding, prefilling):
        scheduler.add_request(request)
    for _ in range(3):
        fake_step(scheduler)
    scheduler.add_request(waiting)
    assert 0 < prefilling.num_computed_tokens < prefilling.num_prompt_tokens
    assert decoding.num_output_tokens > 0
    aborted = scheduler.finish_requests(["p", "d", "w", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in aborted} == {"p", "d", "w"}
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert scheduler.finish_requests(["p"], RequestStatus.FINISHED_ABORTED) == []
    assert_pool_idle(scheduler)


def test_prefix_cache_hit_is_recorded_on_first_schedule() -> None:
    scheduler = make_scheduler(num_blocks=64)
    scheduler.add_request(make_request("a", 20, max_tokens=2))
    run_to_completion(scheduler)
    again = make_request("b", 20, max_tokens=2)
    scheduler.add_request(again)
    plan, _ = fake_step(scheduler)
    assert again.num_cached_tokens == 16  # capped below 20 at a block boundary
    assert plan.num_scheduled_tokens["b"] == 4
    assert (plan.row("b").start, plan.row("b").end) == (16, 20)  # the hit is not recomputed


def test_a_preempted_request_restarts_its_range_from_the_cache() -> None:
    scheduler = make_scheduler(num_blocks=64, enable_prefix_caching=False)
    request = make_request("a", 6, max_tokens=5)
    scheduler.add_request(request)
    fake_step(scheduler)
    scheduler.reschedule(request)  # as the core does after a pass it cannot trust
    plan, _ = fake_step(scheduler)
    # recomputed from position 0: its prompt and the token it had sampled
    assert (plan.row("a").start, plan.row("a").end) == (0, 7)


def test_rows_of_a_subset_keep_the_given_order() -> None:
    scheduler = make_scheduler(num_blocks=64)
    requests = [make_request(str(i), 3 + i, max_tokens=2, first_token=i) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    plan = scheduler.schedule()
    rows = plan.rows_of([requests[2], requests[0]])  # a retried group
    assert [(r.request, r.start, r.end) for r in rows] == [(requests[2], 0, 5),
                                                          (requests[0], 0, 3)]
    assert plan.total_num_scheduled_tokens == 3 + 4 + 5


def test_stop_token_and_min_tokens() -> None:
    scheduler = make_scheduler(num_blocks=64)
    # the fake model samples num_tokens % 50: with a 5-token prompt the outputs are 5, 6, 7 ...
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(6, 9), min_tokens=3)
    request = Request("a", [1, 2, 3, 4, 5], params, arrival_time=0.0, max_tokens=20)
    scheduler.add_request(request)
    run_to_completion(scheduler)
    # 6 arrives as the 2nd token, below min_tokens, so it does not stop; 9 does
    assert request.output_token_ids == [5, 6, 7, 8, 9]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == 9


def check_queues(scheduler: Scheduler, live: set[str]) -> None:
    """Every live request sits in exactly one of waiting and running, and nothing else does."""
    waiting = [r.request_id for r in scheduler.waiting]
    running = [r.request_id for r in scheduler.running]
    assert len(waiting) + len(running) == len(set(waiting) | set(running)), "a duplicate"
    assert set(waiting) | set(running) == live
    assert set(scheduler.requests) == live
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
)
def test_random_workloads_lose_nothing(arrivals: list[tuple[int, int, int]],
                                       aborts: list[tuple[int, int]], num_blocks: int,
                                       max_num_seqs: int, budget: int, caching: bool) -> None:
    """Random arrivals (prompt length, max_tokens, arrival step), aborts (several per step,
    repeated, or of finished requests) and limits: every request ends exactly once, each live
    request is in exactly one queue, budgets hold every step, no block is leaked."""
    scheduler = make_scheduler(num_blocks, max_num_seqs, budget, caching)
    # the engine caps max_model_len to the pool, so any one request fits the pool alone
    pool_tokens = scheduler.kv_cache_manager.num_total_blocks * BLOCK_SIZE
    requests = [make_request(str(i), n, min(m, pool_tokens - n), first_token=i % 3)
                for i, (n, m, _) in enumerate(arrivals)]
    abort_at: dict[int, list[str]] = {}
    for index, step in aborts:
        if index < len(requests):
            abort_at.setdefault(step, []).append(str(index))
    finished: list[Request] = []
    live: set[str] = set()
    for step in range(3000):
        for request, (_, _, arrival_step) in zip(requests, arrivals, strict=True):
            if arrival_step == step:
                scheduler.add_request(request)
                live.add(request.request_id)
        aborted = scheduler.finish_requests(abort_at.get(step, []),
                                            RequestStatus.FINISHED_ABORTED)
        finished += aborted
        live -= {r.request_id for r in aborted}
        check_queues(scheduler, live)
        if step > 5 and not scheduler.has_unfinished_requests():
            break
        plan, done = fake_step(scheduler)
        check_plan(scheduler, plan)
        finished += done
        live -= {r.request_id for r in done}
        check_queues(scheduler, live)
    finished_ids = [r.request_id for r in finished]
    assert sorted(finished_ids) == sorted(r.request_id for r in requests)
    for request in requests:
        if request.status == RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.max_tokens
    assert_pool_idle(scheduler)
