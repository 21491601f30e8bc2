"""EngineCore: the synchronous token-level loop, schedule -> execute -> update, one step a call."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.fault_hooks import FaultHooks
from engine.kv_cache.manager import KVCacheManager
from engine.loader import LoadedModel
from engine.model_runner import (
    ModelRunner,
    ModelRunnerOutput,
    is_fatal_error,
    kv_bytes_per_token,
)
from engine.models import attention_break_even_context
from engine.outputs import EngineCoreOutput, PositionLogprobs
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode.proposer import Proposer, SpecDecodeStats, build_proposer, load_draft

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CoreStepOutput:
    """One step's results: outputs of the sequences that advanced, and the sequences whose
    own content made the step fail (id -> message); the caller fails those."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _PassResults:
    """What the step's passes produced: the tokens and logprobs of the sequences that passed,
    and, when a pass failed, the sequences that fail alone and the blocks they left
    unwritten. Only passes that succeeded add here: a failed pass's rows run again."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    unwritten_block_ids: set[int] = field(default_factory=set)  # garbage KV this step
    num_passed: int = 0  # sequences whose pass succeeded


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
    # sequence's previous token
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_sequences: list[Sequence] = field(default_factory=list)
    spec: SpecDecodeStats | None = None  # this step's verifications (speculative decoding)
    # the prompts of the sequences whose first token came this step, counted whole, and the
    # part of them the prefix cache held: vLLM's prompt-token counters, which count a prompt
    # once when its prefill completes, cache hits included and recomputation not
    num_prefilled_prompt_tokens: int = 0
    num_prefilled_cached_tokens: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, max_model_len: int, *,
                 runner: ModelRunner | None = None) -> None:
        """`runner` stands in for the ModelRunner built from `loaded` (tests pass a fake one);
        the KV pool is sized from whichever runner is used."""
        self.config = config
        self.max_model_len = max_model_len
        draft = load_draft(config, loaded)
        self.runner = runner if runner is not None else ModelRunner(
            loaded, config, max_model_len,
            extra_kv_bytes_per_token=0 if draft is None else kv_bytes_per_token(draft))
        self.kv_cache_manager = KVCacheManager(
            num_blocks=self.runner.num_blocks, block_size=config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            hash_algorithm=config.cache.prefix_caching_hash_algo)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager,
                                   attention_break_even_context(loaded.hf_config))
        self.proposer: Proposer | None = build_proposer(config, draft, self.runner)
        self.last_stats = StepStats()
        self.fault_hooks = FaultHooks()

    def add_sequence(self, sequence: Sequence) -> None:
        self.scheduler.add_sequence(sequence)

    def finish_sequences(self, sequence_ids: list[str], status: SequenceStatus) -> list[Sequence]:
        return self.scheduler.finish_sequences(sequence_ids, status)

    def has_unfinished_sequences(self) -> bool:
        return self.scheduler.has_unfinished_sequences()

    def step(self) -> CoreStepOutput:
        num_preemptions_before = self.scheduler.num_preemptions
        if self.proposer is not None:
            self.proposer.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self.last_stats = self._stats(0, 0, num_preemptions_before, [])
            return CoreStepOutput()
        result = self._execute(plan)
        _commit_prompt_logprobs(plan, result.prompt_logprobs)
        spec_stats = None
        if self.proposer is not None:  # before stops cut the tokens: what verification gave
            self.proposer.observe(plan.rows, result.sampled_token_ids)
            spec_stats = SpecDecodeStats.of_step(plan.rows, result.sampled_token_ids)
        finished = self.scheduler.update_from_output(result.sampled_token_ids)
        result.failed.update(_broken_grammars(plan, result.sampled_token_ids))
        stats = self._stats(_num_prompt_tokens(plan),
                            sum(len(t) for t in result.sampled_token_ids.values()),
                            num_preemptions_before, finished)
        stats.spec = spec_stats
        outputs = self._outputs(plan.scheduled_sequences, result.sampled_token_ids,
                                result.logprobs, stats)
        self.last_stats = stats
        return CoreStepOutput(outputs, result.failed)

    def _execute(self, plan: SchedulerOutput) -> _PassResults:
        """Run the step's batch. When it raises, retry it in smaller groups (order kept) to
        find the sequences that make it fail: they fail alone, the others get the tokens they
        would have got. Errors of the engine itself (out of memory, a lost device, a fault
        that needs no sequence at all) propagate and end the loop."""
        sequences = plan.scheduled_sequences
        try:
            output = self._run(sequences, plan)
            return _PassResults(output.sampled_token_ids, output.logprobs,
                                output.prompt_logprobs)
        except Exception as exc:
            if is_fatal_error(exc):
                raise
            logger.warning("a step of %d sequences failed (%r); retrying them in smaller "
                           "groups to find the cause", len(sequences), exc)
        results = _PassResults()
        self._isolate(sequences, plan, results)
        if results.num_passed == 0:
            self._probe()  # nothing passed: is it the sequences, or the engine?
        return results

    def _isolate(self, group: list[Sequence], plan: SchedulerOutput,
                 results: _PassResults) -> None:
        group = [r for r in group if not self._read_garbage(r, plan, results)]
        if not group:
            return
        try:
            output = self._run(group, plan)
        except Exception as exc:
            if is_fatal_error(exc):
                raise
            if len(group) == 1:
                self._quarantine(group[0], plan, results, exc)
                return
            middle = len(group) // 2
            self._isolate(group[:middle], plan, results)
            self._isolate(group[middle:], plan, results)
            return
        results.sampled_token_ids.update(output.sampled_token_ids)
        results.logprobs.update(output.logprobs)
        results.prompt_logprobs.update(output.prompt_logprobs)
        results.num_passed += len(group)

    def _quarantine(self, sequence: Sequence, plan: SchedulerOutput, results: _PassResults,
                    exc: Exception) -> None:
        logger.error("sequence %s fails the forward pass on its own: %r", sequence.sequence_id,
                     exc)
        results.unwritten_block_ids.update(self.kv_cache_manager.forget_unwritten_blocks(
            sequence, _row_start(sequence, plan)))
        results.failed[sequence.sequence_id] = (
            f"the engine failed while computing this sequence: {exc!r}")

    def _read_garbage(self, sequence: Sequence, plan: SchedulerOutput,
                      results: _PassResults) -> bool:
        """A sequence that hit, in this step, a block a failed sequence never wrote goes back
        to the waiting queue to be recomputed (its own new blocks are garbage as well)."""
        block_ids = self.kv_cache_manager.get_block_ids(sequence.sequence_id)
        if results.unwritten_block_ids.isdisjoint(block_ids):
            return False
        results.unwritten_block_ids.update(self.kv_cache_manager.forget_unwritten_blocks(
            sequence, _row_start(sequence, plan)))
        self.scheduler.reschedule(sequence)
        return True

    def _run(self, sequences: list[Sequence], plan: SchedulerOutput) -> ModelRunnerOutput:
        if self.fault_hooks.on_execute is not None:
            self.fault_hooks.on_execute(sequences)
        block_ids = {r.sequence_id: self.kv_cache_manager.get_block_ids(r.sequence_id)
                     for r in sequences}
        return self.runner.execute(plan.rows_of(sequences), block_ids)

    def _probe(self) -> None:
        """A forward pass of no sequence's making, on scratch KV; raises if the engine is
        broken."""
        if self.fault_hooks.on_execute is not None:
            self.fault_hooks.on_execute([])
        self.runner.probe()

    @staticmethod
    def _outputs(sequences: list[Sequence], sampled: dict[str, list[int]],
                 logprobs: dict[str, list[PositionLogprobs]],
                 stats: StepStats) -> list[EngineCoreOutput]:
        now = time.monotonic()
        outputs = []
        for sequence in sequences:
            token_ids = sampled.get(sequence.sequence_id)
            if token_ids is None:
                continue  # a prefill chunk that has not caught up yet
            timing = sequence.timing
            if timing.first_token is None:
                timing.first_token = now
                stats.time_to_first_tokens.append(now - timing.arrival)
                stats.num_prefilled_prompt_tokens += sequence.num_prompt_tokens
                stats.num_prefilled_cached_tokens += max(sequence.num_cached_tokens, 0)
            else:
                assert timing.last_token is not None
                stats.inter_token_latencies.append(now - timing.last_token)
            timing.last_token = now
            position_logprobs = logprobs.get(sequence.sequence_id)
            outputs.append(EngineCoreOutput(
                sequence_id=sequence.sequence_id, new_token_ids=token_ids,
                # as many as the tokens the sequence kept (see update_from_output)
                new_logprobs=(None if position_logprobs is None
                              else position_logprobs[:len(token_ids)]),
                finish_reason=sequence.status.finish_reason, stop_reason=sequence.stop_reason,
                num_cached_tokens=max(sequence.num_cached_tokens, 0),
                # complete by the first token, and handed out only then
                prompt_logprobs=sequence.take_prompt_logprobs(),
                first_scheduled_time=timing.first_scheduled, time=now))
        return outputs

    def _stats(self, num_prompt: int, num_generation: int, num_preemptions_before: int,
               finished: list[Sequence]) -> StepStats:
        queries, hits = self.kv_cache_manager.take_prefix_cache_stats()
        return StepStats(
            num_prompt_tokens=num_prompt, num_generation_tokens=num_generation,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache_manager.usage,
            num_preemptions=self.scheduler.num_preemptions - num_preemptions_before,
            prefix_cache_queries=queries, prefix_cache_hits=hits, finished_sequences=finished)


def _commit_prompt_logprobs(plan: SchedulerOutput,
                            prompt_logprobs: dict[str, list[PositionLogprobs]]) -> None:
    """Append to each sequence what its successful pass computed: committed only after the
    step's passes, so a failed pass that is retried leaves nothing twice."""
    for sequence_id, entries in prompt_logprobs.items():
        plan.row(sequence_id).sequence.add_prompt_logprobs(entries)


def _broken_grammars(plan: SchedulerOutput,
                     sampled: dict[str, list[int]]) -> dict[str, str]:
    """Sequences whose token broke their grammar: only possible when the request's other
    settings (allowed_token_ids, bad_words, min_tokens) banned every token it allowed. They
    fail rather than stop: their output does not match the constraint."""
    failed = {}
    for sequence_id in sampled:
        grammar = plan.row(sequence_id).sequence.grammar
        if grammar is not None and grammar.is_broken:
            failed[sequence_id] = (
                "the output cannot go on under its constraint: the request's other settings "
                "(allowed_token_ids, bad_words, min_tokens) ban every token it allows")
    return failed


def _row_start(sequence: Sequence, plan: SchedulerOutput) -> int:
    """The first token position this step computes for `sequence`."""
    return plan.row(sequence.sequence_id).start


def _num_prompt_tokens(plan: SchedulerOutput) -> int:
    """Scheduled tokens at prompt positions: prefill work, as opposed to decode."""
    return sum(max(0, min(row.end, row.sequence.num_prompt_tokens) - row.start)
               for row in plan.rows)
