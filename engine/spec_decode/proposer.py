"""Proposers: before each step, offer the running sequences tokens to verify; after it, learn
what the verifications accepted (the policy in policy.py sizes the next proposals by it)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from collections.abc import Sequence as Sequences
from dataclasses import dataclass, field
from typing import Protocol

from engine.config import EngineConfig, SpeculativeConfig
from engine.loader import LoadedModel
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledRow
from engine.sequence import Sequence
from engine.spec_decode.draft_model import DraftModel, load_draft_model
from engine.spec_decode.ngram import propose_ngram
from engine.spec_decode.policy import ProposalBudget

logger = logging.getLogger(__name__)
CALIBRATION_REPEATS = 3


class Proposer(Protocol):
    def propose(self, running: Sequences[Sequence]) -> None:
        """Set every running sequence's spec_token_ids ([] for none) for the next step."""

    def observe(self, rows: Sequences[ScheduledRow],
                sampled_token_ids: dict[str, list[int]]) -> None:
        """After the step's pass: what each verifying row accepted."""


class _Drafting:
    """Who proposes this step, and how many tokens each: the decoding sequences, while the
    batch is no larger than disable_by_batch_size (past it, verifying k more tokens per row
    costs real compute), each as many as the policy gives it. Constrained sequences
    (structured outputs) get none: their grammar advances only on committed tokens."""

    def __init__(self, config: SpeculativeConfig, target: ModelRunner) -> None:
        self.config = config
        # the cost of a verified token is timed on the first step, on the thread that steps
        # the engine: timing it during setup would start a second OpenMP team (runtime.py)
        self._target: ModelRunner | None = target if config.adaptive else None
        self.budget = ProposalBudget(config.num_speculative_tokens, 0.0,
                                     adaptive=config.adaptive)

    def select(self, running: Sequences[Sequence]) -> list[tuple[Sequence, int]]:
        """(sequence, most proposals) for the sequences to propose for. The others have none:
        the scheduler takes every proposal off its sequence each step."""
        if self._target is not None:
            self.budget.token_cost = verify_token_cost(self._target,
                                                       self.config.num_speculative_tokens)
            self._target = None
            logger.info("speculative decoding (%s, up to %d tokens): verifying a token costs "
                        "%.2f of a decode step here; proposals are sized to each sequence's "
                        "acceptance", self.config.method, self.config.num_speculative_tokens,
                        self.budget.token_cost)
        self.budget.forget_all_but({sequence.sequence_id for sequence in running})
        limit = self.config.disable_by_batch_size
        if limit is not None and len(running) > limit:
            return []
        chosen = []
        for sequence in running:
            if sequence.is_decoding and sequence.grammar is None:
                num_proposals = self.budget.num_proposals(sequence.sequence_id)
                if num_proposals:
                    chosen.append((sequence, num_proposals))
        return chosen

    def observe(self, rows: Sequences[ScheduledRow],
                sampled_token_ids: dict[str, list[int]]) -> None:
        for row, num_accepted in verifications(rows, sampled_token_ids):
            self.budget.observe(row.sequence.sequence_id, len(row.spec_token_ids), num_accepted)


class NgramProposer(_Drafting):
    """Prompt lookup (ngram.py) for each drafting sequence."""

    def propose(self, running: Sequences[Sequence]) -> None:
        config = self.config
        for sequence, num_proposals in self.select(running):
            sequence.spec_token_ids = propose_ngram(
                sequence.all_token_ids, num_proposals, config.prompt_lookup_min,
                config.prompt_lookup_max)


