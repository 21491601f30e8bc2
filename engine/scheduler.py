"""Scheduler: continuous batching of requests into steps under token, sequence and block limits.

One rule covers prefill, chunked prefill and decode: each step, every scheduled request's
computed tokens catch up towards its total tokens, as far as the token budget allows. Running
requests go first (oldest first), then waiting ones. When the KV pool cannot hold a running
request's next tokens, the newest running request is preempted by recompute.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScheduledRow:
    """One request's share of a step: it computes the tokens at [start, end) of its
    all_token_ids. start is what its KV cache already holds (prefix-cache hits included)."""

    request: Request
    start: int
    end: int

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan: the rows that run, in batch order, and the requests preempted."""

    rows: list[ScheduledRow] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    _rows_by_id: dict[str, ScheduledRow] = field(default_factory=dict, init=False, repr=False)

    def add(self, row: ScheduledRow) -> None:
        self.rows.append(row)
        self._rows_by_id[row.request.request_id] = row

    def row(self, request_id: str) -> ScheduledRow:
        return self._rows_by_id[request_id]

    def rows_of(self, requests: Iterable[Request]) -> list[ScheduledRow]:
        """The rows of some of this step's requests (a retried group), in their order."""
        return [self._rows_by_id[request.request_id] for request in requests]

    @property
    def scheduled_requests(self) -> list[Request]:
        return [row.request for row in self.rows]

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {row.request.request_id: row.num_new_tokens for row in self.rows}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(row.num_new_tokens for row in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # cumulative, read by the stats logger

    # ---- admission and removal -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        # never refuses: max_queue_len is enforced at admission (AsyncEngine), which counts
        # a request's every sequence; raising here, inside a step, would fail the step
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, stop on a stop string, fail) requests by id; frees their blocks now.
        Unknown or already finished ids are ignored, so aborts are idempotent."""
        finished = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv_cache_manager.free(request)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(output, budget)
        if not output.preempted_request_ids:
            # admitting new work in a step that had to preempt would only thrash the pool
            self._schedule_waiting(output, budget)
        # counted before the pass that writes [start, end): a row whose pass fails is failed or
        # recomputed from its prompt by the core, never resumed from here
        for row in output.rows:
            row.request.num_computed_tokens = row.end
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new_tokens, output):
                break  # the request itself was preempted: nothing newer is left to run
            self._add_scheduled(output, request, request.num_computed_tokens, num_new_tokens)
            budget -= num_new_tokens
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int,
                             output: SchedulerOutput) -> bool:
        """Allocate blocks for `request`, preempting the newest running requests until it fits.
        Returns False when `request` had to be preempted itself."""
        while self.kv_cache_manager.allocate_slots(request, num_new_tokens) is None:
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def reschedule(self, request: Request) -> None:
        """Send a running request back to the head of the waiting queue to be recomputed from
        its prompt (the KV it read this step is not to be trusted)."""
        self.running.remove(request)
        self._preempt(request)

    def _preempt(self, request: Request) -> None:
        # recompute, not swap: the blocks go back to the pool (cached blocks stay hits)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted request %s", request.request_id)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_cached_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new_tokens = min(request.num_tokens - num_cached_tokens, budget)
            new_blocks = self.kv_cache_manager.allocate_slots(
                request, num_new_tokens, computed_blocks, num_cached_tokens)
            if new_blocks is None:
                break  # keep FIFO order: later requests wait behind this one
            self.waiting.popleft()
            self._start_running(request, num_cached_tokens)
            self._add_scheduled(output, request, num_cached_tokens, num_new_tokens)
            budget -= num_new_tokens

    def _start_running(self, request: Request, num_cached_tokens: int) -> None:
        request.num_computed_tokens = num_cached_tokens
        if request.num_cached_tokens < 0:  # the first schedule; a resumed request keeps its count
            request.num_cached_tokens = num_cached_tokens
            request.timing.first_scheduled = time.monotonic()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @staticmethod
    def _add_scheduled(output: SchedulerOutput, request: Request, start: int,
                       num_new_tokens: int) -> None:
        output.add(ScheduledRow(request, start, start + num_new_tokens))

    # ---- after the step -------------------------------------------------------------------

    def update_from_output(self, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Append each sampled token, then finish requests that hit EOS, a stop token id,
        max_tokens or the context limit. Returns the requests finished this step."""
        finished = []
        for request_id, token_id in sampled_token_ids.items():
            request = self.requests[request_id]
            request.append_output_token_id(token_id)
            status = self._check_stop(request, token_id)
            if status is not None:
                finished.extend(self.finish_requests([request_id], status))
        return finished

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in params.eos_token_ids:
                request.stop_reason = None  # EOS is reported as a plain "stop"
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
