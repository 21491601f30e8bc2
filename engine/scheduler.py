"""Scheduler: continuous batching of sequences into steps under token, sequence and block limits.

One rule covers prefill, chunked prefill and decode: each step, every scheduled sequence's
computed tokens catch up towards its total tokens, as far as the token budget allows. Running
sequences go first (oldest first), then waiting ones. When the KV pool cannot hold a running
sequence's next tokens, the newest running sequence is preempted by recompute.

Long prompts (prefill_tokens_while_decoding): while some sequences decode, the prompt tokens of
a step are capped, each weighted by how far into its context it is (attention grows with the
context, the linear layers do not), so a decoding stream's gap between tokens stays about the
same through another request's whole long prompt; and while requests wait, running prompts
leave half of that allowance (or of the budget) to them, so a short request is not kept
behind a long prompt until it is done.

Speculative decoding: a decoding sequence that carries proposals (spec_token_ids) asks for
1 + k slots, k cut to the token budget and to its max_tokens. Proposals get what is left once
every running and admitted sequence has its own tokens: they never preempt anything nor delay
anyone (without room they are dropped). After verification the sequence keeps the accepted
tokens and gives back the slots and blocks of the rejected ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScheduledRow:
    """One sequence's share of a step: it computes the tokens at [start, end) of its
    all_token_ids followed by spec_token_ids (proposals to verify, only on decode rows: then
    end = num_tokens + len(spec_token_ids)). start is what its KV cache already holds
    (prefix-cache hits included)."""

    sequence: Sequence
    start: int
    end: int
    spec_token_ids: tuple[int, ...] = ()

    @property
    def token_ids(self) -> list[int]:
        """The tokens this row computes."""
        if not self.spec_token_ids:
            return self.sequence.all_token_ids[self.start:self.end]
        return [*self.sequence.all_token_ids[self.start:], *self.spec_token_ids]

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan: the rows that run, in batch order, and the sequences preempted."""

    rows: list[ScheduledRow] = field(default_factory=list)
    preempted_sequence_ids: list[str] = field(default_factory=list)
    _rows_by_id: dict[str, ScheduledRow] = field(default_factory=dict, init=False, repr=False)

    def add(self, row: ScheduledRow) -> None:
        self.rows.append(row)
        self._rows_by_id[row.sequence.sequence_id] = row

    def replace(self, row: ScheduledRow) -> None:
        """Put `row` in place of the same sequence's row (to add proposals to it)."""
        old = self._rows_by_id[row.sequence.sequence_id]
        self.rows[self.rows.index(old)] = row
        self._rows_by_id[row.sequence.sequence_id] = row

    def row(self, sequence_id: str) -> ScheduledRow:
        return self._rows_by_id[sequence_id]

    def rows_of(self, sequences: Iterable[Sequence]) -> list[ScheduledRow]:
        """The rows of some of this step's sequences (a retried group), in their order."""
        return [self._rows_by_id[sequence.sequence_id] for sequence in sequences]

    @property
    def scheduled_sequences(self) -> list[Sequence]:
        return [row.sequence for row in self.rows]

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {row.sequence.sequence_id: row.num_new_tokens for row in self.rows}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(row.num_new_tokens for row in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


@dataclass(slots=True)
class PrefillAllowance:
    """What one step may spend on prompt tokens, in tokens at context 0 (a token after c others
    costs 1 + c / break_even_context), and how much of it running prompts may take."""

    left: float
    running_left: float
    break_even_context: float | None  # None: every token costs 1

    def cost(self, start: int) -> float:
        return 1.0 if self.break_even_context is None else 1.0 + start / self.break_even_context

    def tokens(self, start: int, running: bool) -> int:
        """The most prompt tokens from `start` this allowance pays for; at least one while any
        of it is left, so even a very long context advances."""
        left = min(self.left, self.running_left) if running else self.left
        if left <= 0:
            return 0
        if math.isinf(left):
            return 1 << 62
        return max(1, int(left / self.cost(start)))

    def spend(self, start: int, num_tokens: int, running: bool) -> None:
        cost = num_tokens * self.cost(start)
        self.left -= cost
        if running:
            self.running_left -= cost


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 break_even_context: float | None = None) -> None:
        """`break_even_context`: the context length at which a prompt token's attention costs
        as much as its linear layers (engine.models.attention_break_even_context); None:
        prompt tokens cost the same at any context."""
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.break_even_context = break_even_context
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self.num_preemptions = 0  # cumulative, read by the stats logger

    # ---- admission and removal -------------------------------------------------------------

    def add_sequence(self, sequence: Sequence) -> None:
        # never refuses: max_queue_len is enforced at admission (AsyncEngine), which counts
        # a sequence's every sequence; raising here, inside a step, would fail the step
        self.waiting.append(sequence)
        self.sequences[sequence.sequence_id] = sequence

    def finish_sequences(self, sequence_ids: Iterable[str],
                         status: SequenceStatus) -> list[Sequence]:
        """Finish (abort, stop on a stop string, fail) sequences by id; frees their blocks now.
        Unknown or already finished ids are ignored, so aborts are idempotent."""
        finished = []
        for sequence_id in sequence_ids:
            sequence = self.sequences.pop(sequence_id, None)
            if sequence is None:
                continue
            if sequence.status == SequenceStatus.RUNNING:
                self.running.remove(sequence)
            else:
                self.waiting.remove(sequence)
            self._finish(sequence, status)
            finished.append(sequence)
        return finished

    def _finish(self, sequence: Sequence, status: SequenceStatus) -> None:
        sequence.status = status
        self.kv_cache_manager.free(sequence)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_sequences(self) -> bool:
        return bool(self.sequences)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        allowance = self._prefill_allowance(budget)
        proposals = self._take_proposals()
        budget = self._schedule_running(output, budget, allowance)
        if not output.preempted_sequence_ids:
            # admitting new work in a step that had to preempt would only thrash the pool
            budget = self._schedule_waiting(output, budget, allowance)
        if proposals:
            self._schedule_proposals(output, proposals, budget)
        # counted before the pass that writes [start, end): a row whose pass fails is failed or
        # recomputed from its prompt by the core, never resumed from here
        for row in output.rows:
            row.sequence.num_computed_tokens = row.end
        return output

    def _prefill_allowance(self, budget: int) -> PrefillAllowance | None:
        """This step's allowance for prompt tokens; None without prefill_tokens_while_decoding
        (prompts then take whatever the budget leaves)."""
        cap = self.config.prefill_tokens_while_decoding
        if cap is None:
            return None
        decoding = any(sequence.is_decoding for sequence in self.running)
        total = float(cap) if decoding else math.inf
        newcomers = bool(self.waiting) and len(self.running) < self.config.max_num_seqs
        running_share = (cap if decoding else budget) / 2 if newcomers else math.inf
        return PrefillAllowance(total, running_share,
                                self.break_even_context if decoding else None)

    def _schedule_running(self, output: SchedulerOutput, budget: int,
                          allowance: PrefillAllowance | None) -> int:
        # under an allowance, the decode rows behind a prompt keep their slot of the budget
        num_decoding_behind = (0 if allowance is None
                               else sum(1 for sequence in self.running if sequence.is_decoding))
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            start = sequence.num_computed_tokens
            num_new_tokens = min(sequence.num_tokens - start, budget)
            prefilling = allowance is not None and not sequence.is_decoding
            if allowance is not None and not prefilling:
                num_decoding_behind -= 1
            if prefilling:
                assert allowance is not None
                num_new_tokens = min(num_new_tokens, budget - num_decoding_behind,
                                     allowance.tokens(start, running=True))
                if num_new_tokens <= 0:
                    index += 1  # this prompt sits the step out
                    continue
            if not self._allocate_or_preempt(sequence, num_new_tokens, output):
                break  # the sequence itself was preempted: nothing newer is left to run
            if prefilling:
                assert allowance is not None
                allowance.spend(start, num_new_tokens, running=True)
            self._add_scheduled(output, sequence, start, num_new_tokens)
            budget -= num_new_tokens
            index += 1
        return budget

    def _take_proposals(self) -> dict[str, list[int]]:
        """The running decoding sequences' proposals, taken off them (a proposal is offered
        once; a sequence that is not decoding has none to verify)."""
        proposals = {}
        for sequence in self.running:
            if sequence.spec_token_ids and sequence.is_decoding:
                proposals[sequence.sequence_id] = sequence.spec_token_ids
            sequence.spec_token_ids = []
        return proposals

    def _schedule_proposals(self, output: SchedulerOutput, proposals: dict[str, list[int]],
                            budget: int) -> None:
        """Add proposals to the decode rows that have some, oldest first, from the budget and
        the blocks left over: each cut so that every accepted token plus the one sampled after
        them fits max_tokens; dropped where no block is free for them."""
        for row in list(output.rows):
            sequence = row.sequence
            row_proposals = proposals.get(sequence.sequence_id)
            if not row_proposals or budget <= 0:
                continue
            room = min(budget, sequence.max_tokens - sequence.num_output_tokens - 1)
            spec_token_ids = tuple(row_proposals[:max(room, 0)])
            if not spec_token_ids or self.kv_cache_manager.allocate_slots(
                    sequence, row.num_new_tokens + len(spec_token_ids)) is None:
                continue
            output.replace(ScheduledRow(sequence, row.start, row.end + len(spec_token_ids),
                                        spec_token_ids))
            budget -= len(spec_token_ids)

    def _allocate_or_preempt(self, sequence: Sequence, num_new_tokens: int,
                             output: SchedulerOutput) -> bool:
        """Allocate blocks for `sequence`, preempting the newest running sequences until it fits.
        Returns False when `sequence` had to be preempted itself."""
        while self.kv_cache_manager.allocate_slots(sequence, num_new_tokens) is None:
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted_sequence_ids.append(victim.sequence_id)
            if victim is sequence:
                return False
        return True

    def reschedule(self, sequence: Sequence) -> None:
        """Send a running sequence back to the head of the waiting queue to be recomputed from
        its prompt (the KV it read this step is not to be trusted)."""
        self.running.remove(sequence)
        self._preempt(sequence)

    def _preempt(self, sequence: Sequence) -> None:
        # recompute, not swap: the blocks go back to the pool (cached blocks stay hits)
        self.kv_cache_manager.free(sequence)
        sequence.status = SequenceStatus.PREEMPTED
        sequence.num_computed_tokens = 0
        sequence.spec_token_ids = []
        sequence.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)
        logger.debug("preempted sequence %s", sequence.sequence_id)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int,
                          allowance: PrefillAllowance | None) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            sequence = self.waiting[0]
            computed_blocks, num_cached_tokens = self.kv_cache_manager.get_computed_blocks(sequence)
            num_new_tokens = min(sequence.num_tokens - num_cached_tokens, budget)
            if allowance is not None:
                num_new_tokens = min(num_new_tokens,
                                     allowance.tokens(num_cached_tokens, running=False))
                if num_new_tokens <= 0:
                    break
            new_blocks = self.kv_cache_manager.allocate_slots(
                sequence, num_new_tokens, computed_blocks, num_cached_tokens)
            if new_blocks is None:
                break  # keep FIFO order: later sequences wait behind this one
            self.waiting.popleft()
            if allowance is not None:
                allowance.spend(num_cached_tokens, num_new_tokens, running=False)
            self._start_running(sequence, num_cached_tokens)
            self._add_scheduled(output, sequence, num_cached_tokens, num_new_tokens)
            budget -= num_new_tokens
        return budget

    def _start_running(self, sequence: Sequence, num_cached_tokens: int) -> None:
        sequence.num_computed_tokens = num_cached_tokens
        if sequence.num_cached_tokens < 0:  # the first schedule; a resumed sequence keeps its count
            sequence.num_cached_tokens = num_cached_tokens
            sequence.timing.first_scheduled = time.monotonic()
        sequence.status = SequenceStatus.RUNNING
        self.running.append(sequence)

    @staticmethod
    def _add_scheduled(output: SchedulerOutput, sequence: Sequence, start: int,
                       num_new_tokens: int) -> None:
        output.add(ScheduledRow(sequence, start, start + num_new_tokens))

    # ---- after the step -------------------------------------------------------------------

    def update_from_output(self, sampled_token_ids: dict[str, list[int]]) -> list[Sequence]:
        """Append each sequence's new tokens (one, or with speculation the accepted proposals
        and the token sampled after them), finishing it at the first that hits EOS, a stop
        token id, max_tokens or the context limit: later ones are dropped (cut from the list
        in `sampled_token_ids`, which then holds the tokens each sequence kept). Returns the
        sequences finished this step."""
        finished = []
        for sequence_id, token_ids in sampled_token_ids.items():
            sequence = self.sequences[sequence_id]
            for index, token_id in enumerate(token_ids):
                sequence.append_output_token_id(token_id)
                status = self._check_stop(sequence, token_id)
                if status is not None:
                    finished.extend(self.finish_sequences([sequence_id], status))
                    del token_ids[index + 1:]
                    break
            else:
                self._settle(sequence)
        return finished

    def _settle(self, sequence: Sequence) -> None:
        """After a sampling pass: the KV holds every token but the newest (accepted proposals
        included); the slots and blocks of rejected proposals go back to the pool."""
        if sequence.num_computed_tokens >= sequence.num_tokens:
            sequence.num_computed_tokens = sequence.num_tokens - 1
            self.kv_cache_manager.trim(sequence, sequence.num_tokens)

    def _check_stop(self, sequence: Sequence, token_id: int) -> SequenceStatus | None:
        params = sequence.sampling_params
        grammar = sequence.grammar
        if grammar is not None and grammar.is_broken:
            return None  # not a stop of any kind: the core fails it (its output cannot match)
        if sequence.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in params.eos_token_ids:
                sequence.stop_reason = None  # EOS is reported as a plain "stop"
                return SequenceStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                sequence.stop_reason = token_id
                return SequenceStatus.FINISHED_STOPPED
        if grammar is not None and grammar.is_finished:
            # the output is complete (only end-of-sequence could follow), whatever min_tokens
            # or ignore_eos say: the grammar allows nothing else
            sequence.stop_reason = None
            return SequenceStatus.FINISHED_STOPPED
        if sequence.num_output_tokens >= sequence.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        return None