class DraftModelProposer(_Drafting):
    """A draft model's greedy proposals for each drafting sequence (see draft_model.py for
    why greedy keeps verification exact)."""

    def __init__(self, config: SpeculativeConfig, target: ModelRunner,
                 draft: DraftModel) -> None:
        super().__init__(config, target)
        self.draft = draft

    def propose(self, running: Sequences[Sequence]) -> None:
        self.draft.release(running)
        chosen = self.select(running)
        if not chosen:
            return
        sequences = [sequence for sequence, _ in chosen]
        proposals = self.draft.propose(sequences, max(num for _, num in chosen))
        for (sequence, num_proposals), drafted in zip(chosen, proposals, strict=True):
            sequence.spec_token_ids = drafted[:num_proposals]


def load_draft(config: EngineConfig, target: LoadedModel) -> LoadedModel | None:
    """The draft model, when the method has one. Loaded before the target's KV pool is
    sized, which pays for the draft's cache (as many blocks) from the same budget."""
    if config.speculative is None or config.speculative.method != "draft_model":
        return None
    return load_draft_model(config, target)


def build_proposer(config: EngineConfig, draft: LoadedModel | None,
                   target: ModelRunner) -> Proposer | None:
    """The configured proposer; `draft` from load_draft, `target` the target's runner (the
    draft's pool gets as many blocks, its proposals stay within the target's vocabulary)."""
    speculative = config.speculative
    if speculative is None:
        return None
    if not speculative.adaptive:
        logger.info("speculative decoding (%s): %d tokens proposed at every decode step",
                    speculative.method, speculative.num_speculative_tokens)
    if speculative.method == "ngram":
        return NgramProposer(speculative, target)
    assert speculative.method == "draft_model" and draft is not None, "load_draft comes first"
    return DraftModelProposer(speculative, target, DraftModel(
        draft, config, target.num_blocks, target.vocab_size))


def verify_token_cost(target: ModelRunner, num_speculative_tokens: int) -> float:
    """The marginal cost of verifying one more token in a pass, as a fraction of a one-token
    step: timed on the target's own runner (a pass of 1 + k tokens against a pass of one, on
    scratch KV, median of a few; .tolist() syncs a device), since it depends on the device,
    dtype and kernels at hand."""
    def timed(num_tokens: int) -> float:
        times = []
        for _ in range(CALIBRATION_REPEATS):
            start = time.perf_counter()
            # a verifying row: every position through the LM head and the sampler
            target.dummy_step(num_tokens, num_tokens, prompt_logprobs=False).tolist()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    timed(1 + num_speculative_tokens)  # warm-up
    one, many = timed(1), timed(1 + num_speculative_tokens)
    return max(0.0, (many - one) / (one * num_speculative_tokens))


@dataclass(slots=True)
class SpecDecodeStats:
    """One step's verifications, as vLLM counts them: rows that verified proposals (drafts),
    proposals, accepted proposals, and accepted proposals by position (0: the first)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @classmethod
    def of_step(cls, rows: Sequences[ScheduledRow],
                sampled_token_ids: dict[str, list[int]]) -> SpecDecodeStats:
        """From the step's plan and the runner's tokens (before stops cut them)."""
        stats = cls()
        for row, num_accepted in verifications(rows, sampled_token_ids):
            stats.num_drafts += 1
            stats.num_draft_tokens += len(row.spec_token_ids)
            stats.num_accepted_tokens += num_accepted
            if len(stats.accepted_per_position) < len(row.spec_token_ids):
                stats.accepted_per_position += [0] * (
                    len(row.spec_token_ids) - len(stats.accepted_per_position))
            for position in range(num_accepted):
                stats.accepted_per_position[position] += 1
        return stats


def verifications(rows: Sequences[ScheduledRow],
                  sampled_token_ids: dict[str, list[int]]) -> Iterator[tuple[ScheduledRow, int]]:
    """(row, proposals accepted) for each row that verified proposals in a pass that
    succeeded, from the runner's tokens before stops cut them: the accepted ones plus one."""
    for row in rows:
        token_ids = sampled_token_ids.get(row.sequence.sequence_id)
        if row.spec_token_ids and token_ids is not None:
            yield row, len(token_ids) - 1
