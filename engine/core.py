"""EngineCore: the synchronous token-level loop, schedule -> execute -> update, one step a call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.kv_cache.manager import KVCacheManager
from engine.loader import LoadedModel
from engine.model_runner import ModelRunner, ModelRunnerOutput, PositionLogprobs
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did to one request: new tokens and, when it ended, why."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class FaultHooks:
    """Fault injection for tests: every hook is None in production. A hook injects a fault by
    raising; where it is called decides what the fault takes down."""

    on_step: Callable[[], None] | None = None  # start of LLMEngine.step: the engine loop dies
    # before the forward pass, with the step's batch: that batch's requests fail
    on_execute: Callable[[list[Request]], None] | None = None
    # per sequence output, in output processing: that one request fails
    on_request_output: Callable[[Request], None] | None = None


class BatchFailedError(Exception):
    """The forward pass (or sampling) of one step raised. Its requests cannot be trusted to
    continue, but nothing outside the batch is harmed: the engine fails just these."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"the engine step failed: {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


@dataclass(slots=True)
class StepStats:
    """Per-step figures for the metrics logger; computed once per step, never per token."""

    num_prompt_tokens: int = 0  # prefill tokens computed this step
    num_generation_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # this step
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # latencies of this step's tokens, in seconds: first tokens from arrival, others from the
    # request's previous token
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[Request] = field(default_factory=list)


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.runner = ModelRunner(loaded, config, max_model_len)
        self.kv_cache_manager = KVCacheManager(
            num_blocks=self.runner.num_blocks, block_size=config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.last_stats = StepStats()
        self.fault_hooks = FaultHooks()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        finished = self.scheduler.finish_requests(request_ids, status)
        self.runner.release([r.request_id for r in finished])
        return finished

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        num_preemptions_before = self.scheduler.num_preemptions
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self.last_stats = self._stats(0, 0, num_preemptions_before, [])
            return []
        result = self._execute(plan)
        finished = self.scheduler.update_from_output(result.sampled_token_ids)
        self.runner.release([r.request_id for r in finished])
        stats = self._stats(_num_prompt_tokens(plan), len(result.sampled_token_ids),
                            num_preemptions_before, finished)
        outputs = self._outputs(plan.scheduled_requests, result.sampled_token_ids,
                                result.logprobs, stats)
        self.last_stats = stats
        return outputs

    def _execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        """Run the batch; any exception becomes BatchFailedError naming the batch's requests."""
        requests = plan.scheduled_requests
        try:
            if self.fault_hooks.on_execute is not None:
                self.fault_hooks.on_execute(requests)
            block_ids = {r.request_id: self.kv_cache_manager.get_block_ids(r.request_id)
                         for r in requests}
            return self.runner.execute(requests, plan.num_scheduled_tokens, block_ids)
        except Exception as exc:
            logger.exception("step failed for a batch of %d requests", len(requests))
            self.kv_cache_manager.uncache_unwritten_blocks(requests)
            raise BatchFailedError([r.request_id for r in requests], exc) from exc

    @staticmethod
    def _outputs(requests: list[Request], sampled: dict[str, int],
                 logprobs: dict[str, PositionLogprobs], stats: StepStats) -> list[EngineCoreOutput]:
        now = time.monotonic()
        outputs = []
        for request in requests:
            token_id = sampled.get(request.request_id)
            if token_id is None:
                continue  # a prefill chunk that has not caught up yet
            timing = request.timing
            if timing.first_token is None:
                timing.first_token = now
                stats.time_to_first_tokens.append(now - timing.arrival)
            else:
                assert timing.last_token is not None
                stats.inter_token_latencies.append(now - timing.last_token)
            timing.last_token = now
            position_logprobs = logprobs.get(request.request_id)
            outputs.append(EngineCoreOutput(
                request=request, new_token_ids=[token_id],
                new_logprobs=None if position_logprobs is None else [position_logprobs],
                finish_reason=request.status.finish_reason))
        return outputs

    def _stats(self, num_prompt: int, num_generation: int, num_preemptions_before: int,
               finished: list[Request]) -> StepStats:
        queries, hits = self.kv_cache_manager.take_prefix_cache_stats()
        return StepStats(
            num_prompt_tokens=num_prompt, num_generation_tokens=num_generation,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache_manager.usage,
            num_preemptions=self.scheduler.num_preemptions - num_preemptions_before,
            prefix_cache_queries=queries, prefix_cache_hits=hits, finished_requests=finished)


def _num_prompt_tokens(plan: SchedulerOutput) -> int:
    """Scheduled tokens at prompt positions: prefill work, as opposed to decode."""
    total = 0
    for request in plan.scheduled_requests:
        end = request.num_computed_tokens
        start = end - plan.num_scheduled_tokens[request.request_id]
        total += max(0, min(end, request.num_prompt_tokens) - start)
    return total
